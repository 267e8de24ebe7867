"""A lab's own images as the image prior's pretraining corpus (``ldm.corpus`` set to a path).

:func:`load_image_corpus` reads one of

=========================================  ==================================================================
``ldm.corpus``                             read as
=========================================  ==================================================================
a folder                                   every ``.png`` / ``.jpg`` / ``.jpeg`` below it (searched
                                           recursively, in sorted order of relative path); labels unknown
``*.npz``                                  array ``images``, optional array ``labels``
``*.h5`` / ``*.hdf5``                      dataset ``images``, optional dataset ``labels``
``*-images-idx3-ubyte[.gz]``               an IDX file as MNIST and Fashion-MNIST ship it; labels from the
                                           sibling ``*-labels-idx1-ubyte[.gz]`` when present
=========================================  ==================================================================

Arrays hold uint8 images [N, H, W] or [N, H, W, C] (C = 1, 3, or 4 with the
alpha dropped), or floats in [0, 1], which become ``round(value * 255)``.
Labels are integers [N] (-1 = unknown); without them every label is -1.

Every image is fitted to ``image_size`` x ``image_size`` x ``channels``: a
non-square image is centred on a black square, an optional black border of
``pad_fraction`` of its side is added on each edge, and the square is resized
(bicubic) by :func:`mindvis.data.stimuli.fit_image`. The border defaults to
none, since a lab's photographs fill their frame; ``pad_fraction=2 / 28`` frames
Fashion-MNIST-style images the way the embedded stimulus set does (28 -> 32 px).
Colour becomes grey as ITU-R 601 luma (PIL's ``L`` mode); grey becomes colour by
repeating the channel.

The corpus's ``sha256`` identifies its bytes: for one file (``.npz``, ``.h5``,
an IDX file without labels) the file's own SHA-256, as ``sha256sum`` prints it;
for a folder or an IDX pair, the SHA-256 over each file's relative path (UTF-8),
a NUL byte, its size as 8 bytes big-endian and its bytes, file by file in
sorted order, so renaming, adding or changing any file changes it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mindvis.data.stimuli import fit_image, read_idx
from mindvis.errors import MindvisError
from mindvis.utils.io import sha256_file

#: Image files a corpus folder may hold (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HDF5_SUFFIXES = (".h5", ".hdf5")
#: ``train-images-idx3-ubyte.gz`` (MNIST, Fashion-MNIST) or ``train-images.idx3-ubyte`` (some mirrors).
IDX_IMAGES = re.compile(r"^(?P<stem>.*)-images(?P<sep>[.-])idx3-ubyte(?P<gz>\.gz)?$")
KEY = "ldm.corpus"
FIX_FORMATS = ("set ldm.corpus to a folder of PNG/JPEG images, an .npz or .h5 holding 'images' "
               "(optional 'labels'), or an IDX *-images-idx3-ubyte[.gz] file.")


@dataclass
class ImageCorpus:
    """Images for pretraining the image prior.

    Attributes
    ----------
    images : uint8 [N, S, S, C]
        Fitted to the requested size and channels.
    labels : int64 [N]
        Class of each image; -1 where unknown.
    source : str
        What was read, e.g. ``npz:/data/lab/images.npz``.
    sha256 : str
        Digest of the corpus file(s) (rule in the module docstring).
    files : list of Path
        Every file read.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    sha256: str
    files: list = field(default_factory=list)

    def __len__(self):
        return len(self.labels)


