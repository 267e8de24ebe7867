"""The image prior's corpus from a lab's own images: folders, .npz, .h5 and IDX files, all tiny and made here."""

import gzip
import hashlib

import h5py
import numpy as np
import pytest
from PIL import Image

from mindvis.data.image_corpus import load_image_corpus
from mindvis.data.stimuli import fit_image
from mindvis.errors import MindvisError


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def write_idx(path, array):
    """An unsigned-byte IDX file (gzipped when the name ends in .gz), as MNIST ships them."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(raw)


def file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_names_file_key_and_fix(err, name):
    text = str(err.value)
    assert name in text and "key 'ldm.corpus'" in text and "Fix:" in text, text


def test_folder_of_images_searched_recursively_in_sorted_order(tmp_path, rng):
    folder = tmp_path / "lab_images"
    (folder / "b" / "deep").mkdir(parents=True)
    (folder / "a").mkdir()
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    colour = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)  # not square: centred on a black square
    Image.fromarray(grey).save(folder / "b" / "deep" / "grey.png")
    Image.fromarray(colour).save(folder / "a" / "colour.PNG")
    Image.fromarray(grey).save(folder / "b" / "photo.jpg", quality=95)
    (folder / "a" / "notes.txt").write_text("not an image")

    corpus = load_image_corpus(folder, image_size=16, channels=1)
    assert [p.relative_to(folder).as_posix() for p in corpus.files] == ["a/colour.PNG", "b/deep/grey.png",
                                                                       "b/photo.jpg"]
    assert corpus.images.shape == (3, 16, 16, 1) and corpus.images.dtype == np.uint8
    assert corpus.labels.dtype == np.int64 and list(corpus.labels) == [-1, -1, -1]
    np.testing.assert_array_equal(corpus.images[1, :, :, 0], grey)  # right size already: untouched
    grey_colour = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_array_equal(corpus.images[0], fit_image(grey_colour, 16, 1, pad_fraction=0))
    assert corpus.images[0, :, :2].max() == 0 and corpus.images[0, :, 2:14].max() > 0  # 8 wide: black sides
    assert corpus.source == f"folder:{folder}"

    rgb = load_image_corpus(folder, image_size=8, channels=3)
    assert rgb.images.shape == (3, 8, 8, 3) and rgb.sha256 == corpus.sha256
    np.testing.assert_array_equal(rgb.images[1, :, :, 0], rgb.images[1, :, :, 2])  # grey repeated

    # the digest covers names and bytes: same files, same digest; a rename changes it
    assert load_image_corpus(folder, 16, 1).sha256 == corpus.sha256
    (folder / "b" / "photo.jpg").rename(folder / "b" / "photo2.jpg")
    assert load_image_corpus(folder, 16, 1).sha256 != corpus.sha256


def test_npz_with_labels_and_float_images(tmp_path, rng):
    images = rng.integers(0, 256, (5, 12, 12), dtype=np.uint8)
    labels = np.array([3, 0, 1, -1, 2])
    np.savez(tmp_path / "corpus.npz", images=images, labels=labels)
    corpus = load_image_corpus(tmp_path / "corpus.npz", image_size=12, channels=3)
    assert corpus.images.shape == (5, 12, 12, 3)
    np.testing.assert_array_equal(corpus.images, np.repeat(images[..., None], 3, axis=-1))
    np.testing.assert_array_equal(corpus.labels, labels)
    assert corpus.sha256 == file_sha256(tmp_path / "corpus.npz") and corpus.source.startswith("npz:")

    np.savez(tmp_path / "floats.npz", images=(images / 255.0).astype(np.float32))
    floats = load_image_corpus(tmp_path / "floats.npz", image_size=12, channels=1)
    np.testing.assert_array_equal(floats.images[..., 0], images)
    assert np.all(floats.labels == -1)


def test_hdf5_rgb_to_grey_and_resized(tmp_path, rng):
    images = rng.integers(0, 256, (4, 10, 10, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "corpus.h5", "w") as handle:
        handle.create_dataset("images", data=images)
        handle.create_dataset("labels", data=np.array([[1], [1], [0], [2]]))  # a column vector is fine
    corpus = load_image_corpus(tmp_path / "corpus.h5", image_size=10, channels=1)
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in images])
    np.testing.assert_array_equal(corpus.images[..., 0], expected)
    assert list(corpus.labels) == [1, 1, 0, 2] and corpus.sha256 == file_sha256(tmp_path / "corpus.h5")

    resized = load_image_corpus(tmp_path / "corpus.h5", image_size=6, channels=3)
    assert resized.images.shape == (4, 6, 6, 3)
    for plane in range(3):
        expected_plane = fit_image(images[2, :, :, plane], 6, 1, pad_fraction=0)[..., 0]
        np.testing.assert_array_equal(resized.images[2, :, :, plane], expected_plane)


def test_gzipped_idx_pair_with_fashion_mnist_border(tmp_path, rng):
    images = rng.integers(1, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 0, 3, 1, 2])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    corpus = load_image_corpus(tmp_path / "train-images-idx3-ubyte.gz", 32, 1, pad_fraction=2 / 28)
    assert corpus.images.shape == (6, 32, 32, 1) and list(corpus.labels) == list(labels)
    np.testing.assert_array_equal(corpus.images[4], fit_image(images[4], 32, 1))  # the stimulus set's framing
    assert corpus.images[:, :2].max() == 0 and corpus.images[:, 14:18, 14:18].min() > 0  # a black border
    assert [p.name for p in corpus.files] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert corpus.source.startswith("idx:")

    # the border only when asked for: pad_fraction 0 fills the frame
    unpadded = load_image_corpus(tmp_path / "train-images-idx3-ubyte.gz", 28, 1)
    np.testing.assert_array_equal(unpadded.images[..., 0], images)

    # no labels file beside it: labels unknown, the digest is the image file's own
    write_idx(tmp_path / "extra-images-idx3-ubyte", images[:2])
    alone = load_image_corpus(tmp_path / "extra-images-idx3-ubyte", 28, 1)
    assert list(alone.labels) == [-1, -1] and alone.sha256 == file_sha256(tmp_path / "extra-images-idx3-ubyte")


def test_bad_corpora_name_the_file_the_key_and_the_fix(tmp_path, rng):
    with pytest.raises(MindvisError, match="not found") as err:
        load_image_corpus(tmp_path / "absent", 8, 1)
    assert_names_file_key_and_fix(err, "absent")

    (tmp_path / "images.txt").write_text("a list")
    with pytest.raises(MindvisError, match="unknown kind") as err:
        load_image_corpus(tmp_path / "images.txt", 8, 1)
    assert_names_file_key_and_fix(err, "images.txt")

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(MindvisError, match="no PNG or JPEG") as err:
        load_image_corpus(tmp_path / "empty", 8, 1)
    assert_names_file_key_and_fix(err, "empty")

    np.savez(tmp_path / "flat.npz", images=rng.integers(0, 256, (4, 64), dtype=np.uint8))
    with pytest.raises(MindvisError, match=r"\(4, 64\)") as err:
        load_image_corpus(tmp_path / "flat.npz", 8, 1)
    assert_names_file_key_and_fix(err, "flat.npz")

    np.savez(tmp_path / "bright.npz", images=np.full((2, 8, 8), 3.0))
    with pytest.raises(MindvisError, match=r"\[0, 1\]") as err:
        load_image_corpus(tmp_path / "bright.npz", 8, 1)
    assert_names_file_key_and_fix(err, "bright.npz")

    np.savez(tmp_path / "labels.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.arange(2))
    with pytest.raises(MindvisError, match="labels have shape") as err:
        load_image_corpus(tmp_path / "labels.npz", 8, 1)
    assert_names_file_key_and_fix(err, "labels.npz")

    np.savez(tmp_path / "named.npz", X=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(MindvisError, match="no array 'images'.*X") as err:
        load_image_corpus(tmp_path / "named.npz", 8, 1)
    assert_names_file_key_and_fix(err, "named.npz")

    with h5py.File(tmp_path / "named.h5", "w") as handle:
        handle.create_dataset("pictures", data=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(MindvisError, match="no dataset 'images'") as err:
        load_image_corpus(tmp_path / "named.h5", 8, 1)
    assert_names_file_key_and_fix(err, "named.h5")

    (tmp_path / "cut-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") * 3 + b"\0" * 10)
    with pytest.raises(MindvisError, match="truncated") as err:
        load_image_corpus(tmp_path / "cut-images-idx3-ubyte", 8, 1)
    assert_names_file_key_and_fix(err, "cut-images-idx3-ubyte")

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"not a png")
    with pytest.raises(MindvisError, match="cannot read this image") as err:
        load_image_corpus(folder, 8, 1)
    assert_names_file_key_and_fix(err, "x.png")
