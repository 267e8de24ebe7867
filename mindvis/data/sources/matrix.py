"""A lab's own preprocessed matrices: ``.npz``, ``.mat`` (v5 or v7.3) or ``.h5``.

Expected arrays (names set in ``data.matrix.keys``; ``""`` means absent):

=====================  ==================================  ===============================================
key                    shape                               meaning
=====================  ==================================  ===============================================
``train_fmri``         [N_train, V] float                  one row per training trial (required)
``test_fmri``          [N_test, V] float                   one row per test trial, repeats kept (required)
``train_images``       [M_train, H, W(, C)] uint8 / float  images (required); float in [0, 1] or [0, 255];
                       or [M_train, H*W(*C)]               flat rows with ``image_shape``
``test_images``        [M_test, H, W(, C)]                 (required)
``train_labels``       [M_train] int                       class of each image, from ``label_base`` (optional)
``test_labels``        [M_test] int                        (optional)
``class_names``        [C] str / cell array                (optional; else ``class-0`` ..)
``train_image_index``  [N_train] int                       row of ``train_images`` shown in each trial
                                                           (optional: without it images align with trials)
``test_image_index``   [N_test] int                        (optional, as above)
``train_runs``         [N_train] int                       run of each trial (optional; the validation split
                                                           is carved by whole runs when given)
``test_runs``          [N_test] int                        (optional)
=====================  ==================================  ===============================================

Without an image index, trials showing byte-identical images are recognised
as repeats of one stimulus, so repeated test trials are averaged either way.
``column_major: true`` reverses every array's axes (MATLAB v7.3 files seen
through HDF5); ``image_axis: last`` takes images stored as [H, W(, C), N]
(MATLAB's habit); ``index_base: 1`` takes MATLAB's 1-based indices.

Images stored one flat row per image, [M, H*W] or [M, H*W*C], are read with
``image_shape: [H, W]`` (or ``[H, W, C]``) and ``pixel_order``: ``row_major``
is NumPy's reshape, ``column_major`` MATLAB's ``reshape(row, H, W, C)`` (the
image's row index varies fastest). Non-uint8 pixels become uint8 as
``round(value * 255 / top)``, ``top`` being 1 or 255 (``pixel_range``; ``auto``
takes 1 when the largest value of a part's images is at most 1). Labels count
from ``label_base`` (1 for MATLAB's classes) and are stored 0-based.

Miyawaki et al. (2008) as preprocessed for MATLAB (``fmriTrn`` [107, 967],
``stimTrn`` [107, 784] float 28 x 28 column-major, ``labelTrn`` [107, 1]
1-based; the same for ``*Test``) reads with::

    data:
      source: matrix
      matrix:
        path: /data/miyawaki/{subject}.mat
        image_shape: [28, 28]
        pixel_order: column_major
        label_base: 1
        keys: {train_fmri: fmriTrn, test_fmri: fmriTest, train_images: stimTrn, test_images: stimTest,
               train_labels: labelTrn, test_labels: labelTest}
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from mindvis.data.sources.arrays import ArrayFile
from mindvis.data.sources.common import SourceData, line_geometry, subject_number
from mindvis.errors import MindvisError

log = logging.getLogger(__name__)

KEY_PREFIX = "data.matrix.keys"
#: Channel counts a flat row may hold beside H*W grey pixels: grey, RGB, RGBA.
FLAT_CHANNELS = (1, 3, 4)


def matrix_path(config, subject):
    """The matrix file of ``subject``: ``data.matrix.path`` with ``{subject}`` / ``{n}`` filled in."""
    template = config["data"]["matrix"]["path"]
    if not template:
        raise MindvisError("no matrix file configured", key="data.matrix.path",
                           fix="set data.matrix.path, e.g. /data/lab/{subject}_decoding.mat.")
    number = subject_number(subject) if "{n}" in template else None
    return Path(template.format(subject=subject, n=number))


def unflatten_images(rows, image_shape, pixel_order, path=None, key=None):
    """Flat image rows -> images.

    Parameters
    ----------
    rows : array [N, L]
        One image per row, L = H*W*C.
    image_shape : sequence of 2 or 3 int
        [H, W] (C follows from L: 1, 3 or 4) or [H, W, C].
    pixel_order : {"row_major", "column_major"}
        ``row_major``: NumPy's C-order reshape (channel fastest, then column);
        ``column_major``: MATLAB's ``reshape(row, H, W, C)`` (NumPy ``order="F"``:
        the image row index fastest).
    path, key : optional
        Quoted in errors.

    Returns
    -------
    array [N, H, W] (grey, from [H, W]) or [N, H, W, C], dtype of ``rows``
    """
    rows = np.asarray(rows)
    n_images, length = rows.shape
    height, width = int(image_shape[0]), int(image_shape[1])
    channels = int(image_shape[2]) if len(image_shape) == 3 else length // (height * width)
    if height * width * channels != length or channels not in FLAT_CHANNELS:
        per_image = ", ".join(f"{height * width * c}" for c in FLAT_CHANNELS)
        raise MindvisError(
            f"a flat image row holds {length} values, which does not divide into data.matrix.image_shape "
            f"{list(image_shape)} ({per_image} values for 1, 3, 4 channels)", path=path, key=key,
            fix=f"set data.matrix.image_shape to the images' [H, W] or [H, W, C] (H * W * C = {length}), "
                "or name the right array in data.matrix.keys.")
    shape = (height, width, channels)
    if pixel_order == "column_major":
        # Fortran order per row: reversing the axes of a C-order view gives reshape(..., order="F").
        images = rows.reshape((n_images,) + shape[::-1]).transpose(0, 3, 2, 1)
    else:
        images = rows.reshape((n_images,) + shape)
    images = images[..., 0] if len(image_shape) == 2 and channels == 1 else images
    return np.ascontiguousarray(images)


def pixels_to_uint8(images, pixel_range="auto", path=None, key=None):
    """Pixel values -> uint8, as ``round(value * 255 / top)``.

    Parameters
    ----------
    images : array, any shape
        uint8 (returned unchanged) or any other numeric dtype.
    pixel_range : {"auto", "0-1", "0-255"}
        ``top`` is 1 or 255; ``auto`` takes 1 when the largest value is at most 1
        (give or take half a grey level).
        Deciding once for the whole array (not per image) keeps a dark image of
        a 0-255 set from being stretched.

    Raises
    ------
    MindvisError
        Values not finite, or outside [0, top] by more than half a grey level.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "biuf":
        raise MindvisError(f"images must be numeric, found dtype {images.dtype}", path=path, key=key,
                           fix="store pixels as uint8 (0-255) or floats (0-1 or 0-255).")
    values = images.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise MindvisError("images hold NaN or infinite values", path=path, key=key,
                           fix="replace them in the file (e.g. with 0).")
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    # Half a grey level of slack: rounding error (1.0000001) must not change the reading.
    if pixel_range == "auto":
        top = 1.0 if high <= 1.0 + 0.5 / 255 else 255.0
    else:
        top = float(pixel_range.split("-")[1])
    tolerance = 0.5 * top / 255
    if low < -tolerance or high > top + tolerance:
        raise MindvisError(
            f"pixel values run from {low:g} to {high:g}, outside the range 0-{top:g} "
            f"(data.matrix.pixel_range: {pixel_range})", path=path, key=key,
            fix="rescale the images to 0-1 or 0-255 in the file, or set data.matrix.pixel_range to their range.")
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def _images(arrays, key, section, what):
    images = arrays.read(key, what)
    if section["image_axis"] == "last":
        images = np.moveaxis(images, -1, 0)
    image_shape = list(section["image_shape"])
    if images.ndim == 2:
        if not image_shape:
            raise MindvisError(f"{what} are flat rows of shape {images.shape}", path=arrays.path, key=key,
                               fix="set data.matrix.image_shape to the images' [H, W] or [H, W, C] "
                                   "(and data.matrix.pixel_order: column_major for MATLAB's reshape).")
        images = unflatten_images(images, image_shape, section["pixel_order"], path=arrays.path, key=key)
    elif image_shape and list(images.shape[1:1 + len(image_shape)]) != image_shape:
        raise MindvisError(f"{what} have shape {images.shape}, which is not data.matrix.image_shape {image_shape}",
                           path=arrays.path, key=key,
                           fix="set data.matrix.image_shape: [] for images already stored as [N, H, W(, C)].")
    if images.ndim not in (3, 4):
        raise MindvisError(f"{what} must be [N, H, W] or [N, H, W, C], found shape {images.shape}",
                           path=arrays.path, key=key,
                           fix="store images with the image axis first, or set data.matrix.image_axis / "
                               "column_major.")
    return pixels_to_uint8(images, section["pixel_range"], path=arrays.path, key=key)


