"""The image prior: a label-free image encoder, its pretraining on an external corpus, and shipped bundles."""

import json

import numpy as np
import pytest
import torch

from ldm_fixtures import TINY_LDM, tiny_config, write_synthetic_stimuli
from mindvis.errors import MindvisError
from mindvis.models.bundled import (BUNDLED_CLASSIFIER, BUNDLED_PRIOR, PROVENANCE_FILE, verify_bundle,
                                    write_bundle)
from mindvis.models.conditioning import ImageConditioner
from mindvis.models.ldm import load_generator

IMAGE_LDM = {**TINY_LDM, "conditioning": "image"}


def test_image_conditioner_embeds_images_and_drops_to_null():
    torch.manual_seed(0)
    conditioner = ImageConditioner(image_size=16, in_channels=1, widths=(4, 8), token_grid=2, token_dim=3,
                                   cross_attention_dim=8, pooled_dim=12, embedding_noise=0.5).eval()
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    embedding = conditioner.embed(images)
    assert embedding.shape == (4, 4, 3) and conditioner.embedding_shape == (4, 3)
    # Each token is standardised (unit scale), so a decoded embedding has a known target scale.
    torch.testing.assert_close(embedding.mean(-1), torch.zeros(4, 4), atol=1e-5, rtol=0)
    condition = conditioner(images, drop=torch.tensor([False, True, False, True]))
    assert condition.context.shape == (4, 4, 8) and condition.pooled.shape == (4, 12)
    torch.testing.assert_close(condition.context[1], conditioner.null_context)
    torch.testing.assert_close(condition.context[0], conditioner.condition(embedding).context[0])
    # Embedding noise only in training mode.
    torch.testing.assert_close(conditioner(images).context, conditioner(images).context)
    conditioner.train()
    assert not torch.allclose(conditioner(images).context, conditioner(images).context)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A tiny image prior pretrained on an external .npz corpus plus the stimulus file's training images."""
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root = tmp_path_factory.mktemp("prior")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5")  # its pool is not read: the corpus replaces it
    rng = np.random.default_rng(1)
    corpus = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    np.savez(root / "corpus.npz", images=corpus)
    config = tiny_config(ldm={**IMAGE_LDM, "corpus": str(root / "corpus.npz"), "vae_steps": 3, "unet_steps": 5,
                              "val_images": 8, "ema_decay": 0.9, "eval_samples_per_class": 1})
    metrics = pretrain_ldm(config, root / "stimuli.h5", root / "ldm")
    return {"root": root, "metrics": metrics, "stimuli": stimuli, "config": config}


def test_pretraining_on_an_external_corpus_counts_steps_and_records_the_corpus(prior):
    metrics, root = prior["metrics"], prior["root"]
    assert metrics["vae"]["steps"] == 3 and metrics["unet"]["steps"] == 5
    # 40 corpus images - 8 held out + the 24 training images of the stimulus file; labels never used.
    assert metrics["n_train_images"] == 40 - 8 + 24 and metrics["n_val_images"] == 8
    import hashlib

    assert metrics["corpus"]["sha256"] == hashlib.sha256((root / "corpus.npz").read_bytes()).hexdigest()
    assert metrics["n_parameters"]["image_conditioner"] > 0
    lines = [json.loads(line) for line in (root / "ldm" / "train_unet" / "metrics.jsonl").read_text().splitlines()]
    assert "val/loss_null" in lines[-1]  # the conditional loss beside the unconditional one


def test_a_pretrained_prior_loads_frozen_with_its_image_encoder(prior):
    generator = load_generator(prior["root"] / "ldm")
    assert generator.class_conditioner is None and generator.image_conditioner is not None
    assert generator.context_tokens == 4 and generator.conditioner is generator.image_conditioner
    assert not any(p.requires_grad for p in generator.image_conditioner.parameters())
    assert not generator.image_conditioner.training


def test_sample_like_is_seeded_and_follows_the_embedding(prior):
    from mindvis.generate.decode import sample_like

    generator = load_generator(prior["root"] / "ldm")
    images = prior["stimuli"]["train"].images[:3]
    settings = {**prior["config"]["generate"], "steps": 2}
    seeds = np.array([[1], [2], [3]])
    first = sample_like(generator, images, seeds, settings)
    assert first.shape == (3, 1, 16, 16, 1) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, sample_like(generator, images, seeds, settings))


def test_write_and_verify_a_bundle_and_detect_tampering(prior, tmp_path):
    bundle = write_bundle(prior["root"] / "ldm", tmp_path / "prior", {"kind": "prior", "commands": ["test"]})
    provenance = verify_bundle(bundle)
    assert "unet/diffusion_pytorch_model.safetensors" in provenance["files"]
    assert not any(name.startswith("train") for name in provenance["files"])  # no checkpoints shipped
    load_generator(bundle)
    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(MindvisError, match="does not match the SHA-256") as info:
        verify_bundle(bundle)
    assert info.value.key == "files.unet/diffusion_pytorch_model.safetensors"
    (bundle / "extra.json").write_text("{}")
    with pytest.raises(MindvisError, match="differ from those its provenance lists"):
        verify_bundle(bundle)
    (bundle / PROVENANCE_FILE).unlink()
    with pytest.raises(MindvisError, match="has no PROVENANCE.json"):
        verify_bundle(bundle)


@pytest.mark.parametrize("folder", [BUNDLED_PRIOR, BUNDLED_CLASSIFIER], ids=["prior", "classifier"])
def test_the_shipped_artefacts_match_their_recorded_hashes(folder):
    provenance = verify_bundle(folder)
    assert provenance["git"]["commit"] and provenance["corpus"]["files"]["train-images-idx3-ubyte.gz"]
    assert provenance["commands"] and provenance["quality"]
    assert sum((folder / name).stat().st_size for name in provenance["files"]) < 40e6


def test_the_shipped_prior_and_classifier_load_and_meet_their_recorded_quality():
    from mindvis.models.classifiers.domain import load_classifier

    generator = load_generator(BUNDLED_PRIOR)
    assert generator.image_size == 32 and generator.image_channels == 1 and generator.image_conditioner is not None
    classifier = load_classifier(BUNDLED_CLASSIFIER)
    quality = verify_bundle(BUNDLED_CLASSIFIER)["quality"]
    assert quality["n_test_images"] == 10000
    assert quality["classifier_top1_true_images"]["mean"] >= 0.91
    assert quality["vae_pixcorr"]["mean"] >= 0.95
    # The shipped classifier still gives those figures: its top-1 on the committed test images.
    from mindvis.data.stimuli import BUNDLED_FASHION_MNIST, fit_image, load_fashion_mnist

    images, labels = load_fashion_mnist(BUNDLED_FASHION_MNIST)["test"]
    fitted = np.stack([fit_image(image, 32, 1) for image in images[:500]])
    accuracy = np.mean(classifier.predict_proba(fitted).argmax(1) == labels[:500])
    assert accuracy >= 0.85
