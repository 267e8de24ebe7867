"""The generator: embedded and Stable-Diffusion-folder paths through the same code."""

import numpy as np
import pytest
import torch
from ldm_fixtures import save_tiny_sd, tiny_generator

from mindvis.data.images import images_to_tensor, tensor_to_images
from mindvis.errors import MindvisError
from mindvis.generate.sampling import sample_images
from mindvis.models.conditioning import FmriConditioner
from mindvis.models.ldm import cross_attention_modules, load_generator, save_generator


def _unet_output(generator, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(generator.latent_shape(2), generator=gen)
    context = torch.randn(2, generator.context_tokens, generator.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, generator.pooled_dim, generator=gen)
    with torch.no_grad():
        return generator.unet(latents, torch.tensor([3, 50]), encoder_hidden_states=context,
                              class_labels=pooled).sample


def test_embedded_generator_shapes_and_pooled_condition_matters():
    generator = tiny_generator(image_size=16)
    assert generator.latent_shape(3) == (3, 4, 8, 8)
    assert generator.unet.config.class_embed_type == "identity"
    assert generator.pooled_dim == 8 * 4  # diffusers: time embedding = 4 x first block width
    assert len(cross_attention_modules(generator.unet)) > 0
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = generator.encode(images, sample=False)
        assert latents.shape == (2, 4, 8, 8) and latents.is_contiguous()
        assert generator.decode(latents).shape == (2, 1, 16, 16)
    # The pooled vector reaches the UNet through the timestep embedding.
    base = _unet_output(generator)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(generator.latent_shape(2), generator=gen)
    context = torch.randn(2, generator.context_tokens, generator.cross_attention_dim, generator=gen)
    with torch.no_grad():
        other = generator.unet(latents, torch.tensor([3, 50]), encoder_hidden_states=context,
                               class_labels=torch.zeros(2, generator.pooled_dim)).sample
    assert not torch.allclose(base, other)


def test_save_and_load_round_trip(tmp_path):
    generator = tiny_generator()
    generator.vae.register_to_config(scaling_factor=1.7)
    save_generator(generator, tmp_path / "gen")
    loaded = load_generator(tmp_path / "gen")
    assert loaded.image_size == 16 and loaded.context_tokens == 5
    assert loaded.scaling_factor == pytest.approx(1.7)
    assert loaded.class_conditioner is not None
    torch.testing.assert_close(_unet_output(loaded), _unet_output(generator), rtol=0, atol=0)
    labels = torch.tensor([0, -1])
    torch.testing.assert_close(loaded.class_conditioner(labels).context, generator.class_conditioner(labels).context)


def test_stable_diffusion_folder_loads_exactly_and_samples_at_configured_size(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = save_tiny_sd(tmp_path / "sd", cross_attention_dim=12)
    generator = load_generator(folder)
    # SD's context shape comes from the folder: 77 tokens, the UNet's cross-attention width.
    assert generator.context_tokens == 77 and generator.cross_attention_dim == 12
    assert generator.image_size == 16 and generator.image_channels == 3
    assert generator.scheduler_config["num_train_timesteps"] == 1000
    saved = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for (name, loaded), (_, original) in zip(generator.unet.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(loaded, original), name
    conditioner = FmriConditioner(input_tokens=6, input_dim=10, context_tokens=generator.context_tokens,
                                  cross_attention_dim=generator.cross_attention_dim, pooled_dim=generator.pooled_dim)
    with torch.no_grad():
        condition = conditioner(torch.randn(2, 6, 10))
        images = sample_images(generator, condition, null_condition=conditioner.null(2), guidance_scale=2.0,
                               num_steps=2, seeds=[1, 2])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # A configured image size (e.g. 256 px for SD 1.5 at low resolution) changes the latent size.
    bigger = load_generator(folder, image_size=32)
    assert bigger.latent_shape(1) == (1, 4, 16, 16)
    with torch.no_grad():
        images = sample_images(bigger, conditioner(torch.randn(1, 6, 10)), num_steps=1, seeds=[0])
    assert images.shape == (1, 3, 32, 32)


def test_bad_generator_folders_raise_clear_errors(tmp_path):
    with pytest.raises(MindvisError, match="vae/") as info:
        load_generator(tmp_path)
    assert info.value.key == "ldm.base"
    folder = save_tiny_sd(tmp_path / "sd")
    with pytest.raises(MindvisError, match="divisible"):
        load_generator(folder, image_size=15)


def test_image_conversion_round_trip_and_channel_change():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 12, 12, 1), dtype=np.uint8)
    tensor = images_to_tensor(grey, 12, 1)
    assert tensor.shape == (3, 1, 12, 12) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(tensor_to_images(tensor), grey)
    rgb = images_to_tensor(grey, 24, 3)
    assert rgb.shape == (3, 3, 24, 24)
    torch.testing.assert_close(rgb[:, 0], rgb[:, 2])
