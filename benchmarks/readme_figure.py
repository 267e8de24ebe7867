"""The README's picture: test images a subject saw, and under each the image decoded from its fMRI.

Reads ``RESULTS/SUBJECT/samples/samples.h5`` of a finished ``make decode`` run (the ``generate`` stage's
file; layout in ``mindvis/generate/``):

* ``true_images``: [N, H, W, C] uint8 (0..255) or float (0..1), the test images;
* ``samples``: [N, k, H, W, C], the k decoded samples per test stimulus (the first is drawn);
* ``label``: [N] int, the class of each test image; ``stimulus_id``: [N] str (the order of the columns);
* attributes ``class_names`` (JSON list) and ``config`` (JSON; ``stimuli.novel_classes`` marks the classes
  never paired with fMRI in training).

It draws one column per class, the class's first test stimulus by ``stimulus_id``, up to ``--n-stimuli``
columns: the true image on top, the first decoded sample below, the class name as the title (``*`` marks a
novel class). ``--also FOLDER=LABEL`` adds a row of another decoder's first samples of the same stimuli
(``RESULTS/SUBJECT/FOLDER/samples.h5``, e.g. ``samples-prior``, the DC-LDM through its embedding prior).
Nothing is random, so the same run gives the same PNG.

Usage::

    python benchmarks/readme_figure.py --results results --out docs/images/decoded.png \
        [--also "samples-prior=+ embedding prior"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen


def to_uint8(images):
    """Images as uint8 for display.

    Parameters
    ----------
    images : ndarray
        [..., H, W, C], uint8 (0..255) or float (0..1).

    Returns
    -------
    ndarray
        [..., H, W, C] uint8.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return (np.clip(images.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def pick_stimuli(labels, stimulus_ids, n_stimuli):
    """Indices of the first test stimulus (by ``stimulus_id``) of each class, classes in order.

    Parameters
    ----------
    labels : ndarray
        [N] int, each test stimulus's class.
    stimulus_ids : sequence of str
        [N], used only to order the stimuli of a class.
    n_stimuli : int
        At most this many indices.

    Returns
    -------
    list of int
    """
    order = sorted(range(len(labels)), key=lambda index: stimulus_ids[index])
    first_of_class = {}
    for index in order:
        first_of_class.setdefault(int(labels[index]), index)
    return [first_of_class[cls] for cls in sorted(first_of_class)][:n_stimuli]


def read_samples(path):
    """The arrays and attributes the figure needs from one ``samples.h5``."""
    with h5py.File(path, "r") as handle:
        stimulus_ids = [value.decode() if isinstance(value, bytes) else str(value)
                        for value in handle["stimulus_id"][()]]
        config = json.loads(handle.attrs["config"]) if "config" in handle.attrs else {}
        return {
            "true_images": handle["true_images"][()],
            "samples": handle["samples"][()],
            "label": handle["label"][()],
            "stimulus_id": stimulus_ids,
            "class_names": json.loads(handle.attrs["class_names"]),
            "novel_classes": set(config.get("stimuli", {}).get("novel_classes", [])),
        }


def draw(data, indices, out, subject, dpi=100, also=()):
    """Write the grid (true images over the first decoded samples, then one row per ``also`` entry, a
    ``(label, samples [N, k, H, W, C])`` pair of the same stimuli) to ``out`` as PNG."""
    columns = len(indices)
    rows = [("true", data["true_images"][:, None]), ("decoded", data["samples"]), *also]
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns, 0.5 + 1.05 * len(rows)), squeeze=False)
    for column, index in enumerate(indices):
        cls = int(data["label"][index])
        name = data["class_names"][cls] + (" *" if cls in data["novel_classes"] else "")
        for row, image in enumerate(images[index, 0] for _, images in rows):
            image = to_uint8(image)
            axis = axes[row, column]
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                axis.imshow(image, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(name, fontsize=7)
    for row, (label, _) in enumerate(rows):
        axes[row, 0].set_ylabel(label, fontsize=8)
    figure.suptitle(f"{subject}: test images (top) and the first decoded sample of each decoder; * novel class",
                    fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    out.parent.mkdir(parents=True, exist_ok=True)
    # No date or software version in the file, so a rerun on the same run writes the same bytes.
    figure.savefig(out, dpi=dpi, metadata={"Software": None})
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a finished run's results/ folder")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--subject", default="sub-01")
    parser.add_argument("--n-stimuli", type=int, default=10, help="columns, one class each (default 10)")
    parser.add_argument("--also", action="append", default=[], metavar="FOLDER=LABEL",
                        help="another samples folder of the subject drawn as a row, with its label")
    args = parser.parse_args(argv)
    path = args.results / args.subject / "samples" / "samples.h5"
    if not path.is_file():
        sys.exit(f"readme_figure: {path}: not found; give --results the results/ folder of a finished run")
    data = read_samples(path)
    indices = pick_stimuli(data["label"], data["stimulus_id"], args.n_stimuli)
    also = []
    for entry in args.also:
        folder, _, label = entry.partition("=")
        other = read_samples(args.results / args.subject / folder / "samples.h5")
        if other["stimulus_id"] != data["stimulus_id"]:
            sys.exit(f"readme_figure: {folder}/samples.h5 holds other stimuli than samples/samples.h5")
        also.append((label or folder, other["samples"]))
    draw(data, indices, args.out, args.subject, also=also)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes; {args.subject}, stimuli "
          f"{', '.join(data['stimulus_id'][index] for index in indices)})")


if __name__ == "__main__":
    main()
