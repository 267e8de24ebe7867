"""The responses.h5 and rest HDF5 contract: writers, validating readers, clear errors."""

import json

import h5py
import numpy as np
import pytest

from mindvis.data.responses import (
    SPLITS,
    ResponseSplit,
    load_responses,
    load_rest,
    write_responses,
    write_rest,
)
from mindvis.errors import MindvisError

VOLUME_SHAPE = (5, 6, 7)
CLASS_NAMES = ["face", "house", "shoe"]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _geometry(rng, n_voxels=13):
    flat = np.sort(rng.choice(np.prod(VOLUME_SHAPE), n_voxels, replace=False))
    voxel_ijk = np.stack(np.unravel_index(flat, VOLUME_SHAPE), axis=1)
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-5, -60, 10]
    return voxel_ijk, affine, np.where(voxel_ijk[:, 2] < 3, "V1", "LOC")


def _split(rng, n_trials, n_voxels, averaged=False):
    return ResponseSplit(
        fmri=rng.normal(size=(n_trials, n_voxels)).astype(np.float32),
        stimulus_id=[f"img-{i:03d}" for i in range(n_trials)],
        label=rng.integers(0, len(CLASS_NAMES), n_trials),
        run=np.full(n_trials, -1) if averaged else rng.integers(1, 4, n_trials),
        onset=np.full(n_trials, np.nan) if averaged else rng.uniform(0, 100, n_trials),
        n_repeats=np.full(n_trials, 3) if averaged else None,
    )


def _write(path, rng, **overrides):
    voxel_ijk, affine, voxel_roi = _geometry(rng)
    n_voxels = len(voxel_ijk)
    kwargs = dict(
        splits={"train": _split(rng, 9, n_voxels), "val": ResponseSplit.empty(n_voxels),
                "test": _split(rng, 6, n_voxels), "test_avg": _split(rng, 2, n_voxels, averaged=True)},
        voxel_ijk=voxel_ijk, affine=affine, volume_shape=VOLUME_SHAPE, voxel_roi=voxel_roi,
        class_names=CLASS_NAMES, tr=2.0, subject="sub-01", method="glm_lss",
        preprocess_config={"method": "glm_lss"}, config={"seed": 0}, input_hashes={"a.nii.gz": "0" * 64},
        quality={"tsnr": np.full(n_voxels, 50.0, np.float32), "noise_ceiling": np.full(n_voxels, 30.0, np.float32)},
    )
    kwargs.update(overrides)
    write_responses(path, **kwargs)
    return kwargs


def test_round_trip_keeps_every_item(tmp_path, rng):
    path = tmp_path / "responses.h5"
    written = _write(path, rng)
    responses = load_responses(path)
    assert set(responses.splits) == set(SPLITS)
    for name in SPLITS:
        split, original = responses.split(name), written["splits"][name]
        np.testing.assert_array_equal(split.fmri, np.asarray(original.fmri, np.float32))
        assert split.fmri.dtype == np.float32 and split.label.dtype == np.int64 and split.run.dtype == np.int64
        assert list(split.stimulus_id) == list(original.stimulus_id)
    assert responses["val"].fmri.shape == (0, 13)
    np.testing.assert_array_equal(responses["test_avg"].n_repeats, [3, 3])
    assert np.isnan(responses["test_avg"].onset).all()
    np.testing.assert_array_equal(responses.voxel_ijk, written["voxel_ijk"])
    assert responses.voxel_ijk.dtype == np.int32
    assert responses.class_names == CLASS_NAMES and responses.tr == 2.0 and responses.subject == "sub-01"
    assert responses.attrs["input_hashes"] == {"a.nii.gz": "0" * 64}
    assert responses.attrs["config"] == {"seed": 0} and "numpy" in responses.attrs["versions"]
    assert responses.quality["tsnr"].shape == (13,)
    assert set(responses.voxel_roi) == {"V1", "LOC"}


def test_subset_of_splits_and_unloaded_split_error(tmp_path, rng):
    path = tmp_path / "responses.h5"
    _write(path, rng)
    responses = load_responses(path, splits=("train",))
    assert list(responses.splits) == ["train"]
    with pytest.raises(MindvisError, match="not loaded"):
        responses.split("test")


