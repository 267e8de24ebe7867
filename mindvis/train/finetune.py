"""Per-subject DC-LDM fine-tuning (the ``finetune`` stage).

Loads the pretrained SC-MBM encoder (or, in ``baseline`` mode, a randomly
initialised encoder of the same size: MinD-Vis's no-pretraining ablation) and
the base generator, joins them with a fresh :class:`FmriConditioner`, and
trains on the subject's training trials (fMRI -> the image seen) with the
diffusion loss, through the shared engine (:mod:`mindvis.train.engine`).

Trained: the parts named in ``finetune.train`` (default: the encoder, the
conditioner, the UNet's cross-attention ``attn2`` layers and its norms);
everything else has ``requires_grad_(False)`` (no gradient memory) and stays
bit-identical. The VAE is always frozen, and so, by default, is a voxel path
started from ridge (``finetune.ridge_lr_scale``). Conditions are dropped with
probability ``finetune.cond_dropout`` (replaced by the learned null
condition) so that classifier-free guidance works at sampling time.

Model selection uses the ``val`` split only: the validation diffusion loss
(fixed noise and timesteps every time) and, with the domain classifier, a
quick top-1 accuracy of few-step DDIM samples of validation trials.

Outputs in ``out_dir`` (``results/{subject}/dcldm/``)
----------------------------------------------------
The decoder folder of :mod:`mindvis.models.dcldm` (``dcldm.safetensors``,
``encoder/``, ``conditioner/``, ``dcldm.json``), and ``train/``: the engine's
``metrics.jsonl``, checkpoints (``--resume``) and ``best/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from sklearn.linear_model import Ridge

from mindvis.data.pairs import paired_trials, training_share
from mindvis.data.responses import check_stimuli_pair, load_responses
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.generate.decode import decode
from mindvis.models.augment import augment_images
from mindvis.models.classifiers.domain import load_classifier
from mindvis.models.dcldm import (START_DIR, LowLevelStart, build_decoder, responses_record, save_dcldm,
                                  save_lowlevel)
from mindvis.models.ldm import load_generator
from mindvis.models.linear import fit_ridge
from mindvis.models.mindvis_release import import_mindvis_finetuned
from mindvis.train.diffusion import diffusion_target
from mindvis.train.engine import Trainer, TrainConfig, checkpoint_minutes
from mindvis.utils.io import derive_seed, seed_everything, software_versions

log = logging.getLogger(__name__)

TRAINABLE_GROUPS = ("encoder", "conditioner", "attn2", "cross_attn_norms", "norms", "unet")


# -- what is trained ------------------------------------------------------------

def trainable_parameter_names(model, groups):
    """Names of the decoder's parameters that the ``finetune.train`` groups train.

    Parameters
    ----------
    model : mindvis.models.ldm.DCLDM
    groups : sequence of str
        From :data:`TRAINABLE_GROUPS`: ``encoder`` (the SC-MBM encoder, not its
        unused reconstruction decoder), ``conditioner``, ``attn2`` (every UNet
        cross-attention layer), ``cross_attn_norms`` (the LayerNorm before each
        cross-attention, a transformer block's ``norm2``: what MinD-Vis's
        ``configure_optimizers`` adds by the name ``norm2``, which in CompVis's UNet
        names only these), ``norms`` (every UNet GroupNorm / LayerNorm), ``unet``
        (the whole UNet).
    """
    unknown = sorted(set(groups) - set(TRAINABLE_GROUPS))
    if unknown:
        raise MindvisError(f"unknown trainable groups {unknown}", key="finetune.train",
                           fix=f"choose from {', '.join(TRAINABLE_GROUPS)}.")
    names = set()
    if "encoder" in groups:
        names |= {f"encoder.{name}" for name, _ in model.encoder.named_parameters()
                  if not name.startswith(("decoder", "mask_token"))}
    if "conditioner" in groups:
        # Under an image prior the prior's null condition is the unconditional branch: the conditioner's own
        # never enters the loss, and a parameter without a gradient stalls multi-process (DDP) training.
        unused = ("null_context", "null_pooled") if model.prior is not None else ()
        names |= {f"conditioner.{name}" for name, _ in model.conditioner.named_parameters() if name not in unused}
    for module_name, module in model.unet.named_modules():
        if "cross_attn_norms" in groups and getattr(module, "attn2", None) is not None:
            names |= {f"unet.{module_name}.norm2.{name}" for name, _ in module.norm2.named_parameters()}
        is_attn2 = "attn2" in groups and module_name.endswith("attn2")
        is_norm = "norms" in groups and isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        if "unet" in groups or is_attn2 or is_norm:
            names |= {f"unet.{module_name}.{name}" for name, _ in module.named_parameters()}
    return names


def freeze_for_finetuning(model, groups):
    """Set ``requires_grad`` so that only the named groups train; return the trained names (sorted)."""
    names = trainable_parameter_names(model, groups)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


# -- ridge start of the voxel path -----------------------------------------------

def class_condition_targets(class_conditioner, labels):
    """Flattened base conditions (context, then pooled) of ``labels``: float64 [N, T * D + P]."""
    with torch.no_grad():
        condition = class_conditioner(torch.as_tensor(labels, dtype=torch.int64).clamp_min(0))
    return torch.cat([condition.context.flatten(1), condition.pooled], dim=1).double().numpy()


@torch.no_grad()
def base_conditions(generator, images, labels):
    """The base's own condition of each trial's image (:class:`~mindvis.models.conditioning.Condition`) and which trials have one.

    An image-conditioned prior encodes the image itself, so every trial has a
    target and no label is read; a class-conditioned base takes the trial's
    class, and trials of unknown class (-1) have none.
    """
    if generator.image_conditioner is not None:
        embedding = generator.embed_all(images)
        return (generator.image_conditioner.condition(embedding),
                torch.ones(len(images), dtype=torch.bool, device=embedding.device))
    labels = torch.as_tensor(labels, dtype=torch.int64)
    device = generator.class_conditioner.context.device
    condition = generator.class_conditioner(labels.to(device).clamp_min(0))
    return condition, labels.to(device) >= 0


def condition_targets(generator, images, labels, space="condition"):
    """What the voxel path regresses onto, flattened: float64 [M, ...], and the mask of trials kept.

    In ``embedding`` space each trial's target is the prior's embedding of the image it showed
    (:meth:`~mindvis.models.ldm.Generator.embed_all`, every trial kept); in ``condition`` space the base's condition of it,
    context then pooled (:func:`base_conditions`).
    """
    if space == "embedding":
        flat = generator.embed_all(images).flatten(1)
        return flat.double().cpu().numpy(), np.ones(len(flat), dtype=bool)
    condition, known = base_conditions(generator, images, labels)
    flat = torch.cat([condition.context.flatten(1), condition.pooled], dim=1)[known]
    return flat.double().cpu().numpy(), known.cpu().numpy()


def fit_ridge_voxel_map(train_fmri, train_targets, val_fmri, val_targets, alphas):
    """Ridge from fMRI to the base's conditions of the seen images, alpha chosen on the validation split.

    The one ridge of the project (:func:`mindvis.models.linear.fit_ridge`, in
    float64): ``train_targets`` holds each training trial's target condition
    (:func:`condition_targets`: the seen image's own embedding for an
    image-conditioned prior, label-free; its class's condition for a class
    base); the alpha with the lowest relative squared error on the validation
    trials (the alignment loss's measure) is refitted on the training trials
    only, since the validation split goes on to select fine-tuning's checkpoint
    (and the low-level strength) with this map inside. Without validation trials the median alpha is fitted on the
    training trials, with a warning.

    Returns
    -------
    weight : float32 [T * D + P, V]
    bias : float32 [T * D + P]
    report : dict
        ``alpha``, ``val_relative_error`` per alpha, ``n_train``, ``n_val``.
    """
    x_train, y_train = np.asarray(train_fmri, np.float64), np.asarray(train_targets, np.float64)
    x_val, y_val = np.asarray(val_fmri, np.float64), np.asarray(val_targets, np.float64)
    if len(x_train) < 2:
        raise MindvisError("too few training trials with a target condition to fit the voxel path",
                           key="finetune.ridge_init",
                           fix="set finetune.ridge_init: false, or check the labels in responses.h5.")
    errors = {}
    if len(x_val):
        model, info = fit_ridge(x_train, y_train, x_val, y_val, alphas, error="relative", what="voxel path ridge",
                                refit="train")
        alpha, errors = info["alpha"], dict(zip(info["alphas"], info["val_error"]))
    else:
        alpha = float(np.median(alphas))
        log.warning("no validation trials: the voxel path's ridge uses the median alpha %g", alpha)
        model = Ridge(alpha=alpha).fit(x_train, y_train)
    report = {"alpha": alpha, "val_relative_error": errors, "n_train": int(len(x_train)), "n_val": int(len(x_val))}
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32), report


def voxel_path_record(conditioner):
    """The voxel path's shape for ``dcldm.json``: voxels, outputs, rank (0 = full) and parameter count."""
    if conditioner.voxel_map is None:
        return None
    n_parameters = sum(p.numel() for name, p in conditioner.named_parameters() if name.startswith("voxel_"))
    return {"n_voxels": int(conditioner.config.n_voxels), "n_outputs": int(conditioner.voxel_map.out_features),
            "rank": 0 if conditioner.voxel_down is None else int(conditioner.voxel_down.out_features),
            "n_parameters": int(n_parameters)}


# -- losses and validation -----------------------------------------------------

def embedding_alignment_loss(embedding, target, weight=None):
    """Relative squared error between the decoded and the seen image's prior embedding, per sample.

    ``||e - t||^2 / ||t||^2``, averaged over the batch: both are grids of
    unit-scale tokens, so this is a regression onto the image's own
    instance-level embedding (no class enters), the image-embedding analogue
    of MindEye's and Brain-Diffuser's regression onto CLIP image embeddings.
    """
    ours, theirs = embedding.flatten(1).float(), target.flatten(1).float()
    return weighted_mean(((ours - theirs) ** 2).sum(1).div(theirs.pow(2).sum(1).clamp_min(1e-8)), weight)


def weighted_mean(values, weight=None):
    """The mean of per-sample ``values`` [B], or their ``weight``-weighted mean (prior preservation's)."""
    if weight is None:
        return values.mean()
    weight = weight.to(values)
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def contrastive_loss(embedding, target, temperature):
    """Symmetric InfoNCE between decoded and seen-image embeddings within the batch (cosine / temperature).

    Each trial's decoded embedding should be nearer its own image's embedding
    than the other images' of the batch, and vice versa: the contrastive
    objective with which MindEye (Scotti et al., NeurIPS 2023) maps fMRI into
    CLIP image space beside its regression, which keeps decoded embeddings
    apart instead of shrinking them towards the mean. 0 for a batch of one.
    """
    if len(embedding) < 2:
        return embedding.sum() * 0.0
    ours = F.normalize(embedding.flatten(1).float(), dim=1)
    theirs = F.normalize(target.flatten(1).float(), dim=1)
    logits = ours @ theirs.T / temperature
    index = torch.arange(len(ours), device=ours.device)
    return (F.cross_entropy(logits, index) + F.cross_entropy(logits.T, index)) / 2


def alignment_loss(condition, target, known):
    """Relative squared error between the fMRI condition and the base's own condition of the seen image.

    ``||c - t||^2 / ||t||^2`` per sample, for the context and the pooled vector,
    averaged over the samples whose class is known (``known``); 0 when none is.
    The base's own conditions set the target, so the mapper learns to speak the
    generator's language (as Brain-Diffuser and Takagi & Nishimoto regress fMRI
    onto the text embeddings their generator reads).
    """
    if not bool(known.any()):
        return condition.context.sum() * 0.0
    total = 0.0
    for ours, theirs in ((condition.context, target.context), (condition.pooled, target.pooled)):
        ours, theirs = ours[known].flatten(1).float(), theirs[known].flatten(1).float()
        total = total + ((ours - theirs) ** 2).sum(1).div(theirs.pow(2).sum(1).clamp_min(1e-8)).mean()
    return total / 2


def make_loss_fn(generator, scheduler, settings):
    """The fine-tuning loss: encode (augmented) images with the frozen VAE, noise them, predict.

    With ``finetune.align_weight`` > 0, adds that weight x the alignment loss against the base's own
    reading of each trial's image: :func:`embedding_alignment_loss` against the prior's embedding of it
    in embedding space, else :func:`alignment_loss` against its condition (:func:`base_conditions`).
    """
    align_weight = float(settings["align_weight"])
    contrastive_weight = float(settings["contrastive_weight"])
    aligned = (align_weight > 0 or contrastive_weight > 0) and generator.conditioner is not None

    def loss_fn(model, batch):
        images = augment_images(batch["images"], settings["crop_pixels"], settings["hflip"])
        with torch.no_grad():
            latents = generator.encode(images.to(generator.vae.dtype)).float()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        drop = torch.rand(len(latents), device=latents.device) < settings["cond_dropout"]
        # A decoder shared by several subjects (mindvis.models.shared) routes each trial through its subject's
        # adapter; a trial's weight (prior preservation) scales its share of the loss.
        route = {"subject": batch["subject"]} if "subject" in batch else {}
        weight = batch.get("weight")
        prediction, output = model(noisy, timesteps, batch["fmri"], drop=drop, return_condition=True, **route)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        diffusion = (F.mse_loss(prediction.float(), target) if weight is None
                     else weighted_mean((prediction.float() - target).pow(2).flatten(1).mean(1), weight))
        if not aligned:
            return diffusion, {}
        logged = {"diffusion": diffusion.detach()}
        if model.prior is not None:
            target = generator.embed_all(batch["images"])
            align = embedding_alignment_loss(output, target, weight)
            contrast = contrastive_loss(output, target, settings["contrastive_temperature"])
        else:
            target, known = base_conditions(generator, batch["images"], batch["labels"])
            align = alignment_loss(output, target, known)
            contrast = contrastive_loss(output.context[known], target.context[known],
                                        settings["contrastive_temperature"])
        logged.update(align=align.detach(), contrastive=contrast.detach())
        return diffusion + align_weight * align + contrastive_weight * contrast, logged

    return loss_fn


@torch.no_grad()
def validation_loss(model, generator, scheduler, trials, batch_size=64):
    """Mean diffusion loss on ``trials`` (conditioned); noise and timesteps come from torch's generator,
    which the engine reseeds identically before every evaluation."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(trials), batch_size):
        batch = trials.get_batch(list(range(start, min(start + batch_size, len(trials)))))
        latents = generator.encode(batch["images"].to(device, generator.vae.dtype), sample=False).float()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, batch["fmri"].to(device))
        total += F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps),
                            reduction="sum").item() / latents[0].numel()
        count += len(latents)
    return total / max(count, 1)


def make_eval_fn(generator, scheduler, val_trials, settings, generate_settings, classifier, seed):
    """Validation metrics: ``val/loss`` and, with a classifier, ``val/accuracy`` of quick DDIM samples."""
    n_quick = min(len(val_trials), settings["val_max_trials"])
    quick = {**generate_settings, "sampler": "ddim"}
    seeds = np.array([[derive_seed(seed, "val-sample", i)] for i in range(n_quick)], dtype=np.int64)

    def eval_fn(model, epoch):
        metrics = {"val/loss": validation_loss(model, generator, scheduler, val_trials)}
        if classifier is not None and n_quick:
            # One sampler call for all of them (batch_size n_quick), one image each.
            images = decode(model, generator, val_trials.fmri[:n_quick], seeds, quick, batch_size=n_quick,
                            num_steps=settings["val_sample_steps"])[:, 0]
            predicted = classifier.predict_proba(images).argmax(axis=1)
            metrics["val/accuracy"] = float(np.mean(predicted == val_trials.labels[:n_quick].numpy()))
        return metrics

    return eval_fn


def finetune_param_groups(model, settings, ridge_started=False, voxel_lr_scale=None):
    """Optimizer groups: the encoder and a ridge-started voxel path learn at their own rates, the rest at ``lr``.

    The encoder starts pretrained (``finetune.encoder_lr_scale``). A voxel path
    started from ridge holds a closed-form solution with small weights (thousands
    of z-scored voxels): Adam moves every weight by about the learning rate per
    step whatever its gradient, so at the full rate the noisy diffusion-loss
    gradient overwrites that solution within the warm-up
    (``finetune.ridge_lr_scale``; at 0 the path is frozen before this is called).
    ``voxel_lr_scale`` sets the voxel path's rate instead (a shared decoder's new adapter).
    """
    groups = {"encoder": [], "voxel": [], "other": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("views."):  # a shared decoder's views.<subject>.<name>
            name = name.split(".", 2)[2]
        if name.startswith("encoder."):
            groups["encoder"].append(parameter)
        elif name.startswith(("conditioner.voxel_map.", "conditioner.voxel_down.")):
            groups["voxel"].append(parameter)
        else:
            groups["other"].append(parameter)
    voxel = settings["ridge_lr_scale"] if ridge_started else 1.0
    scales = {"encoder": settings["encoder_lr_scale"], "voxel": voxel if voxel_lr_scale is None else voxel_lr_scale,
              "other": 1.0}
    return [{"params": params, "lr_scale": float(scales[key]), "weight_decay": settings["weight_decay"]}
            for key, params in groups.items() if params]


# -- the low-level start (img2img) ----------------------------------------------

def _pixcorr(decoded, truth):
    """Mean Pearson correlation over pixels between uint8 images [N, H, W, C] (one per row)."""
    a = decoded.reshape(len(decoded), -1).astype(np.float64)
    b = truth.reshape(len(truth), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))


def fit_lowlevel_start(model, generator, train_trials, val_trials, settings, generate_settings, classifier, seed):
    """Fit the low-level start and choose its img2img strength on the validation split.

    A ridge from fMRI to the VAE latent of the seen image (alpha chosen on the
    val split by mean squared error, refitted on train only, as val then chooses the strength:
    :func:`mindvis.models.linear.fit_ridge`), then, for every candidate of
    ``finetune.lowlevel_strengths`` (1 = from pure noise, the decoder alone),
    quick DDIM samples of the validation trials scored by PixCorr against the
    seen image and, with a classifier, by top-1 against the label. The strength
    chosen is the one of highest PixCorr among those whose validation top-1
    is at most ``finetune.lowlevel_tolerance`` below that of strength 1, so the
    low-level start may not cost the semantic score (without a classifier: the
    highest PixCorr). Validation trials only; never a test trial.

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
    n_quick = min(len(val_trials), settings["val_max_trials"])
    fmri = val_trials.fmri[:n_quick]
    truth = np.clip((val_trials.images[:n_quick].permute(0, 2, 3, 1).numpy() + 1) * 127.5, 0, 255).round()
    seeds = np.array([[derive_seed(seed, "lowlevel-sample", i)] for i in range(n_quick)], dtype=np.int64)
    quick = {**generate_settings, "sampler": "ddim"}
    scores = []
    for strength in sorted(set(float(x) for x in settings["lowlevel_strengths"]) | {1.0}):
        start.strength = strength
        images = decode(model, generator, fmri, seeds, quick, batch_size=n_quick,
                        num_steps=settings["val_sample_steps"], lowlevel=start)[:, 0]
        score = {"strength": strength, "val_pixcorr": _pixcorr(images, truth)}
        if classifier is not None:
            predicted = classifier.predict_proba(images).argmax(axis=1)
            score["val_accuracy"] = float(np.mean(predicted == val_trials.labels[:n_quick].numpy()))
        scores.append(score)
    full = next(score for score in scores if score["strength"] == 1.0)
    tolerance = float(settings["lowlevel_tolerance"])
    allowed = [score for score in scores
               if "val_accuracy" not in full or score["val_accuracy"] >= full["val_accuracy"] - tolerance]
    chosen = max(allowed, key=lambda score: (score["val_pixcorr"], score["strength"]))
    start.strength = chosen["strength"]
    start.info = {"ridge": info, "latent_dim": int(y_train.shape[1]), "val_scores": scores,
                  "tolerance": tolerance, "n_val_sampled": int(n_quick),
                  "selection": "highest val PixCorr among strengths whose val top-1 is within the tolerance of "
                               "strength 1 (the decoder from pure noise)"}
    log.info("low-level start: strength %.2f chosen on %d val trials (%s)", start.strength, n_quick,
             ", ".join(f"{s['strength']:.2f}: PixCorr {s['val_pixcorr']:.3f}"
                       + (f" top-1 {s['val_accuracy']:.3f}" if "val_accuracy" in s else "") for s in scores))
    return start


