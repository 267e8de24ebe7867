"""Tiny checkpoints in CompVis latent-diffusion's and MinD-Vis's own layouts, for the converter tests.

The state dicts are written out from the structure of openaimodel's
``UNetModel``, taming's ``Encoder``/``Decoder`` with a ``VectorQuantizer``,
and MinD-Vis's ``cond_stage_model`` (its ``fmri_encoder``, ``channel_mapper``,
``dim_mapper``) and ``time_embed_condtion``: module by module, with the
original names and shapes, independently of the converter's key tables.
Weights are seeded random numbers.
"""

from __future__ import annotations

import copy

import torch

#: A cin256-shaped LDM at test size (GroupNorm(32) needs widths in multiples of 32).
TINY_LDM_PARAMS = {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 4, "channels": 3,
    "unet_config": {"params": {"image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                               "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                               "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
                               "context_dim": 16}},
    "first_stage_config": {"params": {"embed_dim": 3, "n_embed": 16,
                                      "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16,
                                                   "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
                                                   "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"params": {"n_classes": 11, "embed_dim": 16}},
}


class _Writer:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.state = {}

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.generator) * 0.1

    def linear(self, name, n_in, n_out, bias=True):
        self.state[f"{name}.weight"] = self.rand(n_out, n_in)
        if bias:
            self.state[f"{name}.bias"] = self.rand(n_out)

    def conv(self, name, n_in, n_out, kernel, bias=True):
        self.state[f"{name}.weight"] = self.rand(n_out, n_in, kernel, kernel)
        if bias:
            self.state[f"{name}.bias"] = self.rand(n_out)

    def conv1d(self, name, n_in, n_out):
        self.state[f"{name}.weight"] = self.rand(n_out, n_in, 1)
        self.state[f"{name}.bias"] = self.rand(n_out)

    def norm(self, name, channels):
        self.state[f"{name}.weight"] = 1 + self.rand(channels)
        self.state[f"{name}.bias"] = self.rand(channels)


def _resblock(w, name, ch_in, ch_out, emb):
    """openaimodel ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, linear), out_layers
    (GroupNorm, SiLU, dropout, conv), skip_connection (1x1 conv when the width changes)."""
    w.norm(f"{name}.in_layers.0", ch_in)
    w.conv(f"{name}.in_layers.2", ch_in, ch_out, 3)
    w.linear(f"{name}.emb_layers.1", emb, ch_out)
    w.norm(f"{name}.out_layers.0", ch_out)
    w.conv(f"{name}.out_layers.3", ch_out, ch_out, 3)
    if ch_in != ch_out:
        w.conv(f"{name}.skip_connection", ch_in, ch_out, 1)


def _spatial_transformer(w, name, ch, heads, context):
    """latent-diffusion SpatialTransformer: norm, proj_in (1x1 conv), one BasicTransformerBlock, proj_out."""
    inner = (ch // heads) * heads
    w.norm(f"{name}.norm", ch)
    w.conv(f"{name}.proj_in", ch, inner, 1)
    block = f"{name}.transformer_blocks.0"
    for attn, source in (("attn1", inner), ("attn2", context)):
        w.linear(f"{block}.{attn}.to_q", inner, inner, bias=False)
        w.linear(f"{block}.{attn}.to_k", source, inner, bias=False)
        w.linear(f"{block}.{attn}.to_v", source, inner, bias=False)
        w.linear(f"{block}.{attn}.to_out.0", inner, inner)
    w.linear(f"{block}.ff.net.0.proj", inner, inner * 4 * 2)  # GEGLU
    w.linear(f"{block}.ff.net.2", inner * 4, inner)
    for i in (1, 2, 3):
        w.norm(f"{block}.norm{i}", inner)
    w.conv(f"{name}.proj_out", inner, ch, 1)


def ldm_unet_state(params, seed=0, prefix="model.diffusion_model.", time_condition=False, context_tokens=77):
    """openaimodel UNetModel tensors, named as in a LatentDiffusion checkpoint (MinD-Vis's time_embed_condtion
    too when ``time_condition``)."""
    p = params["unet_config"]["params"]
    w = _Writer(seed)
    mc, mults, blocks = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
    emb, heads, context = mc * 4, p["num_heads"], p["context_dim"]
    attention = [2 ** level in p["attention_resolutions"] for level in range(len(mults))]
    w.linear("time_embed.0", mc, emb)
    w.linear("time_embed.2", emb, emb)
    if time_condition:
        w.conv1d("time_embed_condtion.0", context_tokens, context_tokens // 2)
        w.conv1d("time_embed_condtion.1", context_tokens // 2, 1)
        w.linear("time_embed_condtion.2", context, emb)
    w.conv("input_blocks.0.0", p["in_channels"], mc, 3)
    chans, ch, index = [mc], mc, 1
    for level, mult in enumerate(mults):
        for _ in range(blocks):
            _resblock(w, f"input_blocks.{index}.0", ch, mc * mult, emb)
            ch = mc * mult
            if attention[level]:
                _spatial_transformer(w, f"input_blocks.{index}.1", ch, heads, context)
            chans.append(ch)
            index += 1
        if level != len(mults) - 1:
            w.conv(f"input_blocks.{index}.0.op", ch, ch, 3)
            chans.append(ch)
            index += 1
    _resblock(w, "middle_block.0", ch, ch, emb)
    _spatial_transformer(w, "middle_block.1", ch, heads, context)
    _resblock(w, "middle_block.2", ch, ch, emb)
    index = 0
    for level, mult in list(enumerate(mults))[::-1]:
        for j in range(blocks + 1):
            skip = chans.pop()
            _resblock(w, f"output_blocks.{index}.0", ch + skip, mc * mult, emb)
            ch = mc * mult
            layer = 1
            if attention[level]:
                _spatial_transformer(w, f"output_blocks.{index}.1", ch, heads, context)
                layer = 2
            if level and j == blocks:
                w.conv(f"output_blocks.{index}.{layer}.conv", ch, ch, 3)
            index += 1
    w.norm("out.0", ch)
    w.conv("out.2", ch, p["out_channels"], 3)
    return {prefix + k: v for k, v in w.state.items()}


def _taming_resnet(w, name, ch_in, ch_out):
    w.norm(f"{name}.norm1", ch_in)
    w.conv(f"{name}.conv1", ch_in, ch_out, 3)
    w.norm(f"{name}.norm2", ch_out)
    w.conv(f"{name}.conv2", ch_out, ch_out, 3)
    if ch_in != ch_out:
        w.conv(f"{name}.nin_shortcut", ch_in, ch_out, 1)


def _taming_mid(w, name, ch):
    _taming_resnet(w, f"{name}.block_1", ch, ch)
    w.norm(f"{name}.attn_1.norm", ch)
    for part in ("q", "k", "v", "proj_out"):
        w.conv(f"{name}.attn_1.{part}", ch, ch, 1)
    _taming_resnet(w, f"{name}.block_2", ch, ch)


def ldm_vq_state(params, seed=1, prefix="first_stage_model."):
    """taming Encoder / Decoder / VectorQuantizer tensors of a VQModelInterface first stage."""
    fs = params["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    w = _Writer(seed)
    ch, mults, blocks, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    w.conv("encoder.conv_in", dd["in_channels"], ch, 3)
    in_mults = (1,) + tuple(mults)
    for level in range(len(mults)):
        block_in, block_out = ch * in_mults[level], ch * mults[level]
        for j in range(blocks):
            _taming_resnet(w, f"encoder.down.{level}.block.{j}", block_in, block_out)
            block_in = block_out
        if level != len(mults) - 1:
            w.conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    _taming_mid(w, "encoder.mid", block_in)
    w.norm("encoder.norm_out", block_in)
    w.conv("encoder.conv_out", block_in, z, 3)
    block_in = ch * mults[-1]
    w.conv("decoder.conv_in", z, block_in, 3)
    _taming_mid(w, "decoder.mid", block_in)
    for level in reversed(range(len(mults))):
        block_out = ch * mults[level]
        for j in range(blocks + 1):
            _taming_resnet(w, f"decoder.up.{level}.block.{j}", block_in, block_out)
            block_in = block_out
        if level != 0:
            w.conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    w.norm("decoder.norm_out", block_in)
    w.conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    w.conv("quant_conv", z, fs["embed_dim"], 1)
    w.state["quantize.embedding.weight"] = w.rand(fs["n_embed"], fs["embed_dim"])
    w.conv("post_quant_conv", fs["embed_dim"], z, 1)
    return {prefix + k: v for k, v in w.state.items()}


def ldm_schedule_buffers(params):
    """latent-diffusion's registered schedule buffers (a few of them)."""
    betas = torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, params["timesteps"],
                           dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}


def tiny_ldm_checkpoint(path, params=None, seed=0):
    """A CompVis-style .ckpt: {"state_dict": LatentDiffusion tensors, "global_step": 1}. Returns the state dict."""
    params = copy.deepcopy(params or TINY_LDM_PARAMS)
    state = {**ldm_unet_state(params, seed), **ldm_vq_state(params, seed + 1), **ldm_schedule_buffers(params),
             "cond_stage_model.embedding.weight": torch.randn(params["cond_stage_config"]["params"]["n_classes"],
                                                              params["cond_stage_config"]["params"]["embed_dim"])}
    torch.save({"state_dict": state, "global_step": 1}, path)
    return state


def mindvis_cond_stage_state(n_patches, embed_dim, depth, patch_size, context_dim, context_tokens=77, seed=2):
    """MinD-Vis's cond_stage_model: its fine-tuned fmri_encoder (mae.*, timm blocks, no decoder) and mappers."""
    from mindvis.models.mbm import sincos_positions

    w = _Writer(seed)
    w.state["mae.cls_token"] = w.rand(1, 1, embed_dim)
    w.state["mae.pos_embed"] = torch.cat([torch.zeros(1, embed_dim), sincos_positions(n_patches, embed_dim)])[None]
    w.state["mae.patch_embed.proj.weight"] = w.rand(embed_dim, 1, patch_size)
    w.state["mae.patch_embed.proj.bias"] = w.rand(embed_dim)
    w.state["mae.mask_token"] = w.rand(1, 1, embed_dim)
    for i in range(depth):
        w.norm(f"mae.blocks.{i}.norm1", embed_dim)
        w.linear(f"mae.blocks.{i}.attn.qkv", embed_dim, 3 * embed_dim)
        w.linear(f"mae.blocks.{i}.attn.proj", embed_dim, embed_dim)
        w.norm(f"mae.blocks.{i}.norm2", embed_dim)
        w.linear(f"mae.blocks.{i}.mlp.fc1", embed_dim, embed_dim)  # MinD-Vis's mlp_ratio 1.0
        w.linear(f"mae.blocks.{i}.mlp.fc2", embed_dim, embed_dim)
    w.norm("mae.norm", embed_dim)
    w.conv1d("channel_mapper.0", n_patches, n_patches // 2)
    w.conv1d("channel_mapper.1", n_patches // 2, context_tokens)
    w.linear("dim_mapper", embed_dim, context_dim)
    return {"cond_stage_model." + k: v for k, v in w.state.items()}


def save_mindvis_release(path, base_state, monkeypatch, n_patches=6, embed_dim=32, depth=2, patch_size=4,
                         attn2_shift=0.05, extra=None, params=None):
    """A MinD-Vis finetuned.pth made from a base LDM state dict as MinD-Vis's fine-tuning makes one: the
    base's cross-attention moved by ``attn2_shift``, its time conditioning and cond_stage_model added, saved
    with MinD-Vis's config class pickled. Returns the state dict."""
    import sys
    import types

    params = params or TINY_LDM_PARAMS
    state = {k: v.clone() for k, v in base_state.items() if not k.startswith("cond_stage_model.")}
    for key in state:
        if ".attn2." in key:
            state[key] += attn2_shift
    w = _Writer(5)
    context = params["unet_config"]["params"]["context_dim"]
    w.conv1d("time_embed_condtion.0", 77, 38)
    w.conv1d("time_embed_condtion.1", 38, 1)
    w.linear("time_embed_condtion.2", context, params["unet_config"]["params"]["model_channels"] * 4)
    state.update({"model.diffusion_model." + k: v for k, v in w.state.items()})
    state.update(mindvis_cond_stage_state(n_patches, embed_dim, depth, patch_size, context))
    state.update(extra or {})
    module = types.ModuleType("config")

    class Config_Generative_Model:  # noqa: N801 - MinD-Vis's name
        def __init__(self):
            self.patch_size, self.img_size, self.global_pool, self.use_time_cond = patch_size, 16, False, True
            self.dataset, self.kam_subs = "GOD", ["sbj_3"]

    Config_Generative_Model.__module__, Config_Generative_Model.__qualname__ = "config", "Config_Generative_Model"
    module.Config_Generative_Model = Config_Generative_Model
    monkeypatch.setitem(sys.modules, "config", module)
    torch.save({"model_state_dict": state, "config": Config_Generative_Model(), "state": torch.random.get_rng_state()},
               path)
    monkeypatch.delitem(sys.modules, "config")
    return state
