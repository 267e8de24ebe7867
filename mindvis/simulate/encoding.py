"""The ground-truth encoding model: how each simulated voxel responds to an image.

Early visual voxels (V1-V3) are population receptive fields over a Gabor energy
pyramid, in the spirit of compressive spatial summation models: the image's
luminance is filtered by quadrature Gabor pairs at ``n_orientations``
orientations and a few wavelengths; the energy (the quadrature amplitude) is
weighted by the voxel's preference for spatial frequency and orientation,
pooled under its Gaussian receptive field, and compressed by a power below one.
Receptive fields grow with eccentricity and from V1 to V3, and preferred
wavelength grows with receptive field size.

Higher visual voxels (LOC, VOT) read, by default, a deep network's layers
(``deepnet`` below). Under the two older category models they are tuned to
object category and to global shape features of the silhouette (occupancy of
coarse image blocks, area, elongation, extent, symmetry). Either way tuning
comes from spatially smooth random fields sampled at the voxels, so
neighbouring voxels prefer similar features (selective patches). LOC leans to
shape (or the mid layer), VOT to category (or the late layer).

The drive comes in three forms (``simulate.category_model``):

``labels``
    A smooth random preference per class (``category_tuning [V, C]``), read
    through the image's label. What one class evokes cannot be predicted from
    the others, so a decoder trained on some classes decodes novel ones at
    chance.
``features``
    A smooth random tuning (``feature_tuning [V, K]``) over ``K`` HMAX-like C2
    features of the image (Riesenhuber & Poggio 1999, Nat. Neurosci. 2:1019;
    Serre, Oliva & Poggio 2007, PNAS 104:6424): S1 is the Gabor energy
    pyramid; C1 takes the local maximum over position and over neighbouring
    wavelengths; S2 is a Gaussian RBF match of 3 x 3-position, all-orientation
    C1 patches to ``K`` prototype patches sampled once from C1 maps of the
    training images; C2 is the maximum over positions and bands. The label is
    not read. Ventral responses are well predicted as linear combinations of
    such hierarchical features (Yamins et al. 2014, PNAS 111:8619;
    Khaligh-Razavi & Kriegeskorte 2014, PLoS Comput. Biol. 10:e1003915), and
    this is what lets a feature decoder trained on some categories identify
    novel ones (Horikawa & Kamitani 2017, Nat. Commun. 8:15037): visually
    similar images evoke similar patterns, whatever their class.
``deepnet``
    The goal-driven encoding model (:mod:`mindvis.simulate.deepnet`): each
    LOC/VOT voxel is a linear read-out of a pretrained ImageNet network's mid
    and late layers, with read-out weights from smooth maps across cortex
    over the top ``DEEPNET_COMPONENTS`` principal components of each layer
    (fitted on the calibration set; unwhitened, so the network's dominant
    dimensions dominate, as IT's object space does: Bao et al. 2020,
    Nature 583:103). LOC leans to the mid layer and VOT to the late one
    (``DEEPNET_LAYER_WEIGHTS``). The silhouette shape features are not used.

Shared anatomy: the smooth tuning maps of the higher areas can be the sum of
a template-space component shared by every subject (drawn from
``simulate.population_seed`` alone, :func:`draw_shared_maps`) and an individual one, the shared one
displaced by a few millimetres per subject (residual misalignment after
anatomical normalisation); see :class:`SharedMaps`.

Visual-field coordinates are in image half-widths: the image spans [-1, 1] in
x (left to right) and y (bottom to top).

Responses are in percent signal change: the peak BOLD change that one
presentation of the image evokes, before noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Receptive-field size (image half-widths) = intercept + slope * eccentricity, per early area.
PRF_SIZE = {"V1": (0.05, 0.12), "V2": (0.07, 0.20), "V3": (0.09, 0.30)}
#: Compressive exponent of spatial summation per early area (stronger compression up the hierarchy).
PRF_EXPONENT = {"V1": 0.6, "V2": 0.5, "V3": 0.4}
#: Scatter of receptive-field centres around the retinotopic map (image half-widths).
PRF_SCATTER = 0.04
#: Preferred wavelength relative to receptive-field size.
WAVELENGTH_PER_SIZE = 2.5
#: Width of spatial-frequency tuning in octaves (standard deviation).
SF_BANDWIDTH_OCTAVES = 1.0
#: Largest orientation bias of a voxel (modulation depth of its orientation weights).
MAX_ORIENTATION_BIAS = 0.5
#: Weights of category and shape tuning in the higher areas.
HIGHER_WEIGHTS = {"LOC": {"category": 0.3, "shape": 0.8}, "VOT": {"category": 0.5, "shape": 0.5}}
#: Smoothness of the tuning maps across cortex (Gaussian sd, mm).
TUNING_SMOOTHNESS_MM = 5.0
#: Spread of voxel gains (sd of the log gain).
GAIN_SPREAD = 0.25
#: Pixels brighter than this fraction of the image maximum belong to the object's silhouette.
SILHOUETTE_THRESHOLD = 0.1
#: Side of the block grid whose occupancy describes the silhouette.
SHAPE_BLOCKS = 4

#: Forms of the higher voxels' category drive (``simulate.category_model``).
CATEGORY_MODELS = ("labels", "features", "deepnet")
#: Principal components of each deep-network layer that the ``deepnet`` voxels read (Bao et al. 2020 used 50).
DEEPNET_COMPONENTS = 50
#: Weight of the mid and late layer in each higher area (``deepnet``): intermediate layers predict lateral
#: occipital cortex best and the late layers ventral temporal cortex, a gradient along the ventral stream
#: (Güçlü & van Gerven 2015, J. Neurosci. 35:10005, Fig. 4; Eickenberg et al. 2017, NeuroImage 152:184).
#: The root sum of squares (0.81 LOC, 0.72 VOT) keeps each area's tuned share of the response where the
#: shape-and-category models put it (0.85, 0.71).
DEEPNET_LAYER_WEIGHTS = {"LOC": (0.7, 0.4), "VOT": (0.4, 0.6)}
#: Number of C2 features (S2 prototype patches) of the ``features`` category model.
C2_PROTOTYPES = 48
#: Side, in C1 positions, of an S2 patch (each patch spans all orientations).
S2_PATCH_SIDE = 3
#: Width of the S2 radial basis function relative to the prototype's norm: a C1 patch that
#: differs from the prototype by this fraction of the prototype's norm gives exp(-1/2).
S2_TOLERANCE = 0.5

SHAPE_FEATURE_NAMES = tuple(
    [f"occupancy_{row}_{col}" for row in range(SHAPE_BLOCKS) for col in range(SHAPE_BLOCKS)]
    + ["area", "centroid_x", "centroid_y", "major_axis", "minor_axis", "elongation",
       "orientation_cos", "orientation_sin", "width", "height", "symmetry_lr", "top_heaviness"]
)


# -- image features -------------------------------------------------------------

def luminance(images):
    """Luminance in [0, 1].

    Parameters
    ----------
    images : uint8 [S, H, W, C] or [S, H, W]

    Returns
    -------
    float32 [S, H, W]
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images.mean(axis=3)
    return (images / 255.0).astype(np.float32)


