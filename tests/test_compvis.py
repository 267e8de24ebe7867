"""CompVis latent-diffusion checkpoints into diffusers modules: the key map against diffusers' own converter,
a round trip through a generator folder, errors naming the tensor, and cin256-v2's sizes."""

import json

import numpy as np
import pytest
import torch
from compvis_fixtures import TINY_LDM_PARAMS, ldm_schedule_buffers, tiny_ldm_checkpoint

from mindvis.errors import MindvisError
from mindvis.models.compvis import (CIN256_V2, compvis_generator_modules, convert_unet_state, convert_vq_state,
                                    import_compvis_checkpoint, load_ldm_config, scheduler_config_from_ldm,
                                    split_ldm_state, unet_config_from_ldm, vq_config_from_ldm)
from mindvis.models.ldm import load_generator

UNET_PARAMS = TINY_LDM_PARAMS["unet_config"]["params"]
FIRST_STAGE = TINY_LDM_PARAMS["first_stage_config"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("compvis") / "model.ckpt"
    return path, tiny_ldm_checkpoint(path)


def test_unet_key_map_equals_diffusers_own_converter(checkpoint):
    """diffusers' single-file loader converts openaimodel UNets too: both maps must agree tensor for tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, state = checkpoint
    config = unet_config_from_ldm(UNET_PARAMS)
    ours, report = convert_unet_state(split_ldm_state(state)["unet"], config, UNET_PARAMS)
    reference = convert_ldm_unet_checkpoint(state, dict(config))
    assert set(ours) == set(reference) and report["missing"] == [] and report["not_mapped"] == {}
    assert all(torch.equal(ours[key], reference[key]) for key in reference)


def test_vq_key_map_equals_diffusers_own_converter(checkpoint):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, state = checkpoint
    config = vq_config_from_ldm(FIRST_STAGE)
    ours, report = convert_vq_state(split_ldm_state(state)["first_stage"], config, FIRST_STAGE)
    reference = convert_ldm_vae_checkpoint(state, dict(config))
    # diffusers' converter is written for KL autoencoders: it leaves the codebook out.
    assert set(ours) - set(reference) == {"quantize.embedding.weight"} and set(reference) <= set(ours)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value.reshape(ours[key].shape), rtol=0, atol=0)
    assert report["missing"] == [] and report["not_mapped"] == {}


def test_import_round_trip_loads_samples_and_keeps_every_tensor(checkpoint, tmp_path):
    path, state = checkpoint
    report = import_compvis_checkpoint(path, tmp_path / "base", config=TINY_LDM_PARAMS)
    assert set(report["not_mapped"]) == {"betas", "alphas_cumprod", "cond_stage_model.embedding.weight"}
    assert json.loads((tmp_path / "base" / "import_report.json").read_text())["n_mapped"] == report["n_mapped"]
    generator = load_generator(tmp_path / "base")
    assert generator.is_vq and generator.scaling_factor == 1.0 and generator.image_size == 16
    assert generator.latent_shape(2) == (2, 3, 8, 8)
    assert torch.equal(generator.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                       state["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"])
    assert torch.equal(generator.vae.state_dict()["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                       state["first_stage_model.decoder.up.1.upsample.conv.weight"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = generator.encode(images)
    assert latents.shape == (2, 3, 8, 8) and generator.decode(latents).shape == (2, 3, 16, 16)
    with torch.no_grad():
        eps = generator.unet(torch.randn(2, 3, 4, 4), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 1, 16),
                             class_labels=torch.zeros(2, generator.pooled_dim)).sample
    assert eps.shape == (2, 3, 4, 4) and torch.isfinite(eps).all()


def test_schedule_is_latent_diffusions_linear_one():
    from diffusers import DDPMScheduler

    betas = DDPMScheduler.from_config(scheduler_config_from_ldm(CIN256_V2)).betas.double()
    expected = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-6, atol=1e-9)
    buffers = ldm_schedule_buffers(CIN256_V2)
    np.testing.assert_allclose(betas.numpy(), buffers["betas"].double().numpy(), rtol=1e-5)


def test_cin256_sizes():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel, VQModel

    config = unet_config_from_ldm(CIN256_V2["unet_config"]["params"])
    assert config["block_out_channels"] == (192, 384, 576, 960) and config["cross_attention_dim"] == 512
    assert config["down_block_types"] == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert config["up_block_types"] == ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
        vq = VQModel(**vq_config_from_ldm(CIN256_V2["first_stage_config"]))
    assert sum(p.numel() for p in unet.parameters()) == 400_920_579  # the "400M" of the LDM paper's cin model
    assert int(unet.time_embedding.linear_2.out_features) == 768  # MinD-Vis's time-condition width
    assert vq.config.num_vq_embeddings == 8192 and vq.config.latent_channels == 3


def test_errors_name_the_tensor_and_the_file(checkpoint, tmp_path):
    path, state = checkpoint
    missing = {k: v for k, v in state.items() if k != "model.diffusion_model.out.2.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(MindvisError, match="out.2.weight|conv_out.weight") as info:
        import_compvis_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out1", config=TINY_LDM_PARAMS)
    assert info.value.path == tmp_path / "missing.ckpt" and not (tmp_path / "out1").exists()
    assert info.value.key == "model.diffusion_model.out.2.weight"  # the name the checkpoint lacks
    wrong = dict(state)
    wrong["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save({"state_dict": wrong}, tmp_path / "wrong.ckpt")
    with pytest.raises(MindvisError, match="quant_conv.weight") as info:
        import_compvis_checkpoint(tmp_path / "wrong.ckpt", tmp_path / "out2", config=TINY_LDM_PARAMS)
    assert "(3, 3, 3, 3)" in str(info.value) and "(3, 3, 1, 1)" in str(info.value)
    assert info.value.key == "first_stage_model.quant_conv.weight"
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(MindvisError) as info:
        import_compvis_checkpoint(tmp_path / "junk.ckpt", tmp_path / "out3")
    assert info.value.path == tmp_path / "junk.ckpt"
    assert "fmri_encoder" not in str(info.value)  # the fix speaks of CompVis checkpoints
    with pytest.raises(MindvisError, match="not found"):
        import_compvis_checkpoint(tmp_path / "absent.ckpt", tmp_path / "out4")
    # failed imports leave neither an output nor a staging folder behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_unsupported_configs_are_refused_with_the_key(tmp_path):
    with pytest.raises(MindvisError) as info:
        unet_config_from_ldm({**UNET_PARAMS, "use_scale_shift_norm": True})
    assert info.value.key == "unet_config.use_scale_shift_norm"
    with pytest.raises(MindvisError, match="KL autoencoder"):
        vq_config_from_ldm({"params": {**FIRST_STAGE["params"], "ddconfig": {**FIRST_STAGE["params"]["ddconfig"],
                                                                            "double_z": True}}})
    (tmp_path / "bad.yaml").write_text("model:\n  params: {}\n")
    with pytest.raises(MindvisError, match="unet_config") as info:
        load_ldm_config(tmp_path / "bad.yaml")
    assert info.value.path == tmp_path / "bad.yaml"


def test_every_tensor_is_its_source_and_extras_are_reported(checkpoint, tmp_path):
    """Every imported tensor equals the one diffusers' own converter picks; MinD-Vis's extra is listed."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from mindvis.utils.io import sha256_file

    _, state = checkpoint
    state = {**state, "model.diffusion_model.time_embed_condtion.2.weight": torch.randn(128, 16)}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "mindvis_style.ckpt")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale.txt").write_text("an older import")  # replaced as a whole
    report = import_compvis_checkpoint(tmp_path / "mindvis_style.ckpt", tmp_path / "base", config=TINY_LDM_PARAMS)
    assert "model.diffusion_model.time_embed_condtion.2.weight" in report["not_mapped"]
    assert not (tmp_path / "base" / "stale.txt").exists()
    assert report["source_sha256"] == sha256_file(tmp_path / "mindvis_style.ckpt")
    meta = json.loads((tmp_path / "base" / "generator.json").read_text())
    assert meta["source"] == "compvis" and meta["ldm_config"]["unet_config"]["params"]["model_channels"] == 32
    generator = load_generator(tmp_path / "base")
    unet_reference = convert_ldm_unet_checkpoint(state, dict(generator.unet.config))
    vq_reference = convert_ldm_vae_checkpoint(state, dict(generator.vae.config))
    vq_reference["quantize.embedding.weight"] = state["first_stage_model.quantize.embedding.weight"]
    unet_state, vq_state = generator.unet.state_dict(), generator.vae.state_dict()
    assert set(unet_state) == set(unet_reference) and set(vq_state) == set(vq_reference)
    assert all(torch.equal(unet_state[k], unet_reference[k]) for k in unet_state)
    assert all(torch.equal(vq_state[k], vq_reference[k].reshape(vq_state[k].shape)) for k in vq_state)


