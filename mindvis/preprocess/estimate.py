"""Per-trial responses of one cleaned run: LSS / LSA single-trial betas and lag averages.

Design matrices come from :func:`nilearn.glm.first_level.make_first_level_design_matrix`
(HRF from the config; as nuisance columns the confounds, the cleaning's cosine
drifts, a linear trend and a constant), so the GLM's nuisance space is exactly the one
:func:`mindvis.preprocess.clean.clean_run` removed from the data.

- ``glm_lsa`` (least squares all): one GLM per run with a regressor per trial,
  fitted by :func:`nilearn.glm.first_level.run_glm` on the masked, cleaned run
  (the same machinery as ``FirstLevelModel``, without refitting the masker).
- ``glm_lss`` (least squares separate, Mumford et al. 2012): one GLM per trial
  with the trial, one regressor summing all other trials, and the nuisance
  columns. With ``noise_model='ols'`` the per-trial fits are computed in closed
  form from one product ``X'Y`` of the run (the tests check they equal
  :func:`run_glm` on each per-trial design to float precision); with ``ar1``
  each trial is fitted by :func:`run_glm` (exact, but much slower).
- ``lag_average``: the mean of the cleaned volumes whose acquisition time lies
  in ``[onset + start, onset + end)`` (Generic Object Decoding style); volumes
  are timed at ``k * TR``, as nilearn's frame times with ``slice_time_ref=0``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mindvis.preprocess.clean import cosine_basis

TRIAL_PREFIX = "trial"
NUISANCE_PREFIX = "nuisance_"


def trial_design(n_volumes, tr, trials, nuisance_events=None, hrf_model="glover", high_pass=0.01,
                 confounds=None):
    """The least-squares-all design of one run.

    Parameters
    ----------
    n_volumes : int
    tr : float
    trials : DataFrame
        ``onset`` and ``duration`` (seconds) of the stimulus trials, in order.
    nuisance_events : DataFrame, optional
        ``onset``, ``duration``, ``trial_type`` of other events (one regressor per type).
    hrf_model : str
        nilearn HRF name (``glover``, ``spm``, ``... + derivative``).
    high_pass : float
        Cosine drift cut-off in Hz (0: no cosines).
    confounds : float [T, K], optional

    Returns
    -------
    design : DataFrame [T, P]
        Columns: per trial ``trial0000`` (and ``trial0000_derivative``), then
        nuisance conditions, confounds, cosines, ``linear_trend``, ``constant``.
    trial_columns : list of list of str
        For each trial its columns; the first is the response regressor.
    nuisance_columns : list of str
    """
    from nilearn.glm.first_level import make_first_level_design_matrix

    names = [f"{TRIAL_PREFIX}{index:05d}" for index in range(len(trials))]
    events = pd.DataFrame({"onset": np.asarray(trials["onset"], float),
                           "duration": np.asarray(trials["duration"], float), "trial_type": names})
    if nuisance_events is not None and len(nuisance_events):
        events = pd.concat([events, pd.DataFrame({
            "onset": nuisance_events["onset"].astype(float), "duration": nuisance_events["duration"].astype(float),
            "trial_type": [f"{NUISANCE_PREFIX}{kind}" for kind in nuisance_events["trial_type"]]})],
            ignore_index=True)
    frame_times = np.arange(n_volumes) * tr
    # The nuisance columns clean_run removed: confounds, the same cosines, and a linear
    # trend (centred, scaled); nilearn adds the constant.
    extra = [] if confounds is None else [np.asarray(confounds, dtype=np.float64)]
    extra_names = [] if confounds is None else [f"confound_{i}" for i in range(confounds.shape[1])]
    cosines = cosine_basis(n_volumes, tr, high_pass) if high_pass > 0 else np.zeros((n_volumes, 0))
    extra += [cosines, np.linspace(-1.0, 1.0, n_volumes)[:, None]]
    extra_names += [f"cosine_{i:02d}" for i in range(cosines.shape[1])] + ["linear_trend"]
    design = make_first_level_design_matrix(frame_times, events, hrf_model=hrf_model, drift_model=None,
                                            add_regs=np.column_stack(extra), add_reg_names=extra_names)
    trial_columns = [[name] + ([f"{name}_derivative"] if f"{name}_derivative" in design.columns else [])
                     for name in names]
    in_trials = {column for columns in trial_columns for column in columns}
    nuisance_columns = [column for column in design.columns if column not in in_trials]
    # Trial regressors first, in trial order; nuisance after.
    design = design[[c for columns in trial_columns for c in columns] + nuisance_columns]
    return design, trial_columns, nuisance_columns


def _glm_betas(signals, design, n_keep, noise_model):
    """First ``n_keep`` betas of ``run_glm(signals, design)`` as [n_keep, V]."""
    from nilearn.glm.first_level import run_glm

    labels, results = run_glm(signals, np.asarray(design, dtype=np.float64), noise_model=noise_model)
    if len(results) == 1:
        return next(iter(results.values())).theta[:n_keep]
    betas = np.empty((n_keep, signals.shape[1]))
    for label, result in results.items():
        betas[:, labels == label] = result.theta[:n_keep]
    return betas


def estimate_lsa(signals, design, trial_columns, noise_model="ols"):
    """Least-squares-all betas: one GLM with every trial in it.

    Parameters
    ----------
    signals : float [T, V]
        The cleaned run.
    design : DataFrame [T, P]
        From :func:`trial_design` (trial columns first).
    trial_columns : list of list of str
    noise_model : {'ols', 'ar1'}

    Returns
    -------
    float64 [n_trials, V]
    """
    n_per_trial = len(trial_columns[0]) if trial_columns else 1
    betas = _glm_betas(np.asarray(signals, np.float64), design, len(trial_columns) * n_per_trial, noise_model)
    return betas[::n_per_trial]


def _residualise(columns, nuisance):
    """``columns`` with their least-squares projection on ``nuisance`` removed."""
    coef, *_ = np.linalg.lstsq(nuisance, columns, rcond=None)
    return columns - nuisance @ coef


def estimate_lss(signals, design, trial_columns, nuisance_columns, noise_model="ols"):
    """Least-squares-separate betas: for each trial, a GLM of [trial, all other trials, nuisance].

    Parameters
    ----------
    signals : float [T, V]
        The cleaned run.
    design : DataFrame [T, P]
        From :func:`trial_design`.
    trial_columns : list of list of str
        Per trial its columns (k = 1, or 2 with an HRF derivative).
    nuisance_columns : list of str
    noise_model : {'ols', 'ar1'}

    Returns
    -------
    float64 [n_trials, V]

    Notes
    -----
    For OLS, by Frisch-Waugh-Lovell each per-trial fit only needs the trial
    regressors residualised on the nuisance columns, ``Xr``: with
    ``C = Xr'Xr`` and ``A = Xr'Y`` (one pass over the data), trial i's model
    ``Z = [B_i, S - B_i]`` (``S`` the sum of all trials' blocks) has
    ``Z'Z`` and ``Z'Y`` made of blocks of ``C`` and ``A``, so all trials cost
    O(n_trials * V) after the product. Memory is O(T * V + n_trials * V).
    """
    signals = np.asarray(signals, dtype=np.float64)
    n_trials = len(trial_columns)
    if n_trials == 0:
        return np.zeros((0, signals.shape[1]))
    k = len(trial_columns[0])
    trial_matrix = design[[c for columns in trial_columns for c in columns]].to_numpy(dtype=np.float64)
    nuisance = design[nuisance_columns].to_numpy(dtype=np.float64)
    if noise_model != "ols":
        betas = np.empty((n_trials, signals.shape[1]))
        for index in range(n_trials):
            own = trial_matrix[:, index * k:(index + 1) * k]
            others = trial_matrix.reshape(len(trial_matrix), n_trials, k).sum(axis=1) - own
            betas[index] = _glm_betas(signals, np.column_stack([own, others, nuisance]), 1, noise_model)[0]
        return betas

    residual = _residualise(trial_matrix, nuisance)                 # [T, n*k]
    gram = residual.T @ residual                                    # C [n*k, n*k]
    products = residual.T @ signals                                 # A [n*k, V]
    blocks = gram.reshape(n_trials, k, n_trials, k)
    row_sums = blocks.sum(axis=2)                                   # R_i = B_i'S, [n, k, k]
    total = row_sums.sum(axis=0)                                    # Q = S'S, [k, k]
    products = products.reshape(n_trials, k, -1)
    product_total = products.sum(axis=0)                            # S'Y, [k, V]
    betas = np.empty((n_trials, signals.shape[1]))
    for index in range(n_trials):
        own = blocks[index, :, index]                               # B_i'B_i
        cross = row_sums[index] - own                               # B_i'(S - B_i)
        rest = total - row_sums[index] - row_sums[index].T + own    # (S - B_i)'(S - B_i)
        gram_i = np.block([[own, cross], [cross.T, rest]])
        rhs = np.concatenate([products[index], product_total - products[index]], axis=0)
        # pinv, like nilearn's OLSModel, so a trial collinear with the others still gives a beta.
        betas[index] = (np.linalg.pinv(gram_i) @ rhs)[0]
    return betas


def lag_average(signals, tr, onsets, window):
    """Mean of the volumes in ``[onset + window[0], onset + window[1])`` for each trial.

    Parameters
    ----------
    signals : float [T, V]
        The cleaned run.
    tr : float
    onsets : float [n_trials]
        Seconds from the first volume.
    window : (float, float)
        Start and end in seconds after onset.

    Returns
    -------
    betas : float64 [n_trials, V]
        NaN rows for trials whose window holds no volume.
    n_volumes : int [n_trials]
        Volumes averaged per trial.
    """
    times = np.arange(signals.shape[0]) * tr
    onsets = np.asarray(onsets, dtype=np.float64)
    # Small tolerance so a window edge on a volume's time includes it despite float rounding.
    tolerance = 1e-6 * tr
    inside = ((times[None, :] >= onsets[:, None] + window[0] - tolerance)
              & (times[None, :] < onsets[:, None] + window[1] - tolerance))
    counts = inside.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        betas = (inside.astype(np.float64) @ np.asarray(signals, dtype=np.float64)) / counts[:, None]
    return betas, counts