def _labels(arrays, key, length, base, what):
    """A label vector counted from ``base``, returned 0-based (int64), or None without a key."""
    if not key:
        return None
    values = arrays.vector(key, what)
    if len(values) != length:
        raise MindvisError(f"{what} has {len(values)} values, expected {length}", path=arrays.path, key=key,
                           fix="give one label per image.")
    if values.dtype.kind not in "biuf" or not np.all(np.isfinite(values)) or np.any(values != np.rint(values)):
        raise MindvisError(f"{what} must be whole numbers, found dtype {values.dtype}", path=arrays.path, key=key,
                           fix="store class indices (0-based, or 1-based with data.matrix.label_base: 1).")
    labels = values.astype(np.int64) - base
    if len(labels) and labels.min() < 0:
        raise MindvisError(f"{what} run from {values.min():g} to {values.max():g}, below data.matrix.label_base "
                           f"{base}", path=arrays.path, key=key,
                           fix="set data.matrix.label_base to the value of the file's first class (0, or 1 for MATLAB).")
    return labels


def _optional_vector(arrays, keys, name, length, dtype, what):
    key = keys[name]
    if not key:
        return None
    vector = arrays.vector(key, what, dtype)
    if len(vector) != length:
        raise MindvisError(f"{what} has {len(vector)} values, expected {length}", path=arrays.path, key=key,
                           fix="give one value per row it describes.")
    return vector


