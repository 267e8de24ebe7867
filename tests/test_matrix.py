"""Matrix files as labs keep them: flat image rows, float pixels, MATLAB's orders and 1-based labels.

The fixture mirrors Miyawaki et al. (2008) as preprocessed for MATLAB
(``fmriTrn`` / ``fmriTest`` trials x voxels, ``stimTrn`` / ``stimTest`` one
float image per row unrolled column-major, ``labelTrn`` / ``labelTest``
1-based column vectors), scaled down to 8 x 8 images and 13 voxels.
"""

import h5py
import numpy as np
import pytest

from mindvis.config import validate
from mindvis.data.responses import load_responses
from mindvis.data.sources import convert_subject
from mindvis.data.sources.matrix import pixels_to_uint8, unflatten_images
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError

SIDE = 8
MIYAWAKI_KEYS = {"train_fmri": "fmriTrn", "test_fmri": "fmriTest", "train_images": "stimTrn",
                 "test_images": "stimTest", "train_labels": "labelTrn", "test_labels": "labelTest"}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_config(tmp_path, matrix):
    return validate({"seed": 3, "stimuli": {"image_size": SIDE, "channels": 1},
                     "preprocess": {"val_fraction": 0.25},
                     "data": {"source": "matrix", "trials_per_block": 3, "matrix": matrix}})


def convert(config, tmp_path, subject="sub-01"):
    out = tmp_path / "results" / subject
    convert_subject(config, subject, out / "responses.h5", out / "stimuli.h5")
    return load_responses(out / "responses.h5"), load_stimulus_set(out / "stimuli.h5")


def matlab_rows(images):
    """uint8 [N, H, W] -> float [N, H*W] in [0, 1], each row MATLAB's ``reshape(image, 1, [])``."""
    return np.stack([(image / 255.0).reshape(-1, order="F") for image in images])


def miyawaki_like(rng, n_train=9, n_test_images=3, repeats=2, n_voxels=13):
    """Arrays named and shaped as in the Miyawaki file, with the images they encode."""
    train_images = rng.integers(0, 256, (n_train, SIDE, SIDE), dtype=np.uint8)
    test_images = rng.integers(0, 256, (n_test_images, SIDE, SIDE), dtype=np.uint8)
    test_rows = np.repeat(np.arange(n_test_images), repeats)
    train_labels = np.arange(n_train) % 3 + 1  # 1-based classes 1..3
    test_labels = np.arange(n_test_images)[test_rows] % 3 + 1
    arrays = {
        "fmriTrn": rng.normal(size=(n_train, n_voxels)), "fmriTest": rng.normal(size=(len(test_rows), n_voxels)),
        "stimTrn": matlab_rows(train_images), "stimTest": matlab_rows(test_images[test_rows]),
        "labelTrn": train_labels.astype(float).reshape(-1, 1), "labelTest": test_labels.astype(float).reshape(-1, 1),
    }
    return arrays, train_images, test_images, train_labels - 1, test_labels - 1


def write_mat(path, arrays, version):
    if version == "v5":
        from scipy.io import savemat

        savemat(path, arrays)  # MATLAB v5, as MATLAB's save writes by default
    else:
        # save -v7.3: HDF5 datasets with every axis reversed
        with h5py.File(path, "w") as handle:
            for name, array in arrays.items():
                handle.create_dataset(name, data=np.transpose(array))


# -- the pieces ------------------------------------------------------------------------------------------

def test_unflatten_matches_matlab_and_numpy_reshapes(rng):
    grey = rng.integers(0, 256, (4, 7, 5), dtype=np.uint8)  # H != W, so a transpose cannot pass
    column_major = np.stack([image.reshape(-1, order="F") for image in grey])
    np.testing.assert_array_equal(unflatten_images(column_major, [7, 5], "column_major"), grey)
    np.testing.assert_array_equal(unflatten_images(grey.reshape(4, -1), [7, 5], "row_major"), grey)
    # the order matters: MATLAB's rows read as NumPy's are not the images
    assert not np.array_equal(unflatten_images(column_major, [7, 5], "row_major"), grey)

    rgb = rng.integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    rgb_rows = np.stack([image.reshape(-1, order="F") for image in rgb])
    for shape in ([7, 5], [7, 5, 3]):  # C follows from the row length, or is given
        np.testing.assert_array_equal(unflatten_images(rgb_rows, shape, "column_major"), rgb)
    np.testing.assert_array_equal(unflatten_images(rgb.reshape(3, -1), [7, 5], "row_major"), rgb)
    assert unflatten_images(grey.reshape(4, -1), [7, 5, 1], "row_major").shape == (4, 7, 5, 1)

    with pytest.raises(MindvisError, match=r"36 values.*\[7, 5\]") as err:
        unflatten_images(np.zeros((2, 36)), [7, 5], "row_major", path="lab.mat", key="stimTrn")
    assert "lab.mat" in str(err.value) and "key 'stimTrn'" in str(err.value) and "Fix:" in str(err.value)


