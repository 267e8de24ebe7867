"""Kamitani Generic Object Decoding (Horikawa & Kamitani 2017), in the two forms labs hold.

``god_npz``: the preprocessed files MinD-Vis reads (``data.god_npz.dir``)
-------------------------------------------------------------------------
``sbj_{1..5}.npz`` per subject:

==============  =====================  ==================================================
key             shape                  meaning
==============  =====================  ==================================================
``arr_0``       [1200, V_all] float    training trials, one per training image
``arr_1``       [1750, V_all] float    test trials, 35 repeats of each of 50 images
``arr_2``       [50, V_all] float      test trials averaged per image
``arr_3``       [1200] int             row of ``train_images`` shown in each trial
``VC``, ``V1``  [V_all] bool           ROI masks by name (``data.roi`` picks one);
...                                    other keys of that length also count as ROIs
==============  =====================  ==================================================

``images_256.npz``: ``train_images`` [1200, 256, 256, 3] uint8 and
``test_images`` [50, 256, 256, 3] uint8. Optional, for labels and ids:
``imagenet_training_label.csv`` / ``imagenet_testing_label.csv`` (one row per
image, first column the image file name, ``n01518878_8432.JPEG`` or the
category number first) and ``imagenet_class_index.json`` (``{"0": [wnid ...,
name], ...}``). Without them the ids are ``train-0000`` / ``test-0000`` and
the labels unknown. The order of ``arr_1`` (35 repeats of image 0 first, or
image 0..49 of repeat 1 first) is found by which grouping averages to
``arr_2`` (``data.god_npz.test_order: auto``), and the averages are then
recomputed from the single trials after normalisation with training
statistics, or read from ``arr_2`` itself as MinD-Vis reads them
(``data.god_npz.test_average: file``). The voxels carry no coordinates in this form: they are laid on a
1-D grid. Training trials record no runs: the validation split takes whole
blocks of 50 consecutive trials (one GOD run).

``god_bdata``: the original BrainDecoderToolbox2 / bdpy files (``data.god_bdata.dir``)
--------------------------------------------------------------------------------------
``Subject{1..5}.h5``: an HDF5 ``dataset`` [samples, columns] float and
``metadata/key`` (names), ``metadata/value`` [keys, columns] (1 marks the
columns a key describes, NaN elsewhere, or per-voxel values such as
``voxel_x``). Columns used: ``VoxelData`` & the ROI key (``ROI_VC``: the
voxels), ``DataType`` (1 = training, 2 = test perception, 3 = imagery, never
used), ``Run``, ``Label`` (the image id ``<category>.<image>``, e.g.
``1518878.008432``). ``voxel_x/y/z`` (mm) give a real voxel grid. Images are
found by file name (``n01518878_8432.JPEG``, any extension) anywhere under
``data.god_bdata.image_dir``. Labels are the 200 categories (150 training,
50 test), named by WordNet id.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np

from mindvis.data.sources.arrays import ArrayFile
from mindvis.data.sources.common import (SourceData, coordinates_geometry, line_geometry, load_rgb_image,
                                         require_file, source_subject, subject_number)
from mindvis.errors import MindvisError

log = logging.getLogger(__name__)

GOD_TR = 3.0
GOD_ATTRIBUTION = ("Generic Object Decoding, Horikawa & Kamitani (2017) Nature Communications 8:15037; "
                   "figshare 7387130 / MinD-Vis figshare release")
_ARRAY_KEYS = ("arr_0", "arr_1", "arr_2", "arr_3")


# -- labels shared by both forms -----------------------------------------------------------------

def _category(name):
    """The WordNet category number at the start of a GOD image name (``n01518878_8432`` -> 1518878)."""
    match = re.match(r"\s*n?0*(\d+)", str(name))
    return int(match.group(1)) if match else None


def _read_label_csv(path):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [row[0].strip() for row in csv.reader(handle) if row and row[0].strip()]
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise MindvisError(f"not a readable CSV file ({' '.join(str(err).split())})", path=path,
                           fix="use the label CSVs that came with images_256.npz.") from None


def _image_names(folder, n_train, n_test):
    """Image file stems from MinD-Vis's label CSVs, or None when they are absent."""
    train_csv, test_csv = folder / "imagenet_training_label.csv", folder / "imagenet_testing_label.csv"
    if not (train_csv.exists() and test_csv.exists()):
        return None, []
    names = {"train": _read_label_csv(train_csv), "test": _read_label_csv(test_csv)}
    for part, n_images in (("train", n_train), ("test", n_test)):
        if len(names[part]) != n_images:
            raise MindvisError(f"lists {len(names[part])} images but the image file holds {n_images}",
                               path=train_csv if part == "train" else test_csv,
                               fix="use the label CSVs that came with images_256.npz.")
    stems = {part: [Path(name).stem if "." in name else name for name in values] for part, values in names.items()}
    return stems, [train_csv, test_csv]


