"""Find and read one subject's BIDS runs, with a clear error for every bad input.

Files read (``{sub}`` is e.g. ``sub-01``; sessions ``{sub}/ses-*/func`` also work):

- ``{sub}/func/{sub}_task-{task}_run-{NN}_bold.nii.gz`` (or ``.nii``): 4-D BOLD,
  on the same voxel grid as the ROI mask;
- ``..._bold.json``: sidecar with ``RepetitionTime`` in seconds;
- ``..._events.tsv`` (task runs): ``onset``, ``duration``, ``trial_type``
  (``train``, ``test``, anything else is modelled as a nuisance condition),
  ``stimulus_id`` and ``class`` (needed when no stimulus set is given);
- ``..._desc-confounds_timeseries.tsv`` (fMRIPrep style): the columns named in
  ``preprocess.confounds``;
- the ROI: ``preprocess.roi`` = ``simulation`` reads the simulator's
  ``derivatives/simulation/{sub}/{sub}_space-MNI152NLin2009aAsym_desc-visual_mask.nii.gz``
  with its ``_desc-visual_dseg.nii.gz`` and ``{sub}_desc-visual_dseg.tsv``
  (index, name) for voxel ROI names; any other value is the path of a NIfTI
  mask (non-zero = in the ROI). An integer label image with a TSV of the same
  stem (``index``, ``name``) beside it names its voxels by label.
- the group template (``preprocess.space: template``): ``preprocess.template_mask``
  = ``simulation`` reads the simulator's
  ``derivatives/simulation/template/tpl-MNI152NLin2009aAsym_desc-visual_mask.nii.gz``
  (with its dseg and TSV); any other value is a NIfTI path read like a mask
  path above. Every subject is then read at the same voxels in the same order
  (:func:`load_voxels`).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mindvis.errors import MindvisError
from mindvis.data.bids_layout import derivative_paths, template_paths

#: Trial types that become responses; any other type is a nuisance condition.
STIMULUS_TRIAL_TYPES = ("train", "test")
EVENT_COLUMNS = ("onset", "duration", "trial_type", "stimulus_id")
_RUN_PATTERN = re.compile(r"_run-(\d+)_")
#: The remedy for a BIDS file that cannot be read at all.
_RECOPY = "re-copy or regenerate the file."


def _one_line(err):
    """A library's error text on one line (nibabel's and pandas' messages can span several)."""
    return " ".join(str(err).split())


@dataclass
class RunFiles:
    """The files of one BIDS run. ``events`` and ``confounds`` are None when absent."""

    run: int
    bold: Path
    sidecar: Path
    events: Path | None
    confounds: Path | None


@dataclass
class RoiMask:
    """The voxels to keep.

    Attributes
    ----------
    mask : bool [X, Y, Z]
    affine : float64 [4, 4]
    voxel_roi : object (str) [V]
        ROI name of each voxel, in ``np.nonzero(mask)`` order.
    files : list of Path
        The files read (for input hashes).
    key : str
        The config key that chose the mask (named in errors).
    """

    mask: np.ndarray
    affine: np.ndarray
    voxel_roi: np.ndarray
    files: list
    key: str = "preprocess.roi"

    @property
    def voxel_ijk(self):
        """int32 [V, 3], ``np.nonzero`` (C) order, the column order of masked data."""
        return np.stack(np.nonzero(self.mask), axis=1).astype(np.int32)


