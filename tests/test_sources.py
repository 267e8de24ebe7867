"""Real-data adapters: each reads a tiny fixture written in the source's real on-disk format.

Fixtures keep the real file names, keys, dtypes and axis orders, with sizes
scaled down (a few dozen voxels, trials and 8 x 8 to 20 x 14 images).
"""

import json

import h5py
import numpy as np
import pytest

from mindvis.config import validate
from mindvis.data.responses import load_responses
from mindvis.data.sources import convert_subject
from mindvis.data.reliability import noise_ceiling
from mindvis.data.sources.common import average_repeats, carve_validation, prepare_image
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_config(tmp_path, **data):
    config = validate({"seed": 3, "stimuli": {"image_size": 8, "channels": 3},
                       "preprocess": {"val_fraction": 0.25}, "data": data})
    return config


def convert(config, tmp_path, subject="sub-01"):
    out = tmp_path / "results" / subject
    summary = convert_subject(config, subject, out / "responses.h5", out / "stimuli.h5")
    return summary, load_responses(out / "responses.h5"), load_stimulus_set(out / "stimuli.h5")


def signal_experiment(rng, n_train_images=24, n_test_images=4, repeats=3, n_voxels=20, image_shape=(10, 12, 3)):
    """Trials whose responses are a fixed pattern per image plus noise, and matching random images."""
    train_images = rng.integers(0, 256, (n_train_images,) + image_shape, dtype=np.uint8)
    test_images = rng.integers(0, 256, (n_test_images,) + image_shape, dtype=np.uint8)
    pattern = {("train", i): rng.normal(size=n_voxels) for i in range(n_train_images)}
    pattern.update({("test", i): rng.normal(size=n_voxels) for i in range(n_test_images)})
    offset, scale = rng.normal(5, 1, n_voxels), rng.uniform(1, 3, n_voxels)
    train_fmri = np.stack([pattern["train", i] for i in range(n_train_images)]) + 0.3 * rng.normal(
        size=(n_train_images, n_voxels))
    test_index = np.repeat(np.arange(n_test_images), repeats)
    test_fmri = np.stack([pattern["test", i] for i in test_index]) + 0.3 * rng.normal(size=(len(test_index), n_voxels))
    return dict(train_fmri=train_fmri * scale + offset, test_fmri=test_fmri * scale + offset,
                train_images=train_images, test_images=test_images, test_index=test_index)


# -- shared machinery ---------------------------------------------------------------------------------

def test_prepare_image_resizes_crops_and_converts():
    tall = np.zeros((20, 10), np.uint8)
    tall[:5] = 255  # the top quarter is cut away by a centre crop
    cropped = prepare_image(tall, 8, 3, "crop")
    assert cropped.shape == (8, 8, 3) and cropped.dtype == np.uint8 and cropped.max() == 0
    padded = prepare_image(tall, 8, 1, "pad")
    assert padded.shape == (8, 8, 1) and padded[0].max() > 0 and padded[:, 0].max() == 0
    floats = prepare_image(np.full((6, 6, 3), 0.5, np.float32), 8, 3)
    assert np.all(np.abs(floats.astype(int) - 128) <= 1)
    with pytest.raises(MindvisError, match="shape"):
        prepare_image(np.zeros((6, 6, 2)), 8, 3)


def test_carve_validation_takes_whole_runs_or_blocks():
    run = np.repeat([1, 2, 3, 4], 5)
    is_val, grouping = carve_validation(run, len(run), 0.25, 50, seed=1)
    assert grouping == "run" and is_val.sum() == 5 and len(np.unique(run[is_val])) == 1
    is_val, grouping = carve_validation(np.full(40, -1), 40, 0.25, 10, seed=1)
    assert grouping.startswith("block") and is_val.sum() == 10
    assert np.all(np.diff(np.flatnonzero(is_val)) == 1)


def test_average_repeats_and_noise_ceiling(rng):
    signal = rng.normal(size=(5, 30))
    ids = np.repeat([f"s{i}" for i in range(5)], 4)
    fmri = (signal[np.repeat(np.arange(5), 4)] + 0.5 * rng.normal(size=(20, 30))).astype(np.float32)
    mean, avg_ids, n = average_repeats(fmri, ids)
    assert list(avg_ids) == [f"s{i}" for i in range(5)] and np.all(n == 4)
    np.testing.assert_allclose(mean[2], fmri[8:12].mean(axis=0), rtol=1e-5)
    ncsnr, ceiling = noise_ceiling(fmri, ids)
    pure_noise = rng.normal(size=(20, 30)).astype(np.float32)
    _, ceiling_noise = noise_ceiling(pure_noise, ids)
    assert ceiling.mean() > 60 and ceiling_noise.mean() < ceiling.mean() - 30


def test_block_wise_summaries_match_whole(rng, monkeypatch):
    import mindvis.data.reliability as reliability
    import mindvis.data.sources.common as common

    fmri = rng.normal(size=(12, 23)).astype(np.float32)
    ids = np.array(list("abcabcabcdde"))
    whole = common.average_repeats(fmri, ids)[0], reliability.noise_ceiling(fmri, ids)[1]
    monkeypatch.setattr(common, "COLUMN_BLOCK", 5)
    monkeypatch.setattr(reliability, "COLUMN_BLOCK", 5)
    blocks = common.average_repeats(fmri, ids)[0], reliability.noise_ceiling(fmri, ids)[1]
    np.testing.assert_allclose(blocks[0], whole[0], rtol=1e-6)
    np.testing.assert_array_equal(blocks[1], whole[1])


# -- matrix files ---------------------------------------------------------------------------------------

