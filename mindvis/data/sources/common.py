"""What every real-data adapter shares: the trial table, the conversion to ``responses.h5``, images.

An adapter (one module per source) knows one on-disk format. It returns a
:class:`SourceData`: a table with one row per trial (which part of the
experiment it belongs to, the stimulus shown, the run), a ``read_trials``
callback that returns the voxel responses of some rows, the voxel geometry
and the stimulus images. :func:`convert_source` does the rest the same way for
every source:

1. carves the validation split from the training trials (whole runs where the
   source records runs, otherwise whole blocks of ``data.trials_per_block``
   consecutive trials, so neighbouring trials never straddle train and val);
2. streams the responses into one preallocated float32 array per split, a
   chunk of trials at a time (the only full-size copy held in memory);
3. drops voxels that are not finite in some trial or constant over the
   training trials, with a warning that counts them;
4. z-scores every voxel with the mean and standard deviation of the
   training trials only (val and test never leak into the normalisation);
5. averages the test trials per stimulus (``test_avg``) and computes the
   noise ceiling from the test repeats;
6. writes the stimulus HDF5 (:func:`mindvis.data.stimuli.save_stimulus_set`)
   and ``responses.h5`` (:func:`mindvis.data.responses.write_responses`),
   both atomically, recording the config, software versions and the SHA-256
   of every input file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mindvis.data.reliability import has_repeats, noise_ceiling
from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_path, check_free_space, derive_seed, sha256_file

log = logging.getLogger(__name__)

#: Trials read from the source per call of ``read_trials``: bounds the transient memory.
CHUNK_TRIALS = 512
#: Voxel columns averaged or summarised at a time.
COLUMN_BLOCK = 2048


@dataclass
class SourceData:
    """One subject of a real data set, as an adapter reads it.

    Attributes
    ----------
    part : object (str) [N]
        ``"train"`` or ``"test"`` for every trial, in the source's trial order.
    stimulus_id : object (str) [N]
        Id of the image shown in each trial (a key of ``images``).
    run : int64 [N]
        Run (or session) of each trial; -1 when the source does not record runs.
    read_trials : callable
        ``read_trials(rows)`` with sorted int rows returns float32 [len(rows), V]: the
        raw responses of those trials (read lazily, a chunk at a time).
    n_voxels : int
    voxel_ijk : int32 [V, 3]
    affine : float64 [4, 4]
    volume_shape : tuple of 3 int
    voxel_roi : object (str) [V]
    images : dict of str -> callable
        For every stimulus id, a function returning its image as an array [H, W] or
        [H, W, C] (uint8, or float in [0, 1] or [0, 255]); called once per image.
    stimulus_label : dict of str -> int
        Class index of each stimulus (-1 or absent when unknown).
    class_names : list of str
    tr : float
        Repetition time in seconds (NaN when the source does not say).
    input_files : list of Path
        Every file read, hashed into the outputs.
    onset : float64 [N] or None
        Onset of each trial in its run (seconds); NaN when unknown.
    notes : dict
        Source-specific facts recorded as the ``source`` attribute (JSON).
    close : callable or None
        Releases open files once the conversion is done.
    test_average : tuple (object (str) [M], float32 [M, V]) or None
        The source's own per-stimulus test averages (raw, before normalisation), used as ``test_avg``
        instead of the recomputed ones (``data.god_npz.test_average: file``); None recomputes them.
    """

    part: np.ndarray
    stimulus_id: np.ndarray
    run: np.ndarray
    read_trials: Callable
    n_voxels: int
    voxel_ijk: np.ndarray
    affine: np.ndarray
    volume_shape: tuple
    voxel_roi: np.ndarray
    images: dict
    stimulus_label: dict
    class_names: list
    tr: float
    input_files: list
    onset: np.ndarray | None = None
    notes: dict = field(default_factory=dict)
    close: Callable | None = None
    test_average: tuple | None = None

    def __len__(self):
        return len(self.part)


# -- helpers adapters share ----------------------------------------------------------------------

def line_geometry(n_voxels):
    """Voxel geometry for sources that give no voxel coordinates.

    The voxels are placed along the first axis of a [V, 1, 1] grid in their
    column order, with an identity affine: maps can still be written back, as
    1-D images, and nothing pretends to know where the voxels are.

    Returns
    -------
    voxel_ijk : int32 [V, 3]
    affine : float64 [4, 4]
    volume_shape : tuple (V, 1, 1)
    """
    voxel_ijk = np.zeros((n_voxels, 3), dtype=np.int32)
    voxel_ijk[:, 0] = np.arange(n_voxels)
    return voxel_ijk, np.eye(4), (max(n_voxels, 1), 1, 1)


def coordinates_geometry(xyz_mm, voxel_size=None):
    """Voxel geometry from world coordinates in millimetres (e.g. bdpy's ``voxel_x/y/z``).

    Parameters
    ----------
    xyz_mm : float [V, 3]
    voxel_size : float or None
        Grid spacing in mm; inferred as the smallest positive step between
        distinct coordinates along each axis when None.

    Returns
    -------
    voxel_ijk : int32 [V, 3]
    affine : float64 [4, 4]
        Diagonal: ``xyz = voxel_size * ijk + origin``.
    volume_shape : tuple of 3 int
    """
    xyz_mm = np.asarray(xyz_mm, dtype=np.float64)
    origin = xyz_mm.min(axis=0)
    steps = []
    for axis in range(3):
        values = np.unique(xyz_mm[:, axis])
        gaps = np.diff(values)
        gaps = gaps[gaps > 1e-6]
        steps.append(float(voxel_size) if voxel_size else (float(gaps.min()) if len(gaps) else 1.0))
    steps = np.asarray(steps)
    voxel_ijk = np.rint((xyz_mm - origin) / steps).astype(np.int32)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(steps)
    affine[:3, 3] = origin
    return voxel_ijk, affine, tuple(int(v) + 1 for v in voxel_ijk.max(axis=0))


def subject_number(subject, key="subjects"):
    """The number in a subject label: ``sub-03`` -> 3, ``sub-CSI2`` -> 2."""
    match = re.search(r"(\d+)$", subject)
    if not match:
        raise MindvisError(f"cannot tell which source subject '{subject}' is (its label ends in no number)",
                           key=key, fix="name subjects like sub-01, or map them in data.subject_map.")
    return int(match.group(1))


def source_subject(config, subject, default):
    """The source's own name for a mindvis subject: ``data.subject_map`` or ``default``."""
    return config["data"]["subject_map"].get(subject, default)


def require_file(path, key, fix=None):
    """Return ``Path(path)``; raise a :class:`MindvisError` naming the config key if it is missing."""
    path = Path(path)
    if not path.exists():
        raise MindvisError("file not found", path=path, key=key,
                           fix=fix or f"set {key} in the config to where the file is.")
    return path


def load_rgb_image(path):
    """An image file (JPEG, PNG, ..) as uint8 [H, W, 3]; stimulus images are read lazily through this."""
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def prepare_image(image, image_size, channels, fit="crop", path=None, key=None):
    """Bring one stimulus image to the model's square size and channel count.

    Parameters
    ----------
    image : array [H, W] or [H, W, C]
        uint8, or float in [0, 1] (or in [0, 255] when its maximum exceeds 1).
        C may be 1, 3 or 4 (alpha is dropped).
    image_size : int
    channels : int
        1 (grey, ITU-R 601 luma) or 3 (grey images are replicated).
    fit : {"crop", "pad", "stretch"}
        ``crop`` cuts the central square, ``pad`` adds a black border to make it
        square, ``stretch`` resizes without keeping the aspect ratio.

    Returns
    -------
    uint8 [image_size, image_size, channels]
    """
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise MindvisError(f"an image must be [H, W] or [H, W, C] with C in 1, 3, 4; found shape {array.shape}",
                           path=path, key=key, fix="store images as [N, H, W(, C)], or set column_major.")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise MindvisError("an image holds NaN or infinite values", path=path, key=key)
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if array.ndim == 3:
        array = array[..., :3]
    picture = Image.fromarray(array)
    width, height = picture.size
    if fit == "crop" and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        picture = picture.crop((left, top, left + side, top + side))
    elif fit == "pad" and width != height:
        side = max(width, height)
        canvas = Image.new(picture.mode, (side, side))
        canvas.paste(picture, ((side - width) // 2, (side - height) // 2))
        picture = canvas
    if picture.size != (image_size, image_size):
        picture = picture.resize((image_size, image_size), Image.BICUBIC)
    picture = picture.convert("L" if channels == 1 else "RGB")
    out = np.asarray(picture, dtype=np.uint8)
    return out[:, :, None] if channels == 1 else out


# -- the conversion ------------------------------------------------------------------------------

def _blocks(n_trials, size):
    return np.arange(n_trials) // max(int(size), 1)


def carve_validation(run, n_train, val_fraction, trials_per_block, seed):
    """Choose training trials for the validation split, by whole runs.

    Parameters
    ----------
    run : int [n_train]
        Run of each training trial; all -1 when the source records none.
    n_train : int
    val_fraction : float
        Fraction of the runs (or blocks) to hold out.
    trials_per_block : int
        Without runs, consecutive trials are grouped into blocks of this size.
    seed : int

    Returns
    -------
    is_val : bool [n_train]
    grouping : str
        ``"run"`` or ``"block of N trials"``: recorded in the output.
    """
    run = np.asarray(run)
    if len(run) and np.all(run < 0):
        groups, grouping = _blocks(n_train, trials_per_block), f"block of {int(trials_per_block)} consecutive trials"
    else:
        groups, grouping = run, "run"
    unique = np.unique(groups)
    is_val = np.zeros(n_train, dtype=bool)
    if len(unique) < 2:
        # Said on the console with the counts (and recorded as n_val 0): a lab's small matrix file is one block.
        log.warning("the %d training trials form only one %s: the validation split stays empty (0 trials); "
                    "lower data.trials_per_block to carve one", n_train, grouping)
        return is_val, grouping
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    chosen = np.random.default_rng(seed).choice(unique, n_val, replace=False)
    is_val[np.isin(groups, chosen)] = True
    return is_val, grouping


def _fill(source, rows_by_split):
    """Read every trial once, in source order, into one float32 array per split.

    Returns
    -------
    dict of str -> float32 [n_split, V]
    """
    order = np.concatenate([rows for rows in rows_by_split.values()]) if rows_by_split else np.zeros(0, int)
    dest_split = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(rows_by_split.values())])
    dest_row = np.concatenate([np.arange(len(rows)) for rows in rows_by_split.values()])
    arrays = [np.empty((len(rows), source.n_voxels), dtype=np.float32) for rows in rows_by_split.values()]
    sort = np.argsort(order, kind="stable")
    order, dest_split, dest_row = order[sort], dest_split[sort], dest_row[sort]
    for start in range(0, len(order), CHUNK_TRIALS):
        stop = min(start + CHUNK_TRIALS, len(order))
        block = np.asarray(source.read_trials(order[start:stop]), dtype=np.float32)
        if block.shape != (stop - start, source.n_voxels):
            raise ValueError(f"read_trials returned {block.shape}, expected {(stop - start, source.n_voxels)}")
        for index, array in enumerate(arrays):
            mask = dest_split[start:stop] == index
            if mask.any():
                array[dest_row[start:stop][mask]] = block[mask]
    return dict(zip(rows_by_split, arrays))


def _column_stats(array, chunk=CHUNK_TRIALS):
    """Mean, standard deviation (ddof 0) and all-finite flag of each column, in float64 chunks."""
    n_rows, n_cols = array.shape
    total = np.zeros(n_cols)
    total_sq = np.zeros(n_cols)
    finite = np.ones(n_cols, dtype=bool)
    for start in range(0, n_rows, chunk):
        block = array[start:start + chunk].astype(np.float64)
        finite &= np.isfinite(block).all(axis=0)
        block = np.where(np.isfinite(block), block, 0.0)
        total += block.sum(axis=0)
        total_sq += (block ** 2).sum(axis=0)
    mean = total / max(n_rows, 1)
    var = np.maximum(total_sq / max(n_rows, 1) - mean ** 2, 0.0)
    return mean, np.sqrt(var), finite


def _finite_columns(array, chunk=CHUNK_TRIALS):
    finite = np.ones(array.shape[1], dtype=bool)
    for start in range(0, len(array), chunk):
        finite &= np.isfinite(array[start:start + chunk]).all(axis=0)
    return finite


def _zscore_inplace(array, mean, std, chunk=CHUNK_TRIALS):
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    for start in range(0, len(array), chunk):
        block = array[start:start + chunk]
        block -= mean32
        block /= std32


def wrap_pad_to_patches(array, patch_size):
    """MinD-Vis's ``pad_to_patch_size``: wrap-pad the columns by ``patch_size - V % patch_size`` (a whole patch
    when V is already a multiple, as its code does).

    Parameters
    ----------
    array : float [N, V]
    patch_size : int

    Returns
    -------
    float [N, V + patch_size - V % patch_size]
    """
    return np.pad(array, ((0, 0), (0, patch_size - array.shape[1] % patch_size)), mode="wrap")


def mindvis_scalars(train, patch_size):
    """One mean and SD of the wrap-padded training matrix, and those of it once normalised by them.

    MinD-Vis (code/dataset.py, ``create_Kamitani_dataset``) normalises the padded training matrix by its own
    scalar mean and SD, then the test matrix by ``np.mean(tr), np.std(tr)`` of the already normalised
    training matrix: about 0 and 1, computed here exactly as its code does (float64).

    Parameters
    ----------
    train : float [N, V]
        Every training trial of the file (validation trials included: its code has no validation split).
    patch_size : int

    Returns
    -------
    (train_mean, train_std), (test_mean, test_std) : tuples of float
    """
    padded = wrap_pad_to_patches(np.asarray(train, dtype=np.float64), patch_size)
    mean, std = float(np.mean(padded)), float(np.std(padded))
    normalised = (padded - mean) / (std * 1.0)
    return (mean, std), (float(np.mean(normalised)), float(np.std(normalised)))


def group_sums(values, groups, n_groups):
    """Sum the rows of ``values`` per group (a sort and ``np.add.reduceat``: far faster than ``np.add.at``).

    Parameters
    ----------
    values : float [N, V]
    groups : int [N]
        Group of each row, in 0 .. n_groups - 1.
    n_groups : int

    Returns
    -------
    float64 [n_groups, V]
    """
    sums = np.zeros((n_groups, values.shape[1]))
    if len(values) == 0:
        return sums
    order = np.argsort(groups, kind="stable")
    sorted_groups = np.asarray(groups)[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sums[sorted_groups[starts]] = np.add.reduceat(np.asarray(values, dtype=np.float64)[order], starts, axis=0)
    return sums


def average_repeats(fmri, stimulus_id):
    """Average trials that showed the same stimulus.

    Parameters
    ----------
    fmri : float32 [N, V]
    stimulus_id : str [N]

    Returns
    -------
    mean : float32 [M, V]
        One row per distinct stimulus, in order of first appearance.
    ids : object [M]
    n_repeats : int64 [M]
    """
    stimulus_id = np.asarray(stimulus_id, dtype=object)
    ids, first, inverse, counts = np.unique(stimulus_id.astype(str), return_index=True, return_inverse=True,
                                            return_counts=True)
    order = np.argsort(first)
    means = np.empty((len(ids), fmri.shape[1]), dtype=np.float32)
    for start in range(0, fmri.shape[1], COLUMN_BLOCK):
        columns = slice(start, start + COLUMN_BLOCK)
        means[:, columns] = group_sums(fmri[:, columns], inverse, len(ids)) / counts[:, None]
    return means[order], ids[order].astype(object), counts[order].astype(np.int64)


def _stimulus_split(source, ids, config, split_name):
    from mindvis.data.stimuli import StimulusSplit

    section = config["stimuli"]
    size, channels, fit = section["image_size"], section["channels"], config["data"]["image_fit"]
    images = np.zeros((len(ids), size, size, channels), dtype=np.uint8)
    for row, sid in enumerate(ids):
        images[row] = prepare_image(source.images[sid](), size, channels, fit, key=f"{split_name} image '{sid}'")
    labels = np.array([int(source.stimulus_label.get(sid, -1)) for sid in ids], dtype=np.int64)
    return StimulusSplit(images=images, label=labels, stimulus_id=np.asarray(ids, dtype=object),
                         source_index=np.arange(len(ids), dtype=np.int64))


def _check_source(source, source_name):
    n_trials = len(source.part)
    for key in ("stimulus_id", "run"):
        if len(getattr(source, key)) != n_trials:
            raise ValueError(f"{source_name}: {key} has {len(getattr(source, key))} rows for {n_trials} trials")
    bad = sorted(set(source.part) - {"train", "test"})
    if bad:
        raise ValueError(f"{source_name}: unknown parts {bad}")
    missing = sorted({str(sid) for sid in source.stimulus_id} - set(source.images))
    if missing:
        raise MindvisError(f"{len(missing)} trials show stimuli without an image, e.g. {missing[:3]}",
                           key="stimulus_id", fix="check that the image file belongs to this fMRI file.")
    n_train, n_test = int(np.sum(source.part == "train")), int(np.sum(source.part == "test"))
    if not n_train:
        raise MindvisError("the source holds no training trials", path=_first_input(source), key="data.source",
                           fix="check the source files and data.roi / key settings.")
    if n_train < 2:
        # Said before the voxels' training variance is measured: one trial makes every voxel look constant.
        raise MindvisError(f"the source holds only {n_train} training trial; a decoder needs at least 2 (and a "
                           "validation split besides)", path=_first_input(source), key="data.source",
                           fix="check the source files: the training fMRI and its images hold one trial each.")
    if not n_test:
        raise MindvisError("the source holds no test trials: the test split would be empty",
                           path=_first_input(source), key="data.source",
                           fix="check the source files: the test fMRI and its images are empty.")


def _file_test_average(source, keep):
    """The source's own test averages (ids, float32 [M, V kept], a copy) or None."""
    if source.test_average is None:
        return None
    ids, values = source.test_average
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape != (len(ids), len(keep)):
        raise ValueError(f"test_average has shape {values.shape} for {len(ids)} ids and {len(keep)} voxels")
    return np.asarray(ids, dtype=object), np.ascontiguousarray(values[:, keep])


def _first_input(source):
    """The source's main file (its fMRI), named in errors about the data as a whole."""
    return source.input_files[0] if source.input_files else None


def convert_source(source, config, subject, source_name, out_responses, out_stimuli):
    """Write ``responses.h5`` and the stimulus HDF5 of one subject from a :class:`SourceData`.

    Parameters
    ----------
    source : SourceData
    config : dict
        The validated experiment config (``seed``, ``stimuli``,
        ``preprocess.val_fraction``, ``data``).
    subject : str
        The mindvis subject label (``sub-01``).
    source_name : str
        The adapter's name (``god_npz``...), recorded as the ``method`` attribute.
    out_responses, out_stimuli : str or Path
        Files to write (atomically).

    Returns
    -------
    dict
        A summary: trials per split, voxels kept and dropped, validation grouping.
    """
    _check_source(source, source_name)
    # The stimulus file is written first (its images then leave memory) but only replaces out_stimuli once
    # responses.h5 is written too: a bad input found in the responses leaves both earlier outputs as they were.
    # responses.h5 records the stimulus file's SHA-256, so a pair split by a kill between the two renames is
    # refused where the files are read together (mindvis.data.responses.check_stimuli_pair).
    with atomic_path(out_stimuli) as stimuli_tmp:
        return _convert(source, config, subject, source_name, out_responses, out_stimuli, stimuli_tmp)


def _convert(source, config, subject, source_name, out_responses, out_stimuli, stimuli_tmp):
    """:func:`convert_source` with the stimulus file written to ``stimuli_tmp``."""
    from mindvis.data.responses import ResponseSplit, write_responses
    from mindvis.data.stimuli import StimulusSet, StimulusSplit, save_stimulus_set
    from mindvis.utils.io import software_versions

    part = np.asarray(source.part)
    stimulus_id = np.asarray([str(s) for s in source.stimulus_id], dtype=object)
    run = np.asarray(source.run, dtype=np.int64)
    onset = np.full(len(part), np.nan) if source.onset is None else np.asarray(source.onset, dtype=np.float64)
    train_rows = np.flatnonzero(part == "train")
    test_rows = np.flatnonzero(part == "test")

    # Images first and freed before the responses are read: the two never peak together.
    train_ids = list(dict.fromkeys(stimulus_id[train_rows]))
    test_ids = list(dict.fromkeys(stimulus_id[test_rows]))
    section = config["stimuli"]
    empty = np.zeros((0, section["image_size"], section["image_size"], section["channels"]), np.uint8)
    stimulus_set = StimulusSet(
        splits={"train": _stimulus_split(source, train_ids, config, "train"),
                "test": _stimulus_split(source, test_ids, config, "test"),
                "pool": StimulusSplit(empty, np.zeros(0, np.int64), np.array([], dtype=object),
                                      np.zeros(0, np.int64))},
        class_names=list(source.class_names),
        attrs={"source": f"{source_name}:{subject}", "image_size": section["image_size"],
               "channels": section["channels"], "license": "see the data set's own terms of use",
               "attribution": source.notes.get("attribution", source_name), "seed": config["seed"],
               "config": json.dumps({"stimuli": section, "data": config["data"]}),
               "versions": json.dumps(software_versions())})
    # HDF5 cannot stop cleanly on a disk that fills up under it: both files must fit before either is begun.
    n_voxels = len(np.asarray(source.voxel_ijk))
    image_bytes = sum(split.images.nbytes for split in stimulus_set.splits.values())
    response_bytes = (len(part) + len(test_ids)) * n_voxels * 4
    check_free_space(Path(out_responses).parent, image_bytes + int(1.1 * response_bytes) + (256 << 10), out_responses)
    save_stimulus_set(stimulus_set, stimuli_tmp)
    stimuli_sha256 = sha256_file(stimuli_tmp)
    trials_per_class = np.bincount(
        np.array([source.stimulus_label.get(sid, -1) for sid in stimulus_id[train_rows]], dtype=np.int64) + 1,
        minlength=len(source.class_names) + 1)[1:]
    del stimulus_set

    is_val, grouping = carve_validation(run[train_rows], len(train_rows), config["preprocess"]["val_fraction"],
                                        config["data"]["trials_per_block"],
                                        derive_seed(config["seed"], "val", subject))
    rows = {"train": train_rows[~is_val], "val": train_rows[is_val], "test": test_rows}
    arrays = _fill(source, rows)

    mean, std, finite = _column_stats(arrays["train"])
    for name in ("val", "test"):
        finite &= _finite_columns(arrays[name])
    normalisation = config["data"].get("normalisation", "voxel_zscore")
    # Under one scalar per split a constant voxel is harmless and dropping it would shift a released encoder's
    # columns: only non-finite voxels go.
    keep = finite & (std > 0) if normalisation == "voxel_zscore" else finite.copy()
    n_dropped = int((~keep).sum())
    if n_dropped:
        log.warning("%s: dropping %d of %d voxels (%d not finite in some trial, %d constant over training "
                    "trials)", subject, n_dropped, len(keep), int((~finite).sum()),
                    int((finite & (std == 0)).sum()))
        if not keep.any():
            raise MindvisError("every voxel is constant or not finite", path=_first_input(source), key="data.roi",
                               fix="check the ROI selection and the source files.")
        arrays = {name: np.ascontiguousarray(array[:, keep]) for name, array in arrays.items()}
        mean, std = mean[keep], std[keep]
    file_average = _file_test_average(source, keep)
    if normalisation == "voxel_zscore":
        for array in arrays.values():
            _zscore_inplace(array, mean, std)
        if file_average is not None:
            _zscore_inplace(file_average[1], mean, std)
        normalisation_note = "z-score per voxel with training-split statistics (val and test excluded)"
    else:
        (train_mean, train_std), test_scalars = mindvis_scalars(
            np.concatenate([arrays["train"], arrays["val"]]), config["mbm"]["patch_size"])
        test_mean, test_std = test_scalars if normalisation == "mindvis_scalar" else (train_mean, train_std)
        for name, array in arrays.items():
            split_mean, split_std = (test_mean, test_std) if name == "test" else (train_mean, train_std)
            array -= np.float32(split_mean)
            array /= np.float32(split_std)
        if file_average is not None:
            file_average[1][:] = (file_average[1] - np.float32(test_mean)) / np.float32(test_std)
        mean, std = np.full(len(mean), train_mean), np.full(len(std), train_std)
        normalisation_note = (f"{normalisation}: training (and val) trials wrap-padded to patches of "
                              f"{config['mbm']['patch_size']}, scaled by mean {train_mean:.6g} and SD "
                              f"{train_std:.6g}; test trials by mean {test_mean:.6g} and SD {test_std:.6g}")

    splits = {}
    for name, split_rows in rows.items():
        labels = np.array([source.stimulus_label.get(sid, -1) for sid in stimulus_id[split_rows]], dtype=np.int64)
        splits[name] = ResponseSplit(fmri=arrays[name], stimulus_id=stimulus_id[split_rows], label=labels,
                                     run=run[split_rows], onset=onset[split_rows])
    averaged, avg_ids, n_repeats = average_repeats(arrays["test"], stimulus_id[test_rows])
    average_note = {}
    if file_average is not None:
        file_ids, file_values = file_average
        position = {str(sid): row for row, sid in enumerate(file_ids)}
        missing = [sid for sid in avg_ids if sid not in position]
        if missing or len(file_ids) != len(avg_ids):
            raise MindvisError(f"the file's test averages hold {len(file_ids)} stimuli but the single test trials "
                               f"show {len(avg_ids)} (e.g. {missing[:3]} without an average)",
                               path=_first_input(source), key="data.god_npz.test_average",
                               fix="use the file's own arrays, or set data.god_npz.test_average: recomputed.")
        file_values = file_values[[position[str(sid)] for sid in avg_ids]]
        # The file's averages and the recomputed ones agree when arr_2 is the mean of arr_1: the record says how far.
        average_note = {"test_average": "file",
                        "test_average_max_abs_difference": float(np.max(np.abs(file_values - averaged)))}
        log.info("%s: test_avg read from the file (largest difference from the recomputed averages %.3g)", subject,
                 average_note["test_average_max_abs_difference"])
        averaged = np.ascontiguousarray(file_values, dtype=np.float32)
    splits["test_avg"] = ResponseSplit(
        fmri=averaged, stimulus_id=avg_ids,
        label=np.array([source.stimulus_label.get(sid, -1) for sid in avg_ids], dtype=np.int64),
        run=np.full(len(avg_ids), -1, dtype=np.int64), onset=np.full(len(avg_ids), np.nan),
        n_repeats=n_repeats)
    quality = {"trials_per_class": trials_per_class, "train_mean": mean.astype(np.float32),
               "train_std": std.astype(np.float32)}
    ncsnr = ceiling = None
    if has_repeats(stimulus_id[test_rows]):
        ncsnr, ceiling = (values.astype(np.float32) for values in noise_ceiling(arrays["test"], stimulus_id[test_rows]))
    if ncsnr is not None:
        quality.update(ncsnr=ncsnr, noise_ceiling=ceiling)

    hashes = {str(path): sha256_file(path) for path in source.input_files}
    summary = {"source": source_name, "n_train": len(rows["train"]), "n_val": len(rows["val"]),
               "n_test": len(test_rows), "n_test_stimuli": len(avg_ids), "n_voxels": int(keep.sum()),
               "n_voxels_dropped": n_dropped, "validation_grouping": grouping,
               "normalisation": normalisation_note, **average_note}
    write_responses(
        out_responses, splits=splits, voxel_ijk=np.asarray(source.voxel_ijk)[keep],
        affine=source.affine, volume_shape=source.volume_shape, voxel_roi=np.asarray(source.voxel_roi)[keep],
        class_names=list(source.class_names), tr=float(source.tr), subject=subject, method=source_name,
        preprocess_config={"data": config["data"], "val_fraction": config["preprocess"]["val_fraction"],
                           **{k: v for k, v in summary.items() if k not in ("n_train", "n_val", "n_test")}},
        config=config, input_hashes=hashes, quality=quality,
        extra_attrs={"source": {**source.notes, **summary}, "stimuli_file": str(out_stimuli),
                     "stimuli_sha256": stimuli_sha256})
    log.info("%s: %s", subject, summary)
    return summary