def gabor_transfer(height, width, orientation, wavelength_px):
    """Frequency response of a complex (quadrature) Gabor filter.

    Only one lobe of the spectrum is kept, so the filtered image is analytic
    and its magnitude is the quadrature energy. The envelope's spatial sd is
    half the wavelength (about one octave of bandwidth). A full-contrast
    grating at the preferred frequency and orientation gives energy 0.5
    (half its peak-to-peak amplitude of 1).

    Returns
    -------
    float64 [height, width]
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    centre = 1.0 / wavelength_px
    sd = 1.0 / (2 * np.pi * 0.5 * wavelength_px)
    # Image rows run downwards; orientation is measured counter-clockwise from the x axis.
    cx, cy = centre * np.cos(orientation), -centre * np.sin(orientation)
    transfer = np.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * sd ** 2))
    transfer[0, 0] = 0.0  # no response to mean luminance
    return transfer


def gabor_energy(lum, n_orientations, wavelengths, chunk=256):
    """Gabor energy pyramid of luminance images.

    Parameters
    ----------
    lum : float32 [S, H, W]
    n_orientations : int
    wavelengths : sequence of float
        Wavelengths as fractions of the image side.
    chunk : int
        Images filtered at once (bounds memory).

    Returns
    -------
    float32 [S, F, H, W]
        Feature ``f = sf_index * n_orientations + orientation_index``.
    """
    from scipy import fft

    n_images, height, width = lum.shape
    pad_h, pad_w = height // 2, width // 2
    size = (height + 2 * pad_h, width + 2 * pad_w)
    orientations = np.arange(n_orientations) * np.pi / n_orientations
    transfers = np.stack([
        gabor_transfer(size[0], size[1], theta, frac * height)
        for frac in wavelengths for theta in orientations
    ]).astype(np.complex64)
    out = np.empty((n_images, len(transfers), height, width), dtype=np.float32)
    for start in range(0, n_images, chunk):
        block = lum[start:start + chunk]
        # Pad with each image's border mean, so the frame edge is not an edge.
        border = np.concatenate([block[:, 0], block[:, -1], block[:, :, 0], block[:, :, -1]], axis=1).mean(axis=1)
        padded = np.empty((len(block),) + size, dtype=np.float32)
        padded[:] = border[:, None, None]
        padded[:, pad_h:pad_h + height, pad_w:pad_w + width] = block
        spectrum = fft.fft2(padded, workers=1)
        # Factor 2: one spectral lobe carries half a real grating's amplitude.
        filtered = fft.ifft2(spectrum[:, None] * transfers[None], workers=1)
        out[start:start + chunk] = 2 * np.abs(filtered[:, :, pad_h:pad_h + height, pad_w:pad_w + width])
    return out


def pixel_coordinates(height, width):
    """Visual-field x and y (image half-widths) of pixel centres, each float [H * W]."""
    y = 1 - (np.arange(height) + 0.5) * 2 / height
    x = (np.arange(width) + 0.5) * 2 / width - 1
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return xx.ravel(), yy.ravel()


def prf_weights(prf_x, prf_y, prf_sigma, height, width):
    """Gaussian receptive fields sampled on the pixel grid.

    Each field integrates to one over the whole visual field, so a field that
    hangs off the image collects less drive.

    Parameters
    ----------
    prf_x, prf_y, prf_sigma : float [V]
    height, width : int

    Returns
    -------
    float32 [V, H * W]
    """
    px, py = pixel_coordinates(height, width)
    prf_x, prf_y, prf_sigma = (np.asarray(a, dtype=np.float64)[:, None] for a in (prf_x, prf_y, prf_sigma))
    squared = (px[None] - prf_x) ** 2 + (py[None] - prf_y) ** 2
    pixel_area = (2.0 / height) * (2.0 / width)
    return (np.exp(-squared / (2 * prf_sigma ** 2)) * pixel_area / (2 * np.pi * prf_sigma ** 2)).astype(np.float32)


def shape_features(lum):
    """Global shape descriptors of the object silhouette.

    Parameters
    ----------
    lum : float32 [S, H, W]

    Returns
    -------
    float32 [S, K]
        Columns named by ``SHAPE_FEATURE_NAMES``.
    """
    n_images, height, width = lum.shape
    peak = lum.reshape(n_images, -1).max(axis=1)
    silhouette = (lum > SILHOUETTE_THRESHOLD * np.maximum(peak, 1e-6)[:, None, None]).astype(np.float64)
    block_h, block_w = height // SHAPE_BLOCKS, width // SHAPE_BLOCKS
    cropped = silhouette[:, :block_h * SHAPE_BLOCKS, :block_w * SHAPE_BLOCKS]
    occupancy = cropped.reshape(n_images, SHAPE_BLOCKS, block_h, SHAPE_BLOCKS, block_w).mean(axis=(2, 4))

    px, py = pixel_coordinates(height, width)
    flat = silhouette.reshape(n_images, -1)
    mass = np.maximum(flat.sum(axis=1), 1.0)
    area = flat.mean(axis=1)
    cx = flat @ px / mass
    cy = flat @ py / mass
    dx, dy = px[None] - cx[:, None], py[None] - cy[:, None]
    cxx, cyy, cxy = ((flat * dx * dx).sum(1) / mass, (flat * dy * dy).sum(1) / mass,
                     (flat * dx * dy).sum(1) / mass)
    spread = np.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    major = np.sqrt(np.maximum((cxx + cyy) / 2 + spread, 0))
    minor = np.sqrt(np.maximum((cxx + cyy) / 2 - spread, 0))
    elongation = (major - minor) / np.maximum(major + minor, 1e-6)
    angle2 = np.arctan2(2 * cxy, cxx - cyy)  # twice the axis orientation
    rows_any, cols_any = silhouette.any(axis=2), silhouette.any(axis=1)
    height_frac = rows_any.sum(axis=1) / height
    width_frac = cols_any.sum(axis=1) / width
    mirrored = silhouette[:, :, ::-1].reshape(n_images, -1)
    symmetry = (flat * mirrored).sum(axis=1) / mass
    top = silhouette[:, : height // 2].reshape(n_images, -1).sum(axis=1) / mass
    features = np.column_stack([
        occupancy.reshape(n_images, -1), area, cx, cy, major, minor, elongation,
        np.cos(angle2), np.sin(angle2), width_frac, height_frac, symmetry, top,
    ])
    return features.astype(np.float32)


# -- HMAX-like C2 features (the ``features`` category model) -----------------------

def c1_maps(energy, n_orientations, wavelengths, height):
    """C1: local maximum of the S1 (Gabor energy) maps over position and neighbouring wavelengths.

    Bands pair adjacent wavelengths (a single wavelength is one band of its
    own), as HMAX pools pairs of S1 scales. Each band takes the maximum over
    its two wavelengths, then over square windows as wide as its finer
    wavelength, stepped by half a window. Bands too small to hold one S2 patch
    are left out.

    Parameters
    ----------
    energy : float32 [S, F, H, W]
        :func:`gabor_energy` output (``f = sf_index * n_orientations + orientation_index``).
    n_orientations : int
    wavelengths : sequence of float
        Fractions of the image side, in the order ``energy`` was computed with.
    height : int
        Image side in pixels.

    Returns
    -------
    list of float32 [S, O, h_b, w_b]
        One map per band, coarser bands last.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    n_images, _, rows, cols = energy.shape
    by_scale = energy.reshape(n_images, len(wavelengths), n_orientations, rows, cols)
    order = np.argsort(wavelengths)
    pairs = [order[i:i + 2] for i in range(len(order) - 1)] if len(order) > 1 else [order]
    bands = []
    for pair in pairs:
        merged = by_scale[:, pair].max(axis=1)
        window = max(2, int(round(min(wavelengths[i] for i in pair) * height)))
        window = min(window, rows, cols)
        step = max(1, window // 2)
        # A square window's maximum is separable: rows first, then columns (several times faster).
        pooled = sliding_window_view(merged, window, axis=2)[:, :, ::step].max(axis=-1)
        pooled = sliding_window_view(pooled, window, axis=3)[:, :, :, ::step].max(axis=-1)
        if min(pooled.shape[2:]) >= S2_PATCH_SIDE:
            bands.append(np.ascontiguousarray(pooled, dtype=np.float32))
    return bands


def _c1_patches(band):
    """All S2-sized patches of one C1 band, float32 [S, N, O * P * P] (N positions)."""
    from numpy.lib.stride_tricks import sliding_window_view

    n_images, n_orientations = band.shape[:2]
    patches = sliding_window_view(band, (S2_PATCH_SIDE, S2_PATCH_SIDE), axis=(2, 3))  # [S, O, h, w, P, P]
    patches = patches.transpose(0, 2, 3, 1, 4, 5)
    return patches.reshape(n_images, -1, n_orientations * S2_PATCH_SIDE ** 2)


def _c1_bands(lum, n_orientations, wavelengths):
    bands = c1_maps(gabor_energy(lum, n_orientations, wavelengths), n_orientations, wavelengths, lum.shape[1])
    if not bands:
        from mindvis.errors import MindvisError

        raise MindvisError(f"images of {lum.shape[1]} x {lum.shape[2]} px give C1 maps smaller than one "
                           f"{S2_PATCH_SIDE} x {S2_PATCH_SIDE} S2 patch", key="simulate.gabor_wavelengths",
                           fix="use shorter Gabor wavelengths or larger images (stimuli.image_size), "
                               "or simulate.category_model: labels.")
    return bands


def draw_c2_prototypes(images, n_orientations, wavelengths, rng, n_prototypes=C2_PROTOTYPES):
    """Sample the S2 prototype patches from C1 maps of (training) images, as HMAX does.

    Each prototype comes from a different image (while there are enough), a
    random band, and a random position drawn with probability proportional to
    the patch's C1 energy, so that blank background is rarely picked.

    Parameters
    ----------
    images : uint8 [S, H, W, C] or [S, H, W]
        The stimulus set's training split.
    n_orientations : int
    wavelengths : sequence of float
        Fractions of the image side (``simulate.gabor_wavelengths``).
    rng : numpy.random.Generator
        Draw it from the config seed alone, so every subject shares the prototypes.
    n_prototypes : int

    Returns
    -------
    float32 [K, O, P, P]
        ``K = n_prototypes`` patches of ``O`` orientations by ``P = S2_PATCH_SIDE`` positions.
    """
    if len(images) == 0:
        from mindvis.errors import MindvisError

        raise MindvisError("the stimulus set has no training images to sample the C2 prototypes from",
                           key="stimuli.n_train_per_class",
                           fix="give the stimulus set training images, or simulate.category_model: labels.")
    picks = rng.choice(len(images), n_prototypes, replace=len(images) < n_prototypes)
    bands = _c1_bands(luminance(images[picks]), n_orientations, wavelengths)
    prototypes = np.empty((n_prototypes, n_orientations * S2_PATCH_SIDE ** 2), dtype=np.float32)
    for index in range(n_prototypes):
        patches = _c1_patches(bands[rng.integers(len(bands))][index:index + 1])[0]  # [N, O * P * P]
        norms = np.linalg.norm(patches, axis=1).astype(np.float64)
        weights = norms / norms.sum() if norms.sum() > 0 else None
        prototypes[index] = patches[rng.choice(len(patches), p=weights)]
    return prototypes.reshape(n_prototypes, n_orientations, S2_PATCH_SIDE, S2_PATCH_SIDE)


def c2_features(lum, prototypes, n_orientations, wavelengths, chunk=256):
    """HMAX-like C2 features: the best S2 (RBF) match of each prototype over positions and bands.

    ``S2 = exp(-|x - p|^2 / (2 (S2_TOLERANCE |p|)^2))`` for a C1 patch ``x``
    and prototype ``p``; C2 is its maximum over all positions of all C1 bands,
    in (0, 1].

    Parameters
    ----------
    lum : float32 [S, H, W]
    prototypes : float32 [K, O, P, P]
        From :func:`draw_c2_prototypes`.
    n_orientations : int
    wavelengths : sequence of float
    chunk : int
        Images processed at once (bounds memory).

    Returns
    -------
    float32 [S, K]
    """
    flat = prototypes.reshape(len(prototypes), -1).astype(np.float32)
    squared_norm = (flat.astype(np.float64) ** 2).sum(axis=1)
    width = 2 * S2_TOLERANCE ** 2 * np.maximum(squared_norm, 1e-12)
    out = np.empty((len(lum), len(flat)), dtype=np.float32)
    for start in range(0, len(lum), chunk):
        nearest = np.full((len(lum[start:start + chunk]), len(flat)), np.inf)
        for band in _c1_bands(lum[start:start + chunk], n_orientations, wavelengths):
            patches = _c1_patches(band)  # [s, N, D]
            distance = (patches ** 2).sum(axis=2)[:, :, None] - 2 * patches @ flat.T + squared_norm
            nearest = np.minimum(nearest, distance.min(axis=1))
        # The maximum of the RBF over positions is the RBF of the nearest patch.
        out[start:start + chunk] = np.exp(-np.maximum(nearest, 0) / width)
    return out

# -- the model --------------------------------------------------------------------

@dataclass
class EncodingModel:
    """Per-voxel tuning of one simulated subject.

    Arrays have one row per voxel (``V``); parameters that do not apply to a
    voxel (a receptive field for a higher voxel, category tuning for an early
    one) are NaN there.

    Attributes
    ----------
    is_early : bool [V]
    prf_x, prf_y, prf_sigma : float32 [V]
        Receptive-field centre and size (image half-widths).
    exponent : float32 [V]
        Compressive exponent of spatial summation.
    feature_weights : float32 [V, F]
        Weights over the Gabor pyramid (``F = n_sf * n_orientations``; sum to 1).
    category_tuning : float32 [V, C]
        Preference for each object category (z-scored over higher voxels);
        NaN everywhere under the ``features`` category model.
    shape_weights : float32 [V, K]
        Weights on the z-scored shape features.
    category_weight, shape_weight : float32 [V]
    gain : float32 [V]
        Voxel gain (vascular density, partial voluming).
    n_orientations : int
    wavelengths : tuple of float
        Fractions of the image side.
    percent_signal_change : float
        Mean evoked response over voxels and calibration images.
    category_model : {'labels', 'features', 'deepnet'}
        What drives the category part of the higher voxels (module docstring).
    feature_tuning : float32 [V, K_c2] or [V, 2 * DEEPNET_COMPONENTS] or None
        ``features``: weights on the z-scored C2 features; ``deepnet``: weights
        on the principal-component scores of the network's layers (columns of
        ``feature_layer``). Z-scored over higher voxels.
    feature_layer : int [K] or None
        ``deepnet`` only: the layer of each ``feature_tuning`` column (index into
        :data:`mindvis.simulate.deepnet.LAYERS`).
    layer_weights : float32 [V, 2] or None
        ``deepnet`` only: weight of the mid and the late layer per voxel.
    feature_network : str or None
        ``deepnet`` only: the ImageNet network whose layers are read.
    c2_prototypes : float32 [K_c2, O, P, P] or None
        ``features`` only: the S2 prototypes (:func:`draw_c2_prototypes`);
        a model without them (a rest subject's) has tuning but cannot predict.
    early_scale_, higher_scale_ : float
    shape_mean_, shape_std_ : float32 [K]
    c2_mean_, c2_std_ : float32 [K_c2]
        ``features`` only: C2 normalisation, like the shape features'.
    pca_means_, pca_components_ : list of float32 [D_l], [K_l, D_l]
        ``deepnet`` only: each layer's principal components on the calibration set.
    layer_scales_ : list of float
        ``deepnet`` only: root mean square of each layer's raw drive (calibration set, higher voxels).
    category_scale_ : float
        ``features``: root mean square of the raw C2 drive over the
        calibration images and higher voxels. Dividing by it gives the feature
        drive the unit mean square that the label drive has (each class's
        tuning is z-scored over higher voxels, so for every image the label
        drive has mean 0 and variance 1 over them); ``HIGHER_WEIGHTS`` then
        weigh category against shape as before. ``deepnet``: the same of the
        layer-weighted drive, used only by :meth:`category_drive`.

    The trailing-underscore attributes are set by :meth:`calibrate` on the
    experiment's stimulus set.
    """

    is_early: np.ndarray
    prf_x: np.ndarray
    prf_y: np.ndarray
    prf_sigma: np.ndarray
    exponent: np.ndarray
    feature_weights: np.ndarray
    category_tuning: np.ndarray
    shape_weights: np.ndarray
    category_weight: np.ndarray
    shape_weight: np.ndarray
    gain: np.ndarray
    n_orientations: int
    wavelengths: tuple
    percent_signal_change: float
    category_model: str = "labels"
    feature_tuning: np.ndarray = field(default=None)
    c2_prototypes: np.ndarray = field(default=None)
    early_scale_: float = 1.0
    higher_scale_: float = 1.0
    shape_mean_: np.ndarray = field(default=None)
    shape_std_: np.ndarray = field(default=None)
    c2_mean_: np.ndarray = field(default=None)
    c2_std_: np.ndarray = field(default=None)
    category_scale_: float = 1.0
    feature_layer: np.ndarray = field(default=None)
    layer_weights: np.ndarray = field(default=None)
    feature_network: str = None
    pca_means_: list = field(default=None)
    pca_components_: list = field(default=None)
    layer_scales_: list = field(default=None)

    @property
    def n_voxels(self):
        return len(self.is_early)

    @property
    def category_maps(self):
        """The tuning that carries the category drive: ``category_tuning [V, C]`` or ``feature_tuning [V, K_c2]``."""
        return self.category_tuning if self.category_model == "labels" else self.feature_tuning

    def _check_labels(self, labels, n_images):
        if self.category_model != "labels":
            return None  # the label is not read
        if labels is None:
            raise ValueError("the labels category model needs one label per image")
        labels = np.asarray(labels, dtype=np.int64)
        n_classes = self.category_tuning.shape[1]
        if labels.shape != (n_images,) or (n_images and (labels.min() < 0 or labels.max() >= n_classes)):
            raise ValueError(f"need one label in [0, {n_classes}) per image, got {labels.shape} "
                             f"in [{labels.min() if n_images else '-'}, {labels.max() if n_images else '-'}]")
        return labels

    # The raw drives, before the calibrated scaling --------------------------
    def _early_drive(self, lum):
        """Compressed, receptive-field pooled Gabor energy, float32 [S, V_early]."""
        early = np.flatnonzero(self.is_early)
        energy = gabor_energy(lum, self.n_orientations, self.wavelengths)
        n_images, n_features, height, width = energy.shape
        fields = prf_weights(self.prf_x[early], self.prf_y[early], self.prf_sigma[early], height, width)
        pooled = np.zeros((n_images, len(early)), dtype=np.float32)
        for feature in range(n_features):
            pooled += (energy[:, feature].reshape(n_images, -1) @ fields.T) * self.feature_weights[early, feature]
        return np.power(np.maximum(pooled, 0), self.exponent[early])

    def _c2(self, lum):
        """C2 features of the images, float32 [S, K_c2]."""
        if self.c2_prototypes is None:
            raise RuntimeError("this features-model has no C2 prototypes (a rest subject's): "
                               "build it with make_encoding_model(..., c2_prototypes=...) to predict")
        return c2_features(lum, self.c2_prototypes, self.n_orientations, self.wavelengths)

    def _c2_drive(self, c2):
        """Unscaled feature drive: z-scored C2 features through the voxels' tuning, float [S, V_higher]."""
        higher = np.flatnonzero(~self.is_early)
        return ((c2 - self.c2_mean_) / self.c2_std_) @ self.feature_tuning[higher].T

    def _layer_drives(self, features):
        """Unscaled drive of each deep-network layer: PC scores through the voxels' tuning, list of [S, V_higher]."""
        from mindvis.simulate.deepnet import LAYERS

        higher = np.flatnonzero(~self.is_early)
        drives = []
        for index, layer in enumerate(LAYERS):
            scores = (np.asarray(features[layer], dtype=np.float64) - self.pca_means_[index]) \
                @ self.pca_components_[index].T
            columns = np.flatnonzero(self.feature_layer == index)
            drives.append(scores @ self.feature_tuning[np.ix_(higher, columns)].T)
        return drives

    def _deepnet_drive(self, features):
        """Deep-network drive of the higher voxels, each layer at unit mean square, weighted; float [S, V_higher]."""
        higher = np.flatnonzero(~self.is_early)
        return sum(self.layer_weights[higher, index] * drive / scale
                   for index, (drive, scale) in enumerate(zip(self._layer_drives(features), self.layer_scales_)))

    def _features(self, images, features):
        """The deep-network features of the images: the ones given, or computed now."""
        if features is not None:
            return features
        from mindvis.simulate.deepnet import layer_features

        return layer_features(images, self.feature_network)

    def _category_drive(self, lum, labels):
        """Category drive of the higher voxels, unit mean square over them, float [S, V_higher]."""
        if self.category_model == "features":
            return self._c2_drive(self._c2(lum)) / self.category_scale_
        return self.category_tuning[np.flatnonzero(~self.is_early)][:, labels].T

    def _higher_drive(self, lum, category):
        """Category and shape drive through a soft rectifier, float32 [S, V_higher]."""
        higher = np.flatnonzero(~self.is_early)
        shapes = (shape_features(lum) - self.shape_mean_) / self.shape_std_
        n_shape = shapes.shape[1]
        shape = shapes @ self.shape_weights[higher].T / np.sqrt(n_shape)
        drive = 1.0 + self.category_weight[higher] * category + self.shape_weight[higher] * shape
        return np.logaddexp(0, drive).astype(np.float32)  # softplus: responses stay positive

    def _higher_response(self, images, lum, labels, features):
        """Higher-voxel drive through the soft rectifier, before the calibrated scale, float32 [S, V_higher]."""
        if self.category_model == "deepnet":
            return np.logaddexp(0, 1.0 + self._deepnet_drive(self._features(images, features))).astype(np.float32)
        return self._higher_drive(lum, self._category_drive(lum, labels))

    def category_drive(self, images, labels=None, features=None):
        """The category drive of the higher voxels alone, before weighting, shape and rectification.

        Under every category model it has unit mean square over higher voxels
        (on the calibration set, for ``features`` and ``deepnet``).

        Parameters
        ----------
        images : uint8 [S, H, W, C]
        labels : int [S], optional
            Needed by the ``labels`` category model only.
        features : dict, optional
            ``deepnet`` only: the images' layer features
            (:func:`mindvis.simulate.deepnet.layer_features`); computed when not given.

        Returns
        -------
        float32 [S, V_higher]
            Columns in the order of ``np.flatnonzero(~is_early)``.
        """
        if self.category_model != "labels" and self.shape_mean_ is None:
            raise RuntimeError("call calibrate() on the stimulus set before category_drive()")
        labels = self._check_labels(labels, len(images))
        if self.category_model == "deepnet":
            # The weighted sum of the layers' drives, rescaled to unit mean square like the others.
            return np.asarray(self._deepnet_drive(self._features(images, features)) / self.category_scale_,
                              dtype=np.float32)
        return np.asarray(self._category_drive(luminance(images), labels), dtype=np.float32)

    def calibrate(self, images, labels=None, features=None):
        """Fix the response scale and the feature normalisations on a stimulus set.

        After calibration the mean response over the set and over voxels of a
        kind (early or higher) is ``percent_signal_change``.

        Parameters
        ----------
        images : uint8 [S, H, W, C]
        labels : int [S], optional
            Needed by the ``labels`` category model only.
        features : dict, optional
            ``deepnet`` only: the images' layer features; computed when not given.

        Returns
        -------
        self
        """
        self.calibrate_predict(images, labels, features)
        return self

    def _fit_components(self, features):
        """``deepnet``: each layer's top principal components and its drive's scale, on the calibration set."""
        from mindvis.simulate.deepnet import LAYERS

        self.pca_means_, self.pca_components_, self.layer_scales_ = [], [], []
        for index, layer in enumerate(LAYERS):
            values = np.asarray(features[layer], dtype=np.float64)
            mean = values.mean(axis=0)
            n_components = int(np.sum(self.feature_layer == index))
            _, _, vt = np.linalg.svd(values - mean, full_matrices=False)
            components = np.zeros((n_components, values.shape[1]))
            kept = min(n_components, len(vt))
            components[:kept] = vt[:kept]
            # Fix each component's sign (largest loading positive), so the model is the same on any LAPACK.
            signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(axis=1)])
            components *= np.where(signs == 0, 1.0, signs)[:, None]
            self.pca_means_.append(mean)
            self.pca_components_.append(components)
        self.layer_scales_ = [float(max(np.sqrt(np.mean(drive ** 2)), 1e-12))
                              for drive in self._layer_drives(features)]

    def calibrate_predict(self, images, labels=None, features=None):
        """:meth:`calibrate` on a stimulus set and return :meth:`predict` of it, computing the drives once.

        Returns
        -------
        float32 [S, V]
        """
        labels = self._check_labels(labels, len(images))
        lum = luminance(images)
        shapes = shape_features(lum)
        self.shape_mean_ = shapes.mean(axis=0)
        self.shape_std_ = np.maximum(shapes.std(axis=0), 1e-3)
        out = np.zeros((len(lum), self.n_voxels), dtype=np.float32)
        early = self.is_early
        if early.any():
            drive = np.concatenate([self._early_drive(lum[start:start + 256]) for start in range(0, len(lum), 256)])
            self.early_scale_ = float(drive.mean())
            out[:, early] = drive / self.early_scale_
        if (~early).any():
            if self.category_model == "deepnet":
                features = self._features(images, features)
                self._fit_components(features)
                raw = self._deepnet_drive(features)
                self.category_scale_ = float(max(np.sqrt(np.mean(raw ** 2)), 1e-12))
                drive = np.logaddexp(0, 1.0 + raw).astype(np.float32)  # as _higher_response, the drive once
            elif self.category_model == "features":
                c2 = self._c2(lum)
                self.c2_mean_ = c2.mean(axis=0)
                self.c2_std_ = np.maximum(c2.std(axis=0), 1e-3)
                raw = self._c2_drive(c2)
                self.category_scale_ = float(np.sqrt(np.mean(raw ** 2)))
                drive = self._higher_drive(lum, raw / self.category_scale_)
            else:
                drive = self._higher_drive(lum, self._category_drive(lum, labels))
            self.higher_scale_ = float(drive.mean())
            out[:, ~early] = drive / self.higher_scale_
        return out * self.gain * self.percent_signal_change

    def predict(self, images, labels=None, chunk=256, features=None):
        """Noise-free evoked response to each image.

        Parameters
        ----------
        images : uint8 [S, H, W, C]
        labels : int [S], optional
            Category of each image: drives the category tuning of the
            ``labels`` model (required there); the other models ignore it.
        chunk : int
            Images processed at once (bounds memory).
        features : dict, optional
            ``deepnet`` only: the images' layer features; computed when not given.

        Returns
        -------
        float32 [S, V]
            Peak percent signal change per image and voxel.
        """
        if self.shape_mean_ is None:
            raise RuntimeError("call calibrate() on the stimulus set before predict()")
        labels = self._check_labels(labels, len(images))
        out = np.zeros((len(images), self.n_voxels), dtype=np.float32)
        early = self.is_early
        for start in range(0, len(images), chunk):
            lum = luminance(images[start:start + chunk])
            rows = slice(start, start + len(lum))
            if early.any():
                out[rows, early] = self._early_drive(lum) / self.early_scale_
            if (~early).any():
                block = None if features is None else {layer: values[rows] for layer, values in features.items()}
                out[rows, ~early] = self._higher_response(images[rows], lum, None if labels is None else labels[rows],
                                                          block) / self.higher_scale_
        return out * self.gain * self.percent_signal_change


