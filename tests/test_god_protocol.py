"""MinD-Vis's GOD protocol behind its config keys (docs/god_protocol.md), each checked against MinD-Vis's code.

The reference formulas below restate MinD-Vis's ``code/dataset.py`` (``pad_to_patch_size``, ``normalize`` and
``create_Kamitani_dataset``) line for line in NumPy, so a change to mindvis's conversion shows here.
"""

import numpy as np
import pytest

from test_sources import convert, god_names, make_config, write_god_npz

PATCH = 16


def upstream_pad(x, patch_size):
    return np.pad(x, ((0, 0), (0, patch_size - x.shape[1] % patch_size)), "wrap")


def upstream_normalize(x, mean=None, std=None):
    mean = np.mean(x) if mean is None else mean
    std = np.std(x) if std is None else std
    return (x - mean) / (std * 1.0)


def upstream_kamitani(truth, arr_2):
    """``create_Kamitani_dataset``'s train and test matrices for one subject (VC), cut back to the real voxels."""
    tr = truth["arr_0"][:, truth["vc"]]
    tt = arr_2[:, truth["vc"]]
    n_voxels = tr.shape[1]
    tr = upstream_normalize(upstream_pad(tr, PATCH))
    tt = upstream_normalize(upstream_pad(tt, PATCH), np.mean(tr), np.std(tr))
    return tr[:, :n_voxels], tt[:, :n_voxels]


@pytest.fixture
def god_files(tmp_path):
    truth = write_god_npz(tmp_path / "npz", np.random.default_rng(7))
    data = np.load(tmp_path / "npz" / "sbj_1.npz")
    truth["arr_2"] = data["arr_2"]
    return tmp_path, truth


def god_config(tmp_path, **god_npz):
    return make_config(tmp_path, source="god_npz", trials_per_block=3, normalisation="mindvis_scalar",
                       god_npz={"dir": str(tmp_path / "npz"), **god_npz})


def test_mindvis_scalar_normalisation_is_mindvis_code(god_files):
    tmp_path, truth = god_files
    summary, responses, _ = convert(god_config(tmp_path, test_average="file"), tmp_path)
    train_names, test_names = god_names()
    expected_train, expected_test = upstream_kamitani(truth, truth["arr_2"])
    # training and validation trials: the training matrix normalised by its own padded scalars
    file_train_names = list(np.asarray(train_names)[truth["train_index"]])
    for split in ("train", "val"):
        rows = [file_train_names.index(s) for s in responses[split].stimulus_id]
        np.testing.assert_allclose(responses[split].fmri, expected_train[rows], rtol=1e-5, atol=1e-5)
    # test averages: the file's arr_2, scaled by the normalised training matrix's scalars as MinD-Vis's code does
    avg = responses["test_avg"]
    rows = [test_names.index(s) for s in avg.stimulus_id]
    np.testing.assert_allclose(avg.fmri, expected_test[rows], rtol=1e-5, atol=1e-5)
    assert "mindvis_scalar" in summary["normalisation"]
    # the test data keep their file scale: MinD-Vis's second scalars are about 0 and 1
    np.testing.assert_allclose(avg.fmri, truth["arr_2"][rows][:, truth["vc"]], atol=1e-4)
    assert summary["test_average"] == "file" and summary["test_average_max_abs_difference"] < 1e-5


def test_scalar_normalisation_scales_test_by_training_scalars(god_files):
    tmp_path, truth = god_files
    config = god_config(tmp_path)
    config["data"]["normalisation"] = "scalar"
    _, responses, _ = convert(config, tmp_path)
    padded = upstream_pad(truth["arr_0"][:, truth["vc"]], PATCH)
    _, test_names = god_names()
    avg = responses["test_avg"]
    rows = [test_names.index(s) for s in avg.stimulus_id]
    expected = (truth["arr_2"][rows][:, truth["vc"]] - padded.mean()) / padded.std()
    np.testing.assert_allclose(avg.fmri, expected, rtol=1e-5, atol=1e-5)


def test_file_averages_must_cover_the_test_stimuli(god_files):
    tmp_path, truth = god_files
    # the recomputed averages (the default) equal the file's when arr_2 is arr_1's mean, as in the release
    _, recomputed, _ = convert(god_config(tmp_path), tmp_path)
    _, from_file, _ = convert(god_config(tmp_path, test_average="file"), tmp_path / "file")
    np.testing.assert_allclose(recomputed["test_avg"].fmri, from_file["test_avg"].fmri, atol=1e-5)
    assert list(recomputed["test_avg"].stimulus_id) == list(from_file["test_avg"].stimulus_id)


def test_constant_voxel_kept_under_scalar_normalisation(tmp_path):
    truth = write_god_npz(tmp_path / "npz", np.random.default_rng(8))
    path = tmp_path / "npz" / "sbj_1.npz"
    arrays = dict(np.load(path))
    arrays["arr_0"][:, 5] = 1.0  # a constant VC voxel: z-scoring drops it, MinD-Vis's scalars keep it
    np.savez(path, **arrays)
    _, scalar, _ = convert(god_config(tmp_path), tmp_path)
    assert scalar.n_voxels == int(truth["vc"].sum())
    _, zscored, _ = convert(make_config(tmp_path, source="god_npz", trials_per_block=3,
                                        god_npz={"dir": str(tmp_path / "npz")}), tmp_path / "z")
    assert zscored.n_voxels == int(truth["vc"].sum()) - 1
