"""A shared voxel space: one fixed set of voxels, in one fixed order, for every subject.

In ``preprocess.space: template`` every subject's responses are read at the
voxels of one group template mask (the simulator's un-jittered visual ROIs, or
a lab's MNI-space mask), in ``np.nonzero`` (C) order, so that voxel ``i`` (and
the SC-MBM token holding it) is the same place of the brain in every subject:
the role HCP grayordinates play for MinD-Vis's pretraining corpus.

A space is described by a small JSON-able dict, its *spec*:

``space``             ``template`` (shared) or ``native`` (each subject its own voxels)
``affine``            float [4][4], voxel index to world mm
``volume_shape``      int [3]
``n_voxels``          int
``voxel_ijk_sha256``  SHA-256 of the voxel indices (int32 [V, 3], C order bytes):
                      equal digests mean the same voxels in the same order
``roi_counts``        {ROI name: voxels}

plus anything its writer adds (the simulator's resolution, field of view and
nominal voxel counts). :func:`check_same_space` compares a subject's voxels
with a spec and names what differs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mindvis.errors import MindvisError

#: Absolute tolerance (mm) when comparing affines.
AFFINE_TOLERANCE = 1e-3


def ijk_digest(voxel_ijk):
    """SHA-256 of voxel indices ``voxel_ijk`` int [V, 3] (as int32, C order)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(voxel_ijk, dtype=np.int32)).tobytes()).hexdigest()


def space_spec(voxel_ijk, affine, volume_shape, voxel_roi=None, space="template", **extra):
    """The spec (see the module docstring) of a set of voxels.

    Parameters
    ----------
    voxel_ijk : int [V, 3]
    affine : float [4, 4]
    volume_shape : sequence of 3 int
    voxel_roi : sequence of str [V], optional
    space : str
    **extra
        Further JSON-able entries (e.g. ``resolution_mm``).

    Returns
    -------
    dict
    """
    voxel_ijk = np.asarray(voxel_ijk, dtype=np.int32)
    spec = {"space": space, "affine": np.asarray(affine, dtype=float).round(6).tolist(),
            "volume_shape": [int(n) for n in volume_shape], "n_voxels": int(len(voxel_ijk)),
            "voxel_ijk_sha256": ijk_digest(voxel_ijk)}
    if voxel_roi is not None:
        names, counts = np.unique(np.asarray(voxel_roi, dtype=str), return_counts=True)
        spec["roi_counts"] = {str(name): int(count) for name, count in zip(names, counts)}
    spec.update(extra)
    return spec


def same_space(spec, other):
    """Whether two specs describe the same voxels in the same order on the same grid."""
    return (spec["voxel_ijk_sha256"] == other["voxel_ijk_sha256"]
            and list(spec["volume_shape"]) == list(other["volume_shape"])
            and np.allclose(spec["affine"], other["affine"], atol=AFFINE_TOLERANCE))


def check_same_space(expected, voxel_ijk, affine, volume_shape, path, what, key="preprocess.space", fix=None):
    """Raise a clear error unless ``voxel_ijk`` on (``affine``, ``volume_shape``) is the ``expected`` space.

    Parameters
    ----------
    expected : dict
        A spec (e.g. a pretrained encoder's ``space.json``).
    voxel_ijk : int [V, 3]
    affine : float [4, 4]
    volume_shape : sequence of 3 int
    path : path
        The file the voxels came from (named in the error).
    what : str
        What ``expected`` belongs to, e.g. ``"the shipped SC-MBM encoder"``.
    key, fix : str, optional
        The config key and the remedy named in the error.

    Raises
    ------
    MindvisError
    """
    voxel_ijk = np.asarray(voxel_ijk)
    fix = fix or ("set preprocess.space: template with the template mask the encoder was pretrained in "
                  "(its space.json), and rerun preprocessing.")
    if list(volume_shape) != list(expected["volume_shape"]) or not np.allclose(affine, expected["affine"],
                                                                               atol=AFFINE_TOLERANCE):
        raise MindvisError(f"these voxels lie on a grid of shape {list(volume_shape)} and affine "
                           f"{np.asarray(affine).round(3).tolist()}, but {what} was pretrained on a grid of shape "
                           f"{expected['volume_shape']} and affine {np.asarray(expected['affine']).round(3).tolist()}",
                           path=path, key=key, fix=fix)
    if len(voxel_ijk) != expected["n_voxels"] or ijk_digest(voxel_ijk) != expected["voxel_ijk_sha256"]:
        raise MindvisError(f"these {len(voxel_ijk)} voxels are not the {expected['n_voxels']} template voxels "
                           f"{what} was pretrained on (or not in the same order): its token i would mean another "
                           "place of the brain", path=path, key=key, fix=fix)


