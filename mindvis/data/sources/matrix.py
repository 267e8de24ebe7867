"""A lab's own preprocessed matrices: ``.npz``, ``.mat`` (v5 or v7.3) or ``.h5``.

Expected arrays (names set in ``data.matrix.keys``; ``""`` means absent):

=====================  ==================================  ===============================================
key                    shape                               meaning
=====================  ==================================  ===============================================
``train_fmri``         [N_train, V] float                  one row per training trial (required)
``test_fmri``          [N_test, V] float                   one row per test trial, repeats kept (required)
``train_images``       [M_train, H, W(, C)] uint8 / float  images (required); float in [0, 1] or [0, 255]
``test_images``        [M_test, H, W(, C)]                 (required)
``train_labels``       [M_train] int                       class of each image (optional)
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
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mindvis.data.sources.arrays import ArrayFile
from mindvis.data.sources.common import SourceData, line_geometry, subject_number
from mindvis.errors import MindvisError

KEY_PREFIX = "data.matrix.keys"


def matrix_path(config, subject):
    """The matrix file of ``subject``: ``data.matrix.path`` with ``{subject}`` / ``{n}`` filled in."""
    template = config["data"]["matrix"]["path"]
    if not template:
        raise MindvisError("no matrix file configured", key="data.matrix.path",
                           fix="set data.matrix.path, e.g. /data/lab/{subject}_decoding.mat.")
    number = subject_number(subject) if "{n}" in template else None
    return Path(template.format(subject=subject, n=number))


def _images(arrays, key, image_axis, what):
    images = arrays.read(key, what)
    if image_axis == "last":
        images = np.moveaxis(images, -1, 0)
    if images.ndim not in (3, 4):
        raise MindvisError(f"{what} must be [N, H, W] or [N, H, W, C], found shape {images.shape}",
                           path=arrays.path, key=key,
                           fix="store images with the image axis first, or set data.matrix.image_axis / "
                               "column_major.")
    return images


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
        if len(shape) != 2:
            raise MindvisError(f"{part} fMRI must be [trials, voxels], found shape {shape}", path=path,
                               key=keys[f"{part}_fmri"])
    if fmri_shapes["train"][1] != fmri_shapes["test"][1]:
        raise MindvisError(f"train fMRI has shape {fmri_shapes['train']} but test fMRI has shape "
                           f"{fmri_shapes['test']}: their voxel counts differ", path=path,
                           key=f"{keys['train_fmri']} / {keys['test_fmri']}",
                           fix="use the same voxels (columns) for both, or set data.matrix.column_major if "
                               "the file was written by MATLAB as v7.3.")
    n_voxels = fmri_shapes["train"][1]

    parts, stimulus_ids, runs, images, labels = [], [], [], {}, {}
    n_labels = None
    for part in ("train", "test"):
        n_trials = fmri_shapes[part][0]
        image_key = keys[f"{part}_images"]
        part_images = _images(arrays, image_key, section["image_axis"], f"{part} images ({KEY_PREFIX}.{part}_images)")
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
        part_labels = _optional_vector(arrays, keys, f"{part}_labels", len(part_images), np.int64,
                                       f"{part} labels ({KEY_PREFIX}.{part}_labels)")
        # ``first`` holds image rows: with an index, each distinct image; without, each id's first trial.
        for row in first:
            sid = ids[row] if trial_rows is None else f"{part}-{row:04d}"
            images[sid] = (lambda image=part_images[row]: image)
            labels[sid] = -1 if part_labels is None else int(part_labels[row])
        if part_labels is not None:
            n_labels = max(n_labels or 0, int(part_labels.max(initial=-1)) + 1)
        run = _optional_vector(arrays, keys, f"{part}_runs", n_trials, np.int64,
                               f"{part} runs ({KEY_PREFIX}.{part}_runs)")
        parts.append(np.full(n_trials, part, dtype=object))
        stimulus_ids.append(ids)
        runs.append(np.full(n_trials, -1, dtype=np.int64) if run is None else run)

    if keys["class_names"]:
        class_names = arrays.strings(keys["class_names"], f"class names ({KEY_PREFIX}.class_names)")
        if n_labels is not None and n_labels > len(class_names):
            raise MindvisError(f"labels reach {n_labels - 1} but only {len(class_names)} class names are given",
                               path=path, key=keys["class_names"], fix="list a name for every class.")
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
