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

A map is drawn only through a path that was trained and carries signal
(:func:`attribution_paths`, from the decoder's ``dcldm.json`` and weights);
otherwise it is left out and the report says why:

* the attention-based map needs the encoder path (``conditioner.width_map``
  and ``token_map``) to have been trained, and to be the decoder's only route
  from fMRI to the condition: beside a voxel path each context token is the
  sum of both paths, and attention on it cannot be split between them (the
  encoder path even starts at exactly zero there). It carries signal when the
  decoder does: its 2-way identification (lower CI bound above 1/2) or its
  PixCorr (lower CI bound above the shuffled-pairs floor) in ``metrics.json``;
* the voxel-path map needs the path fitted by ridge on training trials with a
  validation error below that of the strongest regularisation tried (which
  predicts about the mean condition) by :data:`SIGNAL_MARGIN`.
"""

from __future__ import annotations

import numpy as np

from mindvis.errors import MindvisError

#: How much lower (as a fraction) the voxel-path ridge's validation error at its chosen alpha must be than at
#: the strongest alpha tried, which shrinks every voxel weight to almost nothing and leaves the mean condition:
#: a path that predicts held-out conditions no better than that carries no measurable signal.
SIGNAL_MARGIN = 0.01


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
        keys = set(handle.keys())
        if "conditioner.voxel_map.weight" in keys:
            weight = handle.get_tensor("conditioner.voxel_map.weight").astype(np.float64)
            if "conditioner.voxel_down.weight" in keys:  # a rank-r path: its product is the voxel map
                weight = weight @ handle.get_tensor("conditioner.voxel_down.weight").astype(np.float64)
        elif {"conditioner.readout.weight", "conditioner.voxel_scale"} <= keys:
            # A read-out of the voxels too: its voxel block, per unit of each voxel's own response
            scale = handle.get_tensor("conditioner.voxel_scale").astype(np.float64)
            if not len(scale) or not scale.any():
                return None
            weight = handle.get_tensor("conditioner.readout.weight")[:, -len(scale):].astype(np.float64) * scale
        else:
            return None
    norms = np.linalg.norm(weight, axis=0)
    return norms / max(norms.sum(), 1e-12)


def _decoder_signal(metrics):
    """Why the DC-LDM's test figures show it decodes something (None when they do not)."""
    def entry(row_id, metric):
        row = next((row for row in (metrics or {}).get("rows", []) if row["id"] == row_id and row["available"]), None)
        found = (row or {}).get("metrics", {}).get(metric)
        return found if found and found.get("value") is not None and found.get("ci") else None

    two_way = entry("dcldm", "two_way_id")
    if two_way and two_way["ci"][0] > 0.5:
        return f"the decoder's 2-way identification {two_way['value']:.3f} (CI from {two_way['ci'][0]:.3f}) > 1/2"
    pixcorr, floor = entry("dcldm", "pixcorr"), entry("shuffled-pairs", "pixcorr")
    if pixcorr and floor and pixcorr["ci"][0] > floor["value"]:
        return (f"the decoder's PixCorr {pixcorr['value']:.3f} (CI from {pixcorr['ci'][0]:.3f}) > the shuffled-pairs "
                f"floor {floor['value']:.3f}")
    return None


def attribution_paths(model_dir, metrics=None):
    """Which path each brain map may attribute importance through, or why it is left out.

    Parameters
    ----------
    model_dir : path or None
        The fine-tuned decoder folder (``dcldm.json``, ``dcldm.safetensors``).
    metrics : dict, optional
        The parsed ``metrics.json`` (the decoder's test figures, for the encoder path's signal).

    Returns
    -------
    dict
        ``attention`` and ``voxel``: each ``{"show": bool, "text": str}``, the path used or the reason.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    from mindvis.models.dcldm import META_FILE, MODEL_FILE

    folder = Path(model_dir) if model_dir else None
    if folder is None or not (folder / META_FILE).exists() or not (folder / MODEL_FILE).exists():
        reason = ("the samples name no fine-tuned decoder folder with dcldm.json and weights, so which path was "
                  "trained cannot be checked")
        return {"attention": {"show": False, "text": reason}, "voxel": {"show": False, "text": reason}}
    meta = json.loads((folder / META_FILE).read_text())
    trained = set(meta.get("trained_parameter_names") or [])
    with safe_open(str(folder / MODEL_FILE), framework="numpy") as handle:
        has_voxel_path = "conditioner.voxel_map.weight" in handle.keys()
        voxel_norm = float(np.linalg.norm(handle.get_tensor("conditioner.voxel_map.weight"))) if has_voxel_path else 0.0
        # A read-out that reads the voxels too (finetune.readout_inputs both, a voxel block weight above 0)
        if not has_voxel_path and "conditioner.voxel_scale" in handle.keys():
            scale = handle.get_tensor("conditioner.voxel_scale")
            has_voxel_path = bool(len(scale)) and bool(np.any(scale))
            voxel_norm = float(np.linalg.norm(handle.get_tensor("conditioner.readout.weight")[:, -len(scale):]
                                              * scale)) if has_voxel_path else 0.0

    # The mapper from SC-MBM tokens: FmriConditioner's width and token maps, or the read-out of every token.
    encoder_trained = ({"conditioner.width_map.weight", "conditioner.token_map.weight"} <= trained
                       or "conditioner.readout.weight" in trained)
    signal = _decoder_signal(metrics)
    if has_voxel_path:
        attention = {"show": False, "text": "the decoder also reads every voxel directly (its voxel path), so each "
                     "context token sums both paths and attention on it cannot be traced to SC-MBM patches alone"}
    elif not encoder_trained:
        attention = {"show": False, "text": "the SC-MBM encoder path's mapper (conditioner.width_map and token_map, or "
                     "conditioner.readout) was not among the trained parameters"}
    elif signal is None:
        attention = {"show": False, "text": "the decoder's test figures show no signal above the floors (2-way "
                     "identification not above 1/2, PixCorr not above the shuffled-pairs floor), so there is "
                     "nothing for attention to attribute"}
    else:
        attention = {"show": True, "text": f"through the SC-MBM encoder path (trained; the decoder's only route "
                     f"from fMRI to the condition), which carries signal: {signal}"}

    ridge = meta.get("voxel_path_ridge") or {}
    errors = {float(alpha): float(error) for alpha, error in (ridge.get("val_relative_error") or {}).items()}
    if not has_voxel_path:
        voxel = {"show": False, "text": "the decoder has no voxel path (MinD-Vis's mapper alone)"}
    elif voxel_norm == 0:
        voxel = {"show": False, "text": "the voxel path's weights are all zero (it was never fitted)"}
    elif not errors:
        voxel = {"show": False, "text": "the voxel path was not fitted by ridge on training trials, so no held-out "
                 "error says whether it carries signal"}
    else:
        chosen, strongest = errors.get(float(ridge["alpha"]), min(errors.values())), errors[max(errors)]
        further = ("then trained further by the diffusion loss" if "conditioner.voxel_map.weight" in trained
                   else "then kept fixed")
        if chosen > strongest * (1 - SIGNAL_MARGIN):
            voxel = {"show": False, "text": f"the voxel path's ridge predicts held-out conditions no better than its "
                     f"strongest regularisation (validation relative error {chosen:.3f} vs. {strongest:.3f}), so it "
                     f"carries no measurable signal"}
        else:
            voxel = {"show": True, "text": f"through the voxel path: ridge on training trials (alpha "
                     f"{float(ridge['alpha']):g} chosen on validation; validation relative error {chosen:.3f} vs. "
                     f"{strongest:.3f} at the strongest regularisation), {further}"}
    return {"attention": attention, "voxel": voxel}


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
