"""The prior in embedding space: the projection, its bank and guard, and its rows (issue 34)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ldm_fixtures import tiny_generator

from mindvis.config import embedding_prior_wanted, validate
from mindvis.errors import MindvisError
from mindvis.models.embedding_prior import (EMBEDDING_PRIOR_META, EmbeddingPrior, load_embedding_prior,
                                            save_embedding_prior, standardise_tokens)
from mindvis.train.embedding_prior import bank_corpus, candidate_settings, drop_stimuli


def _bank(n=40, tokens=4, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return standardise_tokens(torch.randn(n, tokens, dim, generator=generator))


def test_one_neighbour_at_full_weight_returns_the_nearest_bank_embedding():
    bank = _bank()
    prior = EmbeddingPrior(bank, k=1, temperature=0.1, weight=1.0)
    query = bank[[7, 21]] + 0.05 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(prior(query), standardise_tokens(bank[[7, 21]]))
    index, similarity = prior.neighbours(query)
    assert index[:, 0].tolist() == [7, 21] and (similarity <= 1 + 1e-6).all()


def test_the_projection_is_a_softmax_mixture_blended_with_the_query_then_standardised():
    bank = _bank()
    prior = EmbeddingPrior(bank, k=5, temperature=0.2, weight=0.5)
    query = _bank(n=3, seed=2)
    index, similarity = prior.neighbours(query)
    weights = torch.softmax(similarity / 0.2, dim=1)
    expected = standardise_tokens(0.5 * query + 0.5 * (weights[..., None, None] * bank[index]).sum(1))
    torch.testing.assert_close(prior(query), expected)
    # Each output token is unit-scale, as the prior's own embedding tokens are.
    out = prior(query)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    # More neighbours than the bank holds: all of them, no error.
    assert EmbeddingPrior(bank[:3], k=100, temperature=0.1, weight=1.0).neighbours(query)[0].shape == (3, 3)


@pytest.mark.parametrize("k, temperature, weight", [(0, 0.1, 1.0), (1, 0.0, 1.0), (1, 0.1, 0.0), (1, 0.1, 1.5)])
def test_settings_out_of_range_are_refused(k, temperature, weight):
    with pytest.raises(ValueError):
        EmbeddingPrior(_bank(), k, temperature, weight)


def test_a_saved_prior_loads_equal_and_a_half_written_one_is_refused(tmp_path):
    prior = EmbeddingPrior(_bank(), 10, 0.1, 0.5, {"bank": {"n_bank": 40}})
    save_embedding_prior(tmp_path, prior)
    loaded = load_embedding_prior(tmp_path)
    assert loaded.settings() == prior.settings() and loaded.info == prior.info
    torch.testing.assert_close(loaded.bank, prior.bank)
    query = _bank(n=2, seed=3)
    torch.testing.assert_close(loaded(query), prior(query))
    assert load_embedding_prior(tmp_path / "none") is None
    (tmp_path / EMBEDDING_PRIOR_META).unlink()
    with pytest.raises(MindvisError) as info:
        load_embedding_prior(tmp_path)
    assert info.value.key == EMBEDDING_PRIOR_META


def test_candidate_settings_try_one_neighbour_once():
    settings = {"embedding_prior_ks": [1, 10], "embedding_prior_temperatures": [0.02, 0.1],
                "embedding_prior_weights": [1.0]}
    assert candidate_settings(settings) == [(1, 0.02, 1.0), (10, 0.02, 1.0), (10, 0.1, 1.0)]


def test_stimuli_are_removed_from_the_bank_exactly_and_as_near_duplicates():
    generator = tiny_generator(conditioning="image")
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, size=(30, 16, 16, 1), dtype=np.uint8)
    stimuli = rng.integers(0, 256, size=(4, 16, 16, 1), dtype=np.uint8)
    bank[3] = stimuli[0]                      # the very stimulus
    bank[11] = stimuli[1]
    bank[11, 0, 0, 0] ^= 1                    # the stimulus with one pixel changed by one grey level
    embeddings, record = drop_stimuli(generator, bank, stimuli, threshold=0.9999)
    assert record["n_exact_stimuli_dropped"] == 1 and record["n_near_duplicates_dropped"] == 1
    assert record["n_bank"] == len(embeddings) == 28
    assert record["max_kept_cosine_to_a_stimulus"] < 0.9999
    with pytest.raises(MindvisError):
        drop_stimuli(generator, stimuli[:2], stimuli, threshold=0.9999)


def test_the_bank_is_the_priors_own_corpus_or_what_the_config_names(tmp_path):
    from mindvis.data.stimuli import BUNDLED_FASHION_MNIST

    config = validate({"experiment": "x", "ldm": {"base": "bundled"}})
    images, record = bank_corpus(config, None, 32, 1)
    assert images.shape == (7500, 32, 32, 1) and record["source"].endswith("train-images-idx3-ubyte.gz")
    assert record["source"].startswith("idx:" + str(BUNDLED_FASHION_MNIST))
    npz = tmp_path / "corpus.npz"
    np.savez(npz, images=np.zeros((5, 20, 20), np.uint8))
    named = validate({"experiment": "x", "finetune": {"embedding_prior_corpus": str(npz)}})
    images, record = bank_corpus(named, None, 16, 1)
    assert images.shape == (5, 16, 16, 1) and record["n_images"] == 5
    folder = validate({"experiment": "x", "ldm": {"base": str(tmp_path)}})
    images, reason = bank_corpus(folder, None, 16, 1)
    assert images is None and "embedding_prior_corpus" in reason


@pytest.mark.parametrize("ldm, finetune, wanted", [
    ({"base": "bundled"}, {}, True),                                  # the shipped image prior
    ({"base": "embedded"}, {}, True),                                 # trained on the simulated pool and training
    ({"base": "embedded", "corpus": "/data/lab/images"}, {}, True),
    ({"base": "embedded", "conditioning": "class"}, {}, False),       # no embedding space
    ({"base": "/data/stable-diffusion-v1-5"}, {}, False),             # a corpus mindvis cannot know
    ({"base": "/data/prior"}, {"embedding_prior_corpus": "/data/corpus.npz"}, True),
    ({}, {"embedding_prior": False}, False),
])
def test_which_configs_draw_the_embedding_prior_rows(ldm, finetune, wanted):
    config = validate({"experiment": "x", "ldm": ldm, "finetune": finetune})
    assert embedding_prior_wanted(config) is wanted


def test_a_prior_trained_on_a_real_data_sets_stimuli_alone_gets_no_embedding_prior():
    """NSD, GOD, BOLD5000: the validation trials repeat the training images, so the bank of such a prior (its
    training images without the validation stimuli) may be empty; the rows are left out unless a corpus is named."""
    nsd = validate({"experiment": "x", "data": {"source": "nsd"}, "ldm": {"base": "embedded"}})
    assert not embedding_prior_wanted(nsd)
    nsd["finetune"]["embedding_prior_corpus"] = "/data/coco/images"
    assert embedding_prior_wanted(nsd)