def _classes(categories, class_index_path=None):
    """Class names and a category -> class index map.

    With MinD-Vis's ``imagenet_class_index.json`` the classes are its entries
    (several WordNet ids may share one); otherwise one class per category,
    named by WordNet id, in sorted order.
    """
    if class_index_path is not None and class_index_path.exists():
        index = _read_class_index(class_index_path)
        names, lookup = [], {}
        for position, key in enumerate(sorted(index, key=lambda k: int(k) if str(k).isdigit() else k)):
            entry = index[key]
            names.append(str(entry[-1]))
            for wnid in entry[:-1]:
                lookup.setdefault(_category(wnid), position)
        return names, lookup
    unique = sorted({c for c in categories if c is not None})
    return [f"n{c:08d}" for c in unique], {c: i for i, c in enumerate(unique)}


def _read_class_index(path):
    """MinD-Vis's ``imagenet_class_index.json``: ``{"0": [wnid, ..., name], ...}``."""
    fix = "use the imagenet_class_index.json that came with MinD-Vis's GOD files, or delete it."
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise MindvisError(f"not readable JSON ({' '.join(str(err).split())})", path=path, fix=fix) from None
    if not isinstance(index, dict):
        raise MindvisError(f"must be a JSON object of class entries, found a {type(index).__name__}", path=path,
                           fix=fix)
    for key, entry in index.items():
        if not isinstance(entry, list) or not entry or not all(isinstance(item, str) for item in entry):
            raise MindvisError(f"entry must be a list of WordNet ids and a class name, found {entry!r}"[:200],
                               path=path, key=key, fix=fix)
    return index


# -- god_npz ----------------------------------------------------------------------------------------

def _test_order(single, averaged, setting, path):
    """How the test trials ``arr_1`` are ordered: ``blocked`` (all repeats of image 0 first) or ``interleaved``."""
    n_images = len(averaged)
    if n_images == 0 or len(single) % n_images:
        raise MindvisError(f"arr_1 has shape {single.shape} but arr_2 has shape {averaged.shape}: the test trials "
                           "are not a whole number of repeats of the averaged images", path=path, key="arr_1 / arr_2",
                           fix="use the sbj_N.npz files as released with MinD-Vis.")
    repeats = len(single) // n_images
    if setting != "auto":
        return setting, repeats, None
    errors = {
        "blocked": np.abs(single.reshape(n_images, repeats, -1).mean(axis=1) - averaged).mean(),
        "interleaved": np.abs(single.reshape(repeats, n_images, -1).mean(axis=0) - averaged).mean(),
    }
    order = min(errors, key=errors.get)
    scale = np.abs(averaged).mean() + 1e-12
    if errors[order] > 0.05 * scale:
        log.warning("%s: neither grouping of arr_1 averages to arr_2 (relative errors %s); assuming 'blocked' "
                    "as MinD-Vis does", path, {k: round(float(v / scale), 3) for k, v in errors.items()})
        order = "blocked"
    return order, repeats, {k: float(v / scale) for k, v in errors.items()}


