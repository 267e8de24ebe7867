"""Model selection on the validation split, shared by every decoder route: no label, no evaluation classifier.

Every choice fine-tuning makes (which checkpoint, the low-level start's
img2img strength) is made on validation trials carved from the training runs,
by a criterion over all of them that reads neither the trials' labels nor the
classifier that scores the test images:

* ``val/identification`` (image priors): quick DDIM samples of every validation
  trial, embedded by the prior's own label-free image encoder, and each compared
  with every validation image's embedding: the share of the other images that
  the sample is less similar to than to its own (two-way identification over
  all pairs; 0.5 is chance). What a decoder is for, in the prior's terms.
* ``val/embedding_identification``: the same for the decoded embedding itself
  (no sampling); logged beside it.
* ``val/loss``: MinD-Vis's diffusion loss on the validation trials, the same
  noise and timesteps at every evaluation (the engine reseeds), ``val_loss_repeats``
  draws per trial; the criterion for a base without an image encoder (Stable
  Diffusion, a class-conditioned base).

Nothing is fitted on the validation trials that is then selected on them
(ridge starts choose their alpha there but are refitted on the training trials).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.data.images import images_to_tensor, tensor_to_images
from mindvis.generate.decode import decode
from mindvis.models.dcldm import LowLevelStart
from mindvis.models.linear import fit_ridge, identification
from mindvis.train.diffusion import diffusion_target
from mindvis.utils.io import derive_seed

log = logging.getLogger(__name__)

#: What ``finetune.select_metric: auto`` becomes (:func:`select_metric`), and which way is better.
SELECT_MODES = {"val/identification": "max", "val/embedding_identification": "max", "val/loss": "min"}


def select_metric(settings, generator):
    """The checkpoint criterion: ``finetune.select_metric``, with ``auto`` resolved for this base."""
    metric = settings["select_metric"]
    if metric == "auto":
        metric = "val/identification" if generator.image_conditioner is not None else "val/loss"
    if metric != "val/loss" and generator.image_conditioner is None:
        log.warning("%s needs an image prior's encoder, and this base has none: selecting on val/loss", metric)
        metric = "val/loss"
    return metric


def embed_samples(generator, images):
    """The prior's embedding of sampled uint8 images ``[N, H, W, C]``."""
    return generator.embed_all(images_to_tensor(images, generator.image_size, generator.image_channels))


def n_sampled(settings, val_trials):
    """How many validation trials the quick samples take (``finetune.val_max_trials``; None: all)."""
    cap = settings["val_max_trials"]
    return len(val_trials) if cap is None else min(len(val_trials), cap)