def _content_ids(images, prefix):
    """Stimulus ids by image content: byte-identical images share one id.

    Returns
    -------
    ids : object [N]
        ``{prefix}-0000`` .., numbered in order of first appearance.
    first : int [M]
        Row of the first image with each id.
    """
    seen, ids, first = {}, [], []
    for row, image in enumerate(images):
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        if digest not in seen:
            seen[digest] = f"{prefix}-{len(seen):04d}"
            first.append(row)
        ids.append(seen[digest])
    return np.asarray(ids, dtype=object), np.asarray(first, dtype=np.int64)


def _check_fmri(arrays, key, shape, part):
    """A [trials, voxels] matrix of real numbers with at least one voxel, or a :class:`MindvisError`."""
    fix = f"store {part} fMRI as a real float matrix [trials, voxels] (or set data.matrix.column_major)."
    if len(shape) != 2:
        raise MindvisError(f"{part} fMRI must be [trials, voxels], found shape {shape}", path=arrays.path, key=key,
                           fix=fix)
    dtype = arrays.dtype(key, f"{part} fMRI")
    if dtype.kind not in "biuf":
        raise MindvisError(f"{part} fMRI must hold real numbers, found dtype {dtype}", path=arrays.path, key=key,
                           fix=fix)
    if shape[1] == 0:
        raise MindvisError(f"{part} fMRI has no voxel columns (shape {shape})", path=arrays.path, key=key, fix=fix)


