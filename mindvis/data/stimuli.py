"""The stimulus set: images, class labels, class names and ids, in one HDF5 file.

Layout of ``stimuli.h5``
------------------------
Groups ``train``, ``test`` and ``pool``, each holding

=================  ================================  ==========================================
dataset            dtype / shape                     meaning
=================  ================================  ==========================================
``images``         uint8 [N, H, W, C]                the images as shown (C = 1 grey or 3 RGB)
``label``          int64 [N]                         class index into ``class_names``; -1 when unknown
``stimulus_id``    UTF-8 str [N]                     unique id, e.g. ``train-0007``, ``test-0003``
``source_index``   int64 [N]                         index of the image in its source file
=================  ================================  ==========================================

File attributes: ``class_names`` (JSON list), ``novel_classes`` (JSON list of
class indices with no training image; absent in older files, read as ``[]``),
``image_size``, ``channels``, ``source``, ``license``, ``attribution``,
``seed``, ``config`` (JSON of the ``stimuli`` section), ``versions`` (JSON).

The split mirrors Kamitani's Generic Object Decoding: ``train`` holds distinct
images each shown once, ``test`` holds few images shown many times, and
``pool`` holds further images from the same source (never a train or test
image) for pretraining the image generator. Training and pool images come from
the source's training file, test images from its test file. Pool images keep
their class labels: they are the generator's "captions", the stand-in for the
text that a pretrained text-to-image model learned from. They are never paired
with fMRI, so no decoder sees a pool label; a source without labels for its
pool writes -1.

Novel categories (``stimuli.novel_classes``), as in GOD, whose 50 test
categories are all absent from its 150 training categories: the listed classes
get no ``train`` image (so no fMRI trial of training or validation shows one);
``test`` still holds ``n_test_per_class`` images of every class, and ``pool``
draws from all classes. The evaluate stage reports the test stimuli of seen and
of novel categories apart.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_path, derive_seed, hdf5_for_writing, software_versions

SPLITS = ("train", "test", "pool")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_LICENSE = "MIT (Expat), Copyright (c) 2017 Zalando SE"
FASHION_MNIST_ATTRIBUTION = (
    "Fashion-MNIST by Han Xiao, Kashif Rasul and Roland Vollgraf, Zalando Research "
    "(arXiv:1708.07747), https://github.com/zalandoresearch/fashion-mnist"
)
#: The subset committed with mindvis: what ``stimuli.fashion_mnist_dir: bundled`` (the default) reads.
BUNDLED_FASHION_MNIST = Path(__file__).with_name("assets") / "fashion-mnist"
#: The value of ``stimuli.fashion_mnist_dir`` that names :data:`BUNDLED_FASHION_MNIST`.
BUNDLED = "bundled"
#: Where Debian's ``dataset-fashion-mnist`` installs the full set (``make prior`` reads it).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class StimulusSplit:
    """One split of a stimulus set. ``images``: uint8 [N, H, W, C]."""

    images: np.ndarray
    label: np.ndarray
    stimulus_id: np.ndarray
    source_index: np.ndarray

    def __len__(self):
        return len(self.label)


@dataclass
class StimulusSet:
    """Images with labels and ids, split as in Generic Object Decoding.

    ``novel_classes``: class indices that have no ``train`` image (GOD's novel test categories).
    """

    splits: dict
    class_names: list
    attrs: dict
    novel_classes: list = field(default_factory=list)

    def __getitem__(self, split):
        return self.splits[split]

    @property
    def n_classes(self):
        return len(self.class_names)

    def lookup(self, stimulus_ids):
        """Images and labels for a sequence of stimulus ids from any split.

        Returns
        -------
        images : uint8 [N, H, W, C]
        labels : int64 [N]
        """
        index = {}
        for name, split in self.splits.items():
            for row, sid in enumerate(split.stimulus_id):
                index[sid] = (name, row)
        missing = [sid for sid in stimulus_ids if sid not in index]
        if missing:
            raise MindvisError(f"{len(missing)} stimulus ids are not in the stimulus set, e.g. {missing[:3]}",
                               key="stimulus_id", fix="use the stimulus HDF5 the fMRI data were made with.")
        rows = [index[sid] for sid in stimulus_ids]
        images = np.stack([self.splits[name].images[row] for name, row in rows])
        labels = np.array([self.splits[name].label[row] for name, row in rows], dtype=np.int64)
        return images, labels


# -- Fashion-MNIST ------------------------------------------------------------

def read_idx(path):
    """Read an IDX file (gzipped or not) as a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise MindvisError(f"cannot read IDX file ({err})", path=path,
                           fix="reinstall the data set or point stimuli.fashion_mnist_dir elsewhere.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MindvisError("not an unsigned-byte IDX file (bad magic number)", path=path)
    n_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)
    if data.size != int(np.prod(shape)):
        raise MindvisError(f"IDX header says {shape} but the file holds {data.size} values (truncated?)", path=path)
    return data.reshape(shape)


def fashion_mnist_dir(value):
    """The Fashion-MNIST folder that ``stimuli.fashion_mnist_dir`` names.

    Parameters
    ----------
    value : str or Path
        :data:`BUNDLED` (the schema's default): the subset committed with mindvis
        (:data:`BUNDLED_FASHION_MNIST`), whether or not Debian's ``dataset-fashion-mnist`` is installed, so the
        default's stimuli are the same on every machine. Any other value is a folder that must hold all four
        IDX files (``/usr/share/datasets/fashion-mnist`` for Debian's full set, as ``make prior`` reads).

    Raises
    ------
    MindvisError
        Naming the first missing file, the key and the fix; a folder is never silently swapped for another.
    """
    bundled = str(value) == BUNDLED
    folder = BUNDLED_FASHION_MNIST if bundled else Path(value)
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not missing:
        return folder
    if bundled:
        raise MindvisError(f"the committed Fashion-MNIST subset lacks {missing[0]} (a broken install?)",
                           path=folder / missing[0], key="stimuli.fashion_mnist_dir",
                           fix="reinstall mindvis, or set stimuli.fashion_mnist_dir to a folder with "
                               f"{', '.join(needed)}.")
    raise MindvisError(f"{missing[0]} is missing ({len(missing)} of the {len(needed)} Fashion-MNIST files are)",
                       path=folder / missing[0], key="stimuli.fashion_mnist_dir",
                       fix=f"install Debian's dataset-fashion-mnist (make fashion-mnist) for {DEBIAN_FASHION_MNIST}, "
                           f"point the key at a folder with {', '.join(needed)}, or set it to '{BUNDLED}' for the "
                           "committed subset.")


def load_fashion_mnist(folder):
    """Images uint8 [N, 28, 28] and labels int64 [N] of both source files."""
    folder = Path(folder)
    out = {}
    for part, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images = read_idx(folder / image_file)
        labels = read_idx(folder / label_file).astype(np.int64)
        if len(images) != len(labels):
            raise MindvisError(f"{len(images)} images but {len(labels)} labels", path=folder / label_file)
        out[part] = (images, labels)
    return out


# -- image geometry -----------------------------------------------------------

def fit_image(image, image_size, channels, pad_fraction=2 / 28):
    """Pad a grey uint8 [h, w] image with a border, resize it to ``image_size``.

    The border (``pad_fraction`` of the side on each edge: 28 -> 32 px for
    Fashion-MNIST) keeps objects off the image edge, like a fixation display.

    Returns
    -------
    uint8 [image_size, image_size, channels]
    """
    from PIL import Image

    height, width = image.shape
    side = max(height, width)
    pad = int(round(side * pad_fraction))
    canvas = np.zeros((side + 2 * pad, side + 2 * pad), dtype=np.uint8)
    top = pad + (side - height) // 2
    left = pad + (side - width) // 2
    canvas[top: top + height, left: left + width] = image
    if canvas.shape[0] != image_size:
        canvas = np.asarray(Image.fromarray(canvas).resize((image_size, image_size), Image.BICUBIC))
    return np.repeat(canvas[:, :, None], channels, axis=2)


# -- building and reading -----------------------------------------------------

def _pick_per_class(labels, n_per_class, classes, rng, exclude=()):
    """``n_per_class`` random rows of each of ``classes``, interleaved by class."""
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[list(exclude)] = True
    chosen = []
    for cls in classes:
        candidates = np.flatnonzero((labels == cls) & ~excluded)
        if len(candidates) < n_per_class:
            raise MindvisError(f"class {cls} has {len(candidates)} images, {n_per_class} asked for",
                               key="stimuli.n_train_per_class / n_test_per_class",
                               fix="ask for fewer images per class, or use the full data set.")
        chosen.append(np.sort(rng.choice(candidates, n_per_class, replace=False)))
    # Interleave classes so any prefix of the split is class-balanced.
    return np.stack(chosen, axis=1).reshape(-1)


def check_novel_classes(novel_classes, n_classes):
    """``stimuli.novel_classes`` as a sorted list of distinct ints, checked against the data set's classes.

    Raises
    ------
    MindvisError
        For an index outside ``[0, n_classes)``, or when every class would be novel (nothing to train on).
    """
    novel = sorted({int(cls) for cls in novel_classes})
    outside = [cls for cls in novel if not 0 <= cls < n_classes]
    if outside:
        raise MindvisError(f"novel class indices {outside} are outside the data set's {n_classes} classes "
                           f"(0 .. {n_classes - 1})", key="stimuli.novel_classes",
                           fix=f"list class indices between 0 and {n_classes - 1}.")
    if len(novel) >= n_classes:
        raise MindvisError(f"all {n_classes} classes are listed as novel: no class would have training images",
                           key="stimuli.novel_classes", fix="leave at least one class out of stimuli.novel_classes.")
    return novel


def build_stimulus_set(config, out_path):
    """Build the stimulus HDF5 from the config's ``stimuli`` section.

    Parameters
    ----------
    config : dict
        A validated experiment config.
    out_path : str or Path
        Where to write ``stimuli.h5`` (written atomically).
    """
    section = config["stimuli"]
    rng = np.random.default_rng(derive_seed(config["seed"], "stimuli"))
    folder = fashion_mnist_dir(section["fashion_mnist_dir"])
    source = load_fashion_mnist(folder)
    n_classes = len(FASHION_MNIST_CLASSES)
    novel = check_novel_classes(section.get("novel_classes", []), n_classes)

    train_images, train_labels = source["train"]
    test_images, test_labels = source["test"]
    seen = [cls for cls in range(n_classes) if cls not in novel]
    train_rows = _pick_per_class(train_labels, section["n_train_per_class"], seen, rng)
    test_rows = _pick_per_class(test_labels, section["n_test_per_class"], range(n_classes), rng)
    remaining = np.setdiff1d(np.arange(len(train_labels)), train_rows)
    if section["n_pool"] > len(remaining):
        raise MindvisError(f"n_pool is {section['n_pool']} but only {len(remaining)} further images exist in {folder}",
                           key="stimuli.n_pool", fix=f"lower stimuli.n_pool, or set stimuli.fashion_mnist_dir to the full set "
                                                    f"({DEBIAN_FASHION_MNIST}, Debian's dataset-fashion-mnist).")
    pool_rows = np.sort(rng.choice(remaining, section["n_pool"], replace=False))

    def make(images, labels, rows, prefix):
        fitted = np.stack([fit_image(images[r], section["image_size"], section["channels"]) for r in rows]) \
            if len(rows) else np.zeros((0, section["image_size"], section["image_size"], section["channels"]), np.uint8)
        return StimulusSplit(
            images=fitted,
            label=labels[rows].astype(np.int64),
            stimulus_id=np.array([f"{prefix}-{i:04d}" for i in range(len(rows))], dtype=object),
            source_index=rows.astype(np.int64),
        )

    splits = {
        "train": make(train_images, train_labels, train_rows, "train"),
        "test": make(test_images, test_labels, test_rows, "test"),
        "pool": make(train_images, train_labels, pool_rows, "pool"),
    }
    attrs = {
        "source": f"fashion_mnist:{folder}",
        "image_size": section["image_size"],
        "channels": section["channels"],
        "license": FASHION_MNIST_LICENSE,
        "attribution": FASHION_MNIST_ATTRIBUTION,
        "seed": config["seed"],
        "config": json.dumps(section),
        "versions": json.dumps(software_versions()),
    }
    save_stimulus_set(StimulusSet(splits, list(FASHION_MNIST_CLASSES), attrs, novel_classes=novel), out_path)


def save_stimulus_set(stimulus_set, out_path):
    """Write a :class:`StimulusSet` to HDF5 atomically (layout in the module docstring)."""
    string_dtype = h5py.string_dtype("utf-8")
    # Built in memory and written in one go: HDF5 writing straight to a full disk crashes (utils.io.hdf5_for_writing).
    with atomic_path(out_path) as tmp, hdf5_for_writing(tmp) as handle:
        for key, value in stimulus_set.attrs.items():
            handle.attrs[key] = value
        handle.attrs["class_names"] = json.dumps(list(stimulus_set.class_names))
        handle.attrs["novel_classes"] = json.dumps([int(cls) for cls in stimulus_set.novel_classes])
        for name, split in stimulus_set.splits.items():
            group = handle.create_group(name)
            # Chunks of whole images and light compression: large natural-image sets
            # (GOD's 256 x 256 RGB) write in seconds and any one image reads alone.
            chunks = (max(1, min(len(split.images), 16)),) + split.images.shape[1:] if len(split.images) else None
            group.create_dataset("images", data=split.images, chunks=chunks,
                                 compression="gzip" if chunks else None, compression_opts=1 if chunks else None)
            group.create_dataset("label", data=np.asarray(split.label, dtype=np.int64))
            group.create_dataset("stimulus_id", data=np.asarray(split.stimulus_id, dtype=object), dtype=string_dtype)
            group.create_dataset("source_index", data=np.asarray(split.source_index, dtype=np.int64))


#: What a stimulus file's errors tell the user to do.
_REBUILD = "rebuild it with the 'stimuli' stage (or 'convert' for a real data set)."


def _json_attr(handle, key, path, default=None):
    """A JSON attribute of a stimulus file (``default`` when absent and a default is given)."""
    if key not in handle.attrs:
        if default is not None:
            return default
        raise MindvisError("attribute missing", path=path, key=key, fix=_REBUILD)
    try:
        return json.loads(handle.attrs[key])
    except (TypeError, ValueError):
        raise MindvisError("attribute is not valid JSON", path=path, key=key, fix=_REBUILD) from None


def _read_stimulus_split(handle, name, path, n_classes):
    """One split's datasets, checked: uint8 images [N, H, W, C], int labels in -1 .. n_classes - 1, str ids."""
    import h5py

    if name not in handle or not isinstance(handle[name], h5py.Group):
        raise MindvisError("group missing", path=path, key=name, fix=_REBUILD)
    group = handle[name]
    for key in ("images", "label", "stimulus_id", "source_index"):
        if key not in group or not isinstance(group[key], h5py.Dataset):
            raise MindvisError("dataset missing", path=path, key=f"{name}/{key}", fix=_REBUILD)
    images = group["images"][()]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise MindvisError(f"images must be uint8 [N, H, W, C], found {images.dtype} {images.shape}",
                           path=path, key=f"{name}/images", fix=_REBUILD)
    label, source_index = group["label"][()], group["source_index"][()]
    for key, values in (("label", label), ("source_index", source_index)):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise MindvisError(f"must be an int vector [N], found {values.dtype} {values.shape}", path=path,
                               key=f"{name}/{key}", fix=_REBUILD)
    if len(label) and (label.min() < -1 or label.max() >= n_classes):
        raise MindvisError(f"labels run from {label.min()} to {label.max()} but class_names has {n_classes} "
                           "(labels must lie in -1 .. n_classes - 1)", path=path, key=f"{name}/label", fix=_REBUILD)
    if h5py.check_string_dtype(group["stimulus_id"].dtype) is None or group["stimulus_id"].ndim != 1:
        raise MindvisError(f"must be a string vector [N], found {group['stimulus_id'].dtype}", path=path,
                           key=f"{name}/stimulus_id", fix=_REBUILD)
    split = StimulusSplit(images=images, label=label.astype(np.int64),
                          stimulus_id=np.asarray(group["stimulus_id"].asstr()[()], dtype=object),
                          source_index=source_index)
    lengths = {len(split.images), len(split.label), len(split.stimulus_id), len(split.source_index)}
    if len(lengths) != 1:
        raise MindvisError(f"datasets of split '{name}' differ in length: {sorted(lengths)}", path=path, key=name,
                           fix=_REBUILD)
    return split


def load_stimulus_set(path, splits=SPLITS):
    """Read and check a stimulus HDF5.

    Raises
    ------
    MindvisError
        Naming the file and the missing or malformed dataset.
    """
    path = Path(path)
    if not path.exists():
        raise MindvisError("stimulus file not found", path=path, fix="run the 'stimuli' stage first.")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        reason = " ".join(str(err).split())  # h5py's messages can span lines; errors stay one line
        raise MindvisError(f"not a readable HDF5 file ({reason})", path=path, fix=_REBUILD) from None
    with handle:
        class_names = _json_attr(handle, "class_names", path)
        if not isinstance(class_names, list) or not all(isinstance(name, str) for name in class_names):
            raise MindvisError("must be a JSON list of strings", path=path, key="class_names", fix=_REBUILD)
        # Files written before novel categories existed have no attribute: every class was seen.
        novel_classes = _json_attr(handle, "novel_classes", path, default=[])
        if not isinstance(novel_classes, list) or not all(isinstance(cls, int) for cls in novel_classes):
            raise MindvisError("must be a JSON list of class indices", path=path, key="novel_classes", fix=_REBUILD)
        attrs = {key: handle.attrs[key] for key in handle.attrs if key not in ("class_names", "novel_classes")}
        out = {name: _read_stimulus_split(handle, name, path, len(class_names)) for name in splits}
    return StimulusSet(out, class_names, attrs, novel_classes=[int(cls) for cls in novel_classes])
