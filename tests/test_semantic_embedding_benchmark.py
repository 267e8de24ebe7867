"""The semantic-embedding benchmark's pure pieces (benchmarks/semantic_embedding.py), fast and seeded.

No results folder and no corpus: NT-Xent against a hand computation, the augmentations' shape, range and effect,
a 2-epoch training on random images, the embedding, the k-NN diagnostic and the prototype read-out.
"""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "semantic_embedding.py"
_SPEC = importlib.util.spec_from_file_location("semantic_embedding", _PATH)
se = importlib.util.module_from_spec(_SPEC)
sys.modules["semantic_embedding"] = se  # dataclasses resolve the module's annotations through sys.modules
_SPEC.loader.exec_module(se)

TINY = se.SimCLRSettings(widths=(4, 8, 8, 8), projection_dim=6, batch_size=16, epochs=2)


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def test_nt_xent_matches_a_hand_computation():
    first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    second = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    temperature = 0.5
    views = [v / np.linalg.norm(v) for v in np.vstack([first.numpy(), second.numpy()]).astype(np.float64)]
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    terms = []
    for i in range(4):
        logits = {j: float(views[i] @ views[j]) / temperature for j in range(4) if j != i}
        terms.append(-logits[positive[i]] + math.log(sum(math.exp(v) for v in logits.values())))
    assert se.nt_xent(first, second, temperature).item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_nt_xent_is_lower_for_matching_views():
    torch.manual_seed(0)
    first = torch.randn(8, 5)
    assert se.nt_xent(first, first + 0.01 * torch.randn(8, 5), 0.2) < se.nt_xent(first, torch.randn(8, 5), 0.2)


def test_augment_keeps_shape_and_range_and_changes_the_image(rng):
    images = torch.as_tensor(rng.uniform(0, 1, size=(6, 1, 32, 32)), dtype=torch.float32)
    views = se.augment(images, se.SimCLRSettings(), torch.Generator().manual_seed(0))
    assert views.shape == images.shape and views.dtype == torch.float32
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    assert float((views - images).abs().mean()) > 0.05
    again = se.augment(images, se.SimCLRSettings(), torch.Generator().manual_seed(0))
    assert torch.equal(views, again)


def test_each_augmentation_does_what_it_claims():
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:24, 4:12] = 1.0  # a bar in the left half
    off = {"crop_area": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_prob": 0.0, "max_shift_px": 0.0,
           "brightness": 0.0, "contrast": 0.0, "noise_sd": 0.0}
    identity = se.augment(image, se.SimCLRSettings(**off), torch.Generator().manual_seed(0))
    assert torch.allclose(identity, image, atol=1e-5)
    flipped = se.augment(image, se.SimCLRSettings(**{**off, "flip_prob": 1.0}), torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, image.flip(-1), atol=1e-5)
    cropped = se.augment(image, se.SimCLRSettings(**{**off, "crop_area": (0.6, 0.6)}),
                         torch.Generator().manual_seed(0))
    assert float(cropped.sum()) > float(image.sum())  # a zoom enlarges the bar
    noisy = se.augment(image, se.SimCLRSettings(**{**off, "noise_sd": 0.1}), torch.Generator().manual_seed(0))
    assert 0.02 < float((noisy - image).abs().mean()) < 0.1
    grey = image * 0.5 + 0.25  # values 0.25 .. 0.75: a shift of up to 0.2 is never clipped
    brighter = se.augment(grey, se.SimCLRSettings(**{**off, "brightness": 0.2}), torch.Generator().manual_seed(0))
    offset = brighter - grey
    assert float(offset.std()) < 1e-5 and float(offset.abs().mean()) > 0  # one offset for the whole image
    stretched = se.augment(grey, se.SimCLRSettings(**{**off, "contrast": 0.3}), torch.Generator().manual_seed(0))
    factor = (stretched - stretched.mean()) / (grey - grey.mean())
    assert float(factor.std()) < 1e-4 and abs(float(factor.mean()) - 1) > 0  # one factor about the mean


def test_two_epoch_training_runs_and_is_seeded(rng):
    images = rng.integers(0, 256, size=(64, 32, 32, 1), dtype=np.uint8)
    model, history = se.train_simclr(images, TINY, seed=5, log_every=0)
    again, _ = se.train_simclr(images, TINY, seed=5, log_every=0)
    other, _ = se.train_simclr(images, TINY, seed=6, log_every=0)
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    embedding = se.embed(model, images)
    assert embedding.shape == (64, TINY.widths[-1])
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0)
    assert np.array_equal(embedding, se.embed(again, images))
    assert not np.allclose(embedding, se.embed(other, images))


def test_knn_accuracy_on_separated_clusters(rng):
    centres = rng.normal(size=(3, 7)) * 10
    labels = np.repeat(np.arange(3), 6)
    features = centres[labels] + rng.normal(size=(18, 7))
    assert se.knn_accuracy(features, labels, k=3) == 1.0
    assert se.knn_accuracy(rng.normal(size=(18, 7)), labels, k=3) < 0.8


def test_prototype_read_out(rng):
    pool = rng.normal(size=(12, 5))
    labels = np.arange(12) % 4
    class_prototypes = se.prototypes(pool, labels, 4)
    assert np.allclose(class_prototypes[1], pool[labels == 1].mean(0))
    assert np.array_equal(se.prototype_correct(class_prototypes[[2, 0]] * 3, class_prototypes, [2, 1]), [1.0, 0.0])
    with pytest.raises(se.MindvisError):
        se.prototypes(pool, labels, 5)


def test_concat_ridge_recovers_a_linear_map(rng):
    voxels = {split: rng.normal(size=(n, 20)) for split, n in (("train", 120), ("val", 40), ("test", 30))}
    weights = rng.normal(size=(20, 6)), rng.normal(size=(20, 4))
    first = [x @ weights[0] for x in voxels.values()]
    second = [100 * x @ weights[1] for x in voxels.values()]  # another scale: the blocks are put on one
    predict, join, record = se.train_ridge_concat(voxels["train"], voxels["val"], first[:2], second[:2])
    assert record["weight"] in se.CONCAT_WEIGHTS and record["val_identification"] > 0.95
    assert np.allclose(predict(voxels["test"]), join(first[2], second[2]), atol=0.05)


def test_encoder_is_kept_and_reused_from_the_work_folder(rng, tmp_path):
    images = rng.integers(0, 256, size=(32, 32, 32, 1), dtype=np.uint8)
    corpus_path = tmp_path / "corpus.bin"
    corpus_path.write_bytes(images.tobytes())
    settings = se.SimCLRSettings(widths=(4, 8, 8, 8), projection_dim=6, batch_size=16, epochs=1)
    model, history, _, reused = se.encoder_for(images, corpus_path, settings, 0, tmp_path / "work")
    loaded, loaded_history, seconds, reused_now = se.encoder_for(images, corpus_path, settings, 0, tmp_path / "work")
    assert not reused and reused_now and loaded_history == history
    assert seconds == pytest.approx(sum(epoch["seconds"] for epoch in history))
    assert np.array_equal(se.embed(model, images), se.embed(loaded, images))
    _, _, _, other_seed = se.encoder_for(images, corpus_path, settings, 1, tmp_path / "work")
    assert not other_seed
