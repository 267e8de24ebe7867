"""Where the simulated voxels live: an MNI-space grid, the brain, and the visual ROIs.

The acquisition grid is an axis-aligned box in MNI space (the occipito-temporal
field of view of ``simulate.field_of_view``) at ``simulate.resolution_mm``
isotropic, with MNI (0, 0, 0) on a grid point. The brain comes from nilearn's
bundled MNI152 brain mask (no download), box-averaged onto the grid so edge
voxels carry a partial-volume fraction.

Visual ROIs are placed per subject and per hemisphere around stylised
anatomical anchors whose positions jitter from subject to subject (the group
template, :func:`template_layout`, places them at the un-jittered anchors with
the nominal voxel counts):

- early visual cortex (V1, V2, V3) is the brain tissue nearest a segment along
  the calcarine sulcus, from the occipital pole forward; V1 is the innermost
  shell around the segment, V2 the next and V3 the outermost (V2 and V3 do wrap
  around V1 in a real brain, although not as neat shells);
- higher visual cortex is the tissue nearest a lateral occipital (LOC) and a
  ventral occipito-temporal (VOT, fusiform) centre.

Early voxels get a stylised retinotopic position from their place around the
calcarine segment: eccentricity grows from the pole forward on a logarithmic
(cortical magnification) scale, polar angle follows the angle around the
segment (dorsal tissue sees the lower visual field, ventral the upper), and
each hemisphere sees the opposite half of the visual field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mindvis.errors import MindvisError

ROI_NAMES = ("V1", "V2", "V3", "LOC", "VOT")
EARLY_ROIS = ("V1", "V2", "V3")
HIGHER_ROIS = ("LOC", "VOT")

# Anchors for the right hemisphere in MNI mm (|x|; the left is the mirror image).
CALCARINE_POSTERIOR = np.array([8.0, -100.0, 2.0])
CALCARINE_ANTERIOR = np.array([12.0, -70.0, 10.0])
LOC_CENTRE = np.array([44.0, -76.0, 0.0])
VOT_CENTRE = np.array([34.0, -56.0, -14.0])
#: Share of early voxels in V1, V2, V3 (inner to outer shell).
EARLY_SHARES = (0.40, 0.33, 0.27)
#: Share of higher voxels in LOC (the rest are VOT).
LOC_SHARE = 0.45
#: Subject-to-subject jitter of the anchors (mm, per axis).
ANCHOR_JITTER_MM = 2.5
#: Eccentricity (in image half-widths) at the anterior end of the calcarine segment.
MAX_ECCENTRICITY = 1.3
#: Eccentricity scale of the logarithmic cortical magnification.
MAGNIFICATION_SCALE = 0.12


@dataclass
class Grid:
    """An MNI-space acquisition grid.

    Attributes
    ----------
    affine : float64 [4, 4]
        Voxel index (i, j, k) to MNI mm.
    shape : tuple of 3 int
    """

    affine: np.ndarray
    shape: tuple

    @property
    def resolution_mm(self):
        return float(self.affine[0, 0])

    def coordinates(self, ijk):
        """MNI mm of voxel indices ``ijk`` int [N, 3] -> float [N, 3]."""
        return np.asarray(ijk) @ self.affine[:3, :3].T + self.affine[:3, 3]


@dataclass
class VoxelLayout:
    """One subject's visual voxels.

    Voxels are ordered as ``np.nonzero`` of the ROI mask (C order over i, j, k).

    Attributes
    ----------
    grid : Grid
    ijk : int32 [V, 3]
        Voxel indices on the grid.
    mni : float32 [V, 3]
        Voxel centres in MNI mm.
    roi : int16 [V]
        1-based index into ``ROI_NAMES``.
    hemisphere : int8 [V]
        -1 left, +1 right.
    eccentricity, polar_angle : float32 [V]
        Retinotopic position of early voxels (image half-widths; radians, 0 on
        the horizontal meridian, positive in the upper field); NaN for higher voxels.
    """

    grid: Grid
    ijk: np.ndarray
    mni: np.ndarray
    roi: np.ndarray
    hemisphere: np.ndarray
    eccentricity: np.ndarray
    polar_angle: np.ndarray

    @property
    def n_voxels(self):
        return len(self.roi)

    @property
    def roi_names(self):
        """ROI name per voxel, str [V]."""
        return np.array([ROI_NAMES[index - 1] for index in self.roi], dtype=object)

    @property
    def is_early(self):
        return self.roi <= len(EARLY_ROIS)

    def label_volume(self):
        """Integer ROI labels on the grid (0 outside), int16 [X, Y, Z]."""
        volume = np.zeros(self.grid.shape, dtype=np.int16)
        volume[tuple(self.ijk.T)] = self.roi
        return volume


def make_grid(resolution_mm, field_of_view):
    """The acquisition grid covering ``field_of_view`` at ``resolution_mm``.

    Parameters
    ----------
    resolution_mm : float
    field_of_view : sequence of 6 float
        ``[x_min, x_max, y_min, y_max, z_min, z_max]`` in MNI mm.

    Returns
    -------
    Grid
    """
    bounds = np.asarray(field_of_view, dtype=float).reshape(3, 2)
    if np.any(bounds[:, 1] <= bounds[:, 0]):
        raise MindvisError(f"each maximum must exceed its minimum, got {list(field_of_view)}",
                           key="simulate.field_of_view", fix="give [x_min, x_max, y_min, y_max, z_min, z_max] in mm.")
    # Snap to multiples of the voxel size so MNI (0, 0, 0) is a voxel centre:
    # then the left and right hemispheres are mirror images on the grid.
    low = np.floor(bounds[:, 0] / resolution_mm) * resolution_mm
    high = np.ceil(bounds[:, 1] / resolution_mm) * resolution_mm
    shape = tuple(int(n) for n in np.round((high - low) / resolution_mm).astype(int) + 1)
    affine = np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
    affine[:3, 3] = low
    return Grid(affine=affine, shape=shape)


@functools.lru_cache(maxsize=4)
def _brain_fraction_cached(resolution_mm, field_of_view):
    from nilearn.datasets import load_mni152_brain_mask
    from scipy import ndimage

    grid = make_grid(resolution_mm, field_of_view)
    mask_img = load_mni152_brain_mask(resolution=1)
    mask = np.asarray(mask_img.dataobj, dtype=np.float32)
    mask_affine = mask_img.affine
    # Box-average over one target voxel, then sample at the target centres: the
    # fraction of each coarse voxel that is brain (a partial-volume map).
    width = max(1, int(round(resolution_mm / abs(mask_affine[0, 0]))))
    smoothed = ndimage.uniform_filter(mask, size=width, mode="constant")
    ijk = np.indices(grid.shape).reshape(3, -1).T
    mni = grid.coordinates(ijk)
    source_index = (mni - mask_affine[:3, 3]) @ np.linalg.inv(mask_affine[:3, :3]).T
    fraction = ndimage.map_coordinates(smoothed, source_index.T, order=1, mode="constant", cval=0.0)
    return grid, np.clip(fraction, 0, 1).reshape(grid.shape).astype(np.float32)


def brain_fraction(resolution_mm, field_of_view):
    """The MNI152 brain on the acquisition grid.

    Returns
    -------
    grid : Grid
    fraction : float32 [X, Y, Z]
        Fraction of each voxel inside nilearn's MNI152 brain mask (0-1).
    """
    grid, fraction = _brain_fraction_cached(float(resolution_mm), tuple(float(v) for v in field_of_view))
    return grid, fraction.copy()


def _segment_coordinates(points, start, end):
    """Position of ``points`` relative to the segment ``start`` -> ``end``.

    Returns
    -------
    along : float [N]
        Projection onto the segment, 0 at ``start`` and 1 at ``end`` (unclipped).
    distance : float [N]
        Distance to the nearest point of the segment (mm).
    angle : float [N]
        Angle around the segment (radians): 0 lateral, +pi/2 dorsal.
    """
    axis = end - start
    length = np.linalg.norm(axis)
    unit = axis / length
    offset = points - start
    along = offset @ unit / length
    nearest = start + np.clip(along, 0, 1)[:, None] * axis
    distance = np.linalg.norm(points - nearest, axis=1)
    # Cross-section basis: 'up' is MNI z made orthogonal to the axis, 'lateral' away from the midline.
    up = np.array([0.0, 0.0, 1.0]) - unit[2] * unit
    up /= np.linalg.norm(up)
    lateral = np.cross(unit, up)
    if lateral[0] * np.sign(start[0] if start[0] != 0 else 1.0) < 0:
        lateral = -lateral
    radial = points - (start + along[:, None] * axis)
    angle = np.arctan2(radial @ up, radial @ lateral)
    return along, distance, angle


def place_rois(resolution_mm, field_of_view, n_early, n_higher, rng, anchor_jitter_mm=ANCHOR_JITTER_MM):
    """Place one subject's early and higher visual voxels in the brain.

    Parameters
    ----------
    resolution_mm : float
    field_of_view : sequence of 6 float
    n_early, n_higher : int
        Voxel counts (split evenly over the hemispheres).
    rng : numpy.random.Generator or None
        Draws the anchor jitter (each subject its own anatomy); None (or
        ``anchor_jitter_mm`` 0) places the ROIs at the anchors themselves.
    anchor_jitter_mm : float
        Standard deviation of the jitter per axis.

    Returns
    -------
    VoxelLayout
    """
    grid, fraction = brain_fraction(resolution_mm, field_of_view)
    candidate_ijk = np.argwhere(fraction >= 0.5)
    candidate_mni = grid.coordinates(candidate_ijk)
    taken = np.zeros(len(candidate_ijk), dtype=bool)
    roi = np.zeros(len(candidate_ijk), dtype=np.int16)
    eccentricity = np.full(len(candidate_ijk), np.nan)
    polar_angle = np.full(len(candidate_ijk), np.nan)
    half = resolution_mm / 2

    for hemisphere in (-1, 1):
        mirror = np.array([hemisphere, 1.0, 1.0])
        # Voxels on the midline belong to neither hemisphere (the interhemispheric fissure).
        side = candidate_mni[:, 0] * hemisphere > half

        def jitter(anchor):
            if rng is None or anchor_jitter_mm == 0:
                return anchor * mirror
            return anchor * mirror + rng.normal(0.0, anchor_jitter_mm, 3)

        start, end = jitter(CALCARINE_POSTERIOR), jitter(CALCARINE_ANTERIOR)
        count = _hemisphere_count(n_early, hemisphere)
        along, distance, angle = _segment_coordinates(candidate_mni, start, end)
        pool = np.flatnonzero(side & ~taken)
        chosen = _take_nearest(pool, distance[pool], count, "simulate.n_early_voxels")
        taken[chosen] = True
        # Shells: V1 nearest the calcarine, then V2, then V3.
        order = chosen[np.argsort(distance[chosen], kind="stable")]
        bounds = np.round(np.cumsum(EARLY_SHARES) * len(order)).astype(int)
        for area, (lo, hi) in enumerate(zip(np.r_[0, bounds[:-1]], bounds), start=1):
            roi[order[lo:hi]] = area
        # Log-polar map: equal cortical distance covers more visual field in the periphery.
        # Rank, not raw position, so that tissue past the pole does not pile up at the fovea.
        position = np.argsort(np.argsort(along[chosen], kind="stable"), kind="stable") / max(len(chosen) - 1, 1)
        eccentricity[chosen] = MAGNIFICATION_SCALE * (
            np.exp(position * np.log1p(MAX_ECCENTRICITY / MAGNIFICATION_SCALE)) - 1)
        # Around the segment: lateral -> horizontal meridian, dorsal -> lower field, ventral -> upper.
        polar_angle[chosen] = -angle[chosen] / 2

        n_hemi_higher = _hemisphere_count(n_higher, hemisphere)
        n_loc = int(round(LOC_SHARE * n_hemi_higher))
        for area, centre, count in ((4, LOC_CENTRE, n_loc), (5, VOT_CENTRE, n_hemi_higher - n_loc)):
            pool = np.flatnonzero(side & ~taken)
            distance = np.linalg.norm(candidate_mni[pool] - jitter(centre), axis=1)
            chosen = _take_nearest(pool, distance, count, "simulate.n_higher_voxels")
            taken[chosen] = True
            roi[chosen] = area

    keep = np.flatnonzero(taken)  # argwhere order is C order, as np.nonzero of the mask
    return VoxelLayout(
        grid=grid,
        ijk=candidate_ijk[keep].astype(np.int32),
        mni=candidate_mni[keep].astype(np.float32),
        roi=roi[keep],
        hemisphere=np.sign(candidate_mni[keep, 0]).astype(np.int8),
        eccentricity=eccentricity[keep].astype(np.float32),
        polar_angle=polar_angle[keep].astype(np.float32),
    )


def template_layout(resolution_mm, field_of_view, n_early, n_higher):
    """The group template: every ROI at its un-jittered anchor with the nominal voxel counts.

    It is the shared voxel space of ``preprocess.space: template`` (the role HCP
    grayordinates play for real data): every subject's responses are read at
    these voxels, in this order (C order over i, j, k), so voxel (and SC-MBM
    token) ``i`` is the same place of the brain in every subject, whatever that
    subject's own (jittered, larger or smaller) ROIs.

    Parameters
    ----------
    resolution_mm : float
    field_of_view : sequence of 6 float
    n_early, n_higher : int
        ``simulate.n_early_voxels`` and ``simulate.n_higher_voxels``.

    Returns
    -------
    VoxelLayout
    """
    return place_rois(resolution_mm, field_of_view, n_early, n_higher, rng=None, anchor_jitter_mm=0.0)


def _take_nearest(pool, distance, count, key):
    """The ``count`` pool members with the smallest ``distance``; a clear error when the pool is too small."""
    if len(pool) < count:
        raise MindvisError(f"only {len(pool)} brain voxels are left in the field of view for {count} asked for",
                           key=key, fix="lower the voxel count, or widen simulate.field_of_view / "
                                        "lower simulate.resolution_mm.")
    return pool[np.argsort(distance, kind="stable")[:count]]


def _hemisphere_count(total, hemisphere):
    """Split ``total`` over the hemispheres (the right one takes the odd voxel)."""
    return total // 2 + (total % 2 if hemisphere > 0 else 0)