def test_voxel_map_goes_back_to_the_volume(tmp_path, rng):
    path = tmp_path / "responses.h5"
    written = _write(path, rng)
    responses = load_responses(path)
    values = np.arange(1, responses.n_voxels + 1, dtype=np.float32)
    image = responses.to_nifti(values)
    assert image.shape == VOLUME_SHAPE
    np.testing.assert_allclose(image.affine, written["affine"])
    data = image.get_fdata()
    ijk = responses.voxel_ijk
    np.testing.assert_array_equal(data[ijk[:, 0], ijk[:, 1], ijk[:, 2]], values)
    assert data.sum() == values.sum()  # nothing written outside the voxels


def test_writer_refuses_a_broken_contract_and_leaves_nothing(tmp_path, rng):
    path = tmp_path / "responses.h5"
    voxel_ijk, _, _ = _geometry(rng)
    bad = _split(rng, 4, len(voxel_ijk) + 1)  # one column too many
    with pytest.raises(ValueError, match="voxel columns"):
        _write(path, rng, splits={"train": bad, "val": bad, "test": bad, "test_avg": _split(rng, 1, 14, True)})
    assert not path.exists() and not list(tmp_path.iterdir())


def _corrupt(path, action):
    with h5py.File(path, "a") as handle:
        action(handle)


@pytest.mark.parametrize("action, key", [
    (lambda h: h.attrs.__delitem__("tr"), "tr"),
    (lambda h: h.__delitem__("test_avg/n_repeats"), "test_avg/n_repeats"),
    (lambda h: h.__delitem__("val"), "val"),
    (lambda h: h.attrs.__setitem__("class_names", "not json ["), "class_names"),
    (lambda h: (h.__delitem__("train/label"), h.create_dataset("train/label", data=np.zeros(3, np.int64))),
     "train/label"),
    (lambda h: (h.__delitem__("train/label"), h.create_dataset("train/label", data=np.full(9, 7, np.int64))),
     "train/label"),
    (lambda h: (h.__delitem__("test/fmri"), h.create_dataset("test/fmri", data=np.zeros((6, 13)))), "test/fmri"),
    (lambda h: h["train/fmri"].__setitem__((0, 0), np.nan), "train/fmri"),
    (lambda h: (h.__delitem__("voxel_ijk"), h.create_dataset("voxel_ijk", data=np.full((13, 3), 9, np.int32))),
     "voxel_ijk"),
    (lambda h: (h.__delitem__("voxel_roi"), h.create_dataset("voxel_roi", data=np.zeros(13))), "voxel_roi"),
])
def test_reader_names_file_and_key_of_a_malformed_file(tmp_path, rng, action, key):
    path = tmp_path / "responses.h5"
    _write(path, rng)
    _corrupt(path, action)
    with pytest.raises(MindvisError) as info:
        load_responses(path)
    assert info.value.key == key
    assert str(path) in str(info.value)


def test_reader_errors_on_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(MindvisError, match="not found"):
        load_responses(tmp_path / "absent.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(MindvisError, match="HDF5"):
        load_responses(junk)


def test_rest_round_trip_and_validation(tmp_path, rng):
    voxel_ijk, affine, voxel_roi = _geometry(rng)
    fmri = rng.normal(size=(20, len(voxel_ijk))).astype(np.float32)
    run = np.repeat([1, 2], 10)
    path = tmp_path / "rest.h5"
    write_rest(path, fmri=fmri, run=run, voxel_ijk=voxel_ijk, affine=affine, volume_shape=VOLUME_SHAPE,
               voxel_roi=voxel_roi, tr=1.5, subject="sub-rest01", preprocess_config={}, config={},
               input_hashes={})
    rest = load_rest(path)
    np.testing.assert_array_equal(rest.fmri, fmri)
    np.testing.assert_array_equal(rest.run, run)
    assert rest.tr == 1.5 and rest.attrs["subject"] == "sub-rest01" and rest.to_nifti(fmri[0]).shape == VOLUME_SHAPE
    _corrupt(path, lambda h: (h.__delitem__("run"), h.create_dataset("run", data=np.zeros(19, np.int64))))
    with pytest.raises(MindvisError) as info:
        load_rest(path)
    assert info.value.key == "run"
    json.dumps(rest.attrs, default=str)  # attributes stay serialisable for reports
