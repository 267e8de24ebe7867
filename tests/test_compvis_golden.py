"""The CompVis importer against CompVis's own model code: tests/data/compvis_golden/golden.safetensors holds a
tiny randomly initialised openaimodel ``UNetModel`` in LatentDiffusion's names, saved by MinD-Vis's copy of
CompVis latent-diffusion (``code/dc_ldm``, make_golden.py beside it), with its output for a fixed latent,
timesteps and context, and 10 steps of its ``PLMSSampler``. mindvis converts the checkpoint with its importer
and must reproduce both to float tolerance.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindvis.generate.sampling import make_scheduler
from mindvis.models.compvis import convert_unet_state, scheduler_config_from_ldm, split_ldm_state, unet_config_from_ldm

GOLDEN = Path(__file__).parent / "data" / "compvis_golden" / "golden.safetensors"
UNET_PARAMS = {"image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32,
               "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
               "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}
LDM_PARAMS = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "unet_config": {"params": UNET_PARAMS}}


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


def converted_unet(checkpoint):
    from diffusers import UNet2DConditionModel

    unet_config = unet_config_from_ldm(UNET_PARAMS)
    state, report = convert_unet_state(split_ldm_state(checkpoint)["unet"], unet_config, UNET_PARAMS)
    unet = UNet2DConditionModel(**unet_config).eval()
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not missing and not unexpected and not report["not_mapped"]
    return unet


def no_pooled(batch):
    """The pooled condition (added to the timestep embedding: DC-LDM's second path) at zero: CompVis's UNet."""
    return torch.zeros(batch, 4 * UNET_PARAMS["model_channels"])


def plms(unet, golden, steps=10):
    scheduler = make_scheduler("plms_compvis", scheduler_config_from_ldm(LDM_PARAMS))
    scheduler.set_timesteps(steps)
    latents = golden["inputs.x_T"] * scheduler.init_noise_sigma
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, timestep)
            eps = unet(model_input, timestep, encoder_hidden_states=golden["inputs.context"],
                       class_labels=no_pooled(len(latents))).sample
            latents = scheduler.step(eps, timestep, latents).prev_sample
    return latents, scheduler


def test_converted_unet_reproduces_compvis_output(golden):
    unet = converted_unet(golden)
    with torch.no_grad():
        eps = unet(golden["inputs.latent"], golden["inputs.timesteps"],
                   encoder_hidden_states=golden["inputs.context"], class_labels=no_pooled(2)).sample
    torch.testing.assert_close(eps, golden["outputs.eps"], rtol=1e-4, atol=1e-5)


def test_plms_compvis_reproduces_compvis_plms_sampler(golden):
    latents, scheduler = plms(converted_unet(golden), golden)
    assert sorted(set(scheduler.timesteps.tolist())) == golden["outputs.plms_timesteps"].tolist()
    torch.testing.assert_close(latents, golden["outputs.plms"], rtol=1e-4, atol=1e-4)


def test_a_swapped_tensor_name_is_caught(golden):
    """Two same-shaped tensors under each other's names (self- and cross-attention queries) convert without
    complaint: only the comparison with CompVis's output catches them."""
    swapped = dict(golden)
    first = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    second = first.replace("attn1", "attn2")
    swapped[first], swapped[second] = golden[second], golden[first]
    unet = converted_unet(swapped)
    with torch.no_grad():
        eps = unet(golden["inputs.latent"], golden["inputs.timesteps"],
                   encoder_hidden_states=golden["inputs.context"], class_labels=no_pooled(2)).sample
    assert not torch.allclose(eps, golden["outputs.eps"], rtol=1e-4, atol=1e-5)