def test_vq_encode_is_the_pre_quantisation_latent(checkpoint, tmp_path):
    path, _ = checkpoint
    import_compvis_checkpoint(path, tmp_path / "base", config=TINY_LDM_PARAMS)
    generator = load_generator(tmp_path / "base")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = generator.encode(images, sample=True)
        torch.testing.assert_close(latents, generator.vae.encode(images).latents * generator.scaling_factor)
        torch.testing.assert_close(generator.encode(images, sample=False), latents)
        quantised = generator.vae.quantize(latents)[0]  # decode quantises, as VQModelInterface.decode does
        torch.testing.assert_close(generator.decode(latents), generator.vae.decode(quantised,
                                                                                   force_not_quantize=True).sample)


def test_converters_read_the_layout_from_the_diffusers_config(checkpoint):
    _, state = checkpoint
    parts = split_ldm_state(state)
    config = unet_config_from_ldm(UNET_PARAMS)
    with_params, _ = convert_unet_state(parts["unet"], config, UNET_PARAMS)
    without, report = convert_unet_state(parts["unet"], config)
    assert report["missing"] == [] and set(with_params) == set(without)
    vq_config = vq_config_from_ldm(FIRST_STAGE)
    vq_with, _ = convert_vq_state(parts["first_stage"], vq_config, FIRST_STAGE)
    vq_without, _ = convert_vq_state(parts["first_stage"], vq_config)
    assert set(vq_with) == set(vq_without)