def _roi_masks(npz, n_all):
    masks = {}
    for key in npz.keys():
        if key in _ARRAY_KEYS:
            continue
        value = npz.read(key)
        if value.ndim == 1 and len(value) == n_all and (value.dtype == bool or np.isin(value, (0, 1)).all()):
            masks[key] = value.astype(bool)
    return masks


def _check_trials(array, key, path):
    """A [trials, voxels] matrix of real numbers with at least one trial, as sbj_N.npz holds."""
    fix = "use the sbj_N.npz files as released with MinD-Vis."
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise MindvisError(f"must be a real [trials, voxels] matrix, found {array.dtype} {array.shape}", path=path,
                           key=key, fix=fix)
    if len(array) == 0:
        raise MindvisError(f"holds no trials (shape {array.shape})", path=path, key=key, fix=fix)


def voxel_roi_names(masks, selected):
    """For each selected voxel, the name of the smallest ROI mask holding it (the selection's own name last)."""
    chosen = masks[selected]
    names = np.full(int(chosen.sum()), selected, dtype=object)
    best = np.full(len(names), np.inf)
    for name, mask in masks.items():
        if name == selected:
            continue
        size = mask.sum()
        inside = mask[chosen]
        better = inside & (size < best)
        names[better] = name
        best[better] = size
    return names


