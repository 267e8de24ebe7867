"""Samplers for the latent diffusion UNet: DDIM, DDPM, DPM-Solver++ and PLMS, with classifier-free guidance.

All samplers are diffusers schedulers built with ``from_config`` from the
generator's training noise schedule, so no sampler needs retraining. The
denoising loop is written here (not a diffusers pipeline) because the UNet
takes the fMRI condition in two places (cross-attention context and pooled
timestep addition) and because attention capture hooks into each step.

Seeding is per sample: each sample has its own ``torch.Generator``, which
draws its initial noise (and, for DDPM, its per-step noise), so a sample does
not depend on which other samples share its batch.
"""

from __future__ import annotations

import contextlib

import torch

from mindvis.errors import MindvisError
from mindvis.models.conditioning import Condition

SAMPLERS = ("ddim", "ddpm", "dpmsolver++", "plms", "plms_compvis")


def make_scheduler(name, scheduler_config, eta=0.0):
    """A fresh sampler scheduler (multistep schedulers keep state, so one per sampling run).

    Parameters
    ----------
    name : {'ddim', 'ddpm', 'dpmsolver++', 'plms', 'plms_compvis'}
        DDIM (deterministic for ``eta = 0``); DDPM, the full stochastic reverse
        process; DPM-Solver++ (2nd order multistep); PLMS (diffusers'
        PNDMScheduler without Runge-Kutta warm-up, timesteps 0 ... 996 for 250
        steps); PLMS as CompVis's ``PLMSSampler`` that MinD-Vis samples with
        (timesteps 1 ... 997: ``steps_offset`` 1, and the last step's previous
        alpha the schedule's first, not 1).
    scheduler_config : dict
        The generator's training schedule.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    # Keys of one scheduler class that another does not know are ignored by from_config.
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(scheduler_config, clip_sample=False)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    if name == "plms":
        return PNDMScheduler.from_config(scheduler_config, skip_prk_steps=True)
    if name == "plms_compvis":
        # CompVis's make_ddim_timesteps adds 1 to range(0, T, T // steps) and its last alpha_prev is alphas_cumprod[0];
        # PNDM's skip-PRK first step is CompVis's pseudo improved Euler step (tests/test_god_protocol.py).
        return PNDMScheduler.from_config(scheduler_config, skip_prk_steps=True, steps_offset=1,
                                         set_alpha_to_one=False, timestep_spacing="leading")
    raise MindvisError(f"unknown sampler '{name}'", key="generate.sampler",
                       fix=f"use one of {', '.join(SAMPLERS)}.")


def sampler_steps(name, steps, scheduler_config):
    """Denoising steps a sampler runs: DDPM always runs the full reverse process."""
    if name == "ddpm":
        return int(scheduler_config["num_train_timesteps"])
    return int(steps)


def seeded_generators(seeds):
    """One CPU ``torch.Generator`` per sample, seeded with ``seeds`` (ints)."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(shape, generators, dtype=torch.float32, device="cpu"):
    """``[B, C, h, w]`` standard normal noise, row ``i`` drawn from ``generators[i]`` alone."""
    rows = [torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32) for gen in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_latents(unet, scheduler, condition, *, null_condition=None, guidance_scale=1.0, num_steps=50,
                   generators, latent_shape, eta=0.0, recorder=None, autocast_dtype=None, init_latents=None,
                   strength=1.0):
    """Run a sampler from noise to clean latents.

    Parameters
    ----------
    unet : diffusers.UNet2DConditionModel
        With ``class_embed_type='identity'``: ``condition.pooled`` is added to its
        timestep embedding.
    scheduler : a diffusers scheduler from :func:`make_scheduler`
    condition : Condition
        ``context`` [B, T, D], ``pooled`` [B, P].
    null_condition : Condition, optional
        The unconditional branch for classifier-free guidance; needed when
        ``guidance_scale != 1``.
    guidance_scale : float
        ``eps = eps_null + s (eps_cond - eps_null)``. At 1 the null branch is
        skipped (the formula reduces to the conditioned prediction).
    num_steps : int
    generators : list of torch.Generator, length B
        Per-sample randomness (initial noise; DDPM and DDIM with eta > 0 noise).
    latent_shape : tuple
        ``(B, C, h, w)``.
    eta : float
        DDIM's stochasticity (0 = deterministic).
    recorder : mindvis.generate.attention.CrossAttentionRecorder, optional
        Told the step index and which batch rows are conditioned before each UNet call.
    autocast_dtype : torch.dtype, optional
        E.g. torch.bfloat16 for the UNet forward passes.
    init_latents : torch.Tensor, optional
        ``[B, C, h, w]`` scaled latents to start from instead of pure noise (img2img, as in
        Brain-Diffuser's and MindEye's low-level start): they are noised to the timestep at
        ``strength`` of the schedule with each sample's own noise, and only the remaining
        ``round(strength * num_steps)`` steps are run.
    strength : float
        In (0, 1]; 1 (or no ``init_latents``) samples from pure noise.

    Returns
    -------
    torch.Tensor
        Latents ``[B, C, h, w]`` (scaled as the VAE expects after division by its scaling factor).
    """
    batch = latent_shape[0]
    if len(generators) != batch or len(condition) != batch:
        raise ValueError(f"need one generator and one condition per sample ({batch}), "
                         f"got {len(generators)} and {len(condition)}")
    guided = guidance_scale != 1.0
    if guided and null_condition is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a null condition")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    latents = initial_noise(latent_shape, generators, dtype=torch.float32, device=device)
    if init_latents is not None and strength < 1.0:
        # As diffusers' img2img pipelines: skip the first (1 - strength) of the steps, noise the start to the first kept one.
        n_run = max(1, min(num_steps, int(round(strength * num_steps))))
        start = (num_steps - n_run) * scheduler.order
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        latents = scheduler.add_noise(init_latents.to(device, torch.float32), latents, timesteps[:1])
    else:
        latents = latents * scheduler.init_noise_sigma
    if guided:
        # Null rows first, then conditioned rows: one UNet pass for both branches.
        both = Condition.cat([null_condition, condition])
        context, pooled = both.context, both.pooled
    else:
        context, pooled = condition.context, condition.pooled
    context, pooled = context.to(device, dtype), pooled.to(device, dtype)
    step_kwargs = {"generator": generators}
    if type(scheduler).__name__ == "DDIMScheduler":
        step_kwargs["eta"] = eta
    elif type(scheduler).__name__ in ("DPMSolverMultistepScheduler", "PNDMScheduler"):
        step_kwargs = {}
    cast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext())
    for index, timestep in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        if recorder is not None:
            recorder.begin_step(index, slice(batch, 2 * batch) if guided else slice(0, batch))
        with cast:
            eps = unet(model_input.to(dtype), timestep, encoder_hidden_states=context,
                       class_labels=pooled).sample.float()
        if guided:
            eps_null, eps_cond = eps.chunk(2)
            eps = eps_null + guidance_scale * (eps_cond - eps_null)
        latents = scheduler.step(eps, timestep, latents, **step_kwargs).prev_sample
    return latents


@torch.no_grad()
def sample_images(generator, condition, *, null_condition=None, sampler="ddim", num_steps=50,
                  guidance_scale=1.0, seeds, eta=0.0, recorder=None, autocast_dtype=None, init_latents=None,
                  strength=1.0):
    """Sample images for a batch of conditions with a :class:`~mindvis.models.ldm.Generator`
    (from ``init_latents`` at ``strength``: see :func:`sample_latents`).

    Returns
    -------
    torch.Tensor
        Images ``[B, C, H, W]`` in [-1, 1] (clamped).
    """
    scheduler = make_scheduler(sampler, generator.scheduler_config, eta=eta)
    steps = sampler_steps(sampler, num_steps, generator.scheduler_config)
    latents = sample_latents(generator.unet, scheduler, condition, null_condition=null_condition,
                             guidance_scale=guidance_scale, num_steps=steps,
                             generators=seeded_generators(seeds), latent_shape=generator.latent_shape(len(seeds)),
                             eta=eta, recorder=recorder, autocast_dtype=autocast_dtype, init_latents=init_latents,
                             strength=strength)
    vae_dtype = next(generator.vae.parameters()).dtype
    return generator.decode(latents.to(vae_dtype)).float().clamp(-1, 1)
