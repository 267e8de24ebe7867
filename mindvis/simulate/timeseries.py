"""From neural responses to raw-looking BOLD volumes: HRF, noise, motion, baseline.

A tissue voxel's intensity in volume ``t`` is::

    B_v * (1 + (signal_v(t) + noise_v(t)) / 100) - grad(B)_v . displacement_v(t)

- ``B_v``: baseline intensity (``baseline_intensity`` times the voxel's brain
  fraction and a smooth coil-sensitivity texture), so the data look like raw
  BOLD rather than z-scores;
- ``signal_v(t)``: percent signal change of the visual voxels, made by
  :mod:`mindvis.simulate.run`: trial amplitudes convolved with nilearn's
  Glover HRF (:func:`event_regressors`, scaled so one ``stimulus_duration``
  event peaks at its amplitude) plus spontaneous fluctuations;
- ``noise_v(t)`` (percent signal change) = ``noise_sd_v`` times the sum of an
  AR(1) process with unit variance (coefficient ``ar1``, spatially smoothed to
  ``noise_fwhm_mm``, as real fMRI noise is correlated between neighbours), a
  cardiac and a respiratory oscillation aliased at the TR
  (``physio_amplitude``, spatially smooth loadings) and slow drift
  (``drift_amplitude``: linear plus the two slowest cosines of the run,
  shared by all voxels in part);
- the last term is head motion: a slowly drifting rigid displacement moves the
  baseline image, which changes intensity most at tissue edges (partial volume).
  The six rigid parameters are written as fMRIPrep-style confounds.

Outside the brain the volume holds dim Rician-like background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Oversampling of the HRF time grid (TR / OVERSAMPLING seconds).
OVERSAMPLING = 20
#: Length of the HRF kernel in seconds.
HRF_LENGTH = 32.0
#: Head radius (mm) that converts rotations to displacement in framewise displacement (Power et al. 2012).
HEAD_RADIUS_MM = 50.0
#: Cardiac and respiratory frequency ranges (Hz).
CARDIAC_HZ = (0.9, 1.3)
RESPIRATORY_HZ = (0.2, 0.33)
#: Share of the drift that all voxels share (scanner drift) rather than their own.
SHARED_DRIFT = 0.6
#: Background intensity outside the brain, as a fraction of the baseline.
BACKGROUND_FRACTION = 0.02
#: Tissue threshold on the brain fraction (below it a voxel is background).
TISSUE_FRACTION = 0.05
#: Spread of the noise sd across voxels (sd of its log).
NOISE_SPREAD = 0.25


def hrf_kernel(tr, oversampling=OVERSAMPLING):
    """nilearn's Glover HRF sampled every ``tr / oversampling`` seconds, float64 [L]."""
    from nilearn.glm.first_level.hemodynamic_models import glover_hrf

    return glover_hrf(tr, oversampling=oversampling, time_length=HRF_LENGTH)


def event_regressors(onsets, durations, n_volumes, tr, reference_duration, oversampling=OVERSAMPLING):
    """One HRF-convolved regressor per event, sampled at the volume times ``k * tr``.

    Each regressor is scaled so that an isolated event of ``reference_duration``
    seconds peaks at 1: an amplitude then reads as peak percent signal change.

    Parameters
    ----------
    onsets, durations : float [K]
        Seconds from the first volume.
    n_volumes : int
    tr : float
    reference_duration : float

    Returns
    -------
    float32 [n_volumes, K]
    """
    from scipy.signal import fftconvolve

    kernel = hrf_kernel(tr, oversampling)
    dt = tr / oversampling
    n_fine = n_volumes * oversampling
    boxcars = np.zeros((n_fine, len(onsets)))
    for column, (onset, duration) in enumerate(zip(onsets, durations)):
        first = int(round(onset / dt))
        last = max(first + 1, int(round((onset + duration) / dt)))
        boxcars[first:min(last, n_fine), column] = 1.0
    reference = np.convolve(np.ones(max(1, int(round(reference_duration / dt)))), kernel).max()
    fine = fftconvolve(boxcars, kernel[:, None], axes=0)[:n_fine]
    return (fine[::oversampling] / reference).astype(np.float32)


