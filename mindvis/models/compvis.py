"""CompVis latent-diffusion checkpoints (the ``.ckpt`` of ``cin256-v2``, which MinD-Vis fine-tunes) as diffusers modules.

latent-diffusion stores one ``LatentDiffusion`` state dict: the UNet
(openaimodel's ``UNetModel``) under ``model.diffusion_model.``, the first stage
(a VQ or KL autoencoder of taming's ``Encoder``/``Decoder``) under
``first_stage_model.``, the condition encoder under ``cond_stage_model.``, and
schedule buffers. Its YAML config (``model.params``) gives the sizes. This
module maps the UNet onto diffusers' ``UNet2DConditionModel`` and a VQ first
stage onto ``VQModel``, name by name, with every shape checked against the
module built from the config; what has no counterpart is listed, never dropped
in silence.

==================================================  ===================================================
openaimodel / taming name                           diffusers name
==================================================  ===================================================
``time_embed.0`` / ``.2``                           ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                                ``conv_in``
``input_blocks.n.0`` (ResBlock)                     ``down_blocks.l.resnets.j`` (``in_layers.0`` norm1,
                                                    ``in_layers.2`` conv1, ``emb_layers.1`` time_emb_proj,
                                                    ``out_layers.0`` norm2, ``out_layers.3`` conv2,
                                                    ``skip_connection`` conv_shortcut)
``input_blocks.n.1`` (SpatialTransformer)           ``down_blocks.l.attentions.j`` (same sub-names)
``input_blocks.n.0.op``                             ``down_blocks.l.downsamplers.0.conv``
``middle_block.0`` / ``.1`` / ``.2``                ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.n.0`` / ``.1``                      ``up_blocks.u.resnets.j`` / ``attentions.j``
``output_blocks.n.{1,2}.conv`` (Upsample)           ``up_blocks.u.upsamplers.0.conv``
``out.0`` / ``out.2``                               ``conv_norm_out`` / ``conv_out``
``encoder.down.i.block.j`` (``nin_shortcut``)        ``encoder.down_blocks.i.resnets.j`` (``conv_shortcut``)
``encoder.down.i.downsample.conv``                  ``encoder.down_blocks.i.downsamplers.0.conv``
``{en,de}coder.mid.block_1`` / ``block_2``          ``{en,de}coder.mid_block.resnets.0`` / ``.1``
``{en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}``   ``...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
                                                    (1 x 1 convolutions become linear weights)
``decoder.up.i`` (``i`` from the finest level)      ``decoder.up_blocks.(L - 1 - i)`` (from the coarsest)
``{en,de}coder.norm_out``                           ``{en,de}coder.conv_norm_out``
``quantize.embedding``, ``quant_conv``,             same names
``post_quant_conv``
==================================================  ===================================================

The UNet is built with ``class_embed_type="identity"`` (mindvis adds its pooled
fMRI condition to the timestep embedding; no weights), and the schedule is
latent-diffusion's ``linear`` one, ``linspace(sqrt(start), sqrt(end), T) ** 2``,
which is diffusers' ``scaled_linear``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from mindvis.errors import MindvisError

log = logging.getLogger(__name__)

#: ``model.params`` of latent-diffusion's ``configs/latent-diffusion/cin256-v2.yaml`` as MinD-Vis ships it
#: (``pretrains/ldm/label2img/config.yaml``; MinD-Vis adds ``cond_scale``, ``use_time_cond``, ``global_pool``).
CIN256_V2 = {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
    "conditioning_key": "crossattn", "parameterization": "eps", "scale_factor": 1.0,
    "unet_config": {"params": {
        "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
        "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
        "cond_scale": 1.0, "use_time_cond": True, "global_pool": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 8192,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": 1001, "embed_dim": 512}},
}

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VQ_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VQ_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# -- configs ----------------------------------------------------------------------------------------

def load_ldm_config(path):
    """``model.params`` of a latent-diffusion YAML config (e.g. MinD-Vis's ``label2img/config.yaml``)."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MindvisError(f"cannot read the latent-diffusion config ({err})", path=path, key="ldm.compvis_config",
                           fix="give the YAML that came with the checkpoint (model: params: unet_config: ...).") \
            from None
    params = ((loaded or {}).get("model") or {}).get("params") if isinstance(loaded, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise MindvisError("not a latent-diffusion config: model.params.unet_config / first_stage_config missing",
                           path=path, key="model.params", fix="give the checkpoint's latent-diffusion YAML.")
    return params


def _levels_with_attention(unet_params):
    mults = list(unet_params["channel_mult"])
    return [2 ** level in set(unet_params.get("attention_resolutions") or ()) for level in range(len(mults))]


def unet_config_from_ldm(unet_params):
    """``UNet2DConditionModel`` keyword arguments equal to openaimodel's ``UNetModel(**unet_params)``.

    Raises
    ------
    MindvisError
        For options this map does not cover (scale-shift norm, a class embedding, resblock up/down
        sampling, no spatial transformer).
    """
    params = dict(unet_params.get("params", unet_params))
    for key, bad, why in (("use_scale_shift_norm", True, "scale-shift ResBlocks"),
                          ("resblock_updown", True, "ResBlock up/down sampling"),
                          ("use_spatial_transformer", False, "attention without cross-attention transformers"),
                          ("legacy", False, "the non-legacy head layout")):
        if params.get(key, not bad) == bad:
            raise MindvisError(f"{key}: {bad} ({why}) is not supported by the converter", key=f"unet_config.{key}",
                               fix="convert a UNet of the cin256 / text-to-image kind.")
    if params.get("num_classes") is not None:
        raise MindvisError("a UNet with its own class embedding (num_classes) cannot take the pooled fMRI condition",
                           key="unet_config.num_classes", fix="use a cross-attention-conditioned LDM (cin256-v2).")
    mults = list(params["channel_mult"])
    channels = [int(params["model_channels"]) * m for m in mults]
    attention = _levels_with_attention(params)
    if params.get("num_head_channels", -1) not in (-1, None):
        heads = tuple(c // int(params["num_head_channels"]) for c in channels)
    else:
        heads = (int(params["num_heads"]),) * len(channels)
    return {
        "sample_size": int(params["image_size"]), "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "block_out_channels": tuple(channels), "layers_per_block": int(params["num_res_blocks"]),
        "cross_attention_dim": int(params["context_dim"]),
        # diffusers reads attention_head_dim as the number of heads (its naming quirk).
        "attention_head_dim": heads, "transformer_layers_per_block": int(params.get("transformer_depth", 1)),
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "class_embed_type": "identity", "flip_sin_to_cos": True, "freq_shift": 0,
        "norm_num_groups": 32, "norm_eps": 1e-5,
    }


def vq_config_from_ldm(first_stage_params, scale_factor=1.0):
    """``VQModel`` keyword arguments equal to latent-diffusion's ``VQModelInterface`` of ``first_stage_params``."""
    params = dict(first_stage_params.get("params", first_stage_params))
    dd = params["ddconfig"]
    if dd.get("double_z", False) or "n_embed" not in params:
        raise MindvisError("this first stage is a KL autoencoder (double_z / no n_embed), not a VQ one",
                           key="first_stage_config", fix="only VQ first stages (cin256-v2's VQ-f4) are converted.")
    if dd.get("attn_resolutions"):
        raise MindvisError(f"attention at resolutions {dd['attn_resolutions']} inside the VQ's levels has no "
                           "diffusers counterpart", key="first_stage_config.ddconfig.attn_resolutions",
                           fix="only first stages without per-level attention (cin256-v2's) are converted.")
    levels = len(dd["ch_mult"])
    return {
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(int(dd["ch"]) * m for m in dd["ch_mult"]),
        "layers_per_block": int(dd["num_res_blocks"]), "latent_channels": int(dd["z_channels"]),
        "num_vq_embeddings": int(params["n_embed"]), "vq_embed_dim": int(params["embed_dim"]),
        "norm_num_groups": 32, "sample_size": int(dd["resolution"]),
        # diffusers' default is SD's 0.18215; latent-diffusion's VQ LDMs use their scale_factor (1.0).
        "scaling_factor": float(scale_factor),
    }


def scheduler_config_from_ldm(params):
    """A DDPMScheduler config of the LDM's training schedule.

    latent-diffusion's ``linear`` schedule, ``linspace(sqrt(linear_start), sqrt(linear_end), timesteps) ** 2``,
    is diffusers' ``scaled_linear``; ``parameterization`` eps / v is ``epsilon`` / ``v_prediction``.
    Absent keys take latent-diffusion's defaults (1e-4, 2e-2, 1000, eps).
    """
    from diffusers import DDPMScheduler

    if params.get("beta_schedule", "linear") != "linear":
        raise MindvisError(f"beta schedule {params['beta_schedule']!r} is not converted", key="beta_schedule",
                           fix="only latent-diffusion's default linear schedule is supported.")
    parameterization = params.get("parameterization", "eps")
    prediction = {"eps": "epsilon", "v": "v_prediction"}.get(parameterization)
    if prediction is None:
        raise MindvisError(f"parameterization {parameterization!r} is not supported", key="parameterization",
                           fix="use an eps- or v-parameterised LDM.")
    scheduler = DDPMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)), beta_schedule="scaled_linear",
                              # latent-diffusion's DDPM defaults (not Stable Diffusion's 0.00085 / 0.012)
                              beta_start=float(params.get("linear_start", 1e-4)),
                              beta_end=float(params.get("linear_end", 2e-2)), prediction_type=prediction,
                              clip_sample=False)
    return dict(scheduler.config)