def test_matrix_npz_converts_with_training_statistics_only(tmp_path, rng):
    exp = signal_experiment(rng)
    labels = np.arange(24) % 3
    np.savez(tmp_path / "lab.npz", train_fmri=exp["train_fmri"], test_fmri=exp["test_fmri"],
             train_images=exp["train_images"], test_images=exp["test_images"][exp["test_index"]],
             train_labels=labels, test_labels=np.repeat([0, 1, 2, 0], 3), names=np.array(["cat", "dog", "owl"]))
    config = make_config(tmp_path, source="matrix", trials_per_block=6,
                         matrix={"path": str(tmp_path / "lab.npz"),
                                 "keys": {"train_labels": "train_labels", "test_labels": "test_labels",
                                          "class_names": "names"}})
    summary, responses, stimuli = convert(config, tmp_path)
    train, val = responses["train"], responses["val"]
    assert len(train) + len(val) == 24 and len(val) == 6 and summary["validation_grouping"].startswith("block")
    # z-scored with the training split's own statistics: exactly mean 0, sd 1 there, not elsewhere
    np.testing.assert_allclose(train.fmri.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.fmri.std(axis=0), 1, atol=1e-4)
    raw_train_rows = np.array([int(s.split("-")[1]) for s in train.stimulus_id])
    raw = exp["train_fmri"][raw_train_rows]
    expected_test = (exp["test_fmri"] - raw.mean(axis=0)) / raw.std(axis=0)
    np.testing.assert_allclose(responses["test"].fmri, expected_test, atol=1e-4)
    # identical test images are recognised as repeats and averaged
    avg = responses["test_avg"]
    assert len(avg) == 4 and np.all(avg.n_repeats == 3)
    np.testing.assert_allclose(avg.fmri[1], expected_test[3:6].mean(axis=0), atol=1e-4)
    assert responses.class_names == ["cat", "dog", "owl"]
    assert list(avg.label) == [0, 1, 2, 0]
    # images resized to the model's size, labels follow the images
    assert stimuli["train"].images.shape == (24, 8, 8, 3) and stimuli["test"].images.shape == (4, 8, 8, 3)
    images, labels_back = stimuli.lookup(list(train.stimulus_id[:5]))
    assert list(labels_back) == list(train.label[:5])
    attrs = responses.attrs
    assert attrs["method"] == "matrix" and str(tmp_path / "lab.npz") in attrs["input_hashes"]
    assert attrs["config"]["data"]["source"] == "matrix" and "numpy" in attrs["versions"]
    assert "ncsnr" in responses.quality and responses.quality["noise_ceiling"].mean() > 50


def test_matrix_mat_v5_with_one_based_index_and_runs(tmp_path, rng):
    from scipy.io import savemat

    exp = signal_experiment(rng)
    savemat(tmp_path / "lab.mat", {
        "Xtrain": exp["train_fmri"], "Xtest": exp["test_fmri"],
        # MATLAB habit: images [H, W, C, N] and 1-based indices
        "Itrain": np.moveaxis(exp["train_images"], 0, -1), "Itest": np.moveaxis(exp["test_images"], 0, -1),
        "idx_test": (exp["test_index"] + 1).reshape(1, -1), "runs": np.repeat([1, 2, 3, 4], 6).reshape(-1, 1),
        "names": np.array(["a", "b"], dtype=object)})
    config = make_config(tmp_path, source="matrix", matrix={
        "path": str(tmp_path / "lab.mat"), "image_axis": "last", "index_base": 1,
        "keys": {"train_fmri": "Xtrain", "test_fmri": "Xtest", "train_images": "Itrain", "test_images": "Itest",
                 "test_image_index": "idx_test", "train_runs": "runs", "class_names": "names"}})
    summary, responses, stimuli = convert(config, tmp_path)
    assert summary["validation_grouping"] == "run" and len(np.unique(responses["val"].run)) == 1
    assert set(responses["val"].run).isdisjoint(responses["train"].run)
    assert list(responses["test_avg"].stimulus_id) == ["test-0000", "test-0001", "test-0002", "test-0003"]
    assert responses.class_names == ["a", "b"]
    # the [H, W, C, N] image came back unchanged in orientation: compare the resized originals
    expected = prepare_image(exp["test_images"][2], 8, 3)
    np.testing.assert_array_equal(stimuli.lookup(["test-0002"])[0][0], expected)


def test_matrix_mat_v73_column_major(tmp_path, rng):
    exp = signal_experiment(rng)
    # What MATLAB's save -v7.3 leaves on disk: HDF5 datasets with every axis reversed.
    with h5py.File(tmp_path / "lab73.mat", "w") as handle:
        handle.create_dataset("train_fmri", data=exp["train_fmri"].T)
        handle.create_dataset("test_fmri", data=exp["test_fmri"].T)
        handle.create_dataset("train_images", data=np.transpose(np.moveaxis(exp["train_images"], 0, -1)))
        handle.create_dataset("test_images", data=np.transpose(np.moveaxis(exp["test_images"][exp["test_index"]],
                                                                           0, -1)))
        # labels as a MATLAB row vector (double) and class names as a cell array of char arrays
        handle.create_dataset("train_labels", data=(np.arange(24) % 2).astype(float)[:, None])
        refs = handle.create_group("#refs#")
        cells = [refs.create_dataset(f"c{i}", data=np.array([[ord(c)] for c in name], np.uint16)).ref
                 for i, name in enumerate(["cat", "dog"])]
        handle.create_dataset("names", data=np.array(cells, dtype=h5py.ref_dtype)[:, None])
    base = {"path": str(tmp_path / "lab73.mat"), "image_axis": "last",
            "keys": {"train_labels": "train_labels", "class_names": "names"}}
    with pytest.raises(MindvisError, match=r"column_major") as err:
        convert(make_config(tmp_path, source="matrix", matrix=base), tmp_path)
    assert "(20, 24)" in str(err.value) and "lab73.mat" in str(err.value)
    summary, responses, stimuli = convert(make_config(tmp_path, source="matrix",
                                                      matrix={**base, "column_major": True}), tmp_path)
    assert responses.n_voxels == 20 and len(responses["test_avg"]) == 4
    assert responses.class_names == ["cat", "dog"] and set(responses["train"].label) == {0, 1}
    assert set(responses["test"].label) == {-1}  # no test labels given
    np.testing.assert_array_equal(stimuli["test"].images[1], prepare_image(exp["test_images"][1], 8, 3))


