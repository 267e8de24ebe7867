"""HCP resting state (CIFTI dense time series) as an SC-MBM pretraining corpus.

MinD-Vis pretrains SC-MBM on visual-cortex time points of HCP resting-state
runs but never published that step; this is mindvis's own, documented version.

On disk
-------
* One subject's runs, found by ``data.hcp.runs_glob`` with ``{subject}`` the
  HCP id, by default the HCP 1200 layout
  ``{id}/MNINonLinear/Results/rfMRI_REST*/rfMRI_REST*_Atlas_MSMAll.dtseries.nii``:
  CIFTI-2 dense series [T, 91282 grayordinates], TR in the series axis (0.72 s).
* ``data.hcp.parcellation``: a CIFTI-2 label file on the same grayordinates
  (``.dlabel.nii``), such as the HCP-MMP1.0 multi-modal parcellation
  (Glasser et al. 2016) whose labels are named ``L_V1_ROI``, ``R_V1_ROI``, ...

What it does
------------
1. keeps the grayordinates whose label is one of ``data.hcp.parcels`` (a
   parcel ``V1`` matches ``V1``, ``L_V1_ROI`` and ``R_V1_ROI``), in
   grayordinate order; every run must have exactly the parcellation's
   grayordinates (same brain models), else an error names both;
2. averages consecutive time points over non-overlapping windows of
   ``data.hcp.window_seconds`` (MinD-Vis averages about 8 s: one sample per
   window, roughly one "trial" of a block design; 0 keeps every TR);
3. z-scores each grayordinate within each run (the resting-state file's
   contract), dropping grayordinates that are constant or not finite in any run;
4. writes the resting-state HDF5 with :func:`mindvis.data.responses.write_rest`.

In the workflow, the ``convert_rest`` rule runs this for every id in
``data.hcp.subjects`` (``results/pretrain/rest/hcp-<id>.h5``, labelled
``sub-hcp<id>``), and ``pretrain_mbm`` adds those files to its corpus.

Surface vertices have no voxel grid: grayordinates are laid on a 1-D grid
(``voxel_ijk[:, 0]`` = grayordinate index, ``volume_shape`` = (91282, 1, 1))
and ``voxel_roi`` holds each one's label name.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np

from mindvis.data.sources.common import require_file
from mindvis.errors import MindvisError
from mindvis.utils.io import sha256_file

log = logging.getLogger(__name__)

#: Time points read from a CIFTI file at a time (91,282 float32 grayordinates: 36 MB per 100).
TIME_CHUNK = 100


def _parcel_selection(parcellation_path, parcels):
    """Grayordinate indices and label names of the chosen parcels, and the brain-model axis."""
    import nibabel as nib

    image = nib.load(parcellation_path)
    try:
        label_axis, brain_axis = image.header.get_axis(0), image.header.get_axis(1)
        table = label_axis.label[0]
    except (AttributeError, IndexError, TypeError):
        raise MindvisError("not a CIFTI-2 label file (.dlabel.nii)", path=parcellation_path,
                           key="data.hcp.parcellation",
                           fix="give the parcellation as a CIFTI dlabel file on the runs' grayordinates.") from None
    wanted = {}
    for key, (name, _) in table.items():
        for parcel in parcels:
            if name in (parcel, f"L_{parcel}_ROI", f"R_{parcel}_ROI"):
                wanted[key] = name
    unmatched = [p for p in parcels if not any(n in (p, f"L_{p}_ROI", f"R_{p}_ROI") for n in wanted.values())]
    if unmatched:
        names = sorted(n for n, _ in table.values())
        raise MindvisError(f"parcels {unmatched} are not labels of the parcellation "
                           f"(labels: {', '.join(names[:12])} ..)",
                           path=parcellation_path, key="data.hcp.parcels", fix="name parcels as the label file does.")
    keys = np.rint(np.asarray(image.dataobj)[0]).astype(np.int64)
    selected = np.flatnonzero(np.isin(keys, list(wanted)))
    return selected, np.asarray([wanted[k] for k in keys[selected]], dtype=object), brain_axis


def window_average(series, window):
    """Average consecutive rows in non-overlapping windows of ``window`` rows.

    Parameters
    ----------
    series : float [T, V]
    window : int

    Returns
    -------
    float64 [T // window, V]
        A trailing partial window is dropped.
    """
    n_windows = len(series) // window
    return series[: n_windows * window].reshape(n_windows, window, -1).mean(axis=1)


def convert_hcp_rest(config, hcp_subject, out_path, subject=None):
    """Write one HCP subject's resting-state runs as a mindvis resting-state file.

    Parameters
    ----------
    config : dict
        Validated config (``data.hcp``).
    hcp_subject : str
        HCP subject id (``100307``), filled into ``data.hcp.runs_glob``.
    out_path : str or Path
        The resting-state HDF5 to write (atomically).
    subject : str, optional
        Label written in the file (default ``sub-<hcp id>``).

    Returns
    -------
    dict
        Summary: runs, time points, grayordinates kept and dropped, window.
    """
    import nibabel as nib

    from mindvis.data.responses import write_rest

    section = config["data"]["hcp"]
    subject = subject or f"sub-{hcp_subject}"
    pattern = section["runs_glob"].format(subject=hcp_subject)
    runs = sorted(Path(p) for p in glob.glob(pattern))
    if not runs:
        raise MindvisError(f"no resting-state runs match {pattern}", key="data.hcp.runs_glob",
                           fix="set data.hcp.runs_glob to where the subject's dtseries files are.")
    parcellation = require_file(section["parcellation"], "data.hcp.parcellation")
    selected, names, brain_axis = _parcel_selection(parcellation, section["parcels"])

    blocks, run_numbers, tr_out = [], [], None
    for number, path in enumerate(runs, start=1):
        image = nib.load(path)
        try:
            series_axis, run_axis = image.header.get_axis(0), image.header.get_axis(1)
        except (AttributeError, IndexError, TypeError):
            raise MindvisError("not a CIFTI-2 dense time series (.dtseries.nii)", path=path,
                               key="data.hcp.runs_glob") from None
        if run_axis != brain_axis:
            raise MindvisError(f"the run has {len(run_axis)} grayordinates but the parcellation has {len(brain_axis)} "
                               "(or they differ in brain models)", path=path, key="data.hcp.parcellation",
                               fix="use a parcellation on the runs' grayordinates (e.g. both 91282 fs_LR 32k).")
        tr = float(section["tr"]) or float(getattr(series_axis, "step", 0.0))
        if not tr > 0:
            raise MindvisError("the series axis states no TR", path=path, key="data.hcp.tr",
                               fix="set data.hcp.tr (0.72 for HCP).")
        window = max(1, int(round(section["window_seconds"] / tr))) if section["window_seconds"] else 1
        series = np.empty((image.shape[0], len(selected)), dtype=np.float64)
        for start in range(0, image.shape[0], TIME_CHUNK):
            chunk = np.asarray(image.dataobj[start:start + TIME_CHUNK], dtype=np.float64)
            series[start:start + len(chunk)] = chunk[:, selected]
        windows = window_average(series, window)
        if len(windows) < 2:
            log.warning("%s: fewer than 2 windows of %d TRs; run skipped", path, window)
            continue
        blocks.append(windows)
        run_numbers.append(np.full(len(windows), number, dtype=np.int64))
        tr_out = tr * window
    if not blocks:
        raise MindvisError("no run is long enough for two windows", key="data.hcp.window_seconds",
                           fix="shorten data.hcp.window_seconds.")

    usable = np.ones(len(selected), dtype=bool)
    for block in blocks:
        usable &= np.all(np.isfinite(block), axis=0) & (np.nanstd(block, axis=0) > 0)
    if not usable.all():
        log.warning("%s: dropping %d of %d grayordinates (constant or not finite in some run)", subject,
                    int((~usable).sum()), len(usable))
    if not usable.any():
        raise MindvisError("every selected grayordinate is constant or not finite", key="data.hcp.parcels")
    fmri = np.concatenate([(b[:, usable] - b[:, usable].mean(axis=0)) / b[:, usable].std(axis=0) for b in blocks])
    voxel_ijk = np.zeros((int(usable.sum()), 3), dtype=np.int32)
    voxel_ijk[:, 0] = selected[usable]
    summary = {"runs": len(blocks), "time_points": int(len(fmri)), "grayordinates": int(usable.sum()),
               "grayordinates_dropped": int((~usable).sum()), "window_trs": window, "window_tr": tr_out,
               "parcels": list(section["parcels"]), "hcp_subject": str(hcp_subject)}
    write_rest(out_path, fmri=fmri.astype(np.float32), run=np.concatenate(run_numbers), voxel_ijk=voxel_ijk,
               affine=np.eye(4), volume_shape=(len(brain_axis), 1, 1), voxel_roi=names[usable], tr=tr_out,
               subject=subject, preprocess_config={"hcp": section, **summary}, config=config,
               input_hashes={str(p): sha256_file(p) for p in runs + [parcellation]},
               extra_attrs={"source": "hcp_cifti", "grid": "1-D: voxel_ijk[:, 0] is the grayordinate index"})
    log.info("%s: %s", subject, summary)
    return summary