# -- state dicts ------------------------------------------------------------------------------------

def split_ldm_state(state):
    """A LatentDiffusion state dict by part: ``unet``, ``first_stage``, ``cond_stage``, ``ema``, ``other``
    (prefixes removed, except in ``other``: the schedule buffers such as ``betas``)."""
    parts = {"unet": {}, "first_stage": {}, "cond_stage": {}, "ema": {}, "other": {}}
    for key, value in state.items():
        for part, prefix in (("unet", UNET_PREFIX), ("first_stage", FIRST_STAGE_PREFIX),
                             ("cond_stage", COND_STAGE_PREFIX), ("ema", "model_ema.")):
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            parts["other"][key] = value
    return parts


def unet_key_map(unet_params):
    """{openaimodel module prefix: diffusers module prefix, kind} for the UNet of ``unet_params``."""
    params = dict(unet_params.get("params", unet_params))
    levels, blocks = len(params["channel_mult"]), int(params["num_res_blocks"])
    attention = _levels_with_attention(params)
    table = {"time_embed.0": ("time_embedding.linear_1", "plain"), "time_embed.2": ("time_embedding.linear_2", "plain"),
             "input_blocks.0.0": ("conv_in", "plain"), "out.0": ("conv_norm_out", "plain"),
             "out.2": ("conv_out", "plain"),
             "middle_block.0": ("mid_block.resnets.0", "resnet"), "middle_block.1": ("mid_block.attentions.0", "plain"),
             "middle_block.2": ("mid_block.resnets.1", "resnet")}
    index = 1
    for level in range(levels):
        for j in range(blocks):
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if attention[level]:
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "plain")
            index += 1
        if level != levels - 1:
            table[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "plain")
            index += 1
    index = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(blocks + 1):
            table[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", "resnet")
            if attention[level]:
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", "plain")
            if j == blocks and up != levels - 1:
                slot = 2 if attention[level] else 1
                table[f"output_blocks.{index}.{slot}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", "plain")
            index += 1
    return table


def vq_key_map(first_stage_params):
    """{taming module prefix: (diffusers prefix, kind)} for a VQ first stage of ``first_stage_params``."""
    params = dict(first_stage_params.get("params", first_stage_params))
    dd = params["ddconfig"]
    levels, blocks = len(dd["ch_mult"]), int(dd["num_res_blocks"])
    table = {name: (name, "plain") for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                                                 "decoder.conv_out", "quant_conv", "post_quant_conv", "quantize")}
    for side in ("encoder", "decoder"):
        table[f"{side}.norm_out"] = (f"{side}.conv_norm_out", "plain")
        table[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", "vq_resnet")
        table[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", "vq_resnet")
        table[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", "vq_attention")
    for level in range(levels):
        for j in range(blocks):
            table[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}", "vq_resnet")
        if level != levels - 1:
            table[f"encoder.down.{level}.downsample.conv"] = (f"encoder.down_blocks.{level}.downsamplers.0.conv",
                                                              "plain")
        up = levels - 1 - level
        for j in range(blocks + 1):
            table[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", "vq_resnet")
        if level != 0:
            table[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", "plain")
    return table


def _source_name(target, table, inner_for):
    """The checkpoint name (prefix removed) that ``table`` maps onto the diffusers name ``target``."""
    for prefix, (name, kind) in sorted(table.items(), key=lambda item: -len(item[1][0])):
        if target.startswith(name + "."):
            head, _, tail = target[len(name) + 1:].rpartition(".")
            inverse = {v: k for k, v in inner_for.get(kind, {}).items()}
            inner = inverse.get(head, head) if kind in inner_for else head
            return ".".join(part for part in (prefix, inner, tail) if part)
    return None


def _convert(source, table, target_state, inner_for, what, strict, squeeze=(), key_prefix=""):
    """Map ``source`` onto ``target_state`` by ``table``; check every shape. Returns (state, report).

    ``key_prefix`` (e.g. ``model.diffusion_model.``) goes before checkpoint names in error messages only.
    """
    import torch

    new_state, not_mapped, mismatch, mapped_keys = {}, {}, {}, []
    for key, tensor in source.items():
        parts = key.split(".")
        target = None
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                name, kind = table[prefix]
                rest = ".".join(parts[cut:])
                if kind in inner_for:
                    head, _, tail = rest.rpartition(".")
                    inner = inner_for[kind]
                    rest = f"{inner[head]}.{tail}" if head in inner else None
                target = None if rest is None else f"{name}.{rest}"
                break
        if target is None or target not in target_state:
            not_mapped[key] = f"no counterpart in diffusers' {what}"
            continue
        value = tensor
        if tuple(value.shape) != tuple(target_state[target].shape) and target.rpartition(".")[0].endswith(squeeze) \
                and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1 x 1 convolution that diffusers holds as a linear layer
        if tuple(value.shape) != tuple(target_state[target].shape):
            mismatch[key] = f"{tuple(tensor.shape)} -> {target} {tuple(target_state[target].shape)}"
            continue
        new_state[target] = value.detach().to(torch.float32).clone()
        mapped_keys.append(key)
    missing = sorted(set(target_state) - set(new_state))
    report = {"mapped": len(new_state), "mapped_keys": mapped_keys, "not_mapped": not_mapped, "missing": missing,
              "shape_mismatch": mismatch}
    if strict and (mismatch or missing):
        if mismatch:
            key = next(iter(mismatch))
            name, detail = key_prefix + key, mismatch[key]
        else:
            source_name = _source_name(missing[0], table, inner_for)
            name = key_prefix + source_name if source_name else missing[0]
            detail = f"not in the checkpoint (it fills {missing[0]})"
        raise MindvisError(f"the checkpoint's {what} does not fit its config: {name}: {detail} "
                           f"({len(mismatch)} shape mismatches, {len(missing)} missing tensors)", key=name,
                           fix="check that the latent-diffusion config is the checkpoint's own (ldm.compvis_config).")
    return new_state, report


def _meta_state(cls, config):
    """The state dict names and shapes of ``cls(**config)``, built without allocating its weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(**config).state_dict()


def convert_unet_state(ldm_state, unet_config, unet_params=None, strict=True):
    """openaimodel UNet tensors (``model.diffusion_model.`` removed) -> a ``UNet2DConditionModel`` state dict.

    Parameters
    ----------
    ldm_state : dict of str -> Tensor
        The UNet's tensors (``split_ldm_state(state)["unet"]``).
    unet_config : dict
        :func:`unet_config_from_ldm` of the UNet's ``unet_config.params``; every tensor is checked
        against a model built from it on the meta device.
    unet_params : dict, optional
        ``unet_config.params``; default: the block layout read back from ``unet_config``.
    strict : bool
        Raise (naming the checkpoint key and both shapes) on a missing or mis-shaped tensor;
        otherwise only report it.

    Returns
    -------
    state : dict
    report : dict
        ``mapped`` (count), ``mapped_keys``, ``not_mapped`` {key: reason} (e.g. MinD-Vis's
        ``time_embed_condtion.*``), ``missing`` [diffusers keys not filled], ``shape_mismatch``.
    """
    from diffusers import UNet2DConditionModel

    if unet_params is None:  # the key map needs only the number of levels, blocks and attention levels
        kinds = unet_config["down_block_types"]
        unet_params = {"channel_mult": [1] * len(kinds), "num_res_blocks": unet_config["layers_per_block"],
                       "attention_resolutions": [2 ** level for level, kind in enumerate(kinds)
                                                 if kind.startswith("CrossAttn")]}
    target = _meta_state(UNet2DConditionModel, unet_config)
    return _convert(ldm_state, unet_key_map(unet_params), target, {"resnet": _RESNET}, "UNet", strict,
                    key_prefix=UNET_PREFIX)


def convert_vq_state(ldm_state, vq_config, first_stage_params=None, strict=True):
    """taming VQ first-stage tensors (``first_stage_model.`` removed) -> a ``VQModel`` state dict.

    As :func:`convert_unet_state`; ``first_stage_params`` (``first_stage_config.params``) defaults to the
    layout read back from ``vq_config``. The mid attention's 1 x 1 convolutions ``[C, C, 1, 1]`` become
    linear weights ``[C, C]``.
    """
    from diffusers import VQModel

    if first_stage_params is None:
        first_stage_params = {"ddconfig": {"ch_mult": [1] * len(vq_config["block_out_channels"]),
                                           "num_res_blocks": vq_config["layers_per_block"]}}
    target = _meta_state(VQModel, vq_config)
    return _convert(ldm_state, vq_key_map(first_stage_params), target,
                    {"vq_resnet": _VQ_RESNET, "vq_attention": _VQ_ATTENTION}, "VQ first stage", strict,
                    squeeze=("to_q", "to_k", "to_v", "to_out.0"), key_prefix=FIRST_STAGE_PREFIX)


def compvis_generator_modules(ldm_state, params=None, strict=True):
    """The UNet, VQ first stage and schedule of a full LatentDiffusion state dict, as diffusers modules.

    Parameters
    ----------
    ldm_state : dict of str -> Tensor
        With latent-diffusion's prefixes (``model.diffusion_model.``, ``first_stage_model.``).
    params : dict, optional
        ``model.params`` of its config; default :data:`CIN256_V2`.

    Returns
    -------
    vq : diffusers.VQModel
    unet : diffusers.UNet2DConditionModel
    scheduler_config : dict
    report : dict
        ``unet`` and ``first_stage`` reports; ``not_mapped`` {full key: reason} over the whole file
        (the condition stage, schedule buffers and UNet extras included); ``mapped_keys`` (full keys).
    """
    import torch
    from diffusers import UNet2DConditionModel, VQModel

    params = copy.deepcopy(params or CIN256_V2)
    parts = split_ldm_state(ldm_state)
    if not parts["unet"]:
        raise MindvisError("no UNet tensors (model.diffusion_model.*) in the state dict", key=UNET_PREFIX,
                           fix="give a latent-diffusion checkpoint (its weights under 'state_dict').")
    unet_params = params["unet_config"].get("params", params["unet_config"])
    unet_config = unet_config_from_ldm(unet_params)
    # A scale_by_std LDM stores the scale it measured as a buffer; otherwise the config's (default 1.0) holds.
    stored_scale = parts["other"].get("scale_factor")
    scale_factor = float(stored_scale) if stored_scale is not None else float(params.get("scale_factor", 1.0))
    vq_config = vq_config_from_ldm(params["first_stage_config"], scale_factor)
    unet_state, unet_report = convert_unet_state(parts["unet"], unet_config, unet_params, strict)
    vq_state, vq_report = convert_vq_state(parts["first_stage"], vq_config, params["first_stage_config"], strict)
    torch.manual_seed(0)  # tensors left unfilled (strict=False) get a reproducible start
    unet = UNet2DConditionModel(**unet_config)
    vq = VQModel(**vq_config)
    unet.load_state_dict({**unet.state_dict(), **unet_state}, strict=True)
    vq.load_state_dict({**vq.state_dict(), **vq_state}, strict=True)
    scheduler_config = scheduler_config_from_ldm(params)
    not_mapped = {UNET_PREFIX + k: v for k, v in unet_report["not_mapped"].items()}
    not_mapped.update({FIRST_STAGE_PREFIX + k: v for k, v in vq_report["not_mapped"].items()})
    not_mapped.update({COND_STAGE_PREFIX + k: "the condition stage (replaced by the fMRI conditioner)"
                       for k in parts["cond_stage"]})
    not_mapped.update({"model_ema." + k: "EMA copy (the non-EMA weights are converted)" for k in parts["ema"]})
    _check_schedule(parts["other"], scheduler_config)
    not_mapped.update({k: "schedule buffer (recomputed by the scheduler)" if k != "scale_factor" else
                       "the latent scale: the VQModel's scaling_factor" for k in parts["other"]})
    mapped = [UNET_PREFIX + k for k in unet_report.pop("mapped_keys")]
    mapped += [FIRST_STAGE_PREFIX + k for k in vq_report.pop("mapped_keys")]
    return vq.eval(), unet.eval(), scheduler_config, {"unet": unet_report, "first_stage": vq_report,
                                                      "not_mapped": not_mapped, "mapped_keys": mapped}


def _check_schedule(buffers, scheduler_config):
    """The checkpoint's own ``betas`` (when stored) must equal the converted schedule."""
    import torch
    from diffusers import DDPMScheduler

    if "betas" not in buffers:
        return
    betas = DDPMScheduler.from_config(scheduler_config).betas.double()
    stored = buffers["betas"].double()
    if stored.shape != betas.shape or not torch.allclose(stored, betas, rtol=1e-4, atol=1e-7):
        raise MindvisError("the checkpoint's betas differ from its config's schedule", key="betas",
                           fix="give the latent-diffusion config that belongs to the checkpoint (ldm.compvis_config).")


def import_compvis_checkpoint(checkpoint, out_dir, config=None, image_size=None, context_tokens=None):
    """Convert a CompVis ``.ckpt`` into a diffusers-format generator folder mindvis loads as ``ldm.base``.

    Parameters
    ----------
    checkpoint : path
        ``model.ckpt`` (weights under ``state_dict``) or a bare LatentDiffusion state dict, read with
        ``torch.load(weights_only=True)`` (:func:`~mindvis.models.mindvis_checkpoint.load_pickled_checkpoint`).
    out_dir : path
        Receives ``vae/`` (the VQModel), ``unet/``, ``scheduler/``, ``generator.json`` and
        ``import_report.json``; written in a temporary folder and moved into place when complete.
    config : path or dict, optional
        The latent-diffusion YAML or its ``model.params``; default :data:`CIN256_V2`.
    image_size : int, optional
        Generated image size; default the first stage's resolution (256).
    context_tokens : int, optional
        Context length recorded for the decoder's mapper; default 77 (MinD-Vis's).

    Returns
    -------
    dict
        The import report.
    """
    from mindvis.models.ldm import Generator, save_generator
    from mindvis.models.mindvis_checkpoint import load_pickled_checkpoint
    from mindvis.utils.io import atomic_folder, sha256_file, software_versions, write_json_atomic

    import torch

    path = Path(checkpoint)
    if not path.exists():
        raise MindvisError("checkpoint not found", path=path, key="ldm.base",
                           fix="point ldm.base at the .ckpt file (cin256-v2: pretrains/ldm/label2img/model.ckpt).")
    params = config if isinstance(config, dict) else (load_ldm_config(config) if config else CIN256_V2)
    try:
        loaded, stand_ins = load_pickled_checkpoint(path)
    except MindvisError as error:  # its fix names MinD-Vis's encoder file
        raise MindvisError(error.message, path=path, key=error.key,
                           fix="give a CompVis latent-diffusion checkpoint (.ckpt, weights under 'state_dict').") \
            from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise MindvisError("no state dict of tensors (under 'state_dict') in the file", path=path, key="state_dict",
                           fix="give a latent-diffusion checkpoint (.ckpt).")
    try:
        vq, unet, scheduler_config, report = compvis_generator_modules(state, params)
    except MindvisError as error:
        raise MindvisError(error.message, path=path, key=error.key, fix=error.fix) from None
    first_stage = params["first_stage_config"].get("params", params["first_stage_config"])
    size = int(image_size or first_stage["ddconfig"]["resolution"])
    generator = Generator(vae=vq, unet=unet, scheduler_config=scheduler_config, image_size=size,
                          context_tokens=int(context_tokens or 77), source=str(path))
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as staging:
        save_generator(generator, staging, extra={"source": "compvis", "checkpoint": str(path),
                                                  "ldm_config": params})
        full_report = {"source": str(path), "source_sha256": sha256_file(path), "pickled_classes_replaced": stand_ins,
                       "ldm_config": params, "n_tensors": len(state), "n_mapped": len(report["mapped_keys"]),
                       "unet": report["unet"], "first_stage": report["first_stage"],
                       "not_mapped": report["not_mapped"], "versions": software_versions()}
        write_json_atomic(staging / "import_report.json", json.loads(json.dumps(full_report, default=str)))
    log.info("converted %s: %d of %d tensors into %s (%d not mapped)", path, len(report["mapped_keys"]), len(state),
             out_dir, len(report["not_mapped"]))
    return full_report
