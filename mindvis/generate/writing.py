"""Writing generated images: PNG files, a grid (ground truth beside its samples) and ``samples.h5``.

Layout of ``samples.h5``
------------------------
=========================  ===========================  ==============================================
item                       dtype / shape                meaning
=========================  ===========================  ==============================================
``samples``                uint8 [N, k, H, W, C]        k samples per stimulus (generator size/channels)
``true_images``            uint8 [N, H0, W0, C0]        the images seen (as in ``stimuli.h5``)
``stimulus_id``            UTF-8 str [N]                stimulus ids (``stimuli.h5``)
``label``                  int64 [N]                    true class of each stimulus
``seeds``                  int64 [N, k]                 the seed of each sample's noise
``predicted_label``        int64 [N, k]                 domain classifier's top-1 (when given one)
``embedding``              float32 [N, ...]             each row's decoded image-prior embedding (the
                                                        decoder's output, ``DCLDM.embedding``, where its
                                                        condition lives in the prior's embedding space;
                                                        evaluate's ``ridge-embedding`` row: the ridge's
                                                        prediction); absent otherwise and in files
                                                        written before it (evaluate then scores no
                                                        retrieval for the row)
``attention/maps``         float16 [S, A, h, w, T]      cross-attention maps over the S denoising steps
                                                        for A stimuli (sample 0), averaged over heads
                                                        and layers, at latent resolution, T tokens
``attention/stimulus_id``  UTF-8 str [A]                which stimuli
``attention/timesteps``    int64 [S]                    the scheduler timestep of each step
``attention/token_weights`` float32 [T, 1 + L]          how each context token mixes the encoder's
                                                        class token and L patch tokens (absolute,
                                                        normalised weights of the token mapping); patch
                                                        token l holds voxels [l * patch_size,
                                                        (l + 1) * patch_size) of ``responses.h5``
=========================  ===========================  ==============================================

File attributes: ``subject``, ``model_dir``, ``sampler``, ``steps``,
``guidance_scale``, ``eta``, ``n_samples``, ``split``, ``class_names`` (JSON),
``classifier_top1_mean`` / ``classifier_top1_best_of_k`` (when scored),
``patch_size``, ``n_voxels``, ``config`` (JSON), ``versions`` (JSON),
``format_version`` (1).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from mindvis.utils.io import atomic_path, hdf5_for_writing

FORMAT_VERSION = 1
#: The file name of a samples folder's HDF5 (the generate stage's and the evaluated baselines').
SAMPLES_FILE = "samples.h5"


def _as_pil(image):
    """uint8 [H, W, C] -> PIL image (grey for C = 1)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(path, image):
    """Write one uint8 [H, W, C] image as PNG, atomically."""
    with atomic_path(path) as tmp:
        _as_pil(image).save(tmp, format="PNG")


def _to_rgb(images):
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def make_grid(rows, truth=None, pad=2):
    """Tile images into one uint8 RGB array.

    Parameters
    ----------
    rows : uint8 [R, K, H, W, C]
        K images per row.
    truth : uint8 [R, H, W, C], optional
        Shown first in each row, separated by a wider gap (resized to H x W if needed).
    pad : int
        Pixels between tiles (white).
    """
    rows = _to_rgb(np.asarray(rows))
    n_rows, n_cols, height, width = rows.shape[:4]
    if truth is not None:
        truth = _to_rgb(np.asarray(truth))
        if truth.shape[1:3] != (height, width):
            truth = np.stack([np.asarray(Image.fromarray(t).resize((width, height), Image.BILINEAR)) for t in truth])
    extra = (width + 2 * pad) if truth is not None else 0
    grid = np.full((n_rows * (height + pad) + pad, extra + n_cols * (width + pad) + pad, 3), 255, np.uint8)
    for r in range(n_rows):
        top = pad + r * (height + pad)
        if truth is not None:
            grid[top:top + height, pad:pad + width] = truth[r]
        for c in range(n_cols):
            left = extra + pad + c * (width + pad)
            grid[top:top + height, left:left + width] = rows[r, c]
    return grid


def save_grid(path, rows, truth=None):
    """Write :func:`make_grid` as a PNG."""
    save_png(path, make_grid(rows, truth))


def write_samples_h5(path, *, samples, true_images, stimulus_id, label, seeds, attrs, predicted_label=None,
                     attention=None, embedding=None):
    """Write ``samples.h5`` atomically (layout in the module docstring).

    Parameters
    ----------
    embedding : array [N, ...], optional
        Each row's decoded image-prior embedding (stored float32).
    attention : dict, optional
        ``maps`` float [S, A, h, w, T], ``stimulus_id`` [A], ``timesteps`` [S], ``token_weights`` [T, 1 + L].
    attrs : dict
        File attributes; dicts and lists are stored as JSON.
    """
    with atomic_path(path) as tmp:
        with hdf5_for_writing(tmp) as handle:
            handle.create_dataset("samples", data=np.asarray(samples, np.uint8), compression="gzip")
            handle.create_dataset("true_images", data=np.asarray(true_images, np.uint8), compression="gzip")
            handle.create_dataset("stimulus_id", data=np.asarray(stimulus_id, dtype=object),
                                  dtype=h5py.string_dtype())
            handle.create_dataset("label", data=np.asarray(label, np.int64))
            handle.create_dataset("seeds", data=np.asarray(seeds, np.int64))
            if predicted_label is not None:
                handle.create_dataset("predicted_label", data=np.asarray(predicted_label, np.int64))
            if embedding is not None:
                handle.create_dataset("embedding", data=np.asarray(embedding, np.float32))
            if attention is not None:
                group = handle.create_group("attention")
                group.create_dataset("maps", data=np.asarray(attention["maps"], np.float16), compression="gzip")
                group.create_dataset("stimulus_id", data=np.asarray(attention["stimulus_id"], dtype=object),
                                     dtype=h5py.string_dtype())
                group.create_dataset("timesteps", data=np.asarray(attention["timesteps"], np.int64))
                group.create_dataset("token_weights", data=np.asarray(attention["token_weights"], np.float32))
            for key, value in {**attrs, "format_version": FORMAT_VERSION}.items():
                handle.attrs[key] = json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else value


def read_samples_h5(path):
    """Read ``samples.h5`` into a dict of arrays (``attention`` a nested dict) plus ``attrs``."""
    out = {}
    with h5py.File(Path(path), "r") as handle:
        for key in ("samples", "true_images", "label", "seeds", "predicted_label", "embedding"):
            if key in handle:
                out[key] = handle[key][()]
        out["stimulus_id"] = handle["stimulus_id"].asstr()[()]
        if "attention" in handle:
            group = handle["attention"]
            out["attention"] = {"maps": group["maps"][()], "stimulus_id": group["stimulus_id"].asstr()[()],
                                "timesteps": group["timesteps"][()], "token_weights": group["token_weights"][()]}
        out["attrs"] = _attrs(handle)
    return out


def read_samples_attrs(path):
    """Only the attributes of a ``samples.h5`` (JSON ones parsed), without reading its images."""
    with h5py.File(Path(path), "r") as handle:
        return _attrs(handle)


def _attrs(handle):
    attrs = {}
    for key, value in handle.attrs.items():
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        attrs[key] = value
    return attrs