def test_a_stored_scale_factor_is_the_vq_scaling_factor(checkpoint):
    """A scale_by_std LDM keeps the scale it measured as a buffer; the config's 1.0 applies otherwise."""
    _, state = checkpoint
    vq, _, _, report = compvis_generator_modules({**state, "scale_factor": torch.tensor(0.25)}, TINY_LDM_PARAMS)
    assert vq.config.scaling_factor == 0.25 and "scale_factor" in report["not_mapped"]
    vq, _, _, _ = compvis_generator_modules(state, TINY_LDM_PARAMS)
    assert vq.config.scaling_factor == 1.0


def test_schedule_defaults_are_latent_diffusions():
    from diffusers import DDPMScheduler

    config = scheduler_config_from_ldm({})
    betas = DDPMScheduler.from_config(config).betas.double()
    expected = torch.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-6, atol=1e-9)
    assert config["prediction_type"] == "epsilon" and config["clip_sample"] is False
    assert scheduler_config_from_ldm({"parameterization": "v"})["prediction_type"] == "v_prediction"
    with pytest.raises(MindvisError, match="x0"):
        scheduler_config_from_ldm({"parameterization": "x0"})


def test_cin256_vq_size():
    from diffusers import VQModel

    with torch.device("meta"):
        vq = VQModel(**vq_config_from_ldm(CIN256_V2["first_stage_config"]))
    assert sum(p.numel() for p in vq.parameters()) == 55_322_782
    assert vq.config.scaling_factor == 1.0 and vq.config.block_out_channels == (128, 256, 512)