def ar1_noise(rng, n_volumes, n_voxels, coefficient):
    """Stationary AR(1) noise with unit variance, float32 [n_volumes, n_voxels]."""
    noise = rng.standard_normal((n_volumes, n_voxels), dtype=np.float32)
    scale = np.float32(np.sqrt(1 - coefficient ** 2))
    rho = np.float32(coefficient)
    # The first sample starts in the stationary distribution (unit variance); a loop over
    # volumes, each step vectorised over voxels, beats a filter along the slow axis.
    for t in range(1, n_volumes):
        noise[t] *= scale
        noise[t] += rho * noise[t - 1]
    return noise


def smooth_ar1_noise(rng, n_volumes, grid_shape, coefficient, fwhm_vox):
    """AR(1) noise that is also spatially smooth, unit variance, float32 [n_volumes, X * Y * Z].

    Each volume of white AR(1) noise is blurred by a Gaussian of ``fwhm_vox``
    (periodic boundaries, so the variance is the same everywhere) and rescaled
    to unit variance.
    """
    from scipy import ndimage

    n_voxels = int(np.prod(grid_shape))
    noise = ar1_noise(rng, n_volumes, n_voxels, coefficient)
    if fwhm_vox <= 0:
        return noise
    sigma = fwhm_vox / np.sqrt(8 * np.log(2))
    volumes = noise.reshape((n_volumes,) + tuple(grid_shape))
    ndimage.gaussian_filter(volumes, sigma=(0, sigma, sigma, sigma), mode="wrap", output=volumes)
    # The variance left after blurring white noise is the sum of the squared kernel weights.
    impulse = np.zeros(grid_shape, dtype=np.float64)
    impulse[tuple(n // 2 for n in grid_shape)] = 1.0
    kernel = ndimage.gaussian_filter(impulse, sigma=sigma, mode="wrap")
    return noise / np.float32(np.sqrt((kernel ** 2).sum()))


def drift(rng, n_volumes, n_voxels):
    """Slow drift, roughly unit standard deviation per voxel, float32 [n_volumes, n_voxels].

    A linear trend and the two slowest cosines of the run; part of it is common
    to all voxels (the scanner), part each voxel's own.
    """
    time = (np.arange(n_volumes) + 0.5) / n_volumes
    basis = np.column_stack([time - 0.5, np.cos(np.pi * time), np.cos(2 * np.pi * time)])
    basis = (basis - basis.mean(axis=0)) / basis.std(axis=0)
    shared = rng.standard_normal(3)
    own = rng.standard_normal((3, n_voxels))
    coefficients = np.sqrt(SHARED_DRIFT) * shared[:, None] + np.sqrt(1 - SHARED_DRIFT) * own
    return (basis @ coefficients / np.sqrt(3)).astype(np.float32)


def physio_timecourses(rng, n_volumes, tr):
    """Cardiac and respiratory oscillations sampled at the TR (aliased), float32 [n_volumes, 2].

    Rates wander slowly (a random walk on the phase), as heart and breathing do.
    """
    times = np.arange(n_volumes) * tr
    out = np.empty((n_volumes, 2), dtype=np.float32)
    for column, (low, high) in enumerate((CARDIAC_HZ, RESPIRATORY_HZ)):
        rate = rng.uniform(low, high)
        wander = np.cumsum(rng.normal(0, 0.05, n_volumes))
        out[:, column] = np.sqrt(2) * np.sin(2 * np.pi * rate * times + rng.uniform(0, 2 * np.pi) + wander)
    return out


def head_motion(rng, n_volumes, motion_mm):
    """Slow rigid head-motion drifts relative to the first volume.

    Returns
    -------
    float64 [n_volumes, 6]
        ``trans_x, trans_y, trans_z`` (mm) and ``rot_x, rot_y, rot_z`` (rad).
    """
    from scipy.ndimage import gaussian_filter1d

    steps = rng.standard_normal((n_volumes, 6))
    walk = gaussian_filter1d(np.cumsum(steps, axis=0), sigma=3, axis=0, mode="nearest")
    walk -= walk[0]
    walk /= max(np.sqrt((walk ** 2).mean()), 1e-9)
    # Each parameter gets its own size; rotations move the head's surface by about motion_mm.
    size = motion_mm * np.exp(rng.normal(0, 0.3, 6))
    size[3:] /= HEAD_RADIUS_MM
    return walk * size


def framewise_displacement(motion, radius=HEAD_RADIUS_MM):
    """Power's framewise displacement (mm) of ``motion`` [T, 6]; the first is NaN, float64 [T]."""
    delta = np.abs(np.diff(motion, axis=0))
    displacement = delta[:, :3].sum(axis=1) + radius * delta[:, 3:].sum(axis=1)
    return np.concatenate([[np.nan], displacement])


@dataclass
class Scanner:
    """Static maps of one subject's acquisition.

    Attributes
    ----------
    shape : tuple of 3 int
        The grid.
    resolution_mm : float
    tissue : int64 [N]
        Flat (C-order) grid indices of tissue voxels.
    background : int64 [M]
        Flat grid indices of the remaining voxels.
    baseline : float32 [N]
        Raw intensity of each tissue voxel.
    noise_sd : float32 [N]
        AR(1) noise sd in percent signal change.
    physio_loading : float32 [N, 2]
        Cardiac and respiratory loadings (multiples of noise_sd).
    gradient : float32 [N, 3]
        Spatial gradient of the baseline image (intensity per mm).
    lever : float32 [N, 3]
        ``r x gradient`` with ``r`` the voxel's position from the head centre
        (how rotations change the intensity).
    background_level : float
    """

    shape: tuple
    resolution_mm: float
    tissue: np.ndarray
    background: np.ndarray
    baseline: np.ndarray
    noise_sd: np.ndarray
    physio_loading: np.ndarray
    gradient: np.ndarray
    lever: np.ndarray
    background_level: float


def make_scanner(grid, fraction, noise_level, section, rng):
    """Build the static maps for one subject.

    Parameters
    ----------
    grid : mindvis.simulate.geometry.Grid
    fraction : float32 [X, Y, Z]
        Brain fraction per voxel.
    noise_level : float
        Mean AR(1) noise sd over voxels (percent signal change); voxels scatter
        around it (log-normal, ``NOISE_SPREAD``).
    section : dict
        The ``simulate`` config section.
    rng : numpy.random.Generator

    Returns
    -------
    Scanner
    """
    from scipy import ndimage

    from mindvis.simulate.encoding import smooth_fields

    flat_fraction = fraction.ravel()
    tissue = np.flatnonzero(flat_fraction >= TISSUE_FRACTION)
    background = np.flatnonzero(flat_fraction < TISSUE_FRACTION)
    # Coil sensitivity and tissue contrast: a smooth texture of about +-10 %.
    texture = smooth_fields(grid.shape, 1, 12.0 / grid.resolution_mm, rng)[0]
    texture = np.exp(0.1 * texture / max(texture.std(), 1e-9))
    baseline_volume = section["baseline_intensity"] * fraction * texture
    baseline_volume = ndimage.gaussian_filter(baseline_volume, 0.5)  # the point-spread function blurs edges
    gradients = np.stack(np.gradient(baseline_volume, grid.resolution_mm), axis=-1).reshape(-1, 3)[tissue]
    ijk = np.column_stack(np.unravel_index(tissue, grid.shape))
    position = grid.coordinates(ijk)
    position -= position.mean(axis=0)
    loadings = smooth_fields(grid.shape, 2, 10.0 / grid.resolution_mm, rng).reshape(2, -1)[:, tissue].T
    loadings = np.abs(loadings) / np.sqrt((loadings ** 2).mean(axis=0))
    # Log-normal scatter with mean one, so the mean noise sd is noise_level.
    noise_sd = noise_level * np.exp(rng.normal(0, NOISE_SPREAD, len(tissue)) - NOISE_SPREAD ** 2 / 2)
    return Scanner(
        shape=tuple(grid.shape),
        resolution_mm=grid.resolution_mm,
        tissue=tissue,
        background=background,
        baseline=baseline_volume.ravel()[tissue].astype(np.float32),
        noise_sd=noise_sd.astype(np.float32),
        physio_loading=(loadings / np.sqrt(2)).astype(np.float32),
        gradient=gradients.astype(np.float32),
        lever=np.cross(position, gradients).astype(np.float32),
        background_level=BACKGROUND_FRACTION * section["baseline_intensity"],
    )


def acquire_run(scanner, n_volumes, signal, section, rng, columns=None):
    """Simulate one run's raw volumes.

    Parameters
    ----------
    scanner : Scanner
    n_volumes : int
    signal : float32 [n_volumes, n_columns] or None
        Neural BOLD signal (percent signal change, already HRF-convolved) of
        the tissue voxels in ``columns``; None for noise only.
    section : dict
        The ``simulate`` config section.
    rng : numpy.random.Generator
    columns : int [n_columns], optional
        Positions in ``scanner.tissue`` that ``signal`` belongs to (all tissue when omitted).

    Returns
    -------
    volumes : int16 [X, Y, Z, n_volumes]
    motion : float64 [n_volumes, 6]
    """
    n_tissue = len(scanner.tissue)
    fwhm_vox = section["noise_fwhm_mm"] / scanner.resolution_mm
    noise = smooth_ar1_noise(rng, n_volumes, scanner.shape, section["ar1"], fwhm_vox)[:, scanner.tissue]
    if section["physio_amplitude"] > 0:
        noise += section["physio_amplitude"] * (physio_timecourses(rng, n_volumes, section["tr"])
                                                @ scanner.physio_loading.T)
    if section["drift_amplitude"] > 0:
        noise += section["drift_amplitude"] * drift(rng, n_volumes, n_tissue)
    percent = noise
    percent *= scanner.noise_sd
    if signal is not None:
        if columns is None:
            percent += signal
        else:
            percent[:, columns] += signal
    tissue = percent
    tissue *= scanner.baseline / 100
    tissue += scanner.baseline
    motion = head_motion(rng, n_volumes, section["motion_mm"])
    # Moving the head by d shifts the image: I(p - d) ~ I(p) - grad(I) . d, with d = t + w x r.
    tissue -= (motion[:, :3].astype(np.float32) @ scanner.gradient.T
               + motion[:, 3:].astype(np.float32) @ scanner.lever.T)

    volumes = np.empty((n_volumes, int(np.prod(scanner.shape))), dtype=np.float32)
    volumes[:, scanner.tissue] = tissue
    # Magnitude images: the background is the modulus of complex Gaussian noise (Rician).
    real = rng.standard_normal((n_volumes, len(scanner.background)), dtype=np.float32)
    imaginary = rng.standard_normal((n_volumes, len(scanner.background)), dtype=np.float32)
    volumes[:, scanner.background] = scanner.background_level * np.hypot(real, imaginary)
    volumes = np.clip(np.rint(volumes), 0, np.iinfo(np.int16).max).astype(np.int16)
    # [T, X, Y, Z] in C order is [X, Y, Z, T] in Fortran order, which is how NIfTI stores it.
    return volumes.reshape((n_volumes,) + scanner.shape).transpose(1, 2, 3, 0), motion