def test_pixels_to_uint8_decides_the_range_per_array():
    images = np.array([[0.0, 0.5, 1.0], [0.0, 0.2, 0.4]])
    np.testing.assert_array_equal(pixels_to_uint8(images), [[0, 128, 255], [0, 51, 102]])
    # a 0-255 set keeps its dark image dark: the range is the array's, not each image's
    byte_scale = np.array([[0.0, 100.0, 255.0], [0.0, 0.5, 0.8]])
    np.testing.assert_array_equal(pixels_to_uint8(byte_scale), [[0, 100, 255], [0, 0, 1]])
    np.testing.assert_array_equal(pixels_to_uint8(np.array([0.0, 0.8]), "0-255"), [0, 1])
    np.testing.assert_array_equal(pixels_to_uint8(np.array([0.0, 1.0000001, -1e-4])), [0, 255, 0])
    unchanged = np.arange(6, dtype=np.uint8)
    assert pixels_to_uint8(unchanged) is unchanged
    with pytest.raises(MindvisError, match="outside the range 0-1"):
        pixels_to_uint8(np.array([0.0, 3.0]), "0-1")
    with pytest.raises(MindvisError, match="-0.5 to 1"):
        pixels_to_uint8(np.array([-0.5, 1.0]), key="stimTrn")
    with pytest.raises(MindvisError, match="NaN"):
        pixels_to_uint8(np.array([0.0, np.nan]))


# -- a Miyawaki-style file, configured by keys alone --------------------------------------------------------

@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_miyawaki_style_mat_reads_upright_with_zero_based_labels(tmp_path, rng, version):
    arrays, train_images, test_images, train_labels, test_labels = miyawaki_like(rng)
    path = tmp_path / "miyawaki.mat"
    write_mat(path, arrays, version)
    matrix = {"path": str(path), "image_shape": [SIDE, SIDE], "pixel_order": "column_major", "label_base": 1,
              "column_major": version == "v7.3", "keys": MIYAWAKI_KEYS}
    responses, stimuli = convert(make_config(tmp_path, matrix), tmp_path)

    # images upright: exactly the 2-D arrays the rows were made from (8 px at 8 px: no resampling)
    train_rows = {sid: int(sid.split("-")[1]) for sid in stimuli["train"].stimulus_id}
    for sid, row in train_rows.items():
        image, label = (value[0] for value in stimuli.lookup([sid]))
        np.testing.assert_array_equal(image[:, :, 0], train_images[row])
        assert label == train_labels[row]
    assert len(stimuli["test"]) == 3  # repeated test rows are one stimulus each
    np.testing.assert_array_equal(stimuli["test"].images[..., 0], test_images)
    # labels 0-based, class names made up to match
    assert list(stimuli["test"].label) == list(test_labels[::2]) and set(stimuli["train"].label) == {0, 1, 2}
    assert responses.class_names == ["class-0", "class-1", "class-2"]
    assert list(responses["test_avg"].label) == list(test_labels[::2])
    assert np.all(responses["test_avg"].n_repeats == 2) and responses.n_voxels == 13


def test_miyawaki_style_mistakes_name_the_file_key_and_fix(tmp_path, rng, caplog):
    arrays, *_ = miyawaki_like(rng)
    path = tmp_path / "miyawaki.mat"
    write_mat(path, arrays, "v5")
    base = {"path": str(path), "image_shape": [SIDE, SIDE], "pixel_order": "column_major", "label_base": 1,
            "keys": MIYAWAKI_KEYS}

    with pytest.raises(MindvisError, match=r"64 values.*image_shape \[28, 28\]") as err:
        convert(make_config(tmp_path, {**base, "image_shape": [28, 28]}), tmp_path)
    text = str(err.value)
    assert "miyawaki.mat" in text and "key 'stimTrn'" in text and "Fix: set data.matrix.image_shape" in text

    with pytest.raises(MindvisError, match="flat rows of shape \\(9, 64\\)") as err:
        convert(make_config(tmp_path, {**base, "image_shape": []}), tmp_path)
    assert "data.matrix.image_shape" in str(err.value)

    arrays["labelTrn"][0] = 0  # a 0 in a 1-based file
    write_mat(path, arrays, "v5")
    with pytest.raises(MindvisError, match="below data.matrix.label_base 1") as err:
        convert(make_config(tmp_path, base), tmp_path)
    assert "key 'labelTrn'" in str(err.value) and "miyawaki.mat" in str(err.value)

    arrays["labelTrn"][0] = 1.5
    write_mat(path, arrays, "v5")
    with pytest.raises(MindvisError, match="whole numbers"):
        convert(make_config(tmp_path, base), tmp_path)

    # 1-based labels read as 0-based: no error, but a warning that says which flag to set
    arrays["labelTrn"][0] = 1
    write_mat(path, arrays, "v5")
    convert(make_config(tmp_path, {**base, "label_base": 0}), tmp_path)
    assert "data.matrix.label_base: 1" in caplog.text

    arrays["stimTrn"] = arrays["stimTrn"] * 400.0
    write_mat(path, arrays, "v5")
    with pytest.raises(MindvisError, match="outside the range 0-255") as err:
        convert(make_config(tmp_path, base), tmp_path)
    assert "data.matrix.pixel_range" in str(err.value)


def test_image_shape_must_be_two_or_three_sides(tmp_path):
    for shape in ([28], [1, 2, 3, 4]):
        with pytest.raises(MindvisError, match="image_shape"):
            make_config(tmp_path, {"path": "lab.mat", "image_shape": shape})
    config = make_config(tmp_path, {"path": "lab.mat"})
    assert config["data"]["matrix"]["image_shape"] == [] and config["data"]["matrix"]["label_base"] == 0
    assert config["data"]["matrix"]["pixel_order"] == "row_major"
    assert config["data"]["matrix"]["pixel_range"] == "auto"
