"""Pretraining the embedded base generator on the stimulus image corpus (the ``pretrain_ldm`` stage).

The stand-in for a pretrained text-to-image model when no Stable Diffusion is
used. Trained on the ``pool`` plus the ``train`` images of ``stimuli.h5``
(never ``test``), in two steps through the shared engine:

1. the ``AutoencoderKL`` (32 x 32 -> 8 x 8 x 4 by default): reconstruction
   (mean squared error) plus ``ldm.kl_weight`` x the KL divergence to N(0, I);
   its ``scaling_factor`` is then set to 1 / std of the training latents, as
   Stable Diffusion's is, so the diffusion sees unit-variance latents;
2. the ``UNet2DConditionModel`` in that latent space, conditioned on a learned
   class-or-null embedding (:class:`~mindvis.models.conditioning.ClassConditioner`)
   through the same two paths the fMRI condition uses later (cross-attention
   context and pooled timestep addition). The images' class labels play the
   part of the captions a text-to-image model learns from (pool labels are
   never paired with fMRI); images without a label (-1) train with the null
   condition, labelled ones are repeated ``ldm.labelled_repeats`` times per
   epoch and drop to null with probability ``ldm.class_dropout``
   (classifier-free guidance).

A part of the pool (``ldm.val_images``) is held out: it picks the best epoch of
each step and measures the reconstruction error.

Outputs in ``out_dir`` (``results/pretrain/ldm/``)
-------------------------------------------------
``vae/``, ``unet/``, ``scheduler/``, ``class_conditioner/``
    diffusers ``save_pretrained`` folders; :func:`mindvis.models.ldm.load_generator`
    loads them like a Stable Diffusion folder.
``generator.json``
    Image size and context length.
``metrics.json``
    Reconstruction MSE and PSNR on held-out pool images, the validation
    diffusion loss, the domain classifier's top-1 on class-conditioned samples
    (with the sampler settings of the ``generate`` section), timings, the
    resolved config and versions.
``class_samples.png``
    One row per class of class-conditioned samples.
``train_vae/``, ``train_unet/``
    The engine's metrics and checkpoints of each step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from mindvis.data.image_corpus import load_image_corpus
from mindvis.data.images import images_to_tensor
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.generate.decode import sample_classes, sample_like
from mindvis.generate.writing import save_grid
from mindvis.models.augment import augment_images
from mindvis.models.classifiers.domain import load_classifier
from mindvis.models.conditioning import ImageConditioner
from mindvis.models.ldm import build_embedded_generator, save_generator
from mindvis.train.diffusion import diffusion_target
from mindvis.train.engine import Trainer, TrainConfig, checkpoint_minutes
from mindvis.utils.io import derive_seed, seed_everything, software_versions, write_json_atomic

log = logging.getLogger(__name__)


class _VAEObjective(torch.nn.Module):
    """Wraps the VAE so the engine calls one ``forward``: images -> (reconstruction, KL per sample)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.kl()


class _DiffusionObjective(torch.nn.Module):
    """UNet + condition encoder: (noisy latents, timesteps, condition input, drop mask) -> prediction.

    The condition input is the clean image for an image conditioner (trained
    jointly, as Diffusion Autoencoders' semantic encoder) or the class label
    (-1 = null) for a class conditioner; rows where ``drop`` is True get the
    null condition.
    """

    def __init__(self, unet, conditioner):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, noisy_latents, timesteps, cond_input, drop):
        if isinstance(self.conditioner, ImageConditioner):
            condition = self.conditioner(cond_input, drop=drop)
        else:
            condition = self.conditioner(torch.where(drop, -1, cond_input))
        return self.unet(noisy_latents.contiguous(), timesteps, encoder_hidden_states=condition.context,
                         class_labels=condition.pooled).sample


