"""Signal cleaning of masked runs with :func:`nilearn.signal.clean`.

Each run is cleaned on its own: linear detrending, a cosine (DCT) high-pass
filter, regression of the confounds, and z-scoring of every voxel. nilearn
detrends the confounds and the cosine terms too and removes them in one
projection, so the cleaned run is exactly the residual of the raw run on
``[constant, linear trend, cosines, confounds]``, rescaled. The GLM estimators
put the same nuisance columns in their design, which (Frisch-Waugh-Lovell)
makes their trial betas equal to those of a GLM fit to the raw run with the
nuisance regressors in the model, in units of the run's residual standard
deviation.
"""

from __future__ import annotations

import numpy as np

from mindvis.errors import MindvisError


def bad_voxels(signals):
    """Voxels a run cannot be estimated on: any non-finite value, or constant over time.

    Parameters
    ----------
    signals : float [T, V]

    Returns
    -------
    non_finite, constant : bool [V] each
    """
    non_finite = ~np.isfinite(signals).all(axis=0)
    with np.errstate(invalid="ignore"):
        # The range of a constant series is exactly 0; non-finite voxels give NaN here and are counted apart.
        constant = (signals.max(axis=0) - signals.min(axis=0)) == 0
    return non_finite, constant & ~non_finite


def clean_run(signals, tr, confounds=None, high_pass=0.01, path=None):
    """Detrend, high-pass, regress confounds and z-score one run.

    Parameters
    ----------
    signals : float [T, V]
        Masked raw time series of one run (no NaN, no constant voxel).
    tr : float
        Repetition time in seconds.
    confounds : float [T, K] or None
        Nuisance time series (motion parameters, ...).
    high_pass : float
        Cut-off in Hz of the cosine drift basis; 0 turns the filter off.
    path : Path, optional
        The run's file, named in errors.

    Returns
    -------
    float32 [T, V]
        Zero mean, unit (sample) standard deviation per voxel.
    """
    from nilearn.signal import clean

    n_volumes = signals.shape[0]
    n_nuisance = 2 + (0 if confounds is None else confounds.shape[1]) + n_cosines(n_volumes, tr, high_pass)
    if n_nuisance >= n_volumes - 1:
        raise MindvisError(f"{n_volumes} volumes cannot carry {n_nuisance} nuisance regressors (trend, cosines, "
                           "confounds)", path=path, key="preprocess.high_pass",
                           fix="lower preprocess.high_pass or list fewer preprocess.confounds.")
    # The cosines are passed as confounds (filter=False) rather than through filter='cosine',
    # which silently skips them when a confound resembles a cosine; the GLM design holds
    # exactly these columns.
    nuisance = [] if confounds is None else [np.asarray(confounds, dtype=np.float64)]
    if n_cosines(n_volumes, tr, high_pass):
        nuisance.append(cosine_basis(n_volumes, tr, high_pass))
    cleaned = clean(np.asarray(signals, dtype=np.float64), detrend=True, standardize="zscore_sample",
                    confounds=np.column_stack(nuisance) if nuisance else None, standardize_confounds=True,
                    filter=False, t_r=tr)
    return cleaned.astype(np.float32)


def cosine_basis(n_volumes, tr, high_pass):
    """nilearn's cosine drift regressors for a run, without the constant: float64 [T, n_cosines]."""
    from nilearn.signal import create_cosine_drift

    return create_cosine_drift(high_pass, np.arange(n_volumes) * tr)[:, :-1]


def n_cosines(n_volumes, tr, high_pass):
    """Number of cosine drift regressors nilearn builds for a run (0 when the filter is off)."""
    if high_pass <= 0:
        return 0
    # The last column of nilearn's basis is the constant, which detrending covers.
    return cosine_basis(n_volumes, tr, high_pass).shape[1]
