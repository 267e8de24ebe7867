"""Checks of a simulated subject read back from its BIDS files.

These are deliberately simple (no GLM, no confound regression): if a plain
lag-average of the raw volumes already decodes, the signal is really in the
files. The real per-trial estimates come from :mod:`mindvis.preprocess`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mindvis.data import bids_layout


def lag_average_trials(bids_dir, subject, window=(4.0, 8.0), task="objects"):
    """Per-trial responses: the mean of the volumes acquired ``window`` seconds after onset.

    Each ROI voxel is first converted to percent signal change of its run mean
    and linearly detrended within the run.

    Parameters
    ----------
    bids_dir : str or Path
    subject : str
    window : (float, float)
        Volumes with ``start <= t - onset < end`` are averaged (volume ``k`` is at ``k * TR``).
    task : str

    Returns
    -------
    responses : float32 [N, V]
        One row per trial, in run order; voxels in ``np.nonzero(mask)`` order.
    events : pandas.DataFrame
        The trials' events rows with a ``run`` column added.
    """
    import json

    import nibabel as nib

    bids_dir = Path(bids_dir)
    mask = np.asarray(nib.load(bids_layout.derivative_paths(bids_dir, subject)["mask"]).dataobj) > 0
    rows, tables = [], []
    run = 1
    while bids_layout.func_path(bids_dir, subject, task, run, "bold.nii.gz").exists():
        image = nib.load(bids_layout.func_path(bids_dir, subject, task, run, "bold.nii.gz"))
        tr = json.loads(bids_layout.func_path(bids_dir, subject, task, run, "bold.json").read_text())["RepetitionTime"]
        data = np.asarray(image.dataobj, dtype=np.float32)[mask]  # [V, T]
        mean = data.mean(axis=1, keepdims=True)
        percent = 100 * (data / mean - 1)
        time = np.arange(percent.shape[1], dtype=np.float64)
        design = np.column_stack([np.ones_like(time), time - time.mean()])
        coefficients, *_ = np.linalg.lstsq(design, percent.T, rcond=None)
        percent = (percent.T - design @ coefficients)  # [T, V]
        events = pd.read_csv(bids_layout.func_path(bids_dir, subject, task, run, "events.tsv"), sep="\t")
        volume_times = np.arange(percent.shape[0]) * tr
        for onset in events["onset"]:
            lag = volume_times - onset
            chosen = (lag >= window[0]) & (lag < window[1])
            rows.append(percent[chosen].mean(axis=0))
        tables.append(events.assign(run=run))
        run += 1
    return np.asarray(rows, dtype=np.float32), pd.concat(tables, ignore_index=True)


def average_repeats(responses, events):
    """Mean response per stimulus over its repeats.

    Returns
    -------
    averaged : float32 [S, V]
    stimulus_ids : ndarray of str [S]
    classes : ndarray of str [S]
    """
    frame = pd.DataFrame({"stimulus_id": events["stimulus_id"].to_numpy(), "class": events["class"].to_numpy()})
    stimulus_ids = frame["stimulus_id"].drop_duplicates().to_numpy()
    averaged = np.stack([responses[(frame["stimulus_id"] == sid).to_numpy()].mean(axis=0) for sid in stimulus_ids])
    classes = frame.drop_duplicates("stimulus_id")["class"].to_numpy()
    return averaged.astype(np.float32), stimulus_ids, classes
