"""Quality measures written beside the responses: tSNR, noise ceiling, trial counts.

Definitions
-----------
tSNR
    Per voxel and raw run, the temporal mean divided by the standard deviation
    of the linearly detrended series; averaged over runs.
NCSNR and noise ceiling
    :func:`mindvis.data.reliability.noise_ceiling` (the NSD definition), the
    one shared with the real-data adapters.
"""

from __future__ import annotations

import numpy as np

from mindvis.data.reliability import group_repeats


def detrended_tsnr(signals):
    """Temporal SNR of one raw run: mean over time / standard deviation after linear detrending.

    Parameters
    ----------
    signals : float [T, V]

    Returns
    -------
    float64 [V] (0 where the detrended series is constant)
    """
    signals = np.asarray(signals, dtype=np.float64)
    time = np.arange(signals.shape[0], dtype=np.float64)
    design = np.stack([np.ones_like(time), time - time.mean()], axis=1)
    coef, *_ = np.linalg.lstsq(design, signals, rcond=None)
    std = (signals - design @ coef).std(axis=0, ddof=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, signals.mean(axis=0) / std, 0.0)


def average_repeats(responses, stimulus_id, label):
    """Average trials per stimulus.

    Parameters
    ----------
    responses : float [N, V]
    stimulus_id : str [N]
    label : int [N]

    Returns
    -------
    averaged : float32 [S, V]
    ids : object [S]
    labels : int64 [S]
    n_repeats : int64 [S]
    """
    ids, rows = group_repeats(stimulus_id)
    n_voxels = np.asarray(responses).shape[1]
    averaged = np.stack([np.asarray(responses)[r].mean(axis=0) for r in rows]).astype(np.float32) if rows \
        else np.zeros((0, n_voxels), np.float32)
    labels = np.array([np.asarray(label)[r[0]] for r in rows], dtype=np.int64)
    return averaged, np.array(ids, dtype=object), labels, np.array([len(r) for r in rows], dtype=np.int64)


def trials_per_class(label, n_classes):
    """Trials of each class, int64 [C] (labels of -1 are not counted)."""
    label = np.asarray(label, dtype=np.int64)
    return np.bincount(label[label >= 0], minlength=n_classes).astype(np.int64)


def summarise(tsnr, ncsnr, ceiling, voxel_roi):
    """Medians of the quality measures, overall and per ROI, for the report (JSON-ready)."""
    def stats(mask):
        def median(values):
            values = values[mask]
            values = values[np.isfinite(values)]
            return round(float(np.median(values)), 4) if len(values) else None

        return {"n_voxels": int(mask.sum()), "tsnr_median": median(tsnr), "ncsnr_median": median(ncsnr),
                "noise_ceiling_median": median(ceiling)}

    voxel_roi = np.asarray(voxel_roi, dtype=object)
    out = stats(np.ones(len(voxel_roi), dtype=bool))
    out["noise_ceiling_mean"] = round(float(np.nanmean(ceiling)), 4) if np.isfinite(ceiling).any() else None
    out["per_roi"] = {str(name): stats(voxel_roi == name) for name in sorted(set(voxel_roi))}
    return out


def _columnwise_correlation(a, b):
    """Pearson correlation of matching columns of a and b [N, V] (NaN where either is constant)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def truth_agreement(truth, truth_ids, truth_ijk, voxel_ijk, splits, ceiling):
    """How well estimated responses match noise-free ground truth (simulated data).

    Parameters
    ----------
    truth : float [S, Vt]
        Noise-free response of each truth voxel to each stimulus.
    truth_ids : str [S]
    truth_ijk : int [Vt, 3]
    voxel_ijk : int [V, 3]
        The estimated responses' voxels (matched to truth by index).
    splits : dict of str -> ResponseSplit
    ceiling : float [V]
        Noise ceiling (percent) of the estimated voxels.

    Returns
    -------
    dict
        ``single_trial_r_median``: median over voxels of the correlation,
        across training trials, of the single-trial estimate with the truth;
        ``test_avg_r2_median`` and ``noise_ceiling_median_fraction``: median
        squared correlation of the repeat-averaged test responses with the
        truth beside the median noise ceiling (as a fraction), which it should
        approach; the number of voxels and trials used.
    """
    column = {tuple(ijk): i for i, ijk in enumerate(np.asarray(truth_ijk))}
    matched = [(i, column[tuple(ijk)]) for i, ijk in enumerate(np.asarray(voxel_ijk)) if tuple(ijk) in column]
    if not matched:
        return {"n_voxels": 0}
    ours, theirs = (np.array(values) for values in zip(*matched))
    row = {sid: i for i, sid in enumerate(truth_ids)}
    out = {"n_voxels": len(ours)}

    def agreement(split):
        rows = [i for i, sid in enumerate(split.stimulus_id) if sid in row]
        if len(rows) < 3:
            return None, 0
        estimated = split.fmri[rows][:, ours].astype(np.float64)
        expected = truth[[row[split.stimulus_id[i]] for i in rows]][:, theirs].astype(np.float64)
        return _columnwise_correlation(estimated, expected), len(rows)

    r_train, n_train = agreement(splits["train"])
    if r_train is not None:
        out["single_trial_r_median"] = round(float(np.nanmedian(r_train)), 4)
        out["n_train_trials"] = n_train
    r_test, n_test = agreement(splits["test_avg"])
    if r_test is not None:
        out["test_avg_r2_median"] = round(float(np.nanmedian(r_test**2)), 4)
        out["n_test_stimuli"] = n_test
        if np.isfinite(ceiling[ours]).any():
            out["noise_ceiling_median_fraction"] = round(float(np.nanmedian(ceiling[ours])) / 100, 4)
    return out
