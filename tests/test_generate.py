"""Samplers, guidance, seeding, attention capture, output files and the domain classifier."""

import numpy as np
import pytest
import torch
from ldm_fixtures import tiny_config, tiny_generator, write_synthetic_stimuli

from mindvis.generate.attention import CrossAttentionRecorder
from mindvis.generate.sampling import (
    SAMPLERS,
    make_scheduler,
    sample_images,
    sample_latents,
    sampler_steps,
    seeded_generators,
)
from mindvis.generate.writing import make_grid, read_samples_h5, write_samples_h5


@pytest.fixture(scope="module")
def generator():
    return tiny_generator(seed=1, num_train_timesteps=20)  # short, for the full DDPM reverse process


def _conditions(generator, labels):
    classes = generator.class_conditioner
    with torch.no_grad():
        # A non-zero null condition, so that guidance has something to push against.
        classes.null_context.normal_(generator=torch.Generator().manual_seed(5))
        classes.null_pooled.normal_(generator=torch.Generator().manual_seed(6))
    return classes(torch.tensor(labels)), classes.null(len(labels))


def test_guidance_scale_one_equals_the_unguided_sample(generator):
    condition, null = _conditions(generator, [0, 1, 2])
    kwargs = dict(num_steps=4, seeds=[11, 12, 13])
    unguided = sample_images(generator, condition, **kwargs)
    at_one = sample_images(generator, condition, null_condition=null, guidance_scale=1.0, **kwargs)
    torch.testing.assert_close(at_one, unguided, rtol=0, atol=0)
    # Through the batched guided path (null rows first, then conditioned rows), a scale a hair above 1 lands
    # on the same images: the two branches are not mixed up.
    near_one = sample_images(generator, condition, null_condition=null, guidance_scale=1.0 + 1e-6, **kwargs)
    torch.testing.assert_close(near_one, unguided, rtol=0, atol=1e-4)
    guided = sample_images(generator, condition, null_condition=null, guidance_scale=4.0, **kwargs)
    assert (guided - unguided).abs().max() > 1e-3


def test_ddim_is_deterministic_per_seed_and_independent_of_the_batch(generator):
    condition, null = _conditions(generator, [0, 1, 2])
    kwargs = dict(null_condition=null, guidance_scale=3.0, num_steps=5)
    first = sample_images(generator, condition, seeds=[1, 2, 3], **kwargs)
    again = sample_images(generator, condition, seeds=[1, 2, 3], **kwargs)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    other_seed = sample_images(generator, condition, seeds=[1, 2, 4], **kwargs)
    torch.testing.assert_close(other_seed[:2], first[:2], rtol=0, atol=0)
    assert (other_seed[2] - first[2]).abs().max() > 1e-3
    # Sample 3 alone (a batch of one) is the same image as inside the batch of three.
    alone = sample_images(generator, condition.select(torch.tensor([2])), null_condition=null.select(slice(2, 3)),
                          guidance_scale=3.0, num_steps=5, seeds=[3])
    torch.testing.assert_close(alone[0], first[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_finite_images(generator, sampler):
    condition, null = _conditions(generator, [0, 1])
    images = sample_images(generator, condition, null_condition=null, guidance_scale=2.0, sampler=sampler,
                           num_steps=4, seeds=[1, 2])
    assert images.shape == (2, 1, 16, 16)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    steps = sampler_steps(sampler, 4, generator.scheduler_config)
    assert steps == (20 if sampler == "ddpm" else 4)  # DDPM runs the whole reverse process


def test_ddpm_noise_is_seeded_per_sample(generator):
    condition, _ = _conditions(generator, [0, 1])
    one = sample_images(generator, condition, sampler="ddpm", seeds=[4, 5])
    two = sample_images(generator, condition, sampler="ddpm", seeds=[4, 5])
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    swapped = sample_images(generator, condition.select(torch.tensor([1, 0])), sampler="ddpm", seeds=[5, 4])
    torch.testing.assert_close(swapped.flip(0), one, rtol=0, atol=1e-5)


def test_attention_capture_records_maps_without_changing_samples(generator):
    condition, null = _conditions(generator, [0, 2])
    kwargs = dict(null_condition=null, guidance_scale=3.0, num_steps=3,
                  generators=None, latent_shape=generator.latent_shape(2))

    def run(recorder=None):
        scheduler = make_scheduler("ddim", generator.scheduler_config)
        return sample_latents(generator.unet, scheduler, condition, recorder=recorder,
                              **{**kwargs, "generators": seeded_generators([7, 8])})

    plain = run()
    with CrossAttentionRecorder(generator.unet) as recorder:
        captured = run(recorder)
    torch.testing.assert_close(captured, plain, rtol=0, atol=0)
    assert sorted(recorder.maps) == [0, 1, 2]
    assert set(recorder.maps[0]) == set(recorder.layers)
    maps = recorder.aggregate(generator.latent_size)
    assert maps.shape == (3, 2, 8, 8, generator.context_tokens)
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(3, 2, 8, 8), rtol=0, atol=1e-5)
    # Only the conditioned rows are recorded: the two stimuli have different maps.
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-4
    # The recorder removed itself: processors are the originals again.
    assert all(type(p).__name__ != "_RecordingProcessor" for p in generator.unet.attn_processors.values())


def test_samples_h5_round_trip_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (3, 2, 16, 16, 1), dtype=np.uint8)
    truth = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    attention = {"maps": rng.random((4, 1, 8, 8, 5)), "stimulus_id": ["b"], "timesteps": [9, 6, 3, 0],
                 "token_weights": rng.random((5, 7))}
    write_samples_h5(tmp_path / "s.h5", samples=samples, true_images=truth, stimulus_id=["a", "b", "c"],
                     label=[0, 1, 2], seeds=np.arange(6).reshape(3, 2), attrs={"subject": "sub-01",
                                                                                "config": {"seed": 1}},
                     predicted_label=np.zeros((3, 2), int), attention=attention)
    data = read_samples_h5(tmp_path / "s.h5")
    np.testing.assert_array_equal(data["samples"], samples)
    assert list(data["stimulus_id"]) == ["a", "b", "c"]
    assert data["attrs"]["config"] == {"seed": 1} and data["attrs"]["format_version"] == 1
    assert data["attention"]["maps"].shape == (4, 1, 8, 8, 5)
    grid = make_grid(samples, truth=truth, pad=2)
    # truth column + gap, then 2 samples: 3 rows of 16 px.
    assert grid.shape == (3 * 18 + 2, 20 + 2 * 18 + 2, 3)
    np.testing.assert_array_equal(grid[2:18, 2 + 20:18 + 20, 0], samples[0, 0, :, :, 0])