#: The ``simulate`` keys that fix the simulator's template space (its grid and nominal ROI sizes).
SIMULATE_SPACE_KEYS = ("resolution_mm", "field_of_view", "n_early_voxels", "n_higher_voxels")


def check_space_config(config, spec, what, path=None):
    """Check that a config reads its subjects in the template space ``spec`` of a pretrained encoder.

    Compares, before any data exist, what the config decides: ``preprocess.space``
    must be ``template``; for simulated data with the simulator's template
    (``preprocess.template_mask: simulation``) the ``simulate`` keys that fix
    the template (:data:`SIMULATE_SPACE_KEYS`) must equal the encoder's. The
    voxels themselves are compared later, with :func:`check_same_space`, on
    each subject's ``responses.h5``.

    Parameters
    ----------
    config : dict
        A validated experiment config.
    spec : dict
        The encoder's ``space.json``.
    what : str
        The encoder, named in errors (e.g. ``"the shipped SC-MBM encoder (mbm.base: bundled)"``).
    path : path, optional
        The config file, named in errors.

    Raises
    ------
    MindvisError
        Naming the first key that differs and the value it needs.
    """
    template = spec.get("template") or {}
    source = config["data"]["source"]
    if source not in ("simulated", "bids"):
        raise MindvisError(f"{what} was pretrained in a shared template space ({spec['n_voxels']} voxels), but "
                           f"data.source {source!r} is read by an adapter that keeps each subject's own voxels",
                           path=path, key="mbm.base",
                           fix="set mbm.base: embedded (pretrained here on these subjects' voxels), or an SC-MBM "
                               "folder without a space.json.")
    if config["preprocess"]["space"] != "template":
        raise MindvisError(f"{what} was pretrained in a shared template space ({spec['n_voxels']} voxels), but "
                           f"preprocess.space is {config['preprocess']['space']!r}: each subject would be read at its "
                           "own voxels, and token i would mean another place of the brain in every subject",
                           path=path, key="preprocess.space",
                           fix="set preprocess.space: template (and rerun preprocessing), or set mbm.base: embedded.")
    simulated = config["data"]["source"] == "simulated" and config["preprocess"]["template_mask"] == "simulation"
    wanted = template.get("simulate")
    if simulated and wanted and template.get("template_mask") == "simulation":
        for key in SIMULATE_SPACE_KEYS:
            have, need = config["simulate"][key], wanted.get(key)
            if need is not None and not np.allclose(np.asarray(have, dtype=float), np.asarray(need, dtype=float)):
                raise MindvisError(f"simulate.{key} is {have!r}, but {what} was pretrained in the template space "
                                   f"of simulate.{key} {need!r} (resolution {wanted.get('resolution_mm')} mm, field "
                                   f"of view {wanted.get('field_of_view')}, {spec['n_voxels']} voxels)",
                                   path=path, key=f"simulate.{key}",
                                   fix=f"set simulate.{key}: {need!r}, or pretrain an encoder for this space "
                                       "(make sc-mbm with your settings, then mbm.base: <its folder>), or set "
                                       "mbm.base: embedded.")