@torch.no_grad()
def validation_loss(model, generator, scheduler, trials, batch_size=64, repeats=1):
    """Mean diffusion loss on ``trials`` (conditioned), ``repeats`` noise draws per trial; noise and timesteps
    come from torch's generator, which the engine reseeds identically before every evaluation."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(trials), batch_size):
        batch = trials.get_batch(list(range(start, min(start + batch_size, len(trials)))))
        latents = generator.encode(batch["images"].to(device, generator.vae.dtype), sample=False).float()
        fmri = batch["fmri"].to(device)
        for _ in range(repeats):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
            prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, fmri)
            total += F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps),
                                reduction="sum").item() / latents[0].numel()
            count += len(latents)
    return total / max(count, 1)


def sample_seeds(seed, what, n):
    """One fixed sampling seed per validation trial ([n, 1]), the same at every evaluation."""
    return np.array([[derive_seed(seed, what, i)] for i in range(n)], dtype=np.int64)


def make_eval_fn(generator, scheduler, val_trials, settings, generate_settings, seed, metric):
    """The engine's eval hook: ``val/loss`` always; with an image prior ``val/embedding_identification``, and
    ``val/identification`` of quick samples when it is the criterion (``metric``) or ``val_identify`` is set."""
    n_quick = n_sampled(settings, val_trials)
    quick = {**generate_settings, "sampler": "ddim"}
    seeds = sample_seeds(seed, "val-sample", n_quick)
    prior = generator.image_conditioner
    truth = generator.embed_all(val_trials.images[:n_quick]) if prior is not None and n_quick else None

    def eval_fn(model, epoch):
        metrics = {"val/loss": validation_loss(model, generator, scheduler, val_trials,
                                               repeats=settings["val_loss_repeats"])}
        if truth is None:
            return metrics
        with torch.no_grad():
            fmri = val_trials.fmri[:n_quick].to(next(model.parameters()).device)
            embedding = model.embedding(fmri) if model.prior is not None else None
        if embedding is not None:
            metrics["val/embedding_identification"] = identification(embedding, truth)
        if metric == "val/identification":
            images = decode(model, generator, val_trials.fmri[:n_quick], seeds, quick, batch_size=n_quick,
                            num_steps=settings["val_sample_steps"])[:, 0]
            metrics["val/identification"] = identification(embed_samples(generator, images), truth)
        return metrics

    return eval_fn


# -- the low-level start (img2img) ----------------------------------------------

def _pixcorr(decoded, truth):
    """Mean Pearson correlation over pixels between uint8 images [N, H, W, C] (one per row)."""
    a = decoded.reshape(len(decoded), -1).astype(np.float64)
    b = truth.reshape(len(truth), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))


def fit_lowlevel_start(model, generator, train_trials, val_trials, settings, generate_settings, seed):
    """Fit the low-level start and choose its img2img strength on the validation split.

    A ridge from fMRI to the VAE latent of the seen image (alpha chosen on the
    val split by mean squared error, refitted on train only, as val then chooses the strength:
    :func:`mindvis.models.linear.fit_ridge`), then, for every candidate of
    ``finetune.lowlevel_strengths`` (1 = from pure noise, the decoder alone),
    quick DDIM samples of the validation trials scored by PixCorr against the
    seen image and, with an image prior, by identification in its embedding
    space (:func:`identification`). The strength chosen is the one of highest
    PixCorr among those whose identification is at most
    ``finetune.lowlevel_tolerance`` below that of strength 1, so the low-level
    start may not cost the semantic score (without an image prior: the highest
    PixCorr). No label, no evaluation classifier, never a test trial.

    Returns
    -------
    LowLevelStart
    """
    y_train = generator.encode_all(train_trials.images).flatten(1).double().cpu().numpy()
    y_val = generator.encode_all(val_trials.images).flatten(1).double().cpu().numpy()
    ridge, info = fit_ridge(train_trials.fmri.numpy().astype(np.float64), y_train,
                            val_trials.fmri.numpy().astype(np.float64), y_val, settings["ridge_alphas"],
                            error="mse", what="low-level start, ridge fMRI -> VAE latent", refit="train")
    start = LowLevelStart(torch.from_numpy(ridge.coef_.astype(np.float32)),
                          torch.from_numpy(ridge.intercept_.astype(np.float32)), 1.0)
    n_quick = n_sampled(settings, val_trials)
    fmri = val_trials.fmri[:n_quick]
    truth = tensor_to_images(val_trials.images[:n_quick])
    embedded = generator.embed_all(val_trials.images[:n_quick]) if generator.image_conditioner is not None else None
    seeds = sample_seeds(seed, "lowlevel-sample", n_quick)
    quick = {**generate_settings, "sampler": "ddim"}
    scores = []
    for strength in sorted(set(float(x) for x in settings["lowlevel_strengths"]) | {1.0}):
        start.strength = strength
        images = decode(model, generator, fmri, seeds, quick, batch_size=n_quick,
                        num_steps=settings["val_sample_steps"], lowlevel=start)[:, 0]
        score = {"strength": strength, "val_pixcorr": _pixcorr(images, truth)}
        if embedded is not None:
            score["val_identification"] = identification(embed_samples(generator, images), embedded)
        scores.append(score)
    full = next(score for score in scores if score["strength"] == 1.0)
    tolerance = float(settings["lowlevel_tolerance"])
    allowed = [score for score in scores if "val_identification" not in full
               or score["val_identification"] >= full["val_identification"] - tolerance]
    chosen = max(allowed, key=lambda score: (score["val_pixcorr"], score["strength"]))
    start.strength = chosen["strength"]
    start.info = {"ridge": info, "latent_dim": int(y_train.shape[1]), "val_scores": scores,
                  "tolerance": tolerance, "n_val_sampled": int(n_quick),
                  "selection": "highest val PixCorr among strengths whose val identification (the prior's image "
                               "embedding) is within the tolerance of strength 1 (the decoder from pure noise)"}
    log.info("low-level start: strength %.2f chosen on %d val trials (%s)", start.strength, n_quick,
             ", ".join(f"{s['strength']:.2f}: PixCorr {s['val_pixcorr']:.3f}"
                       + (f" identification {s['val_identification']:.3f}" if "val_identification" in s else "")
                       for s in scores))
    return start