def test_matrix_bad_inputs_name_key_file_and_shapes(tmp_path, rng):
    exp = signal_experiment(rng)
    path = tmp_path / "bad.npz"
    np.savez(path, train_fmri=exp["train_fmri"], test_fmri=exp["test_fmri"],
             train_images=exp["train_images"][:20], test_images=exp["test_images"][exp["test_index"]])
    config = make_config(tmp_path, source="matrix", matrix={"path": str(path)})
    with pytest.raises(MindvisError) as err:
        convert(config, tmp_path)
    text = str(err.value)
    assert "bad.npz" in text and "(24, 20)" in text and "(20, 10, 12, 3)" in text
    assert not (tmp_path / "results/sub-01/responses.h5").exists()

    config["data"]["matrix"]["keys"]["test_fmri"] = "Xtest"
    with pytest.raises(MindvisError, match="key 'Xtest'") as err:
        convert(config, tmp_path)
    assert "bad.npz" in str(err.value)

    np.savez(path, train_fmri=exp["train_fmri"], test_fmri=exp["test_fmri"][:, :15],
             train_images=exp["train_images"], test_images=exp["test_images"][exp["test_index"]])
    config["data"]["matrix"]["keys"]["test_fmri"] = "test_fmri"
    with pytest.raises(MindvisError, match=r"\(24, 20\).*\(12, 15\)"):
        convert(config, tmp_path)
    config["data"]["matrix"]["path"] = str(tmp_path / "absent.npz")
    with pytest.raises(MindvisError, match="data.matrix.path"):
        convert(config, tmp_path)


def test_constant_and_nan_voxels_are_dropped(tmp_path, rng, caplog):
    exp = signal_experiment(rng)
    exp["train_fmri"][:, 3] = 7.0
    exp["test_fmri"][2, 5] = np.nan
    np.savez(tmp_path / "lab.npz", train_fmri=exp["train_fmri"], test_fmri=exp["test_fmri"],
             train_images=exp["train_images"], test_images=exp["test_images"][exp["test_index"]])
    config = make_config(tmp_path, source="matrix", matrix={"path": str(tmp_path / "lab.npz")})
    summary, responses, _ = convert(config, tmp_path)
    assert summary["n_voxels_dropped"] == 2 and responses.n_voxels == 18
    assert 3 not in responses.voxel_ijk[:, 0] and 5 not in responses.voxel_ijk[:, 0]
    assert "dropping 2 of 20 voxels" in caplog.text


# -- Generic Object Decoding -------------------------------------------------------------------------

GOD_TRAIN_CATEGORIES = [1518878, 1639765, 1645776]
GOD_TEST_CATEGORIES = [1443537, 1943899]


def god_names():
    train = [f"n{c:08d}_{100 + i}" for c in GOD_TRAIN_CATEGORIES for i in range(4)]  # 12 training images
    test = [f"n{c:08d}_{900 + i}" for c in GOD_TEST_CATEGORIES for i in range(2)]  # 4 test images
    return train, test


