"""Attention-based voxel importance and its brain map.

Which voxels drive decoding? DC-LDM reads the fMRI only through the
cross-attention context: each image position of the UNet attends to the
``T`` context tokens (the Prompt-to-Prompt maps recorded by
:mod:`mindvis.generate.attention`), and each context token is a learned mix
of the SC-MBM encoder's patch tokens (``attention/token_weights``), patch
token ``l`` holding voxels ``[l * patch_size, (l + 1) * patch_size)``
(:mod:`mindvis.models.mbm`). Chaining the two gives an attention-based
importance per voxel:

``mass[t]`` = mean over denoising steps, recorded stimuli and image
positions of the attention on token ``t`` (the masses sum to 1);

``importance[v]`` = sum over ``t`` of ``mass[t] * token_weights[t, 1 + l(v)]``
with ``l(v) = v // patch_size``.

It says where the generator *looks* in the voxel vector, not how a voxel's
value changes the image (that would be a gradient-based map); voxels sharing
a patch token share one value.

A decoder with a linear *voxel path* (:class:`~mindvis.models.conditioning.FmriConditioner`
with ``n_voxels``) also reads every voxel directly: its weight-based map
(:func:`voxel_path_importance`) is the norm of the weights from each voxel to
the condition, which is also the gradient of the condition with respect to
that voxel along the path. Like any decoder's weights, it can be large for a
voxel that cancels noise rather than one that carries the signal (Haufe et
al., NeuroImage 2014).
"""

from __future__ import annotations

import numpy as np

from mindvis.errors import MindvisError


def token_attention_mass(maps):
    """Mean attention each context token receives.

    Parameters
    ----------
    maps : float [S, A, h, w, T]
        Cross-attention maps (``samples.h5`` ``attention/maps``): S steps, A stimuli,
        h x w latent positions, T context tokens; each position's weights sum to 1.

    Returns
    -------
    numpy.ndarray
        float64 [T], the mean over steps, stimuli and positions (sums to 1).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 5:
        raise ValueError(f"attention maps must be [S, A, h, w, T], found shape {maps.shape}")
    return maps.reshape(-1, maps.shape[-1]).mean(axis=0)


def voxel_importance(maps, token_weights, patch_size, n_voxels, path=None):
    """Attention-based importance of every voxel (definition in the module docstring).

    Parameters
    ----------
    maps : float [S, A, h, w, T]
    token_weights : float [T, 1 + L]
        Column 0 is the encoder's class token (no voxels), columns 1.. the L patch tokens.
    patch_size : int
        Voxels per patch token.
    n_voxels : int
        Voxels of ``responses.h5`` (the last patch may be padding beyond them).
    path : path, optional
        The ``samples.h5`` the arrays came from, named in errors.

    Returns
    -------
    numpy.ndarray
        float64 [n_voxels], non-negative; sums to at most 1 (the class token's share is left out).
    """
    mass = token_attention_mass(maps)
    token_weights = np.asarray(token_weights, dtype=np.float64)
    if token_weights.ndim != 2 or token_weights.shape[0] != len(mass):
        raise MindvisError(f"attention/token_weights has shape {token_weights.shape}, expected [{len(mass)}, 1 + L]",
                           path=path, key="attention/token_weights", fix="regenerate the samples with this version.")
    n_patches = token_weights.shape[1] - 1
    if n_patches * int(patch_size) < int(n_voxels):
        raise MindvisError(f"{n_patches} patch tokens of {patch_size} voxels cannot cover {n_voxels} voxels",
                           path=path, key="patch_size", fix="regenerate the samples with the subject's own decoder.")
    patch_importance = mass @ token_weights[:, 1:]
    return np.repeat(patch_importance, int(patch_size))[:int(n_voxels)]


def voxel_path_importance(model_dir):
    """Weight-based importance of every voxel in a decoder's linear voxel path, or None without one.

    Parameters
    ----------
    model_dir : path
        A fine-tuned decoder folder (``dcldm.safetensors``).

    Returns
    -------
    numpy.ndarray or None
        float64 [V]: the Euclidean norm of ``conditioner.voxel_map.weight[:, v]``, normalised to sum to 1.
    """
    from pathlib import Path

    from safetensors import safe_open

    from mindvis.models.dcldm import MODEL_FILE

    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="numpy") as handle:
        if "conditioner.voxel_map.weight" not in handle.keys():
            return None
        weight = handle.get_tensor("conditioner.voxel_map.weight").astype(np.float64)
    norms = np.linalg.norm(weight, axis=0)
    return norms / max(norms.sum(), 1e-12)


def brain_map_png(importance, voxel_ijk, affine, volume_shape, title):
    """Draw voxel importance on the MNI152 template with nilearn's ``plot_stat_map``.

    Parameters
    ----------
    importance : float [V]
    voxel_ijk, affine, volume_shape
        The grid of ``responses.h5``.
    title : str

    Returns
    -------
    bytes
        A PNG image.
    """
    from nilearn import datasets, plotting

    from mindvis.data.responses import voxels_to_nifti
    from mindvis.report.figures import figure_png, new_figure

    # Relative to the map's mean so that the colour scale reads "times the average voxel".
    importance = np.asarray(importance, dtype=np.float64)
    relative = importance / max(importance.mean(), 1e-12)
    image = voxels_to_nifti(relative, voxel_ijk, affine, volume_shape)
    figure = new_figure((9, 3.2))
    plotting.plot_stat_map(image, bg_img=datasets.load_mni152_template(), display_mode="ortho",
                           cut_coords=_peak_mm(relative, voxel_ijk, affine), threshold=1.0, colorbar=True,
                           cmap="hot", symmetric_cbar=False, vmin=0.0, title=title, figure=figure)
    return figure_png(figure)


def _peak_mm(values, voxel_ijk, affine):
    """World coordinates (mm) of the largest value, where the ortho cuts go."""
    ijk = np.asarray(voxel_ijk)[int(np.argmax(values))]
    return tuple(float(c) for c in (np.asarray(affine) @ np.append(ijk, 1.0))[:3])
