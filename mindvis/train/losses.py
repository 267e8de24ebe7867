"""The fine-tuning losses of the DC-LDM decoders (every route trains with :func:`make_loss_fn`).

MinD-Vis's diffusion loss (the UNet's noise or v prediction given the fMRI
condition, on the frozen VAE's latent of the seen image), and beside it losses
that need no UNet pass: the regression of the decoded condition onto the base's
own reading of the seen image (:func:`embedding_alignment_loss`,
:func:`alignment_loss`) and MindEye's contrastive term (:func:`contrastive_loss`).
No loss reads the evaluation classifier, and only a class-conditioned base's
alignment target reads a label (the class whose condition it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mindvis.models.augment import augment_images
from mindvis.train.diffusion import diffusion_target
from mindvis.train.ridge_start import base_conditions


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
        images = augment_images(batch["images"], settings["crop_pixels"], settings["hflip"], settings["crop_mode"],
                                settings["crop_p"])
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