def read_matrix(config, subject):
    """Read a subject's matrix file into a :class:`SourceData`.

    Raises
    ------
    MindvisError
        A missing key names the key and the file; an fMRI/image count mismatch
        names both shapes.
    """
    section = config["data"]["matrix"]
    keys = section["keys"]
    path = matrix_path(config, subject)
    arrays = ArrayFile(path, column_major=section["column_major"], config_key="data.matrix.path")
    base = int(section["index_base"])

    fmri_shapes = {part: arrays.shape(keys[f"{part}_fmri"], f"{part} fMRI ({KEY_PREFIX}.{part}_fmri)")
                   for part in ("train", "test")}
    for part, shape in fmri_shapes.items():
        _check_fmri(arrays, keys[f"{part}_fmri"], shape, part)
    if fmri_shapes["train"][1] != fmri_shapes["test"][1]:
        raise MindvisError(f"train fMRI has shape {fmri_shapes['train']} but test fMRI has shape "
                           f"{fmri_shapes['test']}: their voxel counts differ", path=path,
                           key=f"{keys['train_fmri']} / {keys['test_fmri']}",
                           fix="use the same voxels (columns) for both, or set data.matrix.column_major if "
                               "the file was written by MATLAB as v7.3.")
    n_voxels = fmri_shapes["train"][1]

    parts, stimulus_ids, runs, images, labels = [], [], [], {}, {}
    n_labels, lowest = None, np.iinfo(np.int64).max
    for part in ("train", "test"):
        n_trials = fmri_shapes[part][0]
        image_key = keys[f"{part}_images"]
        part_images = _images(arrays, image_key, section, f"{part} images ({KEY_PREFIX}.{part}_images)")
        index = _optional_vector(arrays, keys, f"{part}_image_index", n_trials, np.int64,
                                 f"{part} image index ({KEY_PREFIX}.{part}_image_index)")
        if index is None:
            if len(part_images) != n_trials:
                hint = (" (the fMRI looks transposed: set data.matrix.column_major: true)"
                        if fmri_shapes[part][1] == len(part_images) else "")
                raise MindvisError(
                    f"{part} fMRI has shape {fmri_shapes[part]} but {part} images have shape {part_images.shape}: "
                    f"without an image index every trial needs its own image{hint}", path=path,
                    key=f"{keys[f'{part}_fmri']} / {image_key}",
                    fix=f"give one image per trial, or name the trial-to-image index in "
                        f"{KEY_PREFIX}.{part}_image_index.")
            ids, first = _content_ids(part_images, part)
            trial_rows = None
        else:
            trial_rows = index - base
            if trial_rows.min(initial=0) < 0 or trial_rows.max(initial=0) >= len(part_images):
                raise MindvisError(
                    f"{part} image index runs from {index.min()} to {index.max()} but there are "
                    f"{len(part_images)} {part} images (index_base {base})", path=path,
                    key=keys[f"{part}_image_index"], fix="set data.matrix.index_base (0 or 1) to match the file.")
            first = np.unique(trial_rows)
            ids = np.asarray([f"{part}-{row:04d}" for row in trial_rows], dtype=object)
        part_labels = _labels(arrays, keys[f"{part}_labels"], len(part_images), int(section["label_base"]),
                              f"{part} labels ({KEY_PREFIX}.{part}_labels)")
        # ``first`` holds image rows: with an index, each distinct image; without, each id's first trial.
        for row in first:
            sid = ids[row] if trial_rows is None else f"{part}-{row:04d}"
            images[sid] = (lambda image=part_images[row]: image)
            labels[sid] = -1 if part_labels is None else int(part_labels[row])
        if part_labels is not None:
            n_labels = max(n_labels or 0, int(part_labels.max(initial=-1)) + 1)
            lowest = min(lowest, int(part_labels.min(initial=lowest)))
        run = _optional_vector(arrays, keys, f"{part}_runs", n_trials, np.int64,
                               f"{part} runs ({KEY_PREFIX}.{part}_runs)")
        parts.append(np.full(n_trials, part, dtype=object))
        stimulus_ids.append(ids)
        runs.append(np.full(n_trials, -1, dtype=np.int64) if run is None else run)

    base_label = int(section["label_base"])
    if n_labels is not None and lowest > 0 and base_label == 0:
        log.warning("%s: no label is 0 (the lowest is %d); if the file counts classes from 1, set "
                    "data.matrix.label_base: 1", path, lowest)
    if keys["class_names"]:
        class_names = arrays.strings(keys["class_names"], f"class names ({KEY_PREFIX}.class_names)")
        if n_labels is not None and n_labels > len(class_names):
            raise MindvisError(f"labels reach {n_labels - 1 + base_label} but only {len(class_names)} class names "
                               f"are given (data.matrix.label_base {base_label})", path=path, key=keys["class_names"],
                               fix="list a name for every class, or set data.matrix.label_base: 1 if the labels "
                                   "count from 1.")
    else:
        class_names = [f"class-{i}" for i in range(n_labels or 0)]
    if n_labels is None:
        labels = {sid: -1 for sid in labels}

    n_train = fmri_shapes["train"][0]

    def read_trials(rows):
        rows = np.asarray(rows)
        train = rows[rows < n_train]
        test = rows[rows >= n_train] - n_train
        blocks = [arrays.read_rows(keys["train_fmri"], train) if len(train) else np.zeros((0, n_voxels)),
                  arrays.read_rows(keys["test_fmri"], test) if len(test) else np.zeros((0, n_voxels))]
        return np.concatenate(blocks).astype(np.float32)

    voxel_ijk, affine, volume_shape = line_geometry(n_voxels)
    return SourceData(
        part=np.concatenate(parts), stimulus_id=np.concatenate(stimulus_ids), run=np.concatenate(runs),
        read_trials=read_trials, n_voxels=n_voxels, voxel_ijk=voxel_ijk, affine=affine,
        volume_shape=volume_shape, voxel_roi=np.full(n_voxels, section["roi_name"], dtype=object),
        images=images, stimulus_label=labels, class_names=list(class_names), tr=float(section["tr"]),
        input_files=[path], close=arrays.close, notes={"file": str(path), "container": arrays.kind,
                                   "attribution": f"matrix file {path.name}"})