def write_god_npz(folder, rng, order="blocked", n_voxels=30, repeats=3, with_labels=True):
    """sbj_1.npz + images_256.npz as MinD-Vis ships them (12 training images, 4 test images x 3 repeats)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_names, test_names = god_names()
    patterns = rng.normal(size=(16, n_voxels))
    train_index = rng.permutation(12)
    arr_0 = patterns[train_index] + 0.2 * rng.normal(size=(12, n_voxels))
    test_rows = np.repeat(np.arange(4), repeats) if order == "blocked" else np.tile(np.arange(4), repeats)
    arr_1 = patterns[12 + test_rows] + 0.5 * rng.normal(size=(len(test_rows), n_voxels))
    arr_2 = np.stack([arr_1[test_rows == i].mean(axis=0) for i in range(4)])
    vc = np.zeros(n_voxels, bool)
    vc[4:28] = True
    v1 = np.zeros(n_voxels, bool)
    v1[4:12] = True
    np.savez(folder / "sbj_1.npz", arr_0=arr_0, arr_1=arr_1, arr_2=arr_2, arr_3=train_index, VC=vc, V1=v1)
    images = {"train_images": rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
              "test_images": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)}
    np.savez(folder / "images_256.npz", **images)
    if with_labels:
        (folder / "imagenet_training_label.csv").write_text("".join(f"{n}.JPEG,x\n" for n in train_names))
        (folder / "imagenet_testing_label.csv").write_text("".join(f"{n}.JPEG,x\n" for n in test_names))
        index = {str(i): [f"n{c:08d}", f"thing{i}"] for i, c in enumerate(GOD_TRAIN_CATEGORIES + GOD_TEST_CATEGORIES)}
        (folder / "imagenet_class_index.json").write_text(json.dumps(index))
    return dict(train_index=train_index, arr_0=arr_0, arr_1=arr_1, test_rows=test_rows, vc=vc, images=images)


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
def test_god_npz(tmp_path, rng, order):
    truth = write_god_npz(tmp_path / "npz", rng, order=order)
    config = make_config(tmp_path, source="god_npz", trials_per_block=3, god_npz={"dir": str(tmp_path / "npz")})
    summary, responses, stimuli = convert(config, tmp_path)
    source_attrs = responses.attrs["source"]  # extra JSON attributes come back parsed
    assert source_attrs["test_order"] == order and source_attrs["test_repeats"] == 3
    assert responses.n_voxels == 24 and list(responses.voxel_ijk[:, 0]) == list(range(4, 28))
    assert list(responses.voxel_roi[:8]) == ["V1"] * 8 and responses.voxel_roi[10] == "VC"
    assert len(responses["train"]) + len(responses["val"]) == 12 and len(responses["val"]) == 3
    train_names, test_names = god_names()
    avg = responses["test_avg"]
    assert sorted(avg.stimulus_id) == sorted(test_names) and np.all(avg.n_repeats == 3)
    assert responses.class_names == [f"thing{i}" for i in range(5)]
    assert dict(zip(avg.stimulus_id, avg.label))[test_names[2]] == 4
    # normalised with the training trials only, averaged from the single test trials
    train_rows = [list(np.asarray(train_names)[truth["train_index"]]).index(s) for s in responses["train"].stimulus_id]
    raw_train = truth["arr_0"][train_rows][:, truth["vc"]]
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    image = test_names.index(avg.stimulus_id[0])
    expected = ((truth["arr_1"][truth["test_rows"] == image][:, truth["vc"]] - mean) / std).mean(axis=0)
    np.testing.assert_allclose(avg.fmri[0], expected, atol=1e-4)
    # each trial's image is the image MinD-Vis pairs with it
    images, _ = stimuli.lookup([responses["train"].stimulus_id[0]])
    source_row = train_names.index(responses["train"].stimulus_id[0])
    np.testing.assert_array_equal(images[0], prepare_image(truth["images"]["train_images"][source_row], 8, 3))


def test_god_npz_bad_inputs(tmp_path, rng):
    write_god_npz(tmp_path / "npz", rng, with_labels=False)
    config = make_config(tmp_path, source="god_npz", roi="LOC", god_npz={"dir": str(tmp_path / "npz")})
    with pytest.raises(MindvisError, match=r"sbj_1.npz.*key 'LOC'.*VC"):
        convert(config, tmp_path)
    config["data"]["roi"] = "VC"
    with pytest.raises(MindvisError, match="sbj_2.npz"):
        convert(config, tmp_path, subject="sub-02")
    summary, responses, _ = convert(config, tmp_path)  # without label files: ids by index, labels unknown
    assert responses.class_names == [] and set(responses["test_avg"].label) == {-1}
    with np.load(tmp_path / "npz/sbj_1.npz") as npz:
        arrays = dict(npz)
    arrays["arr_3"] = arrays["arr_3"][:10]
    np.savez(tmp_path / "npz/sbj_1.npz", **arrays)
    with pytest.raises(MindvisError, match=r"\(12, 30\).*arr_3.*\(10,\)"):
        convert(config, tmp_path)
    del arrays["arr_2"]
    np.savez(tmp_path / "npz/sbj_1.npz", **arrays)
    with pytest.raises(MindvisError, match=r"sbj_1.npz.*key 'arr_2'"):
        convert(config, tmp_path)


def write_god_bdata(folder, image_dir, rng, n_voxels=18):
    """Subject1.h5 written by bdpy itself: 2 training runs of 6 images, 2 test runs of 4 images (x1 each)."""
    bdpy = pytest.importorskip("bdpy")
    from PIL import Image

    train_names, test_names = god_names()

    def label(name):
        category, image = name[1:].split("_")
        return int(category) + int(image) / 1e6

    samples = [(1, 1, label(n)) for n in train_names[:6]] + [(1, 2, label(n)) for n in train_names[6:]]
    samples += [(2, 3, label(n)) for n in test_names] + [(2, 4, label(n)) for n in test_names[::-1]]
    samples += [(3, 5, label(test_names[0]))]  # imagery: never used
    patterns = {n: rng.normal(size=n_voxels) for n in train_names + test_names}
    names = {label(n): n for n in train_names + test_names}
    voxels = np.stack([patterns[names[s[2]]] + 0.3 * rng.normal(size=n_voxels) for s in samples])
    bdata = bdpy.BData()
    bdata.add(voxels, "VoxelData")
    bdata.add(np.array([s[0] for s in samples], float)[:, None], "DataType")
    bdata.add(np.array([s[1] for s in samples], float)[:, None], "Run")
    bdata.add(np.array([s[2] for s in samples], float)[:, None], "Label")
    n_columns = n_voxels + 3
    xyz = np.stack(np.unravel_index(np.arange(n_voxels), (3, 3, 2)), axis=1) * 3.0 + np.array([-30.0, -90.0, -6.0])
    for axis, key in enumerate(("voxel_x", "voxel_y", "voxel_z")):
        bdata.add_metadata(key, np.r_[xyz[:, axis], [np.nan] * 3], f"voxel {key[-1]} (mm)")
    for roi, members in (("ROI_VC", range(2, 18)), ("ROI_V1", range(2, 8)), ("ROI_LOC", range(12, 18))):
        value = np.full(n_columns, np.nan)
        value[list(members)] = 1
        bdata.add_metadata(roi, value, f"1 = {roi}")
    folder.mkdir(parents=True, exist_ok=True)
    bdata.save(str(folder / "Subject1.h5"))
    for name in train_names + test_names:
        sub = image_dir / ("training" if name in train_names else "test")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8)).save(sub / f"{name}.JPEG")
    return voxels, samples, xyz


def test_god_bdata_written_by_bdpy(tmp_path, rng):
    voxels, samples, xyz = write_god_bdata(tmp_path / "god", tmp_path / "images", rng)
    config = make_config(tmp_path, source="god_bdata", god_bdata={"dir": str(tmp_path / "god"),
                                                                  "image_dir": str(tmp_path / "images")})
    summary, responses, stimuli = convert(config, tmp_path)
    assert responses.n_voxels == 16
    # a real grid: 3 mm voxels whose world coordinates come back through the affine
    world = responses.voxel_ijk @ responses.affine[:3, :3].T + responses.affine[:3, 3]
    np.testing.assert_allclose(world, xyz[2:18])
    assert list(responses.voxel_roi[:6]) == ["V1"] * 6 and responses.voxel_roi[-1] == "LOC"
    assert responses.voxel_roi[7] == "VC"
    # validation = one whole training run; test = 8 perception trials (imagery dropped), 4 images x 2
    assert len(np.unique(responses["val"].run)) == 1 and len(responses["val"]) == 6
    assert len(responses["test"]) == 8 and sorted(set(responses["test"].run)) == [3, 4]
    avg = responses["test_avg"]
    assert np.all(avg.n_repeats == 2) and len(avg) == 4
    train_names, test_names = god_names()
    assert set(avg.stimulus_id) == set(test_names)
    assert responses.class_names == [f"n{c:08d}" for c in sorted(GOD_TRAIN_CATEGORIES + GOD_TEST_CATEGORIES)]
    assert stimuli["test"].images.shape == (4, 8, 8, 3)
    assert any(path.endswith(".JPEG") for path in responses.attrs["input_hashes"])
    # against bdpy's own reading of the file
    import bdpy

    bdata = bdpy.BData(str(tmp_path / "god/Subject1.h5"))
    raw = bdata.select("ROI_VC")
    is_train = bdata.select("DataType").ravel() == 1
    train_runs = bdata.select("Run").ravel()[is_train]
    keep = np.isin(train_runs, responses["train"].run)
    train_raw = raw[is_train][keep]
    test_raw = raw[bdata.select("DataType").ravel() == 2]
    expected = (test_raw - train_raw.mean(axis=0)) / train_raw.std(axis=0)
    np.testing.assert_allclose(responses["test"].fmri, expected, atol=1e-4)


def test_god_bdata_bad_inputs(tmp_path, rng):
    write_god_bdata(tmp_path / "god", tmp_path / "images", rng)
    config = make_config(tmp_path, source="god_bdata", roi="ROI_FFA",
                         god_bdata={"dir": str(tmp_path / "god"), "image_dir": str(tmp_path / "images")})
    with pytest.raises(MindvisError, match=r"Subject1.h5.*key 'ROI_FFA'"):
        convert(config, tmp_path)
    config["data"]["roi"] = "VC"
    next((tmp_path / "images/test").glob("*.JPEG")).unlink()
    with pytest.raises(MindvisError, match=r"1 stimulus images not found.*image_dir"):
        convert(config, tmp_path)
    with h5py.File(tmp_path / "god/Subject1.h5", "a") as handle:
        del handle["metadata/value"]
    with pytest.raises(MindvisError, match=r"Subject1.h5.*metadata/value"):
        convert(config, tmp_path)


# -- BOLD5000 ---------------------------------------------------------------------------------------------

def write_bold5000(root, rng, n_voxels=(5, 4)):
    """Two sessions x two runs of 5 trials; 3 repeated images; ROI betas for LH/RH x EarlyVis/LOC."""
    from PIL import Image

    stimuli = root / "BOLD5000_Stimuli"
    presented = stimuli / "Scene_Stimuli" / "Presented_Stimuli"
    names = {"COCO": [f"COCO_train2014_{i:012d}.jpg" for i in range(5)],
             "ImageNet": [f"n0144353{i}_{i}.JPEG" for i in range(5)],
             "Scene": [f"scene{i}.jpg" for i in range(4)]}
    for collection, files in names.items():
        (presented / collection).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(files):
            shape = (14 + k, 20, 3) if collection != "Scene" else (16, 16)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(presented / collection / name)
    repeated = [names["COCO"][0], names["ImageNet"][0], names["Scene"][0]]
    (stimuli / "Scene_Stimuli" / "repeated_stimuli_113_list.txt").write_text("\n".join(repeated) + "\n")
    pool = names["COCO"][1:] + names["ImageNet"][1:] + names["Scene"][1:]
    order = []
    for session in (1, 2):
        for run in (1, 2):
            lines = list(rng.choice(pool, 4, replace=False)) + [f"rep_{repeated[(session + run) % 3]}"]
            folder = stimuli / "Stimuli_Presentation_Lists" / "CSI1" / f"CSI1_sess{session:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"CSI_sess{session:02d}_run{run:02d}.txt").write_text("\n".join(lines) + "\n")
            order += [(line[4:] if line.startswith("rep_") else line, 100 * session + run) for line in lines]
    betas_dir = root / "BOLD5000_GLMsingle_ROI_betas" / "py"
    betas_dir.mkdir(parents=True)
    betas = {}
    for hemisphere in ("LH", "RH"):
        for roi, width in zip(("EarlyVis", "LOC"), n_voxels):
            betas[hemisphere + roi] = rng.normal(size=(len(order), width)).astype(np.float32)
            np.save(betas_dir / f"CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{hemisphere}{roi}.npy",
                    betas[hemisphere + roi])
    return order, betas, repeated


def test_bold5000(tmp_path, rng):
    order, betas, repeated = write_bold5000(tmp_path, rng)
    config = make_config(tmp_path, source="bold5000", subject_map={"sub-01": "CSI1"}, bold5000={
        "betas_dir": str(tmp_path / "BOLD5000_GLMsingle_ROI_betas/py"),
        "stimuli_dir": str(tmp_path / "BOLD5000_Stimuli"), "rois": ["EarlyVis", "LOC"]})
    summary, responses, stimuli = convert(config, tmp_path)
    assert responses.n_voxels == 18
    assert list(responses.voxel_roi[:5]) == ["LHEarlyVis"] * 5 and responses.voxel_roi[-1] == "RHLOC"
    assert len(responses["test"]) == 4 and set(responses["test_avg"].stimulus_id) <= set(repeated)
    assert len(responses["train"]) + len(responses["val"]) == 16
    assert set(responses["val"].run).isdisjoint(responses["train"].run)  # whole runs held out
    assert responses.class_names == ["COCO", "ImageNet", "Scene"]
    label_of = dict(zip(responses["train"].stimulus_id, responses["train"].label))
    assert all(label_of[s] == 0 for s in label_of if s.startswith("COCO"))
    assert all(label_of[s] == 2 for s in label_of if s.startswith("scene"))
    assert stimuli["train"].images.shape[1:] == (8, 8, 3)
    # rows of the betas follow the presentation lists: the first test trial is row 4 (run 101, line 5)
    test_rows = [i for i, (name, _) in enumerate(order) if name in repeated]
    raw = np.concatenate([betas[k] for k in ("LHEarlyVis", "LHLOC", "RHEarlyVis", "RHLOC")], axis=1)
    train_rows = [i for i, (name, run) in enumerate(order) if name not in repeated and run in set(responses["train"].run)]
    expected = (raw[test_rows] - raw[train_rows].mean(axis=0)) / raw[train_rows].std(axis=0)
    np.testing.assert_allclose(responses["test"].fmri, expected, atol=1e-4)


def test_bold5000_bad_inputs(tmp_path, rng):
    order, betas, _ = write_bold5000(tmp_path, rng)
    config = make_config(tmp_path, source="bold5000", bold5000={
        "betas_dir": str(tmp_path / "BOLD5000_GLMsingle_ROI_betas/py"),
        "stimuli_dir": str(tmp_path / "BOLD5000_Stimuli"), "rois": ["EarlyVis", "LOC", "PPA"]})
    with pytest.raises(MindvisError, match=r"CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHPPA.npy"):
        convert(config, tmp_path)
    config["data"]["bold5000"]["rois"] = ["EarlyVis"]
    np.save(tmp_path / "BOLD5000_GLMsingle_ROI_betas/py/CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHEarlyVis.npy",
            betas["LHEarlyVis"][:15])
    with pytest.raises(MindvisError, match=r"\(15, 5\).*20 trials"):
        convert(config, tmp_path)


# -- NSD ------------------------------------------------------------------------------------------------------

def write_nsd(root, rng, fmt="hdf5", n_sessions=2, shape=(5, 4, 3)):
    """The NSD tree for subj01 with two sessions of 750 trials on a 5 x 4 x 3 grid and 40 images."""
    import nibabel as nib
    from scipy.io import savemat

    from mindvis.data.sources.nsd import TRIALS_PER_SESSION

    n_trials = TRIALS_PER_SESSION * n_sessions
    n_subject_images, n_brick = 30, 40
    subjectim = np.stack([rng.permutation(n_brick)[:n_subject_images] + 1 for _ in range(8)])
    masterordering = rng.integers(1, n_subject_images + 1, 30000)
    sharedix = np.sort(subjectim[0, :5])  # 5 of subject 1's images are "shared"
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True)
    savemat(design / "nsd_expdesign.mat", {"masterordering": masterordering[None], "subjectim": subjectim,
                                            "sharedix": sharedix[None], "basiccnt": np.zeros((3, 40))})
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-10, -20, -5]
    roi = np.zeros(shape, np.int16) - 1
    roi[1:4, 1:3, :] = 1
    roi[0, 0, 0] = 0
    roi_dir = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi_dir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(roi, affine), roi_dir / "nsdgeneral.nii.gz")
    beta_dir = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    beta_dir.mkdir(parents=True)
    volumes = (rng.normal(0, 1, (n_trials,) + shape) * 300).astype(np.int16)  # [T, X, Y, Z]
    for session in range(n_sessions):
        block = volumes[session * TRIALS_PER_SESSION:(session + 1) * TRIALS_PER_SESSION]
        if fmt == "hdf5":
            with h5py.File(beta_dir / f"betas_session{session + 1:02d}.hdf5", "w") as handle:
                handle.create_dataset("betas", data=np.transpose(block, (0, 3, 2, 1)))  # MATLAB: [T, Z, Y, X]
        else:
            nib.save(nib.Nifti1Image(np.moveaxis(block, 0, -1), affine), beta_dir / f"betas_session{session + 1:02d}.nii.gz")
    stim_dir = root / "nsddata_stimuli/stimuli/nsd"
    stim_dir.mkdir(parents=True)
    brick = rng.integers(0, 256, (n_brick, 12, 12, 3), dtype=np.uint8)
    with h5py.File(stim_dir / "nsd_stimuli.hdf5", "w") as handle:
        handle.create_dataset("imgBrick", data=brick)
    image_ids = subjectim[0, masterordering[:n_trials] - 1]
    return dict(volumes=volumes, roi=roi > 0, image_ids=image_ids, shared=set(sharedix.tolist()), brick=brick,
                affine=affine)


@pytest.mark.parametrize("fmt", ["hdf5", "nifti"])
def test_nsd(tmp_path, rng, fmt):
    truth = write_nsd(tmp_path / "nsd", rng, fmt=fmt)
    config = make_config(tmp_path, source="nsd", nsd={"root": str(tmp_path / "nsd"), "format": fmt})
    config["preprocess"]["val_fraction"] = 0.5
    summary, responses, stimuli = convert(config, tmp_path)
    assert responses.n_voxels == int(truth["roi"].sum()) == 18
    np.testing.assert_allclose(responses.affine, truth["affine"], atol=1e-6)  # NIfTI stores float32
    assert responses.volume_shape == (5, 4, 3)
    is_test = np.array([i in truth["shared"] for i in truth["image_ids"]])
    assert len(responses["test"]) == is_test.sum()
    assert len(responses["test_avg"]) == len(set(truth["image_ids"][is_test]))
    assert sorted(set(responses["val"].run) | set(responses["train"].run)) == [1, 2]
    assert len(set(responses["val"].run)) == 1
    # betas back at the right voxels: z-scored percent signal change of the ROI voxels
    raw = truth["volumes"][:, truth["roi"]].astype(np.float64) / 300
    train_session = responses["train"].run[0]
    train_rows = np.flatnonzero(~is_test & (np.arange(len(is_test)) // 750 + 1 == train_session))
    mean, std = raw[train_rows].mean(axis=0), raw[train_rows].std(axis=0)
    voxel_order = [np.flatnonzero((np.argwhere(truth["roi"]) == ijk).all(axis=1))[0] for ijk in responses.voxel_ijk]
    expected = ((raw[is_test] - mean) / std)[:, voxel_order]
    np.testing.assert_allclose(responses["test"].fmri, expected, atol=1e-4)
    sid = responses["test_avg"].stimulus_id[0]
    np.testing.assert_array_equal(stimuli.lookup([sid])[0][0], prepare_image(truth["brick"][int(sid[4:]) - 1], 8, 3))


def test_nsd_bad_inputs(tmp_path, rng):
    write_nsd(tmp_path / "nsd", rng, n_sessions=1)
    config = make_config(tmp_path, source="nsd", nsd={"root": str(tmp_path / "nsd"), "n_sessions": 3})
    with pytest.raises(MindvisError, match="data.nsd.n_sessions"):
        convert(config, tmp_path)
    config["data"]["nsd"]["n_sessions"] = 0
    config["data"]["roi"] = "prf-visualrois"
    with pytest.raises(MindvisError, match=r"prf-visualrois.nii.gz.*data.roi"):
        convert(config, tmp_path)
    import nibabel as nib

    config["data"]["roi"] = str(tmp_path / "other.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((6, 4, 3), np.int16), np.eye(4)), tmp_path / "other.nii.gz")
    with pytest.raises(MindvisError, match=r"\(750, 3, 4, 5\).*\(6, 4, 3\)"):
        convert(config, tmp_path)


# -- HCP resting state (CIFTI) ------------------------------------------------------------------------------

def write_hcp(root, rng, n_time=(41, 30), tr=0.72):
    """Two dtseries runs of subject 100307 on 18 grayordinates, and a dlabel parcellation."""
    import nibabel as nib
    from nibabel import cifti2

    brain = (cifti2.BrainModelAxis.from_mask(np.ones(10, bool), name="CortexLeft")
             + cifti2.BrainModelAxis.from_mask(np.ones(8, bool), name="CortexRight"))
    runs = []
    for number, n in enumerate(n_time, start=1):
        folder = root / "100307/MNINonLinear/Results" / f"rfMRI_REST{number}_LR"
        folder.mkdir(parents=True)
        data = (rng.normal(size=(n, 18)) * rng.uniform(1, 5, 18) + 100).astype(np.float32)
        image = cifti2.Cifti2Image(data, header=(cifti2.SeriesAxis(0, tr, n, "SECOND"), brain))
        image.nifti_header.set_intent("ConnDenseSeries")
        nib.save(image, folder / f"rfMRI_REST{number}_LR_Atlas_MSMAll.dtseries.nii")
        runs.append(data)
    labels = cifti2.LabelAxis(["parcels"], [{0: ("???", (0, 0, 0, 0)), 1: ("L_V1_ROI", (1, 0, 0, 1)),
                                              2: ("R_V1_ROI", (0, 1, 0, 1)), 3: ("L_V2_ROI", (0, 0, 1, 1)),
                                              4: ("L_MT_ROI", (1, 1, 0, 1))}])
    keys = np.array([[1, 1, 1, 3, 3, 4, 4, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0]], np.float32)
    parcellation = cifti2.Cifti2Image(keys, header=(labels, brain))
    parcellation.nifti_header.set_intent("ConnDenseLabel")
    nib.save(parcellation, root / "HCP-MMP1.dlabel.nii")
    return runs, keys[0]


def test_hcp_rest(tmp_path, rng):
    from mindvis.data.responses import load_rest
    from mindvis.data.sources.hcp import convert_hcp_rest

    runs, keys = write_hcp(tmp_path / "HCP", rng)
    config = validate({"data": {"hcp": {
        "runs_glob": str(tmp_path / "HCP/{subject}/MNINonLinear/Results/rfMRI_REST*/rfMRI_REST*_Atlas_MSMAll.dtseries.nii"),
        "parcellation": str(tmp_path / "HCP/HCP-MMP1.dlabel.nii"), "parcels": ["V1", "V2"], "window_seconds": 3.6}}})
    summary = convert_hcp_rest(config, "100307", tmp_path / "rest.h5")
    rest = load_rest(tmp_path / "rest.h5")
    chosen = np.flatnonzero(np.isin(keys, [1, 2, 3]))
    assert list(rest.voxel_ijk[:, 0]) == list(chosen) and rest.volume_shape == (18, 1, 1)
    assert list(rest.voxel_roi) == ["L_V1_ROI"] * 3 + ["L_V2_ROI"] * 2 + ["R_V1_ROI"] * 3
    # 3.6 s / 0.72 s = 5 TRs per window: 41 -> 8 windows, 30 -> 6 windows
    assert summary["window_trs"] == 5 and list(np.bincount(rest.run)[1:]) == [8, 6]
    assert rest.tr == pytest.approx(3.6)
    first = runs[0][:40, chosen].reshape(8, 5, -1).mean(axis=1)
    np.testing.assert_allclose(rest.fmri[:8], (first - first.mean(axis=0)) / first.std(axis=0), atol=1e-4)
    np.testing.assert_allclose(rest.fmri[8:].mean(axis=0), 0, atol=1e-5)

    import yaml

    from mindvis.cli import main

    (tmp_path / "hcp.yaml").write_text(yaml.safe_dump({"data": {"hcp": config["data"]["hcp"]}}))
    assert main(["convert-rest", "--config", str(tmp_path / "hcp.yaml"), "--hcp-subject", "100307",
                 "--out", str(tmp_path / "cli.h5")]) == 0
    assert load_rest(tmp_path / "cli.h5").attrs["subject"] == "sub-100307"


def test_hcp_bad_inputs(tmp_path, rng):
    from mindvis.data.sources.hcp import convert_hcp_rest

    write_hcp(tmp_path / "HCP", rng)
    hcp = {"runs_glob": str(tmp_path / "HCP/{subject}/MNINonLinear/Results/*/*.dtseries.nii"),
           "parcellation": str(tmp_path / "HCP/HCP-MMP1.dlabel.nii"), "parcels": ["V1", "V4"]}
    with pytest.raises(MindvisError, match=r"HCP-MMP1.dlabel.nii.*\['V4'\]"):
        convert_hcp_rest(validate({"data": {"hcp": hcp}}), "100307", tmp_path / "rest.h5")
    with pytest.raises(MindvisError, match="data.hcp.runs_glob"):
        convert_hcp_rest(validate({"data": {"hcp": {**hcp, "parcels": ["V1"]}}}), "999999", tmp_path / "rest.h5")
    import nibabel as nib
    from nibabel import cifti2

    other = cifti2.BrainModelAxis.from_mask(np.ones(17, bool), name="CortexLeft")
    labels = cifti2.LabelAxis(["parcels"], [{0: ("???", (0, 0, 0, 0)), 1: ("L_V1_ROI", (1, 0, 0, 1))}])
    image = cifti2.Cifti2Image(np.ones((1, 17), np.float32), header=(labels, other))
    image.nifti_header.set_intent("ConnDenseLabel")
    nib.save(image, tmp_path / "other.dlabel.nii")
    with pytest.raises(MindvisError, match=r"rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii.*18 grayordinates.*17"):
        convert_hcp_rest(validate({"data": {"hcp": {**hcp, "parcels": ["V1"],
                                                    "parcellation": str(tmp_path / "other.dlabel.nii")}}}),
                         "100307", tmp_path / "rest.h5")
    assert not (tmp_path / "rest.h5").exists()


def test_cli_convert(tmp_path, rng):
    import yaml

    from mindvis.cli import main

    exp = signal_experiment(rng)
    np.savez(tmp_path / "sub-07.npz", train_fmri=exp["train_fmri"], test_fmri=exp["test_fmri"],
             train_images=exp["train_images"], test_images=exp["test_images"][exp["test_index"]])
    config_path = tmp_path / "lab.yaml"
    config_path.write_text(yaml.safe_dump({"subjects": ["sub-07"], "stimuli": {"image_size": 8},
                                           "data": {"source": "matrix",
                                                    "matrix": {"path": str(tmp_path / "{subject}.npz")}}}))
    out = tmp_path / "results/sub-07"
    args = ["convert", "--config", str(config_path), "--subject", "sub-07", "--out", str(out / "responses.h5"),
            "--stimuli-out", str(out / "stimuli.h5")]
    assert main(args) == 0
    assert load_responses(out / "responses.h5").subject == "sub-07"
    assert load_stimulus_set(out / "stimuli.h5")["train"].images.shape == (24, 8, 8, 1)
    args[4] = "sub-08"  # no sub-08.npz: a clear error, exit status 2, nothing written
    assert main(args[:5] + ["--out", str(tmp_path / "x.h5"), "--stimuli-out", str(tmp_path / "s.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()


# -- the image corpus of a real data set (subjects' stimulus files merged) ------------------------------------

def write_stimulus_file(path, rng, train_ids, test_ids, class_names=("a", "b")):
    from mindvis.data.stimuli import StimulusSet, StimulusSplit, save_stimulus_set

    def split(ids):
        ids = list(ids)
        images = np.stack([np.full((6, 6, 3), int(sid[1:]), np.uint8) for sid in ids]) if ids else \
            np.zeros((0, 6, 6, 3), np.uint8)
        return StimulusSplit(images, np.arange(len(ids)) % 2, np.array(ids, dtype=object), np.arange(len(ids)))

    save_stimulus_set(StimulusSet({"train": split(train_ids), "test": split(test_ids), "pool": split([])},
                                  list(class_names), {"source": f"test:{path.name}"}), path)


def test_merge_stimulus_files_keeps_every_training_image_once_and_no_test_image(tmp_path, rng):
    from mindvis.data.sources.corpus import merge_stimulus_files

    # subject 2 trains on s3, which subject 1 is tested on (NSD: a shared image seen by one subject only so far)
    write_stimulus_file(tmp_path / "a.h5", rng, ["s1", "s2", "s5"], ["s3", "s4"])
    write_stimulus_file(tmp_path / "b.h5", rng, ["s2", "s3", "s6"], ["s4"])
    summary = merge_stimulus_files([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "merged.h5")
    merged = load_stimulus_set(tmp_path / "merged.h5")
    assert list(merged["train"].stimulus_id) == ["s1", "s2", "s5", "s6"]
    assert list(merged["test"].stimulus_id) == ["s3", "s4"] and len(merged["pool"]) == 0
    assert summary == {"files": 2, "train": 4, "test": 2, "train_dropped_as_test": 1}
    # each image travels with its id (pixel value = id number) and its label
    assert [int(image[0, 0, 0]) for image in merged["train"].images] == [1, 2, 5, 6]
    assert list(merged["train"].label) == [0, 1, 0, 0] and merged.class_names == ["a", "b"]

    write_stimulus_file(tmp_path / "c.h5", rng, ["s7"], ["s8"], class_names=("a", "c"))
    with pytest.raises(MindvisError, match=r"c\.h5.*class_names.*class names differ from those of .*a\.h5"):
        merge_stimulus_files([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()