def read_god_npz(config, subject):
    """Read one subject of MinD-Vis's GOD npz files into a :class:`SourceData`."""
    section = config["data"]["god_npz"]
    folder = require_file(section["dir"], "data.god_npz.dir")
    name = source_subject(config, subject, f"sbj_{subject_number(subject)}")
    fmri_path = require_file(folder / f"{name}.npz", "data.god_npz.dir",
                             fix=f"put {name}.npz in data.god_npz.dir, or map {subject} in data.subject_map.")
    image_path = require_file(folder / section["images_file"], "data.god_npz.images_file")
    roi = config["data"]["roi"] or "VC"

    with ArrayFile(fmri_path, config_key="data.god_npz.dir") as npz:
        train_all = npz.read("arr_0", "training trials")
        single_all = npz.read("arr_1", "single test trials")
        averaged_all = npz.read("arr_2", "averaged test trials")
        _check_trials(train_all, "arr_0", fmri_path)
        train_index = npz.vector("arr_3", "training image index", np.int64)
        masks = _roi_masks(npz, train_all.shape[1])
    if roi not in masks:
        raise MindvisError(f"ROI '{roi}' not found (ROI masks in the file: {', '.join(sorted(masks)) or 'none'})",
                           path=fmri_path, key=roi, fix="set data.roi to one of the file's ROI masks.")
    for what, array in (("arr_1", single_all), ("arr_2", averaged_all)):
        if array.dtype.kind not in "biuf" or array.ndim != 2 or array.shape[1] != train_all.shape[1]:
            raise MindvisError(f"arr_0 has shape {train_all.shape} but {what} has {array.dtype} {array.shape}",
                               path=fmri_path, key=what, fix="use the sbj_N.npz files as released with MinD-Vis.")
    if len(train_index) != len(train_all):
        raise MindvisError(f"arr_0 has shape {train_all.shape} but arr_3 has shape {train_index.shape}",
                           path=fmri_path, key="arr_3", fix="give one training image index per training trial.")
    mask = masks[roi]
    if not mask.any():
        raise MindvisError(f"ROI '{roi}' selects no voxels", path=fmri_path, key=roi,
                           fix="set data.roi to an ROI mask of the file that holds voxels.")
    train = train_all[:, mask].astype(np.float32)
    single = single_all[:, mask].astype(np.float32)
    averaged = averaged_all[:, mask].astype(np.float32)
    order, repeats, errors = _test_order(single, averaged, section["test_order"], fmri_path)
    del train_all, single_all, averaged_all

    with ArrayFile(image_path, config_key="data.god_npz.images_file") as image_file:
        train_images = image_file.read("train_images", "training images")
        test_images = image_file.read("test_images", "test images")
    n_test_images = len(single) // repeats
    if len(test_images) != n_test_images:
        raise MindvisError(f"arr_2 has {n_test_images} averaged test images but test_images has shape "
                           f"{test_images.shape}", path=image_path, key="test_images",
                           fix="use images_256.npz from the same release as the fMRI files.")
    if train_index.min() < 0 or train_index.max() >= len(train_images):
        raise MindvisError(f"arr_3 indexes images up to {train_index.max()} but train_images has shape "
                           f"{train_images.shape}", path=fmri_path, key="arr_3",
                           fix="use images_256.npz from the same release as the fMRI files.")

    stems, label_files = _image_names(folder, len(train_images), len(test_images))
    if stems is None:
        stems = {"train": [f"train-{i:04d}" for i in range(len(train_images))],
                 "test": [f"test-{i:04d}" for i in range(len(test_images))]}
        class_names, labels = [], {}
    else:
        categories = [_category(s) for s in stems["train"] + stems["test"]]
        class_index = folder / "imagenet_class_index.json"
        class_names, lookup = _classes(categories, class_index)
        if class_index.exists():
            label_files.append(class_index)
        labels = {s: lookup.get(_category(s), -1) for s in stems["train"] + stems["test"]}

    test_image_row = (np.repeat(np.arange(n_test_images), repeats) if order == "blocked"
                      else np.tile(np.arange(n_test_images), repeats))
    stimulus_id = np.concatenate([np.asarray(stems["train"], dtype=object)[train_index],
                                  np.asarray(stems["test"], dtype=object)[test_image_row]])
    images = {}
    for part, part_images in (("train", train_images), ("test", test_images)):
        for row, stem in enumerate(stems[part]):
            images[stem] = (lambda array=part_images, row=row: array[row])
    responses = np.concatenate([train, single])

    voxel_ijk, affine, volume_shape = line_geometry(int(mask.sum()))
    voxel_ijk[:, 0] = np.flatnonzero(mask)
    volume_shape = (len(mask), 1, 1)
    return SourceData(
        part=np.array(["train"] * len(train) + ["test"] * len(single), dtype=object), stimulus_id=stimulus_id,
        run=np.full(len(responses), -1, dtype=np.int64), read_trials=lambda rows: responses[rows],
        n_voxels=responses.shape[1], voxel_ijk=voxel_ijk, affine=affine, volume_shape=volume_shape,
        voxel_roi=voxel_roi_names(masks, roi), images=images, stimulus_label=labels, class_names=class_names,
        tr=GOD_TR, input_files=[fmri_path, image_path] + label_files,
        notes={"attribution": GOD_ATTRIBUTION, "source_subject": name, "roi": roi, "test_order": order,
               "test_repeats": repeats, "test_order_errors": errors,
               "voxel_grid": "1-D: voxel_ijk[:, 0] is the column in the file's full voxel vector"},
        test_average=((np.asarray(stems["test"], dtype=object), averaged)
                      if section.get("test_average", "recomputed") == "file" else None))


# -- god_bdata --------------------------------------------------------------------------------------