def _stem(bold_path):
    name = bold_path.name
    for suffix in ("_bold.nii.gz", "_bold.nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(name)


def find_runs(bids_dir, subject, task, need_events=True):
    """List one subject's runs of a task, sorted by run number.

    Parameters
    ----------
    bids_dir : str or Path
    subject : str
        With the ``sub-`` prefix.
    task : str
        BIDS task label (``objects``, ``rest``).
    need_events : bool
        Require an events TSV beside each BOLD file.

    Returns
    -------
    list of RunFiles
    """
    subject_dir = Path(bids_dir) / subject
    if not subject_dir.is_dir():
        raise MindvisError("subject folder not found", path=subject_dir,
                           fix=f"check --bids-dir and the subject label ({subject}).")
    bolds = sorted(set(subject_dir.glob(f"func/{subject}_*task-{task}_*bold.nii*"))
                   | set(subject_dir.glob(f"ses-*/func/{subject}_*task-{task}_*bold.nii*")))
    bolds = [path for path in bolds if path.name.endswith(("_bold.nii.gz", "_bold.nii"))]
    if not bolds:
        raise MindvisError(f"no BOLD runs of task '{task}' found (looked for "
                           f"func/{subject}_task-{task}_run-NN_bold.nii.gz)", path=subject_dir,
                           key="preprocess.task", fix="check the task label in the config and the file names.")
    runs = []
    for position, bold in enumerate(bolds, start=1):
        match = _RUN_PATTERN.search(bold.name)
        number = int(match.group(1)) if match else position
        stem = _stem(bold)
        events = bold.with_name(f"{stem}_events.tsv")
        if need_events and not events.exists():
            raise MindvisError("events file missing for this run", path=events,
                               fix="write a BIDS events TSV (onset, duration, trial_type, stimulus_id) beside it.")
        confounds = bold.with_name(f"{stem}_desc-confounds_timeseries.tsv")
        runs.append(RunFiles(run=number, bold=bold, sidecar=bold.with_name(f"{stem}_bold.json"),
                             events=events if events.exists() else None,
                             confounds=confounds if confounds.exists() else None))
    numbers = [run.run for run in runs]
    if len(set(numbers)) != len(numbers):
        raise MindvisError(f"run numbers repeat ({numbers}); sessions must number runs uniquely",
                           path=subject_dir, fix="give every run of the subject its own run-NN entity.")
    return sorted(runs, key=lambda run: run.run)


def read_tr(sidecar):
    """``RepetitionTime`` (seconds) from a BOLD JSON sidecar."""
    sidecar = Path(sidecar)
    if not sidecar.exists():
        raise MindvisError("BOLD sidecar JSON missing", path=sidecar,
                           fix="write the sidecar with RepetitionTime (seconds) beside the BOLD file.")
    try:
        meta = json.loads(sidecar.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise MindvisError(f"not readable JSON ({_one_line(err)})", path=sidecar,
                           fix="write the sidecar as a JSON object, e.g. {\"RepetitionTime\": 2.0}.") from None
    tr = meta.get("RepetitionTime") if isinstance(meta, dict) else None
    if tr is None:
        raise MindvisError("RepetitionTime missing from the sidecar", path=sidecar, key="RepetitionTime",
                           fix="add \"RepetitionTime\": <seconds> to the JSON.")
    if not isinstance(tr, (int, float)) or isinstance(tr, bool) or not np.isfinite(tr) or tr <= 0:
        raise MindvisError(f"RepetitionTime must be a positive number of seconds, found {tr!r}", path=sidecar,
                           key="RepetitionTime", fix="write it as a JSON number, e.g. \"RepetitionTime\": 2.0.")
    if tr > 30:
        raise MindvisError(f"RepetitionTime {tr} looks like milliseconds; BIDS wants seconds", path=sidecar,
                           key="RepetitionTime", fix="divide it by 1000.")
    return float(tr)


def read_events(path, n_volumes, tr, need_class=True):
    """Read and check an events TSV.

    Parameters
    ----------
    path : Path
    n_volumes : int
        Volumes in the run, so onsets past its end are caught.
    tr : float
    need_class : bool
        Require a ``class`` column (no stimulus set gives class names).

    Returns
    -------
    pandas.DataFrame
        Sorted by onset; ``onset`` and ``duration`` float, ``trial_type``,
        ``stimulus_id`` (and ``class``) str.
    """
    path = Path(path)
    try:
        events = pd.read_csv(path, sep="\t", dtype={"trial_type": str, "stimulus_id": str, "class": str},
                             keep_default_na=False, na_values={"onset": ["n/a", ""], "duration": ["n/a", ""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as err:
        raise MindvisError(f"not a readable tab-separated events file ({_one_line(err)})", path=path,
                           fix="write a UTF-8 TSV with a header row (onset, duration, trial_type, stimulus_id).") \
            from None
    needed = EVENT_COLUMNS + (("class",) if need_class else ())
    missing = [column for column in needed if column not in events.columns]
    if missing:
        raise MindvisError(f"events file lacks column(s) {', '.join(missing)} (found: {', '.join(events.columns)})",
                           path=path, key=missing[0],
                           fix="BIDS events need onset, duration, trial_type, stimulus_id"
                               + (" and class (or pass --stimuli)." if need_class else "."))
    if events.empty:
        raise MindvisError("the events file has a header and no trials", path=path, key="onset",
                           fix="list the run's trials, one per row, or leave the run out of the BIDS folder.")
    for column in ("onset", "duration"):
        values = pd.to_numeric(events[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise MindvisError(f"{column} is not a finite number in row {row + 2} ({events[column].iloc[row]!r})",
                               path=path, key=column, fix=f"give every {column} in seconds, as a number.")
        events[column] = values.astype(float)
    if (events["duration"] < 0).any():
        raise MindvisError("negative durations", path=path, key="duration",
                           fix="give durations in seconds, 0 or more.")
    run_length = n_volumes * tr
    late = events["onset"] >= run_length
    early = events["onset"] < 0
    if late.any() or early.any():
        onset = events["onset"][late | early].iloc[0]
        raise MindvisError(f"onset {onset:g} s lies outside the run (0 to {run_length:g} s: {n_volumes} volumes of "
                           f"TR {tr:g} s)", path=path, key="onset",
                           fix="check the onsets' units (seconds from the first volume) and the BOLD file.")
    _check_trial_types(events["trial_type"], path)
    stimulus_rows = events["trial_type"].isin(STIMULUS_TRIAL_TYPES)
    empty_ids = stimulus_rows & (events["stimulus_id"].str.strip() == "")
    if empty_ids.any():
        raise MindvisError(f"{int(empty_ids.sum())} stimulus trials have no stimulus_id", path=path,
                           key="stimulus_id", fix="name the image shown in every train and test trial.")
    if need_class:
        no_class = stimulus_rows & events["class"].str.strip().isin(["", "n/a"])
        if no_class.any():
            raise MindvisError(f"{int(no_class.sum())} stimulus trials have no class", path=path, key="class",
                               fix="fill the class column, or pass the stimulus set (--stimuli) for labels.")
    return events.sort_values("onset", kind="stable").reset_index(drop=True)


def _check_trial_types(trial_type, path):
    """Refuse trial types that are ``train`` or ``test`` but for case, spaces or quotes (``Train``, ``test ``).

    Any other value is a nuisance condition on purpose (``fixation``, ``blank``); a near miss would silently turn
    a stimulus trial into one, and drop it from the responses.
    """
    values = trial_type.astype(str)
    normalised = values.str.strip().str.strip("'\"").str.strip().str.lower()
    near = normalised.isin(STIMULUS_TRIAL_TYPES) & ~values.isin(STIMULUS_TRIAL_TYPES)
    if near.any():
        found = sorted(set(values[near]))
        raise MindvisError(f"{int(near.sum())} rows have trial_type {', '.join(map(repr, found[:4]))}, which is not "
                           "exactly 'train' or 'test': they would be modelled as a nuisance condition and dropped "
                           "from the responses", path=path, key="trial_type",
                           fix="write trial_type exactly 'train' or 'test' (lower case, no spaces) for stimulus "
                               "trials.")


def nuisance_counts(events):
    """``{trial_type: rows}`` of the events that are not stimulus trials (modelled as nuisance conditions)."""
    other = events["trial_type"][~events["trial_type"].isin(STIMULUS_TRIAL_TYPES)].astype(str)
    return {str(name): int(count) for name, count in other.value_counts().sort_index().items()}


def check_tr_header(image, tr, sidecar, bold_path):
    """Refuse a sidecar ``RepetitionTime`` that disagrees with the NIfTI header's time step (where it has one).

    The header counts only when its time units are set (seconds, ms or us) and its step is positive: many
    writers leave it 0 or 1 with unknown units, and the sidecar is then the only record.
    """
    header = image.header
    try:
        zooms = header.get_zooms()
        units = header.get_xyzt_units()[1]
    except (AttributeError, TypeError, ValueError):  # a header without these fields: the sidecar stands alone
        return
    if len(zooms) < 4 or units not in ("sec", "msec", "usec"):
        return
    step = float(zooms[3]) * {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}[units]
    if not np.isfinite(step) or step <= 0:
        return
    if abs(step - tr) > 1e-3 * max(tr, step):
        raise MindvisError(f"RepetitionTime {tr:g} s disagrees with the BOLD header's time step {step:g} s "
                           f"({Path(bold_path).name})", path=sidecar, key="RepetitionTime",
                           fix="correct whichever is wrong: the sidecar's RepetitionTime (seconds) or the NIfTI "
                               "header's pixdim[4] and time units.")


def read_confounds(path, columns, n_volumes, bold_path):
    """The named confound columns as float64 [T, K] (None when no columns are asked for).

    A NaN in the first row only (fMRIPrep leaves derivatives undefined there)
    is replaced by the second row's value; any other NaN is an error.
    """
    if not columns:
        return None
    if path is None:
        raise MindvisError(f"confounds TSV missing, but preprocess.confounds lists {list(columns)}",
                           path=Path(bold_path).with_name(f"{_stem(Path(bold_path))}_desc-confounds_timeseries.tsv"),
                           key="preprocess.confounds", fix="write the confounds TSV, or set preprocess.confounds: [].")
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise MindvisError(f"not a readable tab-separated confounds file ({_one_line(err)})", path=path,
                           key="preprocess.confounds", fix="write a UTF-8 TSV with one header row and one row per "
                                                           "volume, or set preprocess.confounds: [].") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise MindvisError(f"confound column(s) {', '.join(missing)} not in the file", path=path,
                           key="preprocess.confounds", fix="remove them from preprocess.confounds or add them.")
    if len(table) != n_volumes:
        raise MindvisError(f"{len(table)} confound rows for {n_volumes} volumes", path=path,
                           fix="write one confounds row per BOLD volume.")
    values = np.array(table[list(columns)].apply(pd.to_numeric, errors="coerce"), dtype=np.float64)
    if n_volumes > 1:
        values[0] = np.where(np.isnan(values[0]), values[1], values[0])
    if not np.all(np.isfinite(values)):
        column = columns[int(np.flatnonzero(~np.isfinite(values).all(axis=0))[0])]
        raise MindvisError("non-numeric or missing confound values", path=path, key=column,
                           fix="fill the column with numbers (n/a only in the first row), or drop it from "
                               "preprocess.confounds.")
    return values


# -- ROI ------------------------------------------------------------------------

def _load_nifti(path, what):
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise MindvisError(f"{what} not found", path=path, fix="check the path, or rerun the stage that writes it.")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise MindvisError(f"not a readable NIfTI image ({type(err).__name__}: {_one_line(err)})", path=path,
                           fix=_RECOPY) from None


def _read_volume(image, path):
    try:
        return np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as err:
        raise MindvisError(f"truncated or corrupt image data ({type(err).__name__}: {_one_line(err)})", path=path,
                           fix=_RECOPY) from None


def _read_label_names(tsv, labels_present):
    fix = "write a TSV with columns index (the label value) and name, one row per label."
    try:
        table = pd.read_csv(tsv, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise MindvisError(f"not a readable label table ({_one_line(err)})", path=tsv, fix=fix) from None
    if not {"index", "name"} <= set(table.columns):
        raise MindvisError("label table needs columns index and name", path=tsv, fix=fix)
    index = pd.to_numeric(table["index"], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(index) & (index == np.rint(index))):
        raise MindvisError("label indices must be whole numbers", path=tsv, key="index", fix=fix)
    names = dict(zip(index.astype(int), table["name"].astype(str)))
    missing = sorted(set(int(v) for v in labels_present) - set(names))
    if missing:
        raise MindvisError(f"labels {missing[:5]} of the label image have no name", path=tsv, key="index", fix=fix)
    return names


def load_roi(roi, bids_dir, subject, labels=()):
    """Read the ROI mask and name each voxel's region.

    Parameters
    ----------
    roi : str
        ``simulation`` or a NIfTI path (see the module docstring).
    bids_dir : Path
    subject : str
    labels : sequence of str, optional
        Keep only voxels of these regions (``preprocess.roi_labels``); empty keeps all.

    Returns
    -------
    RoiMask
    """
    return _load_mask(roi, derivative_paths(bids_dir, subject) if roi == "simulation" else None, labels,
                      key="preprocess.roi",
                      fix="run the 'simulate' stage, or set preprocess.roi to a NIfTI mask path.")


def load_template(template_mask, bids_dir, labels=()):
    """Read the group template mask of ``preprocess.space: template`` (the same for every subject).

    Parameters
    ----------
    template_mask : str
        ``simulation`` (the simulator's template, see the module docstring) or a NIfTI path.
    bids_dir : Path
    labels : sequence of str, optional
        ``preprocess.roi_labels``.

    Returns
    -------
    RoiMask
    """
    return _load_mask(template_mask, template_paths(bids_dir) if template_mask == "simulation" else None, labels,
                      key="preprocess.template_mask",
                      fix="run the 'bids_metadata' rule (mindvis bids-metadata), which writes the simulator's "
                          "template, or set preprocess.template_mask to a NIfTI mask path.")


def load_voxels(section, bids_dir, subject):
    """The voxels to read for one subject: its own ROI (``space: native``) or the group template (``template``).

    Parameters
    ----------
    section : dict
        The ``preprocess`` config section.
    bids_dir : Path
    subject : str

    Returns
    -------
    RoiMask
    """
    if section["space"] == "template":
        return load_template(section["template_mask"], bids_dir, section["roi_labels"])
    return load_roi(section["roi"], bids_dir, subject, section["roi_labels"])


def _load_mask(value, simulator_paths, labels, key, fix):
    """Read a mask: the simulator's (``simulator_paths``: mask, dseg, dseg_tsv) or the NIfTI path ``value``."""
    wanted = list(labels)
    roi = value
    if simulator_paths is not None:
        mask_path, dseg_path, table_path = simulator_paths["mask"], simulator_paths["dseg"], simulator_paths["dseg_tsv"]
        if not mask_path.exists():
            raise MindvisError("the simulator's mask is missing", path=mask_path, key=key, fix=fix)
        roi = "simulation"
    else:
        mask_path, dseg_path = Path(roi), None
        table_path = Path(str(mask_path).replace(".nii.gz", "").replace(".nii", "") + ".tsv")
    image = _load_nifti(mask_path, "ROI mask")
    data = _read_volume(image, mask_path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MindvisError(f"an ROI mask must be 3-D, found shape {data.shape}", path=mask_path, key=key, fix=fix)
    if not np.all(np.isfinite(data)):
        raise MindvisError("the ROI mask holds NaN values", path=mask_path, key=key,
                           fix="write the mask as integers, 0 outside the ROI (e.g. nilearn.image.math_img).")
    mask = data != 0
    if not mask.any():
        raise MindvisError("the ROI mask is empty", path=mask_path, key=key, fix=fix)
    files = [mask_path]
    voxel_roi = np.full(int(mask.sum()), "roi" if roi != "simulation" else "visual", dtype=object)
    label_values = None
    if dseg_path is not None and dseg_path.exists():
        dseg = _load_nifti(dseg_path, "ROI label image")
        if dseg.shape[:3] != mask.shape or not np.allclose(dseg.affine, image.affine, atol=1e-3):
            what = (f"grid {dseg.shape[:3]} differs from the mask's {mask.shape}" if dseg.shape[:3] != mask.shape
                    else "affine differs from the mask's")
            raise MindvisError(f"the label image's {what}", path=dseg_path, key=key,
                               fix="write the label image on the mask's grid (same shape and affine).")
        label_values = np.rint(_read_volume(dseg, dseg_path)).astype(np.int64).reshape(mask.shape)[mask]
        files.append(dseg_path)
    elif roi != "simulation" and len(np.unique(data[mask])) > 1 and table_path.exists():
        label_values = np.rint(data[mask]).astype(np.int64)
    if label_values is not None and table_path.exists():
        names = _read_label_names(table_path, np.unique(label_values))
        voxel_roi = np.array([names[int(v)] for v in label_values], dtype=object)
        files.append(table_path)
    if wanted:
        unknown = sorted(set(wanted) - set(voxel_roi))
        if unknown:
            raise MindvisError(f"ROI label(s) {unknown} not found; this ROI has {sorted(set(voxel_roi))}",
                               path=files[-1], key="preprocess.roi_labels",
                               fix="list region names from the label table, or leave roi_labels empty.")
        chosen = np.isin(voxel_roi, wanted)
        mask = mask.copy()
        mask[mask] = chosen
        voxel_roi = voxel_roi[chosen]
    return RoiMask(mask=mask, affine=np.asarray(image.affine, dtype=np.float64), voxel_roi=voxel_roi, files=files,
                   key=key)


# -- BOLD -----------------------------------------------------------------------

def open_bold(path, roi):
    """Open a BOLD run lazily and check it is 4-D on the ROI's grid.

    Returns
    -------
    nibabel image (data not yet read)
    """
    import nibabel as nib

    path = Path(path)
    try:
        # keep_file_open lets chunked reads of a .nii.gz continue the gzip stream
        # instead of decompressing from the start for every chunk.
        image = nib.load(path, keep_file_open=True)
    except FileNotFoundError:
        raise MindvisError("BOLD file not found", path=path) from None
    except Exception as err:  # nibabel raises several types for unreadable files
        raise MindvisError(f"not a readable NIfTI image ({type(err).__name__}: {_one_line(err)})", path=path,
                           fix=_RECOPY) from None
    if len(image.shape) != 4:
        raise MindvisError(f"BOLD must be 4-D (x, y, z, time), found shape {image.shape}", path=path,
                           fix="pass the 4-D run, not a single volume.")
    if image.shape[3] < 3:
        raise MindvisError(f"a run needs at least 3 volumes, found {image.shape[3]}", path=path,
                           fix="pass the whole run (every volume of the acquisition).")
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":
        # numpy would silently drop the imaginary part (complex) or fail deep in masking (RGB).
        raise MindvisError(f"BOLD voxels must hold real numbers, found dtype {dtype}", path=path,
                           fix="write the magnitude image (e.g. numpy.abs) as float32 or int16.")
    if tuple(image.shape[:3]) != roi.mask.shape:
        raise MindvisError(f"BOLD grid {tuple(image.shape[:3])} differs from the ROI mask grid {roi.mask.shape}",
                           path=path, key=roi.key,
                           fix="resample the mask to the BOLD grid (nilearn.image.resample_to_img, "
                               "interpolation='nearest').")
    if not np.allclose(image.affine, roi.affine, atol=1e-3):
        raise MindvisError("BOLD affine differs from the ROI mask's affine (different space or voxel size)",
                           path=path, key=roi.key,
                           fix="resample the mask to the BOLD grid (nilearn.image.resample_to_img, "
                               "interpolation='nearest').")
    return image


#: Grid values read at once by :func:`mask_bold` (about 256 MB as float64).
CHUNK_VALUES = 32_000_000


def mask_bold(image, mask, path, chunk_volumes=None):
    """Masked time series of a BOLD run, read a chunk of volumes at a time.

    Equal to ``nilearn.masking.apply_mask(image, mask_img)`` (same voxel order),
    but holds only a chunk of whole volumes at once, so a 2 mm MNI run of 300
    volumes needs a few hundred MB rather than GB.

    Parameters
    ----------
    image : nibabel image, 4-D
        Opened with ``keep_file_open=True`` (see :func:`open_bold`), so that
        each chunk continues the gzip stream.
    mask : bool [X, Y, Z]
    path : Path
        Named in errors.
    chunk_volumes : int, optional
        Volumes per read; by default as many as fit in :data:`CHUNK_VALUES`.

    Returns
    -------
    float32 [T, V]
    """
    n_volumes = image.shape[3]
    if chunk_volumes is None:
        chunk_volumes = max(1, CHUNK_VALUES // int(np.prod(image.shape[:3])))
    out = np.empty((n_volumes, int(mask.sum())), dtype=np.float32)
    try:
        for start in range(0, n_volumes, chunk_volumes):
            stop = min(start + chunk_volumes, n_volumes)
            block = np.asarray(image.dataobj[..., start:stop])
            out[start:stop] = block[mask].T
    except (EOFError, OSError, ValueError, zlib.error) as err:
        raise MindvisError(f"truncated or corrupt BOLD data ({type(err).__name__}: {_one_line(err)})", path=path,
                           fix=_RECOPY) from None
    return out
