"""Writing the simulated experiment as a BIDS dataset a real pipeline would accept.

Layout (``{bids}`` is the dataset root, ``{sub}`` a label such as ``sub-01``)::

    {bids}/dataset_description.json
    {bids}/participants.tsv            participant_id, group (task|rest), age, sex, handedness,
                                       n_early_voxels, n_higher_voxels, snr_factor
    {bids}/participants.json           column descriptions
    {bids}/stimuli/stimuli.h5          the stimulus set (mindvis.data.stimuli)
    {bids}/{sub}/func/{sub}_task-objects_run-{NN}_bold.nii.gz
        4-D int16 raw-like BOLD on an MNI-space grid (sform/qform code 4),
        cropped to an occipito-temporal box; voxel size simulate.resolution_mm.
    {bids}/{sub}/func/{sub}_task-objects_run-{NN}_bold.json
        RepetitionTime (s), TaskName, ...
    {bids}/{sub}/func/{sub}_task-objects_run-{NN}_events.tsv
        onset, duration (s), trial_type (train|test), stimulus_id, class
    {bids}/{sub}/func/{sub}_task-objects_run-{NN}_desc-confounds_timeseries.tsv
        trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad) relative to
        the first volume, framewise_displacement (mm; n/a in the first row)
    {bids}/sub-restNN/func/sub-restNN_task-rest_run-{NN}_bold.nii.gz (+ _bold.json,
        _desc-confounds_timeseries.tsv; no events)

Training runs come first (run-01 ..), then test runs. The simulator's own
derivatives live in ``{bids}/derivatives/simulation/{sub}/``:

``{sub}_space-MNI152NLin2009aAsym_desc-visual_mask.nii.gz``
    uint8 ROI mask (1 = simulated visual voxel) on the BOLD grid.
``{sub}_space-MNI152NLin2009aAsym_desc-visual_dseg.nii.gz``
    int16 ROI labels (0 outside) with ``{sub}_desc-visual_dseg.tsv`` (index, name).
``{sub}_desc-groundtruth.h5``
    The ground truth (``V`` voxels in ``np.nonzero(mask)`` order, ``S`` images)::

        voxel_ijk          int32 [V, 3]     indices on the BOLD grid
        voxel_mni          float32 [V, 3]   MNI mm
        voxel_roi          str [V]          V1, V2, V3, LOC or VOT
        noise_sd           float32 [V]      AR(1) noise sd, percent signal change
        baseline           float32 [V]      raw baseline intensity
        snr                float32 [V]      sd over images of response / noise_sd
        encoding/          per-voxel tuning (NaN where it does not apply):
            is_early bool [V], prf_x, prf_y, prf_sigma float32 [V] (image
            half-widths; x right, y up), exponent [V], feature_weights [V, F]
            (F = n_wavelengths x n_orientations), category_tuning [V, C],
            shape_weights [V, K], category_weight [V], shape_weight [V], gain [V];
            features / deepnet models: feature_tuning [V, K]; deepnet:
            feature_layer int [K], layer_weights [V, 2];
            attrs: wavelengths, n_orientations, shape_feature_names, class_names,
            category_model, feature_network (deepnet)
        stimulus_id        str [S]          every train and test image (task subjects)
        label              int64 [S]
        response           float32 [S, V]   noise-free peak evoked response, percent signal change

    attrs: subject, seed, config (JSON of the simulate section), versions (JSON).
``{sub}_desc-simulation_manifest.json``
    Written last: files written (path, bytes, sha256), config section, seed,
    versions, wall time.

The group template (one per data set, written with the dataset metadata) lives in
``{bids}/derivatives/simulation/template/``:

``tpl-MNI152NLin2009aAsym_desc-visual_mask.nii.gz``, ``..._dseg.nii.gz``, ``..._dseg.tsv``
    The visual ROIs placed at the un-jittered anchors with the nominal voxel
    counts (``simulate.n_early_voxels``, ``simulate.n_higher_voxels``), on the
    BOLD grid: the shared voxel space of ``preprocess.space: template``.
``tpl-MNI152NLin2009aAsym_desc-visual_mask.json``
    Its spec (:mod:`mindvis.data.voxel_space`): affine, grid shape, voxel
    count and order, ROI counts, resolution, field of view, nominal counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mindvis.data.bids_layout import derivative_paths, template_paths
from mindvis.utils.io import (atomic_path, hdf5_bytes, hdf5_for_writing, software_versions, write_json_atomic,
                              write_text_atomic)

BIDS_VERSION = "1.9.0"
CONFOUND_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement")
TASK_DESCRIPTIONS = {
    "objects": "Passive viewing of object images (Generic Object Decoding style): training images once each, "
               "test images repeatedly.",
    "rest": "Eyes open, fixation; no stimuli.",
}


def write_nifti(path, data, affine, tr=None):
    """Save a 3-D or 4-D array as NIfTI-1 in MNI space, atomically.

    Parameters
    ----------
    data : array [X, Y, Z] or [X, Y, Z, T]
    affine : float [4, 4]
    tr : float, optional
        Repetition time recorded in the header's fourth pixdim.
    """
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=4)  # 4 = MNI 152
    image.set_qform(affine, code=4)
    if tr is not None:
        zooms = image.header.get_zooms()
        image.header.set_zooms(zooms[:3] + (float(tr),))
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def write_tsv(path, frame):
    """Write a DataFrame as a BIDS TSV (tab separated, ``n/a`` for missing), atomically."""
    write_text_atomic(path, frame.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g"))


def write_bold_sidecar(path, section, task):
    """The ``_bold.json`` sidecar of a run."""
    write_json_atomic(path, {
        "RepetitionTime": float(section["tr"]),
        "TaskName": task,
        "TaskDescription": TASK_DESCRIPTIONS.get(task, ""),
        "Manufacturer": "mindvis simulator",
        "MagneticFieldStrength": 3,
        "EchoTime": 0.03,
    })


def write_confounds(path, motion, fd):
    """fMRIPrep-style motion confounds: ``motion`` float [T, 6], ``fd`` float [T]."""
    columns = dict(zip(CONFOUND_COLUMNS[:6], motion.T))
    columns["framewise_displacement"] = fd
    write_tsv(path, pd.DataFrame(columns, columns=list(CONFOUND_COLUMNS)))


def write_roi_files(bids_dir, subject, layout):
    """The ROI mask, label image and label table of one subject.

    Returns
    -------
    list of Path
    """
    from mindvis.simulate.geometry import ROI_NAMES

    paths = derivative_paths(bids_dir, subject)
    labels = layout.label_volume()
    write_nifti(paths["mask"], (labels > 0).astype(np.uint8), layout.grid.affine)
    write_nifti(paths["dseg"], labels, layout.grid.affine)
    write_tsv(paths["dseg_tsv"], pd.DataFrame({"index": np.arange(1, len(ROI_NAMES) + 1), "name": ROI_NAMES}))
    return [paths["mask"], paths["dseg"], paths["dseg_tsv"]]


def write_template_files(bids_dir, section):
    """Write the group template (mask, label image, label table and spec) of the ``simulate`` section.

    Parameters
    ----------
    bids_dir : str or Path
    section : dict
        The ``simulate`` config section (resolution, field of view, nominal voxel counts).

    Returns
    -------
    list of Path
    """
    from mindvis.data.voxel_space import space_spec
    from mindvis.simulate.geometry import ROI_NAMES, template_layout

    layout = template_layout(section["resolution_mm"], section["field_of_view"], section["n_early_voxels"],
                             section["n_higher_voxels"])
    paths = template_paths(bids_dir)
    labels = layout.label_volume()
    write_nifti(paths["mask"], (labels > 0).astype(np.uint8), layout.grid.affine)
    write_nifti(paths["dseg"], labels, layout.grid.affine)
    write_tsv(paths["dseg_tsv"], pd.DataFrame({"index": np.arange(1, len(ROI_NAMES) + 1), "name": ROI_NAMES}))
    spec = space_spec(layout.ijk, layout.grid.affine, layout.grid.shape, layout.roi_names,
                      template="simulation", resolution_mm=float(section["resolution_mm"]),
                      field_of_view=[float(v) for v in section["field_of_view"]],
                      n_early_voxels=int(section["n_early_voxels"]), n_higher_voxels=int(section["n_higher_voxels"]),
                      voxel_order="np.nonzero of the mask (C order over i, j, k)",
                      description="visual ROIs at the un-jittered anchors with the nominal voxel counts")
    write_json_atomic(paths["spec"], spec)
    return [paths["mask"], paths["dseg"], paths["dseg_tsv"], paths["spec"]]


#: The encoding model's per-voxel arrays in the ground truth's ``encoding`` group.
ENCODING_ARRAYS = ("is_early", "prf_x", "prf_y", "prf_sigma", "exponent", "feature_weights", "category_tuning",
                   "shape_weights", "category_weight", "shape_weight", "gain")
#: Written where the model has them: the tuning of the C2 (features) or deep-network (deepnet) model, and the
#: latter's layer weights.
OPTIONAL_ENCODING_ARRAYS = ("feature_tuning", "feature_layer", "layer_weights")


def write_ground_truth(path, layout, model, noise_sd, baseline, attrs, class_names,
                       stimulus_ids=None, labels=None, response=None):
    """Write the ground-truth HDF5 (layout in the module docstring), atomically.

    Parameters
    ----------
    layout : mindvis.simulate.geometry.VoxelLayout
    model : mindvis.simulate.encoding.EncodingModel
    noise_sd, baseline : float [V]
    attrs : dict
        File attributes (JSON-encoded when not scalars).
    class_names : list of str
    stimulus_ids : sequence of str [S], optional
    labels : int [S], optional
    response : float32 [S, V], optional
    """
    import h5py

    from mindvis.simulate.encoding import SHAPE_FEATURE_NAMES

    string = h5py.string_dtype("utf-8")
    n_strings = len(layout.ijk) + (0 if stimulus_ids is None else len(stimulus_ids))
    expected = hdf5_bytes(layout.ijk, layout.mni, noise_sd, baseline, response,
                          *(getattr(model, name) for name in ENCODING_ARRAYS + OPTIONAL_ENCODING_ARRAYS),
                          raw_bytes=64 * n_strings)
    # Built in memory and written in one go, after a check that it fits: HDF5 writing straight to a full disk
    # crashes (utils.io.hdf5_for_writing).
    with atomic_path(path) as tmp, hdf5_for_writing(tmp, expected_bytes=expected) as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        handle.create_dataset("voxel_ijk", data=layout.ijk.astype(np.int32))
        handle.create_dataset("voxel_mni", data=layout.mni.astype(np.float32))
        handle.create_dataset("voxel_roi", data=np.asarray(layout.roi_names, dtype=object), dtype=string)
        handle.create_dataset("noise_sd", data=np.asarray(noise_sd, dtype=np.float32))
        handle.create_dataset("baseline", data=np.asarray(baseline, dtype=np.float32))
        group = handle.create_group("encoding")
        for name in ENCODING_ARRAYS:
            group.create_dataset(name, data=getattr(model, name))
        for name in OPTIONAL_ENCODING_ARRAYS:
            if getattr(model, name) is not None:
                group.create_dataset(name, data=getattr(model, name))
        group.attrs["category_model"] = model.category_model
        if model.feature_network:
            group.attrs["feature_network"] = model.feature_network
        group.attrs["wavelengths"] = json.dumps(list(model.wavelengths))
        group.attrs["n_orientations"] = model.n_orientations
        group.attrs["shape_feature_names"] = json.dumps(list(SHAPE_FEATURE_NAMES))
        group.attrs["class_names"] = json.dumps(list(class_names))
        if response is not None:
            handle.create_dataset("stimulus_id", data=np.asarray(stimulus_ids, dtype=object), dtype=string)
            handle.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
            handle.create_dataset("response", data=np.asarray(response, dtype=np.float32),
                                  compression="gzip", compression_opts=1)
            snr = response.std(axis=0) / np.maximum(noise_sd, 1e-12)
            handle.create_dataset("snr", data=snr.astype(np.float32))


def read_ground_truth(path):
    """Read a ground-truth HDF5 into a dict of arrays (strings decoded) plus ``attrs``."""
    import h5py

    def decode(values):
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)

    out = {}
    with h5py.File(path, "r") as handle:
        for key in handle:
            if isinstance(handle[key], h5py.Group):
                out[key] = {name: handle[key][name][()] for name in handle[key]}
                out[key]["attrs"] = dict(handle[key].attrs)
            else:
                values = handle[key][()]
                out[key] = decode(values) if values.dtype.kind in "OS" else values
        out["attrs"] = dict(handle.attrs)
    return out


def write_dataset_metadata(config, bids_dir):
    """Write ``dataset_description.json``, ``participants.tsv`` (+ ``.json``), the derivatives' description
    and the group template (:func:`write_template_files`).

    Parameters
    ----------
    config : dict
        A validated experiment config.
    bids_dir : str or Path
        The dataset root.
    """
    from mindvis.config import rest_subjects, subjects
    from mindvis.simulate.traits import subject_traits

    bids_dir = Path(bids_dir)
    versions = software_versions()
    generated_by = [{"Name": "mindvis", "Version": versions.get("mindvis", "unknown"),
                     "Description": "simulated visual fMRI experiment (mindvis.simulate)"}]
    write_json_atomic(bids_dir / "dataset_description.json", {
        "Name": f"mindvis simulated object-viewing experiment ({config['experiment']})",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["mindvis simulator"],
        "GeneratedBy": generated_by,
        "HowToAcknowledge": "Stimuli: Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence).",
        "mindvis": {"seed": config["seed"], "simulate": config["simulate"], "versions": versions},
    })
    rows = [{"participant_id": subject, **subject_traits(config, subject)}
            for subject in subjects(config) + rest_subjects(config)]
    write_tsv(bids_dir / "participants.tsv", pd.DataFrame(rows))
    write_json_atomic(bids_dir / "participants.json", {
        "group": {"Description": "task: saw the stimuli; rest: resting-state runs only (pretraining corpus)"},
        "age": {"Description": "simulated age", "Units": "years"},
        "sex": {"Description": "simulated sex", "Levels": {"F": "female", "M": "male"}},
        "handedness": {"Description": "simulated handedness", "Levels": {"R": "right", "L": "left"}},
        "n_early_voxels": {"Description": "simulated V1-V3 voxels"},
        "n_higher_voxels": {"Description": "simulated LOC and VOT voxels"},
        "snr_factor": {"Description": "this subject's signal-to-noise relative to simulate.single_trial_snr"},
    })
    write_json_atomic(bids_dir / "derivatives" / "simulation" / "dataset_description.json", {
        "Name": "mindvis simulation ground truth",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by,
    })
    write_template_files(bids_dir, config["simulate"])