def load_image_corpus(spec, image_size, channels, pad_fraction=0.0, key=KEY):
    """Read a corpus of images (a folder, ``.npz``, ``.h5`` or IDX file) fitted to one size.

    Parameters
    ----------
    spec : str or Path
        The corpus: a folder, an ``.npz``, an ``.h5`` / ``.hdf5`` or an
        ``*-images-idx3-ubyte[.gz]`` file (module docstring).
    image_size : int
        Side S of the square images returned.
    channels : {1, 3}
        Channels C of the images returned.
    pad_fraction : float
        Black border added on each edge before resizing, as a fraction of the
        image's side (0: none; ``2 / 28`` for Fashion-MNIST-style framing).
    key : str
        The config key that named ``spec``, quoted in errors.

    Returns
    -------
    ImageCorpus

    Raises
    ------
    MindvisError
        A missing path, an unknown kind of file, an empty folder, images or
        labels of the wrong shape or range: naming the file, ``key`` and the fix.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if int(image_size) < 1 or not 0 <= pad_fraction < 0.5:
        raise ValueError(f"image_size must be positive and pad_fraction in [0, 0.5): {image_size}, {pad_fraction}")
    path = Path(spec)
    if not path.exists():
        raise MindvisError("image corpus not found", path=path, key=key,
                           fix=f"set {key} to an existing folder or file, or to 'stimuli'.")
    if path.is_dir():
        return _read_folder(path, image_size, channels, pad_fraction, key)
    name = path.name.lower()
    if IDX_IMAGES.match(path.name):
        images, labels, files = _read_idx_pair(path, key)
        kind = "idx"
    elif name.endswith(".npz"):
        images, labels = _read_npz(path, key)
        files, kind = [path], "npz"
    elif name.endswith(HDF5_SUFFIXES):
        images, labels = _read_hdf5(path, key)
        files, kind = [path], "hdf5"
    else:
        raise MindvisError(f"unknown kind of image corpus '{path.suffix or path.name}'", path=path, key=key,
                           fix=FIX_FORMATS)
    images = _as_uint8(_check_images(images, path, key), path, key)
    labels = _check_labels(labels, len(images), path, key)
    fitted = fit_images(images, image_size, channels, pad_fraction)
    digest = sha256_file(path) if len(files) == 1 else _sha256_files(path.parent, files)
    return ImageCorpus(images=fitted, labels=labels, source=f"{kind}:{path}", sha256=digest, files=files)


# -- fitting -------------------------------------------------------------------------------------------------

def fit_images(images, image_size, channels, pad_fraction=0.0):
    """uint8 [N, H, W] or [N, H, W, C] (C = 1, 3, 4) -> uint8 [N, image_size, image_size, channels].

    Alpha is dropped, colour becomes ITU-R 601 luma for ``channels=1`` and grey
    is repeated for ``channels=3``; geometry as :func:`mindvis.data.stimuli.fit_image`.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4:
        images = images[..., :3]
        if channels == 1:
            images = _luma(images)
    n_images, height, width = images.shape[:3]
    if height == width == image_size and not round(height * pad_fraction):
        # Already the right geometry: skip the per-image resampling (100k images stay fast).
        if images.ndim == 3:
            images = images[..., None]
        return np.ascontiguousarray(np.repeat(images, channels // images.shape[-1], axis=-1))
    out = np.empty((n_images, image_size, image_size, channels), dtype=np.uint8)
    for row, image in enumerate(images):
        if image.ndim == 2:
            out[row] = fit_image(image, image_size, channels, pad_fraction)
        else:
            # fit_image takes grey images: fit each colour plane alike (PIL resizes planes independently).
            out[row] = np.stack([fit_image(image[..., plane], image_size, 1, pad_fraction)[..., 0]
                                 for plane in range(3)], axis=-1)
    return out


def _luma(rgb):
    """uint8 [..., 3] -> uint8 [...]: ITU-R 601 luma in PIL's fixed point, so arrays and files agree."""
    weights = np.array([19595, 38470, 7471], dtype=np.uint32)  # 0.299, 0.587, 0.114 in 1/65536
    return ((rgb.astype(np.uint32) @ weights + 0x8000) >> 16).astype(np.uint8)


# -- checks --------------------------------------------------------------------------------------------------

def _check_images(images, path, key):
    images = np.asarray(images)
    bad_channels = images.ndim == 4 and images.shape[-1] not in (1, 3, 4)
    if images.ndim not in (3, 4) or bad_channels or images.shape[0] == 0 or 0 in images.shape:
        raise MindvisError(f"images must be [N, H, W] or [N, H, W, C] with N > 0 and C in 1, 3, 4; found shape "
                           f"{images.shape}", path=path, key=key,
                           fix=f"store the corpus images with the image axis first ({key}).")
    return images


def _as_uint8(images, path, key):
    """uint8 unchanged; integers in 0..255 cast; floats in [0, 1] as round(value * 255)."""
    if images.dtype == np.uint8:
        return images
    fix = f"store uint8 images, or floats in [0, 1] ({key})."
    if images.dtype.kind in "iu":
        if images.min() < 0 or images.max() > 255:
            raise MindvisError(f"integer images run from {images.min()} to {images.max()}, outside 0..255",
                               path=path, key=key, fix=fix)
        return images.astype(np.uint8)
    if images.dtype.kind != "f":
        raise MindvisError(f"images must be numeric, found dtype {images.dtype}", path=path, key=key, fix=fix)
    values = images.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    # Half a grey level of slack absorbs rounding error (1.0000001); NaN fails every comparison.
    if not (np.isfinite(low) and np.isfinite(high) and low >= -0.5 / 255 and high <= 1 + 0.5 / 255):
        raise MindvisError(f"float images run from {low:g} to {high:g}; floats must lie in [0, 1]", path=path,
                           key=key, fix=fix)
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def _check_labels(labels, n_images, path, key):
    if labels is None:
        return np.full(n_images, -1, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and 1 in labels.shape:
        labels = labels.reshape(-1)
    fix = f"store one integer label per image ([N], -1 = unknown), or leave the labels out ({key})."
    if labels.ndim != 1 or len(labels) != n_images:
        raise MindvisError(f"labels have shape {labels.shape} for {n_images} images", path=path, key=key, fix=fix)
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and np.any(labels != np.rint(labels))):
        raise MindvisError(f"labels must be whole numbers, found dtype {labels.dtype}", path=path, key=key, fix=fix)
    labels = labels.astype(np.int64)
    if labels.min() < -1:
        raise MindvisError(f"labels reach {labels.min()}; -1 is the only negative label (unknown)", path=path,
                           key=key, fix=fix)
    return labels


# -- readers -------------------------------------------------------------------------------------------------

def _read_folder(folder, image_size, channels, pad_fraction, key):
    from PIL import Image, UnidentifiedImageError

    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise MindvisError("no PNG or JPEG images in this folder (searched recursively)", path=folder, key=key,
                           fix=f"put {', '.join(IMAGE_SUFFIXES)} files below it, or point {key} elsewhere.")
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for row, file in enumerate(files):
        try:
            with Image.open(file) as picture:
                # L for a grey corpus, RGB otherwise: palette, alpha and 16-bit modes all land in one of the two.
                image = np.asarray(picture.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise MindvisError(f"cannot read this image ({err})", path=file, key=key,
                               fix="replace or remove the file.") from None
        out[row] = fit_images(image[None], image_size, channels, pad_fraction)[0]
    return ImageCorpus(images=out, labels=np.full(len(files), -1, dtype=np.int64), source=f"folder:{folder}",
                       sha256=_sha256_files(folder, files), files=files)


def _read_npz(path, key):
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "images" not in arrays:
                raise MindvisError(f"no array 'images' (the file holds: {', '.join(sorted(arrays.files))})",
                                   path=path, key=key, fix="save the images as numpy.savez(path, images=..).")
            return arrays["images"], (arrays["labels"] if "labels" in arrays else None)
    except (OSError, ValueError) as err:
        raise MindvisError(f"cannot read this .npz ({err})", path=path, key=key, fix=FIX_FORMATS) from None


def _read_hdf5(path, key):
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise MindvisError(f"cannot read this HDF5 file ({err})", path=path, key=key, fix=FIX_FORMATS) from None
    with handle:
        if "images" not in handle or not isinstance(handle["images"], h5py.Dataset):
            raise MindvisError(f"no dataset 'images' (the file holds: {', '.join(sorted(handle))})", path=path,
                               key=key, fix="write the images to a dataset named 'images'.")
        labels = handle["labels"][()] if isinstance(handle.get("labels"), h5py.Dataset) else None
        return handle["images"][()], labels


def _read_idx_pair(path, key):
    match = IDX_IMAGES.match(path.name)
    images = _read_idx(path, key)
    stem, sep = match["stem"], match["sep"]
    candidates = [path.with_name(f"{stem}-labels{sep}idx1-ubyte{gz}") for gz in (match["gz"] or "", ".gz", "")]
    label_file = next((p for p in dict.fromkeys(candidates) if p.exists()), None)
    if label_file is None:
        return images, None, [path]
    return images, _read_idx(label_file, key), sorted([path, label_file])


def _read_idx(path, key):
    try:
        return read_idx(path)
    except MindvisError as err:
        raise MindvisError(err.message, path=err.path, key=key,
                           fix=f"check the file is a complete IDX file (MNIST's format), or point {key} "
                               "elsewhere.") from None


def _sha256_files(root, files):
    """SHA-256 over (relative path, NUL, size, bytes) of each file, in the given (sorted) order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