def test_samples_h5_records_the_decoded_embedding_of_an_embedding_space_decoder(tmp_path):
    from mindvis.generate.decode import decoded_embeddings
    from mindvis.models.dcldm import build_decoder

    torch.manual_seed(0)
    prior = tiny_generator(conditioning="image", token_grid=2, token_dim=3, encoder_widths=[4, 8])
    decoder = build_decoder(tiny_config(finetune={"mapper": "mindvis-ext"}), prior, 13, baseline=True).eval()
    fmri = np.random.default_rng(0).normal(size=(3, 13)).astype(np.float32)
    embedding = decoded_embeddings(decoder, fmri)
    with torch.no_grad():
        expected = decoder.embedding(torch.as_tensor(fmri)).numpy()
    assert embedding.shape == (3, 4, 3) and embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding, expected)
    # A decoder in the UNet's condition space has no prior embedding: nothing is recorded.
    other = build_decoder(tiny_config(finetune={"mapper": "mindvis-ext", "condition_space": "condition"}), prior, 13,
                          baseline=True)
    assert decoded_embeddings(other, fmri) is None
    images = np.zeros((3, 1, 16, 16, 1), np.uint8)
    common = dict(samples=images, true_images=images[:, 0], stimulus_id=["a", "b", "c"], label=[0, 1, 2],
                  seeds=np.zeros((3, 1)), attrs={})
    write_samples_h5(tmp_path / "new.h5", embedding=embedding, **common)
    write_samples_h5(tmp_path / "old.h5", **common)
    np.testing.assert_array_equal(read_samples_h5(tmp_path / "new.h5")["embedding"], embedding)
    assert "embedding" not in read_samples_h5(tmp_path / "old.h5")


def test_domain_classifier_learns_the_stimulus_classes(tmp_path):
    from mindvis.models.classifiers.domain import load_classifier
    from mindvis.train.classifier import top1_accuracy, train_classifier

    stimuli = write_synthetic_stimuli(tmp_path / "stimuli.h5", n_train_per_class=12, n_test_per_class=4)
    config = tiny_config()
    config["classifier"] = {"epochs": 20, "widths": [8, 16], "batch_size": 10, "lr": 0.01}
    metrics = train_classifier(config, tmp_path / "stimuli.h5", tmp_path / "clf")
    # Trained on the training images and the labelled pool images (a stratified part held out), never test.
    n_labelled_pool = int((stimuli.splits["pool"].label >= 0).sum())
    assert metrics["n_pool_images"] == n_labelled_pool
    assert metrics["n_val"] + metrics["n_train"] == 36 + n_labelled_pool and metrics["n_val"] >= 6
    classifier = load_classifier(tmp_path / "clf")
    test = stimuli.splits["test"]
    accuracy = top1_accuracy(classifier, test.images, test.label)
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    assert accuracy >= 0.75  # chance is 1/3
    probabilities = classifier.predict_proba(np.repeat(test.images, 3, axis=-1))  # RGB input is converted
    assert probabilities.shape == (12, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_img2img_runs_the_last_share_of_the_schedule_from_the_given_latents(generator):
    """strength 1 ignores the start latents; a small strength runs fewer UNet calls and stays near the start."""

    condition, null = _conditions(generator, [0, 1])
    shape = generator.latent_shape(2)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2
    kwargs = dict(null_condition=null, guidance_scale=2.0, num_steps=10, seeds=[5, 6])
    plain = sample_images(generator, condition, **kwargs)
    torch.testing.assert_close(sample_images(generator, condition, init_latents=start, strength=1.0, **kwargs),
                               plain, rtol=0, atol=0)
    calls = []
    hook = generator.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        near = sample_images(generator, condition, init_latents=start, strength=0.2, **kwargs)
    finally:
        hook.remove()
    assert len(calls) == 2  # round(0.2 * 10) steps, guided in one batched call each
    start_images = generator.decode(start).clamp(-1, 1)
    assert (near - start_images).abs().mean() < (plain - start_images).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sample_images(generator, condition, init_latents=start, strength=0.0, **kwargs)


def test_a_lowlevel_start_round_trips_and_predicts_latents(tmp_path):
    from mindvis.models.dcldm import LowLevelStart, load_lowlevel, save_lowlevel

    assert load_lowlevel(tmp_path) is None
    start = LowLevelStart(torch.randn(4 * 2 * 2, 5), torch.randn(16), 0.7, {"ridge": {"alpha": 10.0}})
    save_lowlevel(tmp_path, start)
    loaded = load_lowlevel(tmp_path)
    assert loaded.strength == 0.7 and loaded.info == {"ridge": {"alpha": 10.0}}
    fmri = torch.randn(3, 5)
    torch.testing.assert_close(loaded.latents(fmri, (3, 4, 2, 2)), (fmri @ start.weight.T + start.bias).reshape(3, 4, 2, 2))