# -- the stage -----------------------------------------------------------------

def finetune(config, subject, responses, stimuli, base, out_dir, mbm_dir=None, classifier_dir=None,
             baseline=False, resume=False, released=None):
    """Fine-tune the DC-LDM decoder for one subject and write ``out_dir`` (see the module docstring).

    Parameters
    ----------
    config : dict
        The resolved experiment config.
    subject : str
        ``sub-XX``.
    responses : path
        The subject's ``responses.h5`` (train and val splits are read; never test).
    stimuli : path
        ``stimuli.h5``.
    base : path
        The base generator folder (``results/pretrain/ldm`` or a Stable Diffusion folder).
    out_dir : path
    mbm_dir : path, optional
        The pretrained SC-MBM folder (unused in baseline mode).
    classifier_dir : path, optional
        The domain classifier; enables ``val/accuracy``.
    baseline : bool
        Fine-tune from a random encoder (no SC-MBM pretraining).
    resume : bool
        Continue from the last checkpoint in ``out_dir/train``.
    released : path, optional
        MinD-Vis's released ``finetuned.pth`` for this subject (``finetune.released``): it is imported
        as the decoder (:func:`mindvis.models.mindvis_release.import_mindvis_finetuned`, against ``base``)
        instead of training one. Ignored for the ``baseline`` ablation, which is trained.

    Returns
    -------
    dict
        The contents of ``dcldm.json``.
    """
    started = time.perf_counter()
    settings, generate_settings = config["finetune"], config["generate"]
    out_dir = Path(out_dir)
    if released and not baseline:
        n_voxels = load_responses(responses, splits=("train",)).n_voxels
        log.info("%s: importing MinD-Vis's released decoder %s (nothing is trained)", subject, released)
        meta = import_mindvis_finetuned(released, out_dir, base=base, ldm_config=config["ldm"].get("compvis_config"),
                                        subject=subject, n_voxels=n_voxels, config=config)
        return meta
    seed = derive_seed(config["seed"], "finetune", subject, "baseline" if baseline else "pretrained")
    seed_everything(seed)
    data = load_responses(responses, splits=("train", "val"))
    check_stimuli_pair(data, responses, stimuli)
    stimulus_set = load_stimulus_set(stimuli)
    generator = load_generator(base, image_size=config["ldm"]["image_size"])
    generator.vae.requires_grad_(False).eval()
    if generator.conditioner is not None:
        generator.conditioner.requires_grad_(False).eval()
    elif settings["align_weight"] > 0:
        raise MindvisError("finetune.align_weight needs the base generator's own conditions, and this base has "
                           "none (a Stable Diffusion folder)", path=base, key="finetune.align_weight",
                           fix="set finetune.align_weight: 0 for a Stable Diffusion base (MinD-Vis's own loss).")
    model = build_decoder(config, generator, data.n_voxels, mbm_dir=mbm_dir, baseline=baseline)
    freeze_for_finetuning(model, settings["train"])
    if settings["gradient_checkpointing"]:
        generator.unet.enable_gradient_checkpointing()  # active in train mode only, so sampling is unchanged
    train_trials = paired_trials(data["train"], stimulus_set, generator.image_size, generator.image_channels)
    if (settings["train_fraction"] < 1.0 or settings["train_runs"]) and settings.get("new_subject") in (None, subject):
        # The learning curve (benchmarks/learning_curve.py), or the few-shot subject's from-scratch decoder
        # (finetune.new_subject: the same trials its adaptation sees): fewer labelled trials, the same val split.
        n_all = len(train_trials)
        train_trials = training_share(train_trials, settings["train_fraction"], settings["train_runs"],
                                      derive_seed(config["seed"], "train-fraction"))
        log.info("finetune.train_fraction %.2f, train_runs %s: %d of %d training trials", settings["train_fraction"],
                 settings["train_runs"], len(train_trials), n_all)
    val_trials = paired_trials(data["val"], stimulus_set, generator.image_size, generator.image_channels)
    if len(train_trials) == 0:
        raise MindvisError("no training trials", path=responses, key="train", fix="check the preprocessing output.")
    ridge_report = None
    space = "embedding" if model.prior is not None else "condition"
    if model.conditioner.voxel_map is not None and settings["ridge_init"] and generator.conditioner is not None:
        y_train, train_known = condition_targets(generator, train_trials.images, train_trials.labels, space)
        y_val, val_known = condition_targets(generator, val_trials.images, val_trials.labels, space)
        if len(y_train) < 2:
            log.warning("only %d training trials of known class: the voxel path starts at zero instead of from "
                        "ridge (a class-conditioned base on a data set without classes)", len(y_train))
        else:
            weight, bias, ridge_report = fit_ridge_voxel_map(
                train_trials.fmri.numpy()[train_known], y_train, val_trials.fmri.numpy()[val_known], y_val,
                settings["ridge_alphas"])
            ridge_report["target"] = {"embedding": "prior image embedding",
                                      "condition": "image condition" if generator.image_conditioner is not None
                                      else "class condition"}[space]
            model.conditioner.set_voxel_map(torch.from_numpy(weight), torch.from_numpy(bias))
            frozen = settings["ridge_lr_scale"] == 0
            if frozen:
                model.conditioner.voxel_map.requires_grad_(False)
                if model.conditioner.voxel_down is not None:
                    model.conditioner.voxel_down.requires_grad_(False)
            log.info("voxel path starts from ridge onto the base's %s conditions (alpha %g chosen on val; val "
                     "relative error %s)%s", ridge_report["target"], ridge_report["alpha"],
                     {a: round(e, 3) for a, e in ridge_report["val_relative_error"].items()},
                     "; kept fixed (finetune.ridge_lr_scale 0)" if frozen else "")
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    start_meta = None
    if generate_settings.get("start_row", False) and not baseline:  # the rows are of the main decoder
        # The decoder before any fine-tuning step (ridge start, zero encoder path), to measure what training adds.
        start_meta = {"stage": "finetune", "subject": subject, "baseline": bool(baseline), "base": str(base),
                      "image_size": generator.image_size, "n_voxels": int(data.n_voxels), "step": 0,
                      "start_of": str(out_dir), "voxel_path_ridge": ridge_report,
                      "inputs": {**responses_record(responses, data), "stimuli": str(stimuli)}, "config": config,
                      "versions": software_versions()}
    log.info("%s%s: training %d of %d decoder parameters (%s); %d training, %d validation trials",
             subject, " (baseline, random encoder)" if baseline else "", n_trained, n_total,
             ", ".join(settings["train"]), len(train_trials), len(val_trials))

    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    classifier = None
    if classifier_dir is not None:
        classifier = load_classifier(classifier_dir)
    eval_fn = None
    select = settings["select_metric"]
    if len(val_trials):
        eval_fn = make_eval_fn(generator, scheduler, val_trials, settings, generate_settings, classifier, seed)
        if select == "val/accuracy" and classifier is None:
            log.warning("no classifier given: selecting the checkpoint on val/loss instead of val/accuracy")
            select = "val/loss"
    else:
        log.warning("the val split is empty: no checkpoint selection, the last epoch's model is kept")
        select = None
    param_groups = finetune_param_groups(model, settings, ridge_started=ridge_report is not None)
    train_config = TrainConfig(
        epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
        weight_decay=settings["weight_decay"], warmup_epochs=settings["warmup_epochs"], betas=(0.9, 0.999),
        clip_grad_norm=settings["clip_grad_norm"] or None, mixed_precision=settings["mixed_precision"], seed=seed,
        eval_every=settings["eval_every"], eval_at_start=select is not None, select_metric=select,
        select_mode="max" if select == "val/accuracy" else "min", optimizer=settings["optimizer"],
        checkpoint_every_minutes=checkpoint_minutes(config))
    trained_on = [responses, stimuli, base, *([Path(mbm_dir) / "diffusion_pytorch_model.safetensors"] if mbm_dir else [])]
    trainer = Trainer(model, train_trials, make_loss_fn(generator, scheduler, settings), train_config,
                      out_dir / "train", eval_fn=eval_fn, run_config=config, param_groups=param_groups,
                      checkpoint_params="trainable", inputs=trained_on)
    generator.vae.to(trainer.device)  # outside the trained model, so the engine does not place it
    if generator.conditioner is not None:
        generator.conditioner.to(trainer.device)
    if start_meta is not None and trainer.accelerator.is_main_process:
        save_dcldm(model, out_dir / START_DIR, start_meta, metadata={"subject": subject, "step": "0"})
    result = trainer.fit(resume=resume)
    if result["stopped_early"]:
        return result
    model = trainer.load_best().eval()
    lowlevel = None
    if generate_settings.get("lowlevel", False) and len(val_trials) and not baseline:
        generator.vae.eval()
        lowlevel = fit_lowlevel_start(model, generator, train_trials, val_trials, settings, generate_settings,
                                      classifier, seed)
    meta = {
        "stage": "finetune", "subject": subject, "baseline": bool(baseline), "base": str(base),
        "image_size": generator.image_size, "n_voxels": int(data.n_voxels), "trained_groups": list(settings["train"]),
        "n_trained_parameters": int(n_trained), "n_parameters": int(n_total), "trained_parameter_names": trained,
        "select_metric": select, "best": result["best"], "final_metrics": result["last_metrics"],
        "voxel_path_ridge": ridge_report, "condition_space": space,
        "voxel_path": voxel_path_record(model.conditioner),
        "lowlevel": None if lowlevel is None else {"strength": lowlevel.strength, **lowlevel.info},
        "step": result["step"], "epochs": result["epochs_done"],
        "training": {"peak_lr": result["peak_lr"], "effective_batch": result["effective_batch"],
                     "mixed_precision": result["mixed_precision"], "device": str(trainer.device),
                     "torch_threads": torch.get_num_threads()},
        "inputs": {**responses_record(responses, data), "stimuli": str(stimuli),
                   "mbm": None if baseline else str(mbm_dir)},
        "n_train": len(train_trials), "n_val": len(val_trials),
        "wall_time_s": round(time.perf_counter() - started, 2), "config": config, "versions": software_versions(),
    }
    if trainer.accelerator.is_main_process:
        if lowlevel is not None:
            save_lowlevel(out_dir, lowlevel)
        save_dcldm(model, out_dir, meta, metadata={"subject": subject})
        log.info("wrote %s (best %s)", out_dir, result["best"])
    return meta