class BDataFile:
    """Columns and metadata of a BrainDecoderToolbox2 / bdpy HDF5 file, read lazily with h5py.

    Parameters
    ----------
    path : Path
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        try:
            self.handle = h5py.File(self.path, "r")
        except OSError as err:
            raise MindvisError(f"not a readable HDF5 file ({err})", path=self.path,
                               fix="give the BData .h5 file as downloaded (figshare 7387130).") from None
        group = next((g for g in ("metadata", "metaData") if g in self.handle), None)
        data = next((d for d in ("dataset", "dataSet") if d in self.handle), None)
        if group is None or data is None:
            raise MindvisError("not a BData file: it needs 'dataset' and 'metadata/{key,value}'", path=self.path,
                               key="metadata" if group is None else "dataset",
                               fix="give the BData .h5 file as downloaded, or convert it with bdpy.")
        fix = "give the BData .h5 file as downloaded, or convert it with bdpy."
        self.dataset = self.handle[data]
        if not isinstance(self.dataset, h5py.Dataset):
            raise MindvisError("must be a dataset, found a group", path=self.path, key=data, fix=fix)
        if self.dataset.ndim != 2 or self.dataset.dtype.kind not in "biuf":
            raise MindvisError(f"must be a real [samples, columns] matrix, found {self.dataset.dtype} "
                               f"{self.dataset.shape}", path=self.path, key=data, fix=fix)
        for needed in ("key", "value"):
            if not isinstance(self.handle[group], h5py.Group) or not isinstance(self.handle[group].get(needed),
                                                                                 h5py.Dataset):
                raise MindvisError("dataset missing", path=self.path, key=f"{group}/{needed}", fix=fix)
        self.keys = [k.decode() if isinstance(k, bytes) else str(k) for k in self.handle[group]["key"][()]]
        self.values = self.handle[group]["value"][()]
        if self.values.dtype.kind not in "biuf":
            raise MindvisError(f"must hold numbers, found dtype {self.values.dtype}", path=self.path,
                               key=f"{group}/value", fix=fix)
        self.values = self.values.astype(np.float64)
        if self.values.shape != (len(self.keys), self.dataset.shape[1]):
            raise MindvisError(f"metadata/value has shape {self.values.shape} but there are {len(self.keys)} keys "
                               f"and the dataset has shape {self.dataset.shape}", path=self.path,
                               key=f"{group}/value", fix=fix)

    def close(self):
        self.handle.close()

    def meta(self, key, config_key=None):
        """Metadata values [columns] of ``key``."""
        if key not in self.keys:
            raise MindvisError(f"metadata key not found (keys: {', '.join(self.keys[:30])})", path=self.path,
                               key=key, fix=f"set {config_key} to a key of this file." if config_key else None)
        return self.values[self.keys.index(key)]

    def columns(self, key, config_key=None):
        """Column indices a key marks (value 1)."""
        return np.flatnonzero(self.meta(key, config_key) == 1)

    def column(self, key, config_key=None):
        """The single column a key marks, read whole: [samples]."""
        columns = self.columns(key, config_key)
        if len(columns) != 1:
            raise MindvisError(f"expected one column for this key, found {len(columns)}", path=self.path, key=key)
        return np.asarray(self.dataset[:, int(columns[0])], dtype=np.float64)


def god_image_name(label):
    """GOD's image id ``<category>.<image>`` as a file stem: 1518878.008432 -> ``n01518878_8432``."""
    category = int(np.floor(label))
    image = int(round((label - category) * 1e6))
    return f"n{category:08d}_{image}"


def _index_images(folder, extensions=(".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff")):
    """Map file stem -> path for every image under ``folder``."""
    index = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in extensions:
            index.setdefault(path.stem, path)
    return index


