"""The embedding-space prior of a decoder: its bank of real image embeddings, and its settings chosen on val.

:class:`mindvis.models.embedding_prior.EmbeddingPrior` moves a decoded
embedding onto the manifold of real images' embeddings. This module builds it
for a fine-tuned decoder (the ``finetune`` stage, ``finetune.embedding_prior``):

1. **The bank** (:func:`bank_corpus`): the images the image prior was trained on
   where mindvis knows them (``finetune.embedding_prior_corpus: auto``): the
   bundled prior's Fashion-MNIST training file (the committed subset of it), a
   lab's ``ldm.corpus``, or, for a prior trained on the stimulus file
   (``ldm.corpus: stimuli``), its pool and training images. A path names any
   corpus :func:`mindvis.data.image_corpus.load_image_corpus` reads. At most
   ``embedding_prior_bank_size`` images are kept (a seeded draw).
2. **The guard** (:func:`drop_stimuli`): every bank image that is a validation or
   test stimulus is removed before anything is embedded into the bank: pixel
   for pixel, and by near-duplicate embedding (cosine >= ``embedding_prior_duplicate_cosine``
   after centring), since a lab's corpus may hold its stimuli resized or
   re-encoded (GOD's test images are ImageNet images). A bank that held the
   test images would let decoding retrieve them; one that held the validation
   images would bias the selection below. How many were dropped is recorded.
3. **The settings** (:func:`fit_embedding_prior`): every ``k`` x ``temperature``
   x ``weight`` of the config is tried on the validation trials: one quick
   DDIM sample per trial from the projected embedding, embedded by the prior's
   own image encoder, and compared with the seen image's embedding. The one
   of highest mean cosine similarity is kept: how close what is drawn comes to
   what was seen, in the prior's label-free terms. Identification among the
   validation images (the checkpoint criterion) is recorded beside it, and so
   are both figures without the projection. No label, no evaluation
   classifier, never a test trial; nothing is fitted on the validation trials.
"""

from __future__ import annotations

import hashlib
import logging
from itertools import product

import numpy as np
import torch

from mindvis.data.image_corpus import load_image_corpus
from mindvis.data.images import tensor_to_images
from mindvis.data.stimuli import BUNDLED_FASHION_MNIST
from mindvis.errors import MindvisError
from mindvis.generate.decode import decode
from mindvis.models.bundled import BUNDLED
from mindvis.models.embedding_prior import EmbeddingPrior, centred_unit
from mindvis.models.linear import identification
from mindvis.train.selection import embed_samples, n_sampled, sample_seeds

log = logging.getLogger(__name__)

KEY = "finetune.embedding_prior_corpus"
#: The bundled prior's corpus: Fashion-MNIST's training file (its committed subset; PROVENANCE.json names the whole).
BUNDLED_CORPUS_FILE = "train-images-idx3-ubyte.gz"
#: The border the embedded stimulus set puts around a Fashion-MNIST image (28 -> 32 px), as the prior saw them.
FASHION_MNIST_BORDER = 2 / 28


def bank_corpus(config, stimulus_set, image_size, channels):
    """The bank's images, uint8 ``[N, S, S, C]``, and a record of where they came from (module docstring, 1).

    Returns ``(images, record)``, or ``(None, reason)`` when no corpus is known for this base (a base that is not
    an image prior, such as Stable Diffusion, has no embedding space to project in and never gets here).
    """
    settings, ldm = config["finetune"], config["ldm"]
    spec = settings["embedding_prior_corpus"]
    if spec == "auto":
        if str(ldm["base"]) == BUNDLED:
            spec, border = str(BUNDLED_FASHION_MNIST / BUNDLED_CORPUS_FILE), FASHION_MNIST_BORDER
        elif ldm["base"] == "embedded" and ldm["corpus"] == "stimuli":
            images = np.concatenate([stimulus_set.splits[name].images for name in ("pool", "train")
                                     if name in stimulus_set.splits])
            return images, {"spec": "auto", "source": "the stimulus file's pool and training images (the corpus "
                                                      "the embedded prior was trained on)", "n_images": len(images)}
        elif ldm["base"] == "embedded":
            spec, border = ldm["corpus"], float(ldm["corpus_border"])
        else:
            return None, (f"ldm.base is a prior folder ({ldm['base']}) whose training corpus mindvis cannot know: "
                          f"set {KEY} to its images")
    else:
        border = float(ldm["corpus_border"])
    corpus = load_image_corpus(spec, image_size, channels, pad_fraction=border, key=KEY)
    return corpus.images, {"spec": settings["embedding_prior_corpus"], "source": corpus.source,
                           "sha256": corpus.sha256, "n_images": len(corpus.images)}


def _digests(images):
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


