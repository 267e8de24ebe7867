"""How reliably voxels respond to repeated stimuli: the NCSNR and noise ceiling of ``responses.h5``.

The one definition used by the BIDS preprocessing, the real-data adapters and
the simulator's checks (Allen et al. 2022, the Natural Scenes Dataset). From
test trials that repeat stimuli, per voxel: the noise variance ``var_noise``
is the mean over stimuli of the variance of the responses across repeats
(ddof 1); the signal variance is ``var_signal = max(0, var_total - var_noise)``,
with ``var_total`` the variance of all test trials;
``ncsnr = sqrt(var_signal / var_noise)``. The noise ceiling of the response
averaged over ``n`` repeats is the percentage of its variance the signal can
explain, ``NC = 100 * ncsnr**2 / (ncsnr**2 + 1/n)``; with unequal repeat
counts ``1/n`` is the mean of ``1/n_s`` over stimuli. A model predicting the
averaged responses cannot explain more than NC percent of their variance.

Imports nothing of mindvis.
"""

from __future__ import annotations

import numpy as np

#: Voxels per block: float64 copies of the test trials stay small (NSD: 3,000 trials x 15,000 voxels).
COLUMN_BLOCK = 2048


def group_repeats(stimulus_id):
    """Rows of each distinct stimulus, in order of first appearance.

    Returns
    -------
    ids : list of str
    rows : list of int arrays
    """
    stimulus_id = np.asarray(stimulus_id, dtype=object)
    ids, first = np.unique(stimulus_id, return_index=True)
    ids = ids[np.argsort(first)]
    return list(ids), [np.flatnonzero(stimulus_id == sid) for sid in ids]


def noise_ceiling(responses, stimulus_id):
    """NCSNR and noise ceiling per voxel from repeated trials (definition in the module docstring).

    Computed :data:`COLUMN_BLOCK` voxels at a time; every voxel's figure is
    independent of the others, so the blocks do not change it.

    Parameters
    ----------
    responses : float [N, V]
        Single-trial responses (test trials, repeats kept).
    stimulus_id : str [N]

    Returns
    -------
    ncsnr : float64 [V]
    ceiling : float64 [V]
        Percent of variance of the repeat-averaged responses; NaN for every
        voxel when no stimulus is repeated.
    """
    responses = np.asarray(responses)  # no copy: blocks are converted to float64 one at a time
    _, rows = group_repeats(stimulus_id)
    repeated = [r for r in rows if len(r) > 1]
    n_voxels = np.shape(responses)[1]
    if not repeated:
        return np.full(n_voxels, np.nan), np.full(n_voxels, np.nan)
    inverse_n = np.mean([1.0 / len(r) for r in rows])
    ncsnr = np.empty(n_voxels)
    for start in range(0, n_voxels, COLUMN_BLOCK):
        block = np.asarray(responses[:, start:start + COLUMN_BLOCK], dtype=np.float64)
        noise_var = np.mean([block[r].var(axis=0, ddof=1) for r in repeated], axis=0)
        signal_var = np.maximum(block.var(axis=0, ddof=1) - noise_var, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ncsnr[start:start + COLUMN_BLOCK] = np.where(noise_var > 0, np.sqrt(signal_var / noise_var), 0.0)
    return ncsnr, 100.0 * ncsnr**2 / (ncsnr**2 + inverse_n)


def has_repeats(stimulus_id):
    """Whether any stimulus was shown at least twice (a noise ceiling can be measured)."""
    _, counts = np.unique(np.asarray(stimulus_id).astype(str), return_counts=True)
    return bool((counts >= 2).any())