def read_god_bdata(config, subject):
    """Read one subject's GOD BData HDF5 into a :class:`SourceData`."""
    section = config["data"]["god_bdata"]
    folder = require_file(section["dir"], "data.god_bdata.dir")
    name = source_subject(config, subject, f"Subject{subject_number(subject)}")
    path = require_file(folder / f"{name}.h5", "data.god_bdata.dir",
                        fix=f"put {name}.h5 in data.god_bdata.dir, or map {subject} in data.subject_map.")
    bdata = BDataFile(path)
    roi = config["data"]["roi"] or "ROI_VC"
    roi_key = roi if roi.startswith("ROI_") else f"ROI_{roi}"
    voxels = np.intersect1d(bdata.columns(section["voxel_key"], "data.god_bdata.voxel_key"),
                            bdata.columns(roi_key, "data.roi"))
    if len(voxels) == 0:
        raise MindvisError("the ROI selects no voxel columns", path=path, key=roi_key,
                           fix="set data.roi to an ROI_* key with voxels.")
    data_type = bdata.column(section["datatype_key"], "data.god_bdata.datatype_key")
    run = bdata.column(section["run_key"], "data.god_bdata.run_key")
    label = bdata.column(section["label_key"], "data.god_bdata.label_key")
    is_train = data_type == section["train_type"]
    is_test = data_type == section["test_type"]
    rows = np.flatnonzero(is_train | is_test)
    if not is_train.any():
        raise MindvisError(f"no sample has {section['datatype_key']} == {section['train_type']}", path=path,
                           key=section["datatype_key"], fix="set data.god_bdata.train_type.")

    if not np.all(np.isfinite(label[rows])):
        raise MindvisError(f"{int(np.sum(~np.isfinite(label[rows])))} training or test samples have no image id "
                           "(NaN)", path=path, key=section["label_key"],
                           fix="give every training and test sample its image id <category>.<image>.")
    names = np.asarray([god_image_name(value) for value in label[rows]], dtype=object)
    if not section["image_dir"]:
        raise MindvisError("no image folder configured (GOD's images are shared on request)",
                           key="data.god_bdata.image_dir", fix="set data.god_bdata.image_dir to the folder holding "
                           "the training and test images (n01518878_8432.JPEG ...).")
    index = _index_images(require_file(section["image_dir"], "data.god_bdata.image_dir"))
    missing = sorted(set(names) - set(index))
    if missing:
        raise MindvisError(f"{len(missing)} stimulus images not found, e.g. {missing[:3]}",
                           path=section["image_dir"], key="data.god_bdata.image_dir",
                           fix="put every training and test image (file named as its GOD id) under image_dir.")
    categories = [int(np.floor(v)) for v in label[rows]]
    class_names, lookup = _classes(categories)
    labels = {n: lookup[c] for n, c in zip(names, categories)}

    coords = [k in bdata.keys for k in ("voxel_x", "voxel_y", "voxel_z")]
    if all(coords):
        xyz = np.stack([bdata.meta(k)[voxels] for k in ("voxel_x", "voxel_y", "voxel_z")], axis=1)
        voxel_ijk, affine, volume_shape = coordinates_geometry(xyz, section["voxel_size"] or None)
        grid = "from voxel_x/y/z (mm)"
    else:
        voxel_ijk, affine, volume_shape = line_geometry(len(voxels))
        grid = "1-D (no voxel_x/y/z metadata)"
    roi_masks = {k[4:]: bdata.meta(k)[voxels] == 1 for k in bdata.keys if k.startswith("ROI_")}
    roi_masks[roi_key[4:]] = np.ones(len(voxels), dtype=bool)
    voxel_roi = voxel_roi_names(roi_masks, roi_key[4:])
    column_lo = int(voxels.min())
    column_hi = int(voxels.max()) + 1

    def read_trials(chunk):
        samples = rows[np.asarray(chunk)]
        lo, hi = int(samples[0]), int(samples[-1]) + 1
        # A contiguous slab of samples and of the voxel column span, then numpy picks: h5py is slow at fancy picks.
        block = bdata.dataset[lo:hi, column_lo:column_hi]
        return block[samples - lo][:, voxels - column_lo].astype(np.float32)

    return SourceData(
        part=np.where(is_train[rows], "train", "test").astype(object), stimulus_id=names,
        run=run[rows].astype(np.int64), read_trials=read_trials, n_voxels=len(voxels), voxel_ijk=voxel_ijk,
        affine=affine, volume_shape=volume_shape, voxel_roi=voxel_roi,
        images={n: (lambda p=index[n]: load_rgb_image(p)) for n in set(names)}, stimulus_label=labels,
        class_names=class_names, tr=GOD_TR, input_files=[path] + sorted(index[n] for n in set(names)),
        close=bdata.close,
        notes={"attribution": GOD_ATTRIBUTION, "source_subject": name, "roi": roi_key, "voxel_grid": grid,
               "image_dir": str(section["image_dir"])})