def drop_stimuli(generator, bank_images, stimulus_images, threshold):
    """The bank without the stimuli (module docstring, 2): ``(bank embeddings [M, tokens, dim], record)``."""
    stimulus_digests = set(_digests(stimulus_images))
    exact = np.array([digest in stimulus_digests for digest in _digests(bank_images)], dtype=bool)
    kept = bank_images[~exact]
    if not len(kept):
        raise MindvisError("every image of the embedding prior's bank is a stimulus", key=KEY,
                           fix="set finetune.embedding_prior_corpus to a corpus that is not the stimulus set, "
                               "or finetune.embedding_prior: false.")
    embeddings = embed_samples(generator, kept).float().cpu()
    stimuli = embed_samples(generator, stimulus_images).float().cpu()
    centre = embeddings.flatten(1).mean(0)
    unit, stimulus_unit = centred_unit(embeddings, centre), centred_unit(stimuli, centre)
    nearest = torch.cat([(chunk @ stimulus_unit.T).max(dim=1).values for chunk in unit.split(4096)])
    near = (nearest >= threshold).numpy()
    record = {"n_exact_stimuli_dropped": int(exact.sum()), "n_near_duplicates_dropped": int(near.sum()),
              "duplicate_cosine": float(threshold), "n_bank": int((~near).sum()),
              "max_kept_cosine_to_a_stimulus": float(nearest[~torch.as_tensor(near)].max()) if (~near).any() else None}
    if not (~near).any():
        raise MindvisError("every image of the embedding prior's bank is a near-duplicate of a stimulus", key=KEY,
                           fix="raise finetune.embedding_prior_duplicate_cosine or use another corpus.")
    return embeddings[torch.as_tensor(~near)], record


def candidate_settings(settings):
    """Every distinct ``(k, temperature, weight)`` of the config (``k = 1`` ignores the temperature)."""
    seen, out = set(), []
    for k, temperature, weight in product(settings["embedding_prior_ks"], settings["embedding_prior_temperatures"],
                                          settings["embedding_prior_weights"]):
        key = (int(k), None if int(k) == 1 else float(temperature), float(weight))
        if key not in seen:
            seen.add(key)
            out.append((int(k), float(temperature), float(weight)))
    return out


def _val_scores(model, generator, fmri, prior, truth, seeds, quick, num_steps):
    """Mean cosine and identification of one quick sample per val trial, drawn as generate draws (``prior``:
    through it, or None), against the seen images' embeddings ``truth``."""
    images = decode(model, generator, fmri, seeds, quick, batch_size=len(fmri), num_steps=num_steps,
                    embedding_prior=prior)[:, 0]
    drawn = embed_samples(generator, images).flatten(1).float()
    target = truth.flatten(1).float()
    cosine = torch.nn.functional.cosine_similarity(drawn, target, dim=1).mean().item()
    return {"val_cosine": float(cosine), "val_identification": float(identification(drawn, target))}


@torch.no_grad()
def fit_embedding_prior(model, generator, val_trials, stimulus_set, config, seed):
    """The decoder's :class:`EmbeddingPrior`, its settings chosen on the validation trials (module docstring).

    Returns ``(prior, None)``, or ``(None, reason)`` when the base has no image encoder or no corpus is known.
    """
    settings, generate_settings = config["finetune"], config["generate"]
    if generator.image_conditioner is None or model.prior is None:
        return None, "the decoder does not decode into an image prior's embedding space"
    images, source = bank_corpus(config, stimulus_set, generator.image_size, generator.image_channels)
    if images is None:
        return None, source
    cap = settings["embedding_prior_bank_size"]
    if cap is not None and len(images) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(len(images), int(cap), replace=False))
        images, source = images[rows], {**source, "n_drawn": int(cap)}
    n_quick = n_sampled(settings, val_trials)
    val_images = tensor_to_images(val_trials.images)
    test = stimulus_set.splits.get("test")
    stimulus_images = val_images if test is None else np.concatenate([val_images, test.images])
    bank, guard = drop_stimuli(generator, images, stimulus_images, settings["embedding_prior_duplicate_cosine"])
    fmri = val_trials.fmri[:n_quick]
    truth = generator.embed_all(val_trials.images[:n_quick]).float()
    seeds = sample_seeds(seed, "embedding-prior-sample", n_quick)
    quick = {**generate_settings, "sampler": "ddim"}
    steps = settings["val_sample_steps"]
    without = _val_scores(model, generator, fmri, None, truth, seeds, quick, steps)
    scores = []
    for k, temperature, weight in candidate_settings(settings):
        prior = EmbeddingPrior(bank, k, temperature, weight)
        scores.append({**prior.settings(), **_val_scores(model, generator, fmri, prior, truth, seeds, quick, steps)})
    chosen = max(scores, key=lambda score: (score["val_cosine"], -score["k"]))
    info = {"bank": {**source, **guard}, "val_scores": scores, "without": without, "n_val_sampled": int(n_quick),
            "selection": "highest mean cosine similarity on the val trials between the prior's embedding of a quick "
                         "sample and the seen image's embedding (no labels, no evaluation classifier)"}
    prior = EmbeddingPrior(bank, chosen["k"], chosen["temperature"], chosen["weight"], info)
    log.info("embedding prior: k %d, temperature %.3g, weight %.2f on a bank of %d (%d stimuli dropped, %d near "
             "duplicates); val cosine %.3f (%.3f without), identification %.3f (%.3f without)", prior.k,
             prior.temperature, prior.weight, len(bank), guard["n_exact_stimuli_dropped"],
             guard["n_near_duplicates_dropped"], chosen["val_cosine"], without["val_cosine"],
             chosen["val_identification"], without["val_identification"])
    return prior, None