def smooth_fields(grid_shape, n_fields, smoothness_vox, rng):
    """Spatially smooth Gaussian random fields on the grid.

    Returns
    -------
    float32 [n_fields, X, Y, Z]
    """
    from scipy import ndimage

    fields = np.empty((n_fields,) + tuple(grid_shape), dtype=np.float32)
    for index in range(n_fields):
        # Periodic boundaries keep the variance even up to the box edge; the visual ROIs sit far
        # enough from the edges that no patch wraps onto the other side.
        fields[index] = ndimage.gaussian_filter(rng.standard_normal(grid_shape), smoothness_vox, mode="wrap")
    return fields


def zscore_columns(values):
    """Each column of ``values [N, K]`` at mean 0 and sd 1 (a constant column stays 0)."""
    return (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-9)


@dataclass
class SharedMaps:
    """The template-space part of the tuning maps, common to every subject, and one subject's view of it.

    A subject's map is ``sqrt(1 - weight) * individual + sqrt(weight) * shared``
    (both smooth fields of the same smoothness, so of equal variance) before
    the columns are z-scored over the higher voxels: ``weight`` 0 gives
    independent maps, 1 the same map in every subject up to ``offset_vox``.

    Attributes
    ----------
    fields : float32 [n_maps, X, Y, Z]
        Drawn from ``simulate.population_seed`` alone (:func:`draw_shared_maps`).
    weight : float
        ``simulate.shared_tuning``, in [0, 1].
    offset_vox : float [3]
        This subject's displacement of the shared maps (grid voxels): the
        residual misalignment after anatomical normalisation.
    """

    fields: np.ndarray
    weight: float
    offset_vox: np.ndarray

    def sample(self, ijk):
        """The shared maps at voxel indices ``ijk`` int [V, 3], read ``offset_vox`` away; float [V, n_maps].

        Linear interpolation, periodic at the box edges as the fields are.
        """
        from scipy import ndimage

        positions = (np.asarray(ijk, dtype=np.float64) + np.asarray(self.offset_vox, dtype=np.float64)).T
        return np.stack([ndimage.map_coordinates(field, positions, order=1, mode="grid-wrap")
                         for field in self.fields], axis=1)


