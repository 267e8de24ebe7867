"""benchmarks/readme_figure.py on a tiny synthetic samples.h5: one column per class, the same bytes twice."""

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_figure.py"
_SPEC = importlib.util.spec_from_file_location("readme_figure", _PATH)
readme_figure = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(readme_figure)


def write_samples(path, rng):
    """A samples.h5 of 7 stimuli of 3 classes, float images [7, 6, 5, 1] and samples [7, 2, 6, 5, 1]."""
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as handle:
        handle["true_images"] = rng.random((7, 6, 5, 1), dtype=np.float32)
        handle["samples"] = rng.random((7, 2, 6, 5, 1), dtype=np.float32)
        handle["label"] = np.array([2, 0, 1, 0, 2, 1, 0])
        handle["stimulus_id"] = np.array([f"test-{i:04d}" for i in (6, 5, 4, 3, 2, 1, 0)], dtype=object)
        handle.attrs["class_names"] = json.dumps(["a", "b", "c"])
        handle.attrs["config"] = json.dumps({"stimuli": {"novel_classes": [1]}})


def test_one_column_per_class_first_by_stimulus_id():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    ids = [f"test-{i:04d}" for i in (6, 5, 4, 3, 2, 1, 0)]
    assert readme_figure.pick_stimuli(labels, ids, 10) == [6, 5, 4]
    assert readme_figure.pick_stimuli(labels, ids, 2) == [6, 5]


def test_float_images_become_uint8():
    assert readme_figure.to_uint8(np.array([0.0, 0.5, 1.0, 1.5])).tolist() == [0, 128, 255, 255]


def test_the_figure_is_deterministic(tmp_path):
    write_samples(tmp_path / "results" / "sub-01" / "samples" / "samples.h5", np.random.default_rng(0))
    first, second = tmp_path / "one.png", tmp_path / "two.png"
    readme_figure.main(["--results", str(tmp_path / "results"), "--out", str(first)])
    readme_figure.main(["--results", str(tmp_path / "results"), "--out", str(second)])
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.read_bytes() == second.read_bytes()


def test_another_decoders_row_is_drawn_under_the_first(tmp_path):
    results = tmp_path / "results"
    write_samples(results / "sub-01" / "samples" / "samples.h5", np.random.default_rng(0))
    write_samples(results / "sub-01" / "samples-prior" / "samples.h5", np.random.default_rng(1))
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    readme_figure.main(["--results", str(results), "--out", str(two)])
    readme_figure.main(["--results", str(results), "--out", str(three), "--also", "samples-prior=+ prior"])
    from PIL import Image

    assert Image.open(three).size[1] > Image.open(two).size[1]