class _Tensors:
    """In-memory tensors for the engine's ``get_batch`` path."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def get_batch(self, indices):
        return {name: tensor[indices] for name, tensor in self.tensors.items()}


def image_corpus(stimulus_set, val_images, seed, corpus=None):
    """Training images and held-out images, as uint8 arrays with labels (-1 where unknown).

    The corpus is the stimulus file's pool (``corpus`` None), or an external
    :class:`~mindvis.data.image_corpus.ImageCorpus`; the held-out images come
    from it (from the training images when it is empty), and the stimulus
    file's training images are always added to the training images. Test
    images are never read.

    Returns ``(images, labels, val_images, val_labels)``; held-out labels only score samples.
    """
    pool, train = stimulus_set.splits["pool"], stimulus_set.splits["train"]
    extra_images, extra_labels = (pool.images, pool.label) if corpus is None else (corpus.images, corpus.labels)
    if not len(extra_images):
        # Real data sets (GOD, NSD, ...) have no pool: the held-out images come from the training images.
        n_val = min(int(val_images), len(train) // 5)
        order = np.random.default_rng(seed).permutation(len(train))
        val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
        return (train.images[train_rows], train.label[train_rows].astype(np.int64), train.images[val_rows],
                train.label[val_rows].astype(np.int64))
    n_val = min(int(val_images), len(extra_images) // 5)
    order = np.random.default_rng(seed).permutation(len(extra_images))
    val_rows, pool_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    images = np.concatenate([extra_images[pool_rows], train.images])
    labels = np.concatenate([np.asarray(extra_labels)[pool_rows].astype(np.int64), train.label.astype(np.int64)])
    return images, labels, extra_images[val_rows], np.asarray(extra_labels)[val_rows].astype(np.int64)


@torch.no_grad()
def reconstruction_metrics(generator, images, batch_size=128):
    """MSE (in [-1, 1] units) and PSNR (dB, peak-to-peak 2) of VAE reconstructions of ``images`` [N, C, S, S]."""
    errors = []
    device = next(generator.vae.parameters()).device
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        reconstruction = generator.decode(generator.encode(batch, sample=False)).clamp(-1, 1)
        errors.append(((reconstruction - batch) ** 2).flatten(1).mean(1).cpu())
    if not errors:
        return {"recon_mse": float("nan"), "recon_psnr_db": float("nan")}
    mse = torch.cat(errors)
    return {"recon_mse": float(mse.mean()), "recon_psnr_db": float((10 * torch.log10(4.0 / mse)).mean())}


def class_conditioned_samples(generator, n_classes, per_class, generate_settings, seed):
    """``per_class`` samples of every class from the class-conditioned base, as uint8 [n_classes, per_class, H, W, C]."""
    labels = np.repeat(np.arange(n_classes), per_class)
    seeds = np.array([derive_seed(seed, "class-sample", i) for i in range(len(labels))], np.int64)[:, None]
    images = sample_classes(generator, labels, seeds, generate_settings)[:, 0]
    return images.reshape(n_classes, per_class, *images.shape[1:]), labels


def reconstruction_samples(generator, images, labels, n_classes, per_class, generate_settings, seed):
    """One sample per held-out image given its own embedding, ``per_class`` images of each labelled class.

    Returns uint8 ``[n_classes, per_class, H, W, C]`` (classes with too few held-out images are
    filled from what there is) and their labels.
    """
    picked = []
    for cls in range(n_classes):
        rows = np.flatnonzero(labels == cls)[:per_class]
        if len(rows) < per_class:
            return np.zeros((0, per_class, generator.image_size, generator.image_size, generator.image_channels),
                            np.uint8), np.zeros(0, np.int64)
        picked.append(rows)
    rows = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    seeds = np.array([derive_seed(seed, "recon-sample", i) for i in range(len(rows))], np.int64)[:, None]
    samples = sample_like(generator, images[rows], seeds, generate_settings)[:, 0]
    return samples.reshape(n_classes, per_class, *samples.shape[1:]), labels[rows]


def train_vae(generator, images, val_images, ldm, seed, out_dir, config, resume=False, inputs=None):
    """Step 1: train the VAE; set its scaling factor from the training latents. Returns the engine summary."""
    objective = _VAEObjective(generator.vae)
    kl_weight, hflip = float(ldm["kl_weight"]), bool(ldm["hflip"])

    def loss_fn(model, batch):
        target = augment_images(batch["images"], 0, hflip)
        reconstruction, kl = model(target)
        mse = F.mse_loss(reconstruction, target)
        kl = kl.mean() / target[0].numel()  # per pixel, like the MSE
        return mse + kl_weight * kl, {"mse": mse, "kl": kl}

    def eval_fn(model, epoch):
        return {f"val/{k}": v for k, v in reconstruction_metrics(generator, val_images).items()}

    train_config = TrainConfig(epochs=ldm["vae_epochs"], max_steps=ldm["vae_steps"], batch_size=ldm["batch_size"],
                               lr=ldm["vae_lr"], weight_decay=0.0,
                               warmup_epochs=_warmup_epochs(ldm["vae_epochs"], ldm["vae_steps"], len(images),
                                                            ldm["batch_size"]),
                               checkpoint_every_steps=ldm.get("checkpoint_every_steps", 0),
                               checkpoint_every_minutes=checkpoint_minutes(config),
                               betas=(0.9, 0.999), seed=derive_seed(seed, "vae"),
                               mixed_precision=ldm["mixed_precision"],
                               select_metric="val/recon_mse" if len(val_images) else None, select_mode="min")
    trainer = Trainer(objective, _Tensors(images=images), loss_fn, train_config, Path(out_dir) / "train_vae",
                      eval_fn=eval_fn if len(val_images) else None, run_config=config, inputs=inputs)
    result = trainer.fit(resume=resume)
    trainer.load_best()
    generator.vae.eval().requires_grad_(False)
    # Unit-variance latents for the diffusion, as Stable Diffusion's 0.18215 does for its VAE.
    with torch.no_grad():
        generator.vae.register_to_config(scaling_factor=1.0)
        device = next(generator.vae.parameters()).device
        sample = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1024]].to(device)
        latents = torch.cat([generator.encode(sample[i:i + 256], sample=False) for i in range(0, len(sample), 256)])
        generator.vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp_min(1e-6)))
    log.info("VAE trained; latent scaling factor %.4f", generator.scaling_factor)
    return result


def _warmup_epochs(epochs, steps, n_images, batch_size):
    """A quarter of the run, at most one epoch (or 1,000 steps when the run is counted in steps)."""
    if not steps:
        return min(1.0, epochs / 4)
    steps_per_epoch = max(1, n_images // batch_size)
    return min(steps / 4, 1000) / steps_per_epoch


def train_unet(generator, images, labels, val_images, ldm, seed, out_dir, config, resume=False, inputs=None):
    """Step 2: train the UNet and its condition encoder on frozen-VAE latents. Returns the engine summary."""
    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    conditioner = generator.conditioner
    image_conditioned = isinstance(conditioner, ImageConditioner)
    objective = _DiffusionObjective(generator.unet, conditioner)

    # Posterior means and standard deviations, once (the VAE is frozen now); flips are encoded too.
    device = next(generator.vae.parameters()).device

    @torch.no_grad()
    def posterior(batch_images):
        out_mean, out_std = [], []
        for start in range(0, len(batch_images), 256):
            dist = generator.vae.encode(batch_images[start:start + 256].to(device)).latent_dist
            # contiguous: channels-last latents crash the UNet backward on CPU (see Generator.encode).
            out_mean.append(dist.mean.cpu().contiguous())
            out_std.append(dist.std.cpu().contiguous())
        return torch.cat(out_mean), torch.cat(out_std)

    mean, std = posterior(images)
    tensors = {"mean": mean, "std": std, "labels": torch.as_tensor(labels)}
    if image_conditioned:
        tensors["images"] = images
    if ldm["hflip"]:
        tensors["mean_flip"], tensors["std_flip"] = posterior(images.flip(-1))
    if not image_conditioned:
        # Labelled images are a minority of the corpus: repeat them so the class embedding learns enough.
        labelled = torch.nonzero(tensors["labels"] >= 0).flatten()
        rows = torch.cat([torch.arange(len(labels))] + [labelled] * (int(ldm["labelled_repeats"]) - 1))
        tensors = {name: tensor[rows] for name, tensor in tensors.items()}
    val_mean, _ = posterior(val_images) if len(val_images) else (torch.zeros(0, *mean.shape[1:]), None)
    scale, dropout, n_train_t = generator.scaling_factor, float(ldm["cond_dropout"]), scheduler.config.num_train_timesteps

    def loss_fn(model, batch):
        mean, std = batch["mean"], batch["std"]
        flip = None
        if "mean_flip" in batch:
            flip = (torch.rand(len(mean), device=mean.device) < 0.5)[:, None, None, None]
            mean, std = torch.where(flip, batch["mean_flip"], mean), torch.where(flip, batch["std_flip"], std)
        latents = (mean + std * torch.randn_like(mean)) * scale
        drop = torch.rand(len(mean), device=mean.device) < dropout
        if image_conditioned:
            cond_input = batch["images"] if flip is None else torch.where(flip, batch["images"].flip(-1),
                                                                           batch["images"])
        else:
            cond_input = batch["labels"]
            drop = drop | (cond_input < 0)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, n_train_t, (len(latents),), device=latents.device)
        prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, cond_input, drop)
        return F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps)), {}

    def eval_fn(model, epoch):
        # The conditional loss on held-out images (unconditional for a class base: held-out images have no label).
        device = next(model.parameters()).device
        latents = val_mean.to(device) * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, n_train_t, (len(latents),), device=device)
        if image_conditioned:
            cond_input, drop = val_images.to(device), torch.zeros(len(latents), dtype=torch.bool, device=device)
        else:
            cond_input = torch.full((len(latents),), -1, device=device)
            drop = torch.ones(len(latents), dtype=torch.bool, device=device)
        noisy, target = scheduler.add_noise(latents, noise, timesteps), diffusion_target(scheduler, latents, noise,
                                                                                         timesteps)
        metrics = {"val/loss": F.mse_loss(model(noisy, timesteps, cond_input, drop).float(), target)}
        if image_conditioned:  # what the image embedding is worth: the same loss with the null condition
            null = model(noisy, timesteps, cond_input, torch.ones_like(drop))
            metrics["val/loss_null"] = F.mse_loss(null.float(), target)
        return metrics

    train_config = TrainConfig(epochs=ldm["unet_epochs"], max_steps=ldm["unet_steps"], batch_size=ldm["batch_size"],
                               lr=ldm["unet_lr"], weight_decay=0.0, ema_decay=ldm["ema_decay"],
                               warmup_epochs=_warmup_epochs(ldm["unet_epochs"], ldm["unet_steps"], len(tensors["mean"]),
                                                            ldm["batch_size"]),
                               checkpoint_every_steps=ldm.get("checkpoint_every_steps", 0),
                               checkpoint_every_minutes=checkpoint_minutes(config),
                               betas=(0.9, 0.999), seed=derive_seed(seed, "unet"),
                               mixed_precision=ldm["mixed_precision"],
                               select_metric="val/loss" if len(val_images) else None, select_mode="min")
    trainer = Trainer(objective, _Tensors(**tensors), loss_fn, train_config, Path(out_dir) / "train_unet",
                      eval_fn=eval_fn if len(val_images) else None, run_config=config, inputs=inputs)
    result = trainer.fit(resume=resume)
    trainer.load_best()
    generator.unet.eval()
    conditioner.eval().requires_grad_(False)
    return result


def pretrain_ldm(config, stimuli, out_dir, classifier_dir=None, resume=False):
    """Train the embedded base generator and write ``out_dir`` (see the module docstring).

    Parameters
    ----------
    config : dict
        Resolved experiment config (``ldm``, ``generate`` sections, ``seed``).
    stimuli : path
        ``stimuli.h5``; its ``pool`` and ``train`` images are used, never ``test``.
    out_dir : path
    classifier_dir : path, optional
        The domain classifier, to score class-conditioned samples.
    resume : bool
        Continue each step from its last checkpoint.

    Returns
    -------
    dict
        The contents of ``metrics.json``.
    """
    ldm = config["ldm"]
    if ldm["base"] != "embedded":
        raise MindvisError("pretrain_ldm trains the embedded generator, but ldm.base names a folder",
                           key="ldm.base", fix="use the folder directly (no pretraining), or set ldm.base: embedded.")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    seed = derive_seed(config["seed"], "pretrain_ldm")
    seed_everything(seed)
    stimulus_set = load_stimulus_set(stimuli)
    image_size = ldm["image_size"] or int(stimulus_set.splits["train"].images.shape[1])
    channels = int(stimulus_set.splits["train"].images.shape[3])
    corpus = None
    if ldm["corpus"] != "stimuli":
        # At the stimulus images' own size, so both concatenate; all are resized to image_size below.
        corpus = load_image_corpus(ldm["corpus"], int(stimulus_set.splits["train"].images.shape[1]), channels,
                                   pad_fraction=ldm["corpus_border"])
        log.info("pretrain_ldm: corpus %s (%d images, sha256 %s)", corpus.source, len(corpus.images),
                 corpus.sha256[:12])
    raw_images, labels, raw_val, val_labels = image_corpus(stimulus_set, ldm["val_images"], seed, corpus)
    images = images_to_tensor(raw_images, image_size, channels)
    val_images = images_to_tensor(raw_val, image_size, channels) if len(raw_val) else images[:0]
    log.info("pretrain_ldm: %d training images (%d labelled), %d held out, %d px, %d channel(s)", len(images),
             int((labels >= 0).sum()), len(val_images), image_size, channels)

    generator = build_embedded_generator(image_size, channels, stimulus_set.n_classes, ldm)
    conditioner_name = "image_conditioner" if generator.image_conditioner is not None else "class_conditioner"
    n_params = {name: sum(p.numel() for p in module.parameters())
                for name, module in (("vae", generator.vae), ("unet", generator.unet),
                                     (conditioner_name, generator.conditioner))}
    timings = {}
    tick = time.perf_counter()
    trained_on = [stimuli] + ([] if ldm["corpus"] == "stimuli" else [ldm["corpus"]])
    vae_result = train_vae(generator, images, val_images, ldm, seed, out_dir, config, resume, inputs=trained_on)
    timings["vae_s"] = round(time.perf_counter() - tick, 2)
    tick = time.perf_counter()
    unet_result = train_unet(generator, images, labels, val_images, ldm, seed, out_dir, config, resume,
                             inputs=trained_on)
    timings["unet_s"] = round(time.perf_counter() - tick, 2)

    metrics = {"stage": "pretrain_ldm", "corpus": {"spec": ldm["corpus"], "source": corpus.source,
                                                   "sha256": corpus.sha256, "n_images": len(corpus.images)}
               if corpus is not None else {"spec": "stimuli", "source": str(stimuli)},
               "n_train_images": len(images), "n_labelled": int((labels >= 0).sum()),
               "n_val_images": len(val_images), "image_size": image_size, "latent_shape": generator.latent_shape(1)[1:],
               "scaling_factor": generator.scaling_factor, "n_parameters": n_params,
               "vae": {"best": vae_result["best"], "steps": vae_result["step"]},
               "unet": {"best": unet_result["best"], "steps": unet_result["step"],
                        "final": unet_result["last_metrics"]}}
    metrics.update({f"val_{k}": v for k, v in reconstruction_metrics(generator, val_images).items()})
    tick = time.perf_counter()
    sampler = {k: config["generate"][k] for k in ("sampler", "steps", "guidance_scale", "eta")}
    if generator.image_conditioner is not None:
        samples, sample_labels = reconstruction_samples(generator, raw_val, val_labels, stimulus_set.n_classes,
                                                        ldm["eval_samples_per_class"], config["generate"], seed)
    else:
        samples, sample_labels = class_conditioned_samples(generator, stimulus_set.n_classes,
                                                           ldm["eval_samples_per_class"], config["generate"], seed)
    timings["class_samples_s"] = round(time.perf_counter() - tick, 2)
    metrics["class_samples"] = {"per_class": int(ldm["eval_samples_per_class"]), **sampler,
                                "given": "own image embedding (held-out images)"
                                if generator.image_conditioner is not None else "class label"}
    if classifier_dir is not None and len(sample_labels):
        classifier = load_classifier(classifier_dir)
        flat = samples.reshape(-1, *samples.shape[2:])
        predicted = classifier.predict_proba(flat).argmax(axis=1)
        metrics["class_samples"]["classifier_top1"] = float(np.mean(predicted == sample_labels))
        metrics["class_samples"]["per_class_top1"] = [
            float(np.mean(predicted[sample_labels == c] == c)) for c in range(stimulus_set.n_classes)]
        log.info("class-conditioned base samples: classifier top-1 %.3f (chance %.3f)",
                 metrics["class_samples"]["classifier_top1"], 1 / stimulus_set.n_classes)
    metrics.update({"timings": timings, "wall_time_s": round(time.perf_counter() - started, 2),
                    "class_names": list(stimulus_set.class_names), "config": config, "versions": software_versions()})
    save_generator(generator, out_dir, extra={"stage": "pretrain_ldm", "class_names": list(stimulus_set.class_names)})
    if samples.size:
        save_grid(out_dir / "class_samples.png", samples)
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("wrote %s: held-out reconstruction MSE %.4f (PSNR %.1f dB)", out_dir, metrics["val_recon_mse"],
             metrics["val_recon_psnr_db"])
    return metrics
