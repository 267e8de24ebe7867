"""Per-trial voxel responses (``responses.h5``) and resting-state TR vectors (rest HDF5).

These two files are the contract between preprocessing and everything after it
(SC-MBM pretraining, fine-tuning, evaluation, reports). :func:`write_responses`
and :func:`write_rest` are their only writers; :func:`load_responses` and
:func:`load_rest` their only readers, and both readers validate the layout and
raise :class:`~mindvis.errors.MindvisError` naming the file and the key.

Layout of ``responses.h5``
--------------------------
One group per split: ``train``, ``val`` (whole training runs held out for
model selection), ``test`` (every test trial, repeats kept one by one) and
``test_avg`` (test trials averaged per stimulus). Each group holds

=================  ======================  ====================================================
dataset            dtype / shape           meaning
=================  ======================  ====================================================
``fmri``           float32 [N, V]          per-trial response of each voxel, z-scored with the
                                           mean and standard deviation of the training trials
``stimulus_id``    UTF-8 str [N]           id of the image shown (``stimuli.h5`` ids)
``label``          int64 [N]               class index into ``class_names``; -1 when unknown
``run``            int64 [N]               run number the trial came from; -1 in ``test_avg``
``onset``          float64 [N]             onset in seconds from the run start; NaN in ``test_avg``
``n_repeats``      int64 [N]               ``test_avg`` only: how many trials were averaged
=================  ======================  ====================================================

A split may hold zero trials (``fmri`` [0, V]), e.g. a data set without test
runs. File level:

=====================  ======================  ================================================
item                   dtype / shape           meaning
=====================  ======================  ================================================
``voxel_ijk``          int32 [V, 3]            voxel indices in the volume grid (column order
                                               of ``fmri``)
``affine``             float64 [4, 4]          voxel-to-world (mm) affine of that grid
``voxel_roi``          UTF-8 str [V]           ROI name of each voxel (e.g. ``V1``, ``LOC``)
attr ``volume_shape``  int [3]                 shape of the volume grid
attr ``class_names``   JSON list of str        class names, indexed by ``label``
attr ``tr``            float                   repetition time in seconds
attr ``subject``       str                     BIDS subject label, ``sub-01``
attr ``method``        str                     ``glm_lss``, ``glm_lsa``, ``lag_average`` or an
                                               adapter's name
attr ``preprocess_config``  JSON               the ``preprocess`` config section used
attr ``config``        JSON                    the whole resolved experiment config
attr ``versions``      JSON                    software versions (:func:`software_versions`)
attr ``input_hashes``  JSON {file: sha256}     every input file read
attr ``format_version`` int                    this layout's version (1)
``quality/``           group                   ``tsnr`` float32 [V] (temporal SNR of the raw
                                               runs), ``noise_ceiling`` float32 [V] (percent
                                               of explainable variance of ``test_avg``, NaN
                                               without repeats; definition in
                                               :mod:`mindvis.preprocess.quality`),
                                               ``ncsnr`` float32 [V], ``trials_per_class``
                                               int64 [C] (``train``; ``trials_per_class_val``
                                               and ``_test`` too), ``train_mean`` and
                                               ``train_std`` float32 [V] (the statistics
                                               the z-scoring used); adapters may write a
                                               subset or more
=====================  ======================  ================================================

Writers may add attributes; those stored as JSON are listed in the attribute
``json_attrs`` and decoded by the reader. The preprocess stage adds
``val_runs`` (the runs in ``val``) and ``dropped_voxels`` (counts by reason).

Layout of the resting-state file (``results/pretrain/rest/{subject}.h5``)
-----------------------------------------------------------------------
``fmri`` float32 [T, V] (cleaned time points, z-scored per run), ``run`` int64
[T], ``voxel_ijk``, ``affine``, ``voxel_roi`` as above; attributes
``volume_shape``, ``tr``, ``subject``, ``preprocess_config``, ``config``,
``versions``, ``input_hashes``, ``format_version``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mindvis.errors import MindvisError
from mindvis.utils.io import (
    atomic_path,
    hdf5_bytes,
    hdf5_for_writing,
    software_versions,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test", "test_avg")
SPLIT_KEYS = ("fmri", "stimulus_id", "label", "run", "onset")
_REQUIRED_ATTRS = ("volume_shape", "class_names", "tr", "subject", "method", "preprocess_config",
                   "config", "versions", "input_hashes")
_REST_ATTRS = ("volume_shape", "tr", "subject", "preprocess_config", "config", "versions", "input_hashes")
_JSON_ATTRS = ("class_names", "preprocess_config", "config", "versions", "input_hashes")


@dataclass
class ResponseSplit:
    """The trials of one split.

    Attributes
    ----------
    fmri : float32 [N, V]
    stimulus_id : object (str) [N]
    label : int64 [N]
    run : int64 [N]
    onset : float64 [N]
    n_repeats : int64 [N] or None
        Trials averaged into each row (``test_avg`` only).
    """

    fmri: np.ndarray
    stimulus_id: np.ndarray
    label: np.ndarray
    run: np.ndarray
    onset: np.ndarray
    n_repeats: np.ndarray | None = None

    def __len__(self):
        return len(self.label)

    @classmethod
    def empty(cls, n_voxels, averaged=False):
        """A split with no trials and ``n_voxels`` columns."""
        return cls(np.zeros((0, n_voxels), np.float32), np.array([], dtype=object), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, np.float64),
                   np.zeros(0, np.int64) if averaged else None)


@dataclass
class Responses:
    """Everything in a ``responses.h5`` (see the module docstring for the layout).

    Attributes
    ----------
    splits : dict of str -> ResponseSplit
        The splits that were loaded.
    voxel_ijk : int32 [V, 3]
    affine : float64 [4, 4]
    volume_shape : tuple of 3 int
    voxel_roi : object (str) [V]
    class_names : list of str
    attrs : dict
        ``tr``, ``subject``, ``method`` and the JSON attributes, parsed.
    quality : dict of str -> ndarray
        The ``quality/`` group.
    path : Path or None
        The file it was read from.
    """

    splits: dict
    voxel_ijk: np.ndarray
    affine: np.ndarray
    volume_shape: tuple
    voxel_roi: np.ndarray
    class_names: list
    attrs: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    path: Path | None = None

    def split(self, name):
        """The :class:`ResponseSplit` called ``name`` (it must have been loaded)."""
        if name not in self.splits:
            raise MindvisError(f"split '{name}' was not loaded (loaded: {', '.join(self.splits)})",
                               path=self.path, key=name, fix=f"pass splits=(..., '{name}') to load_responses.")
        return self.splits[name]

    def __getitem__(self, name):
        return self.split(name)

    @property
    def n_voxels(self):
        return len(self.voxel_ijk)

    @property
    def n_classes(self):
        return len(self.class_names)

    @property
    def tr(self):
        return float(self.attrs["tr"])

    @property
    def subject(self):
        return str(self.attrs["subject"])

    def to_nifti(self, values):
        """Write a voxel map back into the volume grid.

        Parameters
        ----------
        values : array [V] or [V, K]
            One value (or K values) per voxel, in ``fmri`` column order.

        Returns
        -------
        nibabel.Nifti1Image
            float32 [X, Y, Z] (or [X, Y, Z, K]); voxels outside the ROI are 0.
        """
        return voxels_to_nifti(values, self.voxel_ijk, self.affine, self.volume_shape)


@dataclass
class RestRuns:
    """A resting-state file: cleaned time points of one subject.

    Attributes
    ----------
    fmri : float32 [T, V]
        Cleaned time points, z-scored per run.
    run : int64 [T]
    voxel_ijk : int32 [V, 3]
    affine : float64 [4, 4]
    volume_shape : tuple of 3 int
    voxel_roi : object (str) [V]
    attrs : dict
    path : Path or None
    """

    fmri: np.ndarray
    run: np.ndarray
    voxel_ijk: np.ndarray
    affine: np.ndarray
    volume_shape: tuple
    voxel_roi: np.ndarray
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_voxels(self):
        return len(self.voxel_ijk)

    @property
    def tr(self):
        return float(self.attrs["tr"])

    def to_nifti(self, values):
        """See :meth:`Responses.to_nifti`."""
        return voxels_to_nifti(values, self.voxel_ijk, self.affine, self.volume_shape)


def voxels_to_nifti(values, voxel_ijk, affine, volume_shape):
    """Scatter per-voxel values [V] or [V, K] into a NIfTI image of ``volume_shape``."""
    import nibabel as nib

    values = np.asarray(values, dtype=np.float32)
    voxel_ijk = np.asarray(voxel_ijk)
    if values.shape[0] != len(voxel_ijk):
        raise ValueError(f"{values.shape[0]} values for {len(voxel_ijk)} voxels")
    volume = np.zeros(tuple(volume_shape) + values.shape[1:], dtype=np.float32)
    volume[voxel_ijk[:, 0], voxel_ijk[:, 1], voxel_ijk[:, 2]] = values
    return nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))


# -- writing ------------------------------------------------------------------

def _strings(values):
    return np.asarray([str(v) for v in values], dtype=object)


def _write_geometry(handle, voxel_ijk, affine, volume_shape, voxel_roi):
    string_dtype = h5py.string_dtype("utf-8")
    handle.create_dataset("voxel_ijk", data=np.asarray(voxel_ijk, dtype=np.int32))
    handle.create_dataset("affine", data=np.asarray(affine, dtype=np.float64))
    handle.create_dataset("voxel_roi", data=_strings(voxel_roi), dtype=string_dtype)
    handle.attrs["volume_shape"] = np.asarray(volume_shape, dtype=np.int64)


def _json(value):
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _set_attrs(handle, attrs, extra_attrs):
    """Write attributes; extra ones that are not scalars or strings are JSON-encoded and listed in ``json_attrs``."""
    encoded = []
    for key, value in (extra_attrs or {}).items():
        if isinstance(value, (str, int, float, np.number)):
            attrs[key] = value
        else:
            attrs[key] = _json(value)
            encoded.append(key)
    attrs["json_attrs"] = json.dumps(encoded)
    for key, value in attrs.items():
        handle.attrs[key] = value


def check_stimuli_pair(data, responses_path, stimuli_path):
    """Refuse a stimulus file other than the one ``convert`` wrote beside these responses.

    ``convert`` records the SHA-256 of the stimulus file it writes with the responses (attribute
    ``stimuli_sha256``): the two files are renamed into place one after the other, and a job killed between the
    renames, or files copied from two runs, leave a pair that both load. Responses that record no pair (the
    preprocess stage's, read with the stimulus stage's file) are not checked.
    """
    from mindvis.utils.io import sha256_file

    expected = data.attrs.get("stimuli_sha256")
    if not expected or sha256_file(stimuli_path) == expected:
        return
    raise MindvisError(f"not the stimulus file converted with {responses_path} (its SHA-256 differs from the one "
                       "the responses record): the two come from different convert runs, or a run was stopped "
                       "between writing them", path=stimuli_path, key="stimuli_sha256",
                       fix="rerun convert for this subject, which writes both files again.")


def write_responses(path, *, splits, voxel_ijk, affine, volume_shape, voxel_roi, class_names, tr, subject,
                    method, preprocess_config, config, input_hashes, quality=None, versions=None,
                    extra_attrs=None):
    """Write ``responses.h5`` atomically, after checking it as the reader would.

    Parameters
    ----------
    path : str or Path
        The file to write; nothing is left there if writing fails.
    splits : dict of str -> ResponseSplit
        All four of ``train``, ``val``, ``test``, ``test_avg`` (use
        :meth:`ResponseSplit.empty` for a split without trials).
    voxel_ijk : int [V, 3]
    affine : float [4, 4]
    volume_shape : 3 ints
    voxel_roi : str [V]
    class_names : list of str
    tr : float
    subject : str
    method : str
    preprocess_config, config : dict
    input_hashes : dict of str -> str
        SHA-256 of every input file.
    quality : dict of str -> ndarray, optional
        Written under ``quality/``.
    versions : dict, optional
        Defaults to :func:`mindvis.utils.io.software_versions`.
    extra_attrs : dict, optional
        Further file attributes (JSON-encoded when not scalars or strings).

    Raises
    ------
    ValueError
        When the arrays break the contract (a programming error, not user input).
    """
    responses = Responses(
        splits={name: _coerce_split(name, splits[name]) for name in SPLITS if name in splits},
        voxel_ijk=np.asarray(voxel_ijk, dtype=np.int32), affine=np.asarray(affine, dtype=np.float64),
        volume_shape=tuple(int(v) for v in volume_shape), voxel_roi=_strings(voxel_roi),
        class_names=[str(name) for name in class_names])
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        raise ValueError(f"write_responses needs all splits; missing: {missing}")
    problem = _check_responses(responses)
    if problem:
        raise ValueError(f"refusing to write {path}: {problem[1]} ({problem[0]})")

    string_dtype = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, hdf5_for_writing(tmp) as handle:
        _write_geometry(handle, responses.voxel_ijk, responses.affine, responses.volume_shape, responses.voxel_roi)
        attrs = {
            "format_version": FORMAT_VERSION, "class_names": json.dumps(responses.class_names), "tr": float(tr),
            "subject": str(subject), "method": str(method), "preprocess_config": _json(preprocess_config),
            "config": _json(config), "versions": _json(versions if versions is not None else software_versions()),
            "input_hashes": _json(input_hashes),
        }
        _set_attrs(handle, attrs, extra_attrs)
        for name, split in responses.splits.items():
            group = handle.create_group(name)
            group.create_dataset("fmri", data=split.fmri, chunks=True if len(split) else None)
            group.create_dataset("stimulus_id", data=split.stimulus_id, dtype=string_dtype)
            for key in ("label", "run", "onset", "n_repeats"):
                value = getattr(split, key)
                if value is not None:
                    group.create_dataset(key, data=value)
        group = handle.create_group("quality")
        for key, value in (quality or {}).items():
            group.create_dataset(key, data=np.asarray(value))


def _coerce_split(name, split):
    return ResponseSplit(
        fmri=np.asarray(split.fmri, dtype=np.float32),
        stimulus_id=_strings(split.stimulus_id),
        label=np.asarray(split.label, dtype=np.int64),
        run=np.asarray(split.run, dtype=np.int64),
        onset=np.asarray(split.onset, dtype=np.float64),
        n_repeats=None if split.n_repeats is None else np.asarray(split.n_repeats, dtype=np.int64))


def write_rest(path, *, fmri, run, voxel_ijk, affine, volume_shape, voxel_roi, tr, subject, preprocess_config,
               config, input_hashes, versions=None, extra_attrs=None):
    """Write a resting-state file atomically (layout in the module docstring).

    Parameters
    ----------
    fmri : float32 [T, V]
    run : int [T]
    Other parameters as in :func:`write_responses`.
    """
    rest = RestRuns(fmri=np.asarray(fmri, dtype=np.float32), run=np.asarray(run, dtype=np.int64),
                    voxel_ijk=np.asarray(voxel_ijk, dtype=np.int32), affine=np.asarray(affine, dtype=np.float64),
                    volume_shape=tuple(int(v) for v in volume_shape), voxel_roi=_strings(voxel_roi))
    problem = _check_rest(rest)
    if problem:
        raise ValueError(f"refusing to write {path}: {problem[1]} ({problem[0]})")
    # Built in memory like responses.h5 (HDF5 writing straight to a full disk crashes), after a check that it fits.
    expected = hdf5_bytes(rest.fmri, rest.run, rest.voxel_ijk, rest.voxel_roi)
    with atomic_path(path) as tmp, hdf5_for_writing(tmp, expected_bytes=expected) as handle:
        _write_geometry(handle, rest.voxel_ijk, rest.affine, rest.volume_shape, rest.voxel_roi)
        handle.create_dataset("fmri", data=rest.fmri, chunks=True if len(rest.run) else None)
        handle.create_dataset("run", data=rest.run)
        attrs = {"format_version": FORMAT_VERSION, "tr": float(tr), "subject": str(subject),
                 "preprocess_config": _json(preprocess_config), "config": _json(config),
                 "versions": _json(versions if versions is not None else software_versions()),
                 "input_hashes": _json(input_hashes)}
        _set_attrs(handle, attrs, extra_attrs)


# -- checking -----------------------------------------------------------------

def _check_geometry(voxel_ijk, affine, volume_shape, voxel_roi):
    """Return (key, problem) for the first broken geometry item, or None."""
    if voxel_ijk.ndim != 2 or voxel_ijk.shape[1] != 3 or voxel_ijk.dtype.kind not in "iu":
        return "voxel_ijk", f"must be int [V, 3], found {voxel_ijk.dtype} {voxel_ijk.shape}"
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "affine", f"must be a finite float [4, 4], found shape {affine.shape}"
    if len(volume_shape) != 3:
        return "volume_shape", f"must hold 3 sizes, found {volume_shape}"
    if len(voxel_ijk) and (voxel_ijk.min() < 0 or np.any(voxel_ijk.max(axis=0) >= np.asarray(volume_shape))):
        return "voxel_ijk", f"indices fall outside the volume of shape {tuple(volume_shape)}"
    if voxel_roi.shape != (len(voxel_ijk),):
        return "voxel_roi", f"must hold one name per voxel ({len(voxel_ijk)}), found shape {voxel_roi.shape}"
    return None


def _check_split(name, split, n_voxels, n_classes):
    fmri = split.fmri
    if fmri.ndim != 2 or fmri.dtype != np.float32:
        return f"{name}/fmri", f"must be float32 [N, V], found {fmri.dtype} {fmri.shape}"
    if fmri.shape[1] != n_voxels:
        return f"{name}/fmri", f"has {fmri.shape[1]} voxel columns but voxel_ijk lists {n_voxels} voxels"
    n_trials = fmri.shape[0]
    expected = {"stimulus_id": "O", "label": "i", "run": "i", "onset": "f"}
    if name == "test_avg":
        if split.n_repeats is None:
            return f"{name}/n_repeats", "missing (test_avg needs the number of trials averaged per row)"
        expected["n_repeats"] = "i"
    for key, kind in expected.items():
        value = getattr(split, key)
        if value.ndim != 1 or len(value) != n_trials:
            return f"{name}/{key}", f"must hold one value per trial ({n_trials}), found shape {value.shape}"
        if value.dtype.kind != kind:
            return f"{name}/{key}", f"has dtype {value.dtype}, expected {'str' if kind == 'O' else kind}"
    if n_trials and (split.label.min() < -1 or split.label.max() >= n_classes):
        return f"{name}/label", f"labels must lie in -1 .. {n_classes - 1} (class_names has {n_classes})"
    if not np.all(np.isfinite(fmri)):
        return f"{name}/fmri", f"holds {int(np.sum(~np.isfinite(fmri)))} non-finite values"
    return None


def _check_responses(responses):
    problem = _check_geometry(responses.voxel_ijk, responses.affine, responses.volume_shape, responses.voxel_roi)
    if problem:
        return problem
    for name, split in responses.splits.items():
        problem = _check_split(name, split, responses.n_voxels, len(responses.class_names))
        if problem:
            return problem
    return None


def _check_rest(rest):
    problem = _check_geometry(rest.voxel_ijk, rest.affine, rest.volume_shape, rest.voxel_roi)
    if problem:
        return problem
    if rest.fmri.ndim != 2 or rest.fmri.dtype != np.float32 or rest.fmri.shape[1] != rest.n_voxels:
        return "fmri", f"must be float32 [T, {rest.n_voxels}], found {rest.fmri.dtype} {rest.fmri.shape}"
    if rest.run.shape != (rest.fmri.shape[0],) or rest.run.dtype.kind != "i":
        return "run", f"must be int [T={rest.fmri.shape[0]}], found {rest.run.dtype} {rest.run.shape}"
    if not np.all(np.isfinite(rest.fmri)):
        return "fmri", "holds non-finite values"
    return None


# -- reading ------------------------------------------------------------------

def _open(path, what, stage):
    path = Path(path)
    if not path.exists():
        raise MindvisError(f"{what} not found", path=path, fix=f"run the '{stage}' stage first.")
    if not path.is_file():
        raise MindvisError(f"{what} is not a file", path=path, fix=f"delete it and rerun the '{stage}' stage.")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = " ".join(str(err).split())  # h5py's messages can span lines; errors stay one line
        raise MindvisError(f"not a readable HDF5 file ({reason})", path=path,
                           fix=f"delete it and rerun the '{stage}' stage.") from None


def _read_attrs(handle, path, required, stage):
    attrs = {}
    json_attrs = set(_JSON_ATTRS)
    if "json_attrs" in handle.attrs:
        try:
            listed = json.loads(handle.attrs["json_attrs"])
        except (TypeError, ValueError):
            listed = None
        if not isinstance(listed, list) or not all(isinstance(key, str) for key in listed):
            raise MindvisError("attribute is not a JSON list of attribute names", path=path, key="json_attrs",
                               fix=f"rerun the '{stage}' stage.")
        json_attrs |= set(listed)
    for key in required:
        if key not in handle.attrs:
            raise MindvisError("attribute missing", path=path, key=key, fix=f"rerun the '{stage}' stage.")
    for key in handle.attrs:
        value = handle.attrs[key]
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key == "json_attrs":
            continue
        if key in json_attrs:
            try:
                value = json.loads(value)
            except (TypeError, ValueError):
                raise MindvisError("attribute is not valid JSON", path=path, key=key,
                                   fix=f"rerun the '{stage}' stage.") from None
        attrs[key] = value
    return attrs


def _read_dataset(handle, key, path, stage, prefix=""):
    if key not in handle:
        raise MindvisError("dataset missing", path=path, key=prefix + key, fix=f"rerun the '{stage}' stage.")
    dataset = handle[key]
    if not isinstance(dataset, h5py.Dataset):
        raise MindvisError("expected a dataset, found a group", path=path, key=prefix + key,
                           fix=f"rerun the '{stage}' stage.")
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=object)
    return dataset[()]


def _read_geometry(handle, path, stage):
    voxel_ijk = _read_dataset(handle, "voxel_ijk", path, stage)
    affine = _read_dataset(handle, "affine", path, stage)
    voxel_roi = _read_dataset(handle, "voxel_roi", path, stage)
    volume_shape = np.atleast_1d(handle.attrs["volume_shape"])
    if volume_shape.dtype.kind not in "iu":
        raise MindvisError(f"must be 3 integer sizes, found {volume_shape.dtype} {volume_shape.tolist()}",
                           path=path, key="volume_shape", fix=f"rerun the '{stage}' stage.")
    volume_shape = tuple(int(v) for v in volume_shape)
    if voxel_roi.dtype != object:
        raise MindvisError(f"must be strings, found {voxel_roi.dtype}", path=path, key="voxel_roi",
                           fix=f"rerun the '{stage}' stage.")
    problem = _check_geometry(voxel_ijk, affine, volume_shape, voxel_roi)
    if problem:
        raise MindvisError(problem[1], path=path, key=problem[0], fix=f"rerun the '{stage}' stage.")
    return voxel_ijk.astype(np.int32), affine.astype(np.float64), volume_shape, voxel_roi


def _read_quality(handle, path, stage, n_voxels):
    """The ``quality/`` group as a dict of arrays (empty without the group)."""
    if "quality" not in handle:
        return {}
    if not isinstance(handle["quality"], h5py.Group):
        raise MindvisError("expected a group, found a dataset", path=path, key="quality",
                           fix=f"rerun the '{stage}' stage.")
    quality = {}
    for key in handle["quality"]:
        quality[key] = _read_dataset(handle["quality"], key, path, stage, prefix="quality/")
        if key in ("tsnr", "noise_ceiling", "ncsnr") and quality[key].shape != (n_voxels,):
            raise MindvisError(f"must hold one value per voxel ({n_voxels}), found shape {quality[key].shape}",
                               path=path, key=f"quality/{key}", fix=f"rerun the '{stage}' stage.")
    return quality


def load_responses(path, splits=SPLITS):
    """Read and validate a ``responses.h5``.

    Parameters
    ----------
    path : str or Path
    splits : sequence of str
        Which of ``train``, ``val``, ``test``, ``test_avg`` to load (only these
        are read into memory).

    Returns
    -------
    Responses

    Raises
    ------
    MindvisError
        Naming the file and the missing or malformed key.
    """
    path = Path(path)
    unknown = [name for name in splits if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {SPLITS}")
    stage = "preprocess"
    with _open(path, "responses file", stage) as handle:
        attrs = _read_attrs(handle, path, _REQUIRED_ATTRS, stage)
        class_names = attrs.pop("class_names")
        if not isinstance(class_names, list) or not all(isinstance(name, str) for name in class_names):
            raise MindvisError("must be a JSON list of strings", path=path, key="class_names",
                               fix=f"rerun the '{stage}' stage.")
        if isinstance(attrs["tr"], bool) or not isinstance(attrs["tr"], (int, float)):
            raise MindvisError(f"must be a number of seconds, found {attrs['tr']!r}", path=path, key="tr",
                               fix=f"rerun the '{stage}' stage.")
        voxel_ijk, affine, volume_shape, voxel_roi = _read_geometry(handle, path, stage)
        loaded = {}
        for name in splits:
            if name not in handle or not isinstance(handle[name], h5py.Group):
                raise MindvisError("split group missing", path=path, key=name, fix=f"rerun the '{stage}' stage.")
            group = handle[name]
            keys = SPLIT_KEYS + (("n_repeats",) if name == "test_avg" else ())
            values = {key: _read_dataset(group, key, path, stage, prefix=f"{name}/") for key in keys}
            split = ResponseSplit(n_repeats=values.pop("n_repeats", None), **values)
            problem = _check_split(name, split, len(voxel_ijk), len(class_names))
            if problem:
                raise MindvisError(problem[1], path=path, key=problem[0], fix=f"rerun the '{stage}' stage.")
            split.label = split.label.astype(np.int64)
            split.run = split.run.astype(np.int64)
            loaded[name] = split
        quality = _read_quality(handle, path, stage, len(voxel_ijk))
    return Responses(splits=loaded, voxel_ijk=voxel_ijk, affine=affine, volume_shape=volume_shape,
                     voxel_roi=voxel_roi, class_names=class_names, attrs=attrs, quality=quality, path=path)


def load_rest(path):
    """Read and validate a resting-state HDF5 (see the module docstring).

    Returns
    -------
    RestRuns

    Raises
    ------
    MindvisError
        Naming the file and the missing or malformed key.
    """
    path = Path(path)
    stage = "preprocess_rest"
    with _open(path, "resting-state file", stage) as handle:
        attrs = _read_attrs(handle, path, _REST_ATTRS, stage)
        voxel_ijk, affine, volume_shape, voxel_roi = _read_geometry(handle, path, stage)
        fmri = _read_dataset(handle, "fmri", path, stage)
        run = _read_dataset(handle, "run", path, stage)
    rest = RestRuns(fmri=fmri, run=run, voxel_ijk=voxel_ijk, affine=affine, volume_shape=volume_shape,
                    voxel_roi=voxel_roi, attrs=attrs, path=path)
    problem = _check_rest(rest)
    if problem:
        raise MindvisError(problem[1], path=path, key=problem[0], fix=f"rerun the '{stage}' stage.")
    rest.run = rest.run.astype(np.int64)
    return rest