def draw_shared_maps(grid_shape, n_maps, resolution_mm, rng, smoothness_mm=TUNING_SMOOTHNESS_MM):
    """The shared template-space tuning fields, float32 [n_maps, X, Y, Z] (draw ``rng`` from the population seed)."""
    return smooth_fields(grid_shape, n_maps, smoothness_mm / resolution_mm, rng)


def n_tuning_maps(category_model, n_classes, n_prototypes=C2_PROTOTYPES):
    """How many smooth maps the higher voxels' tuning reads: category (or feature) maps, then shape maps."""
    if category_model == "labels":
        return n_classes + len(SHAPE_FEATURE_NAMES)
    if category_model == "features":
        return n_prototypes + len(SHAPE_FEATURE_NAMES)
    return 2 * DEEPNET_COMPONENTS  # deepnet: no silhouette shape features


def make_encoding_model(layout, n_classes, section, rng, c2_prototypes=None, shared=None):
    """Draw one subject's voxel tuning.

    Parameters
    ----------
    layout : mindvis.simulate.geometry.VoxelLayout
    n_classes : int
        Object categories the higher voxels are tuned to (``labels`` category model).
    section : dict
        The ``simulate`` config section (``n_orientations``, ``gabor_wavelengths``,
        ``percent_signal_change``, ``category_model``).
    rng : numpy.random.Generator
    c2_prototypes : float32 [K_c2, O, P, P], optional
        ``features`` category model: the S2 prototypes, shared by all subjects
        (:func:`draw_c2_prototypes`). Without them the model has its tuning
        (``C2_PROTOTYPES`` features) but cannot predict, which is all a rest
        subject needs. Under the ``labels`` model it must be None.
    shared : SharedMaps, optional
        The template-space part of the higher areas' tuning maps (as many maps
        as :func:`n_tuning_maps`). None: the maps are the subject's alone.
        The subject's own maps are drawn from ``rng`` either way, so every
        other draw is unchanged by it.

    Returns
    -------
    EncodingModel
        Uncalibrated: call :meth:`EncodingModel.calibrate` before predicting.
    """
    n_voxels = layout.n_voxels
    names = layout.roi_names
    early = layout.is_early
    n_orientations = int(section["n_orientations"])
    wavelengths = tuple(float(w) for w in section["gabor_wavelengths"])
    n_features = n_orientations * len(wavelengths)
    n_shape = len(SHAPE_FEATURE_NAMES)
    category_model = section["category_model"]
    if category_model not in CATEGORY_MODELS:
        from mindvis.errors import MindvisError

        raise MindvisError(f"unknown category model '{category_model}'", key="simulate.category_model",
                           fix=f"use one of {', '.join(CATEGORY_MODELS)}.")
    if category_model != "features" and c2_prototypes is not None:
        raise ValueError("C2 prototypes are only used by the features category model")
    if c2_prototypes is not None and np.shape(c2_prototypes)[1:] != (n_orientations, S2_PATCH_SIDE, S2_PATCH_SIDE):
        raise ValueError(f"C2 prototypes must be [K, {n_orientations}, {S2_PATCH_SIDE}, {S2_PATCH_SIDE}], "
                         f"got {np.shape(c2_prototypes)}")
    # The label model's maps are one per class; the feature model's one per C2 feature.
    # The deepnet model's maps are one per principal component of each layer, and it has no shape maps.
    n_category_maps = n_classes if category_model == "labels" else (
        2 * DEEPNET_COMPONENTS if category_model == "deepnet" else
        C2_PROTOTYPES if c2_prototypes is None else len(c2_prototypes))
    if category_model == "deepnet":
        n_shape = 0

    nan = np.full(n_voxels, np.nan, dtype=np.float32)
    prf_x, prf_y, prf_sigma, exponent = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    feature_weights = np.full((n_voxels, n_features), np.nan, dtype=np.float32)
    category_tuning = np.full((n_voxels, n_classes), np.nan, dtype=np.float32)
    shape_weights = np.full((n_voxels, n_shape), np.nan, dtype=np.float32)
    feature_tuning = (np.full((n_voxels, n_category_maps), np.nan, dtype=np.float32)
                      if category_model != "labels" else None)
    category_weight, shape_weight = nan.copy(), nan.copy()

    # Early: receptive fields on the retinotopic map.
    ecc = layout.eccentricity[early].astype(np.float64)
    angle = layout.polar_angle[early].astype(np.float64)
    # Each hemisphere sees the opposite half of the visual field.
    prf_x[early] = -layout.hemisphere[early] * ecc * np.cos(angle) + rng.normal(0, PRF_SCATTER, early.sum())
    prf_y[early] = ecc * np.sin(angle) + rng.normal(0, PRF_SCATTER, early.sum())
    intercept = np.array([PRF_SIZE[n][0] for n in names[early]])
    slope = np.array([PRF_SIZE[n][1] for n in names[early]])
    sigma = (intercept + slope * ecc) * np.exp(rng.normal(0, 0.15, early.sum()))
    prf_sigma[early] = sigma
    exponent[early] = [PRF_EXPONENT[n] for n in names[early]]
    # Spatial-frequency preference follows receptive-field size; orientation bias is weak and random.
    wavelength_hw = 2 * np.asarray(wavelengths)  # fraction of the side -> image half-widths
    preferred = WAVELENGTH_PER_SIZE * sigma
    sf_weights = np.exp(-np.log2(wavelength_hw[None] / preferred[:, None]) ** 2 / (2 * SF_BANDWIDTH_OCTAVES ** 2))
    orientations = np.arange(n_orientations) * np.pi / n_orientations
    bias = rng.uniform(0, MAX_ORIENTATION_BIAS, early.sum())
    preferred_orientation = rng.uniform(0, np.pi, early.sum())
    ori_weights = 1 + bias[:, None] * np.cos(2 * (orientations[None] - preferred_orientation[:, None]))
    weights = (sf_weights[:, :, None] * ori_weights[:, None, :]).reshape(early.sum(), n_features)
    feature_weights[early] = weights / weights.sum(axis=1, keepdims=True)

    # Higher: tuning read from smooth maps across cortex, so selectivity comes in patches.
    higher = ~early
    if higher.any():
        smoothness_vox = TUNING_SMOOTHNESS_MM / layout.grid.resolution_mm
        maps = smooth_fields(layout.grid.shape, n_category_maps + n_shape, smoothness_vox, rng)
        sampled = maps[:, layout.ijk[higher, 0], layout.ijk[higher, 1], layout.ijk[higher, 2]].T
        if shared is not None and shared.weight > 0:
            if len(shared.fields) != n_category_maps + n_shape:
                raise ValueError(f"{len(shared.fields)} shared maps for {n_category_maps + n_shape} tuning maps")
            sampled = (np.sqrt(1 - shared.weight) * sampled
                       + np.sqrt(shared.weight) * shared.sample(layout.ijk[higher]))
        sampled = zscore_columns(sampled)
        (category_tuning if category_model == "labels" else feature_tuning)[higher] = sampled[:, :n_category_maps]
        shape_weights[higher] = sampled[:, n_category_maps:]
        if category_model == "deepnet":
            layer_weights = np.full((n_voxels, 2), np.nan, dtype=np.float32)
            layer_weights[higher] = [DEEPNET_LAYER_WEIGHTS[n] for n in names[higher]]
        else:
            category_weight[higher] = [HIGHER_WEIGHTS[n]["category"] for n in names[higher]]
            shape_weight[higher] = [HIGHER_WEIGHTS[n]["shape"] for n in names[higher]]

    gain = np.exp(rng.normal(0, GAIN_SPREAD, n_voxels))
    return EncodingModel(
        is_early=early.copy(),
        prf_x=prf_x, prf_y=prf_y, prf_sigma=prf_sigma, exponent=exponent,
        feature_weights=feature_weights,
        category_tuning=category_tuning, shape_weights=shape_weights,
        category_weight=category_weight, shape_weight=shape_weight,
        gain=(gain / gain.mean()).astype(np.float32),
        n_orientations=n_orientations, wavelengths=wavelengths,
        percent_signal_change=float(section["percent_signal_change"]),
        category_model=category_model, feature_tuning=feature_tuning,
        c2_prototypes=None if c2_prototypes is None else np.asarray(c2_prototypes, dtype=np.float32),
        **({} if category_model != "deepnet" else {
            "feature_layer": np.repeat(np.arange(2), DEEPNET_COMPONENTS),
            "layer_weights": layer_weights if higher.any() else np.full((n_voxels, 2), np.nan, dtype=np.float32),
            "feature_network": section.get("feature_network", "efficientnet_lite0"),
        }),
    )
