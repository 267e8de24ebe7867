"""The stimulus set: Fashion-MNIST reading, GOD-style split, HDF5 round trip."""

import gzip

import h5py
import numpy as np
import pytest

from mindvis.config import validate
from mindvis.data.stimuli import (
    BUNDLED, BUNDLED_FASHION_MNIST, build_stimulus_set, fashion_mnist_dir, fit_image, load_stimulus_set, read_idx,
)
from mindvis.errors import MindvisError


def _config(tmp_path, **stimuli):
    section = {"n_train_per_class": 3, "n_test_per_class": 2, "n_pool": 40, **stimuli}
    return validate({"seed": 3, "stimuli": section})


@pytest.fixture
def stimulus_file(tmp_path):
    path = tmp_path / "stimuli.h5"
    build_stimulus_set(_config(tmp_path), path)
    return path


def test_split_sizes_balance_and_disjointness(stimulus_file):
    stim = load_stimulus_set(stimulus_file)
    assert len(stim["train"]) == 30 and len(stim["test"]) == 20 and len(stim["pool"]) == 40
    assert np.bincount(stim["train"].label, minlength=10).tolist() == [3] * 10
    assert np.bincount(stim["test"].label, minlength=10).tolist() == [2] * 10
    # Pool images keep their labels (the generator's "captions"), drawn from every class.
    assert stim["pool"].label.min() >= 0 and len(np.unique(stim["pool"].label)) > 1
    # Train and pool both come from the source's training file: never the same image.
    assert not set(stim["train"].source_index) & set(stim["pool"].source_index)
    ids = np.concatenate([stim[s].stimulus_id for s in ("train", "test", "pool")])
    assert len(set(ids)) == len(ids)
    assert stim["train"].images.shape[1:] == (32, 32, 1)
    assert stim.n_classes == 10 and stim.class_names[9] == "Ankle boot"


def test_same_seed_same_set_other_seed_differs(tmp_path, stimulus_file):
    again = tmp_path / "again.h5"
    build_stimulus_set(_config(tmp_path), again)
    np.testing.assert_array_equal(load_stimulus_set(again)["train"].images,
                                  load_stimulus_set(stimulus_file)["train"].images)
    other = tmp_path / "other.h5"
    config = _config(tmp_path)
    config["seed"] = 4
    build_stimulus_set(config, other)
    assert not np.array_equal(load_stimulus_set(other)["train"].source_index,
                              load_stimulus_set(stimulus_file)["train"].source_index)


def test_images_are_the_source_images_padded(stimulus_file):
    stim = load_stimulus_set(stimulus_file)
    folder = stim.attrs["source"].split(":", 1)[1]
    source = read_idx(f"{folder}/train-images-idx3-ubyte.gz")
    row = stim["train"].source_index[0]
    np.testing.assert_array_equal(stim["train"].images[0, 2:30, 2:30, 0], source[row])
    assert stim["train"].images[0, :2].max() == 0  # the border is blank


def test_rgb_and_resize():
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = fit_image(image, 64, 3)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out.std() > 0


def test_lookup_returns_images_in_order(stimulus_file):
    stim = load_stimulus_set(stimulus_file)
    ids = [stim["test"].stimulus_id[1], stim["train"].stimulus_id[0]]
    images, labels = stim.lookup(ids)
    np.testing.assert_array_equal(images[0], stim["test"].images[1])
    assert labels.tolist() == [stim["test"].label[1], stim["train"].label[0]]
    with pytest.raises(MindvisError, match="not in the stimulus set"):
        stim.lookup(["test-9999"])


def test_default_reads_the_committed_subset_whether_or_not_debian_is_installed(tmp_path):
    # The schema's default names the committed subset: the same stimuli on every machine (issue 36).
    config = _config(tmp_path)
    assert config["stimuli"]["fashion_mnist_dir"] == BUNDLED
    assert fashion_mnist_dir(BUNDLED) == BUNDLED_FASHION_MNIST
    build_stimulus_set(config, tmp_path / "s.h5")
    assert load_stimulus_set(tmp_path / "s.h5").attrs["source"] == f"fashion_mnist:{BUNDLED_FASHION_MNIST}"


def test_an_incomplete_folder_is_a_clear_error_not_the_subset(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes((BUNDLED_FASHION_MNIST / "train-images-idx3-ubyte.gz")
                                                         .read_bytes())
    with pytest.raises(MindvisError, match="train-labels-idx1-ubyte.gz is missing") as err:
        build_stimulus_set(_config(tmp_path, fashion_mnist_dir=str(folder)), tmp_path / "s.h5")
    message = str(err.value)
    assert "stimuli.fashion_mnist_dir" in message and "dataset-fashion-mnist" in message and BUNDLED in message
    assert not (tmp_path / "s.h5").exists()


def test_an_explicit_folder_is_read(tmp_path):
    config = _config(tmp_path, fashion_mnist_dir=str(BUNDLED_FASHION_MNIST))
    build_stimulus_set(config, tmp_path / "s.h5")
    assert load_stimulus_set(tmp_path / "s.h5").attrs["source"] == f"fashion_mnist:{BUNDLED_FASHION_MNIST}"


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = gzip.open(BUNDLED_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").read()
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(raw[:5000])
    with pytest.raises(MindvisError, match="truncated"):
        read_idx(bad)


def test_too_many_pool_images_is_a_clear_error(tmp_path):
    config = _config(tmp_path, n_pool=10**6)
    with pytest.raises(MindvisError, match="stimuli.n_pool"):
        build_stimulus_set(config, tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists()


def test_reader_names_missing_dataset(tmp_path, stimulus_file):
    with h5py.File(stimulus_file, "a") as handle:
        del handle["test/label"]
    with pytest.raises(MindvisError, match="test/label"):
        load_stimulus_set(stimulus_file)


def test_novel_classes_get_no_training_images_but_test_and_pool_images(tmp_path):
    config = _config(tmp_path, novel_classes=[5, 2])
    build_stimulus_set(config, tmp_path / "s.h5")
    stim = load_stimulus_set(tmp_path / "s.h5")
    assert stim.novel_classes == [2, 5]
    counts = np.bincount(stim["train"].label, minlength=10).tolist()
    assert counts == [3, 3, 0, 3, 3, 0, 3, 3, 3, 3] and len(stim["train"]) == 24
    assert np.bincount(stim["test"].label, minlength=10).tolist() == [2] * 10
    assert {2, 5} <= set(stim["pool"].label.tolist())  # the pool covers every class, novel ones too
    assert not set(stim["train"].source_index) & set(stim["pool"].source_index)


def test_novel_classes_attribute_defaults_to_none_on_old_files(stimulus_file):
    assert load_stimulus_set(stimulus_file).novel_classes == []
    with h5py.File(stimulus_file, "a") as handle:
        del handle.attrs["novel_classes"]  # as written before the key existed
    stim = load_stimulus_set(stimulus_file)
    assert stim.novel_classes == [] and "novel_classes" not in stim.attrs


@pytest.mark.parametrize("novel, message", [([3, 10], r"\[10\] are outside"), (list(range(10)), "all 10 classes")])
def test_bad_novel_classes_are_a_clear_error(tmp_path, novel, message):
    config = _config(tmp_path, novel_classes=novel)
    with pytest.raises(MindvisError, match=message) as error:
        build_stimulus_set(config, tmp_path / "s.h5")
    assert "stimuli.novel_classes" in str(error.value)
    assert not (tmp_path / "s.h5").exists()
