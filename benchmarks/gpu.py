"""GPU speed and memory of the two UNets mindvis fine-tunes, with random weights (no download).

Both UNets are built from their configs with seeded random weights: speed and memory do not
depend on the weights. Weights are float32, the work runs under bf16 autocast (fp16 on a GPU
without bf16), ``torch.backends.cuda.matmul.allow_tf32`` is left as torch sets it.

* **sd15**: Stable Diffusion 1.5's UNet (``SD15_UNET_CONFIG``, 860 M parameters) with
  ``class_embed_type="identity"`` (mindvis adds its pooled fMRI condition, 1280 wide, to the
  timestep embedding through ``class_labels``), and SD's VAE (``SD15_VAE_CONFIG``) to decode.
* **cin256**: the UNet of CompVis's class-conditional ImageNet LDM that MinD-Vis fine-tunes
  (``mindvis.models.compvis.CIN256_V2``), on 64 x 64 x 3 latents (256 px images), context
  ``[B, 77, 512]``, pooled condition 768 wide. UNet only: its VQ first stage is not run.

Per UNet:

* ``finetune``: optimiser steps per second and peak GPU memory
  (``torch.cuda.max_memory_allocated``, reset before each case) of one fine-tuning step as mindvis
  takes it: epsilon MSE on random latents with random noise and timesteps, the UNet's default
  trained groups (cross-attention ``attn2`` layers and every GroupNorm / LayerNorm, as
  ``mindvis.train.finetune.trainable_parameter_names``), AdamW at lr 1e-4, gradient norm clipped
  at 1; SD at 256 px (latent 32) and 512 px (latent 64), cin256 at 256 px. Extra rows with
  gradient checkpointing (``--gradient-checkpointing``) and with bitsandbytes' 8-bit AdamW (when
  bitsandbytes imports; else the row says "not installed").
* ``sample``: images per second of a sampling run with classifier-free guidance (null and
  conditioned rows in one UNet batch), as ``mindvis.generate.sampling.sample_latents`` runs it:
  DDIM-50 for both UNets, and MinD-Vis's PLMS-250 (diffusers' ``PNDMScheduler`` without PRK steps)
  for cin256; SD's rows include the VAE decode.
* Parameter counts: total, and trained by the default groups.

A case that runs out of GPU memory is recorded as "out of memory" and the run goes on.

Usage::

    python benchmarks/gpu.py                               # on a GPU machine (a few minutes on an H100)
    python benchmarks/gpu.py --gradient-checkpointing --quick
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu   # every code path, tiny configs, CPU

On a GPU it writes ``benchmarks/results/gpu.json`` (every figure and the config of every case) and
``benchmarks/results/gpu.md`` (the tables and the machine); ``--out`` picks another folder.
Without a CUDA device it prints one line and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: Stable Diffusion 1.5's ``unet/config.json`` (runwayml/stable-diffusion-v1-5), plus mindvis's pooled condition.
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    # mindvis adds its pooled fMRI condition (time_embed_dim = 1280 wide) to the timestep embedding.
    "class_embed_type": "identity",
}

#: Stable Diffusion 1.5's ``vae/config.json``.
SD15_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}

#: Stable Diffusion's training schedule (``scheduler/scheduler_config.json``).
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1}

CONTEXT_TOKENS = 77          # CLIP's context length; MinD-Vis maps fMRI to 77 tokens for cin256 too
TRAINED_GROUPS = ("attn2", "norms")   # the UNet part of finetune.train's default
LR = 1e-4
WEIGHT_DECAY = 0.01          # finetune.weight_decay's default
CLIP_GRAD_NORM = 1.0         # finetune.clip_grad_norm's default
TINY_BATCH = 2
TINY_SAMPLING_STEPS = 3


# -- models --------------------------------------------------------------------------------------

def tiny_unet_config(config):
    """A two-level UNet of ``config``'s kind (its first and last level), ``block_out_channels (32, 64)``.

    The cross-attention width stays, so the condition has the real shape; the pooled condition
    becomes 128 wide (4 x 32, the tiny timestep embedding).
    """
    tiny = dict(config)
    heads = config["attention_head_dim"]
    tiny.update({
        "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": (config["down_block_types"][0], config["down_block_types"][-1]),
        "up_block_types": (config["up_block_types"][0], config["up_block_types"][-1]),
        "attention_head_dim": (heads[0], heads[-1]) if isinstance(heads, (tuple, list)) else heads,
    })
    tiny.pop("transformer_layers_per_block", None)
    return tiny


def tiny_vae_config(config):
    """A two-level VAE of ``config``'s kind (downsampling factor 2)."""
    return dict(config, block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                down_block_types=config["down_block_types"][:2], up_block_types=config["up_block_types"][:2])


def sd15_spec(tiny):
    """The Stable Diffusion 1.5 cases: UNet, VAE, schedule, image sizes and samplers."""
    unet, vae = SD15_UNET_CONFIG, SD15_VAE_CONFIG
    if tiny:
        unet, vae = tiny_unet_config(unet), tiny_vae_config(vae)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {"name": "sd15", "title": "Stable Diffusion 1.5 UNet (+ VAE decode when sampling)",
            "unet_config": unet, "vae_config": vae, "schedule": SD15_SCHEDULE,
            "image_sizes": (16, 32) if tiny else (256, 512), "latent_factor": factor,
            "samplers": (("ddim", 50),), "decode": "SD VAE"}


def cin256_spec(tiny):
    """The cin256 cases (MinD-Vis's LDM): UNet only; None's place is an ``error`` when compvis is missing."""
    try:
        from mindvis.models.compvis import CIN256_V2, scheduler_config_from_ldm, unet_config_from_ldm
    except ImportError:
        return {"name": "cin256", "error": "mindvis.models.compvis not available"}
    unet = unet_config_from_ldm(CIN256_V2["unet_config"]["params"])
    schedule = dict(scheduler_config_from_ldm(CIN256_V2), clip_sample=False, set_alpha_to_one=False)
    return {"name": "cin256", "title": "CompVis cin256-v2 UNet (MinD-Vis's LDM; UNet only, no VQ decode)",
            "unet_config": tiny_unet_config(unet) if tiny else unet, "vae_config": None, "schedule": schedule,
            # The VQ-f4 first stage: 256 px -> 64 x 64 x 3 latents.
            "image_sizes": (32,) if tiny else (256,), "latent_factor": 4,
            "samplers": (("ddim", 50), ("plms", 250)), "decode": "none (UNet only)"}


def build_unet(config, seed=0):
    """A ``UNet2DConditionModel`` of ``config`` with seeded random weights (float32, on the CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def build_vae(config, seed=1):
    """An ``AutoencoderKL`` of ``config`` with seeded random weights (float32, on the CPU)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config)


def trained_names(unet):
    """Names of the UNet parameters mindvis fine-tunes by default (``attn2`` layers and norms)."""
    from mindvis.train.finetune import trainable_parameter_names

    names = trainable_parameter_names(types.SimpleNamespace(unet=unet), TRAINED_GROUPS)
    return {name.removeprefix("unet.") for name in names}


def parameter_counts(unet):
    """``{"total": int, "trained_default": int}`` parameter counts of ``unet``."""
    names = trained_names(unet)
    params = dict(unet.named_parameters())
    return {"total": sum(p.numel() for p in params.values()),
            "trained_default": sum(params[name].numel() for name in names),
            "trained_groups": list(TRAINED_GROUPS)}


def pooled_width(unet):
    """Width of the UNet's timestep embedding, which ``class_labels`` is added to."""
    return unet.time_embedding.linear_2.out_features


# -- measurements --------------------------------------------------------------------------------

def _peak_memory_gib(device):
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def _free_memory(device):
    """Return cached GPU memory and reset the peak statistics (nothing to do off CUDA)."""
    import torch

    if device.type == "cuda":
        gc.collect()  # about 0.3 s with torch and diffusers loaded, so only where memory is measured
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_finetune(unet, *, batch, latent_size, schedule, optimizer, checkpointing, warmup, steps, device,
                     precision, seed=0):
    """Time fine-tuning steps of ``unet`` on random latents; return a result dict.

    Parameters
    ----------
    unet : diffusers.UNet2DConditionModel
        On ``device``; its default groups (:func:`trained_names`) are trained, the rest frozen.
    batch, latent_size : int
        Latents ``[batch, C, latent_size, latent_size]``; context ``[batch, 77, cross_attention_dim]``,
        ``class_labels [batch, time_embed_dim]``.
    schedule : dict
        The noise schedule (a DDPMScheduler config) timesteps are drawn from.
    optimizer : {'adamw', 'adamw8bit'}
    checkpointing : bool
        Gradient checkpointing of the UNet's blocks.
    warmup, steps : int
        Untimed, then timed optimiser steps.
    device : torch.device
    precision : {'bf16', 'fp16', 'no'}
        Autocast precision of the forward pass (weights stay float32).

    Returns
    -------
    dict
        ``it_per_s`` (optimiser steps per second), ``images_per_s``, ``seconds_per_step``,
        ``peak_memory_gib`` (None off CUDA), ``params_without_grad`` (trained parameters that got
        no gradient in the first step; 0 when the step is right), ``last_loss``.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from mindvis.train.engine import make_optimizer
    from mindvis.utils.device import autocast, synchronize

    names = trained_names(unet)
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
    trained = [param for param in unet.parameters() if param.requires_grad]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_schedule = DDPMScheduler.from_config(schedule)
    adamw = make_optimizer(optimizer, [{"params": trained}], lr=LR, betas=(0.9, 0.999),
                           weight_decay=WEIGHT_DECAY, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    channels, timesteps = unet.config.in_channels, noise_schedule.config.num_train_timesteps
    latents = torch.randn(batch, channels, latent_size, latent_size, generator=generator, device=device)
    context = torch.randn(batch, CONTEXT_TOKENS, unet.config.cross_attention_dim, generator=generator, device=device)
    pooled = torch.randn(batch, pooled_width(unet), generator=generator, device=device)

    def step(check=False):
        noise = torch.randn(latents.shape, generator=generator, device=device)
        t = torch.randint(0, timesteps, (batch,), generator=generator, device=device)
        with autocast(device, precision):
            pred = unet(noise_schedule.add_noise(latents, noise, t), t, encoder_hidden_states=context,
                        class_labels=pooled).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        missing = sum(param.grad is None for param in trained) if check else None
        torch.nn.utils.clip_grad_norm_(trained, CLIP_GRAD_NORM)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return loss.detach(), missing

    try:
        _, missing = step(check=True)
        for _ in range(warmup - 1):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = step()
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    return {"it_per_s": steps / seconds, "images_per_s": steps * batch / seconds, "seconds_per_step": seconds / steps,
            "peak_memory_gib": _peak_memory_gib(device), "params_without_grad": int(missing),
            "last_loss": float(loss)}


def measure_sampling(unet, vae, *, sampler, num_steps, batch, latent_size, schedule, guidance_scale, n_batches,
                     device, precision, seed=0):
    """Time sampling runs (``n_batches`` batches of ``batch`` images) after a short warm-up run.

    Parameters
    ----------
    unet : diffusers.UNet2DConditionModel
    vae : diffusers.AutoencoderKL or None
        Decodes the latents (inside the timing); None: UNet only.
    sampler : {'ddim', 'plms'}
        As :func:`mindvis.generate.sampling.make_scheduler` builds it from ``schedule``.
    num_steps, batch, latent_size : int
    schedule : dict
    guidance_scale : float
        Classifier-free guidance: every UNet call takes ``2 * batch`` rows (null, then conditioned).
    n_batches : int
    device : torch.device
    precision : {'bf16', 'fp16', 'no'}

    Returns
    -------
    dict
        ``images_per_s``, ``seconds_per_batch``, ``peak_memory_gib`` (None off CUDA).
    """
    import torch

    from mindvis.generate.sampling import make_scheduler, sample_latents, seeded_generators
    from mindvis.models.conditioning import Condition
    from mindvis.utils.device import autocast, autocast_dtype, synchronize

    unet.eval()
    if vae is not None:
        vae.eval()
    generator = torch.Generator(device).manual_seed(seed)

    def condition():
        return Condition(torch.randn(batch, CONTEXT_TOKENS, unet.config.cross_attention_dim, generator=generator,
                                     device=device),
                         torch.randn(batch, pooled_width(unet), generator=generator, device=device))

    # The null branch's values do not change the cost (SD's would be CLIP's embedding of "").
    cond, null = condition(), condition()
    latent_shape = (batch, unet.config.in_channels, latent_size, latent_size)

    @torch.no_grad()
    def run(steps):
        latents = sample_latents(unet, make_scheduler(sampler, schedule), cond, null_condition=null,
                                 guidance_scale=guidance_scale, num_steps=steps,
                                 generators=seeded_generators(range(batch)), latent_shape=latent_shape,
                                 autocast_dtype=autocast_dtype(precision))
        if vae is None:
            return latents
        with autocast(device, precision):
            return vae.decode(latents / vae.config.scaling_factor).sample

    run(min(3, num_steps))  # kernels chosen and memory pools grown outside the timing
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        run(num_steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": n_batches * batch / seconds, "seconds_per_batch": seconds / n_batches,
            "peak_memory_gib": _peak_memory_gib(device)}


def run_case(case, measure, device, modules):
    """Run ``measure()`` for ``case`` (a config dict) and return the case with its results or its error.

    A CUDA out-of-memory error is recorded as ``error: "out of memory"``; memory is freed
    (gradients, caches) and peak statistics reset before and after.
    """
    import torch

    _free_memory(device)
    result = {"error": None}
    try:
        result.update(measure())
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    for module in modules:
        module.zero_grad(set_to_none=True)
    _free_memory(device)
    case = {**case, **result}
    print(f"[gpu] {describe(case)}", flush=True)
    return case


def describe(case):
    """One progress line of a finished case."""
    head = f"{case['model']} {case['work']} {case['image_size']} px batch {case['batch']}"
    if case["work"] == "finetune":
        head += f" {case['optimizer']}{' + checkpointing' if case['gradient_checkpointing'] else ''}"
        figure = f"{case['it_per_s']:.2f} it/s" if case.get("error") is None else case["error"]
    else:
        head += f" {case['sampler']}-{case['num_steps']}"
        figure = f"{case['images_per_s']:.2f} images/s" if case.get("error") is None else case["error"]
    memory = case.get("peak_memory_gib")
    return head + f": {figure}" + (f", peak {memory:.1f} GiB" if memory is not None else "")


def _eight_bit_status(device):
    """None when 8-bit AdamW can run here, else why not."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken install (CUDA libraries missing) raises other errors at import
        return f"does not import ({type(error).__name__}: {error})"
    if device.type != "cuda":
        return "needs CUDA"
    return None


def benchmark_model(spec, args, device, precision):
    """All cases of one UNet (``spec`` from :func:`sd15_spec` / :func:`cin256_spec`); return (model, cases)."""
    model = {key: value for key, value in spec.items() if key not in ("image_sizes", "samplers")}
    if spec.get("error"):
        print(f"[gpu] {spec['name']}: {spec['error']}", flush=True)
        return model, []
    print(f"[gpu] {spec['name']}: building the UNet ({spec['title']})", flush=True)
    unet = build_unet(spec["unet_config"]).to(device)
    model["parameters"] = parameter_counts(unet)
    model["pooled_width"] = pooled_width(unet)
    counts = model["parameters"]
    print(f"[gpu] {spec['name']}: {counts['total'] / 1e6:.1f} M parameters, "
          f"{counts['trained_default'] / 1e6:.1f} M trained ({' + '.join(TRAINED_GROUPS)})", flush=True)
    cases = []
    eight_bit = _eight_bit_status(device)
    variants = [("adamw", False), ("adamw8bit", False)]
    if args.gradient_checkpointing or args.tiny:
        variants += [("adamw", True), ("adamw8bit", True)]
    for size in spec["image_sizes"]:
        batch = TINY_BATCH if args.tiny else args.finetune_batch[size]
        latent_size = size // spec["latent_factor"]
        for optimizer, checkpointing in sorted(variants, key=lambda v: (v[1], v[0])):
            case = {"model": spec["name"], "work": "finetune", "image_size": size, "batch": batch,
                    "latent_shape": [batch, unet.config.in_channels, latent_size, latent_size],
                    "context_shape": [batch, CONTEXT_TOKENS, unet.config.cross_attention_dim],
                    "class_labels_shape": [batch, pooled_width(unet)], "optimizer": optimizer, "lr": LR,
                    "weight_decay": WEIGHT_DECAY, "clip_grad_norm": CLIP_GRAD_NORM,
                    "gradient_checkpointing": checkpointing, "trained_groups": list(TRAINED_GROUPS),
                    "warmup_steps": args.warmup, "timed_steps": args.steps, "precision": precision}
            if optimizer == "adamw8bit" and eight_bit:
                case = {**case, "error": eight_bit}
                print(f"[gpu] {describe(case)}", flush=True)
                cases.append(case)
                continue
            cases.append(run_case(case, lambda: measure_finetune(
                unet, batch=batch, latent_size=latent_size, schedule=spec["schedule"], optimizer=optimizer,
                checkpointing=checkpointing, warmup=args.warmup, steps=args.steps, device=device,
                precision=precision), device, [unet]))
    for name, param in unet.named_parameters():
        param.requires_grad_(False)
    vae = build_vae(spec["vae_config"]).to(device).requires_grad_(False) if spec["vae_config"] else None
    for sampler, num_steps in spec["samplers"]:
        num_steps = TINY_SAMPLING_STEPS if args.tiny else num_steps
        for size in spec["image_sizes"]:
            batch = TINY_BATCH if args.tiny else args.sample_batch[size]
            latent_size = size // spec["latent_factor"]
            case = {"model": spec["name"], "work": "sample", "image_size": size, "batch": batch,
                    "latent_shape": [batch, unet.config.in_channels, latent_size, latent_size],
                    "sampler": sampler, "num_steps": num_steps, "guidance_scale": args.guidance_scale,
                    "unet_rows_per_call": 2 * batch, "decode": spec["decode"], "timed_batches": args.sampling_batches,
                    "precision": precision}
            cases.append(run_case(case, lambda: measure_sampling(
                unet, vae, sampler=sampler, num_steps=num_steps, batch=batch, latent_size=latent_size,
                schedule=spec["schedule"], guidance_scale=args.guidance_scale, n_batches=args.sampling_batches,
                device=device, precision=precision), device, []))
    return model, cases  # the UNet and VAE go with this frame; main frees their memory


# -- the machine and the report ------------------------------------------------------------------

def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def machine_info(device):
    """What the figures were measured on: the GPU (or CPU), CUDA, driver, versions, date."""
    import torch

    from mindvis.utils.io import software_versions

    versions = software_versions()
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": str(device),
            "torch": torch.__version__, "diffusers": versions.get("diffusers"), "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32, "versions": versions}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / 2 ** 30,
                     "compute_capability": f"{props.major}.{props.minor}", "driver": _nvidia_driver()})
    else:
        info.update({"cpu": versions.get("cpu"), "torch_threads": torch.get_num_threads()})
    return info


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report):
    """The Markdown page of a report dict (:func:`main`'s ``gpu.json``)."""
    machine = report["machine"]
    if "gpu" in machine:
        where = (f"{machine['gpu']}, {machine['gpu_memory_gib']:.1f} GiB (compute capability "
                 f"{machine['compute_capability']}); CUDA {machine['cuda']}, driver {machine['driver'] or 'unknown'}")
    else:
        where = f"CPU ({machine['cpu']}; torch threads: {machine['torch_threads']})"
    lines = [
        "# GPU: fine-tuning and sampling speed of the SD-1.5 and cin256 UNets" + (" (tiny configs)" if report["tiny"]
                                                                                     else ""),
        "",
        f"Machine: {where}; torch {machine['torch']}, diffusers {machine['diffusers']}; "
        f"{machine['date']}. Command: `{report['command']}`.",
        "",
        f"Random (seeded) weights, float32, {report['precision']} autocast "
        f"(`allow_tf32` matmul {machine['allow_tf32_matmul']}, cuDNN {machine['allow_tf32_cudnn']}); "
        f"{report['warmup_steps']} untimed + {report['timed_steps']} timed optimiser steps per fine-tuning case, "
        f"a 3-step warm-up run + {report['sampling_batches']} timed batch(es) per sampling case. Peak memory: "
        "`torch.cuda.max_memory_allocated`, reset before each case (weights, gradients, optimiser state, "
        "activations).",
        "",
        "## Parameters",
        "",
        "| UNet | parameters | trained by default (attn2 + norms) |",
        "| --- | ---: | ---: |",
    ]
    for model in report["models"]:
        if model.get("error"):
            lines.append(f"| {model['name']} | {model['error']} | |")
        else:
            counts = model["parameters"]
            lines.append(f"| {model['name']}: {model['title']} | {counts['total'] / 1e6:.1f} M | "
                         f"{counts['trained_default'] / 1e6:.1f} M |")
    lines += ["", "## Fine-tuning step (epsilon MSE, AdamW lr 1e-4, grad-norm clip 1)", "",
              "| UNet | image (latent) | batch | optimizer | gradient checkpointing | it/s | images/s | s/step "
              "| peak GPU memory (GiB) |",
              "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for case in report["cases"]:
        if case["work"] != "finetune":
            continue
        latent = case["latent_shape"]
        head = (f"| {case['model']} | {case['image_size']} px ({latent[2]} x {latent[3]} x {latent[1]}) | "
                f"{case['batch']} | {case['optimizer']} | {'yes' if case['gradient_checkpointing'] else 'no'} |")
        if case.get("error"):
            lines.append(f"{head} {case['error']} | | | |")
        else:
            lines.append(f"{head} {_fmt(case['it_per_s'])} | {_fmt(case['images_per_s'])} | "
                         f"{_fmt(case['seconds_per_step'], 3)} | {_fmt(case['peak_memory_gib'])} |")
    lines += ["", f"## Sampling (classifier-free guidance {report['guidance_scale']}: 2 x batch rows per UNet call)",
              "", "| UNet | sampler | image | batch | decode | images/s | s/batch | peak GPU memory (GiB) |",
              "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for case in report["cases"]:
        if case["work"] != "sample":
            continue
        head = (f"| {case['model']} | {case['sampler'].upper()}-{case['num_steps']} | {case['image_size']} px | "
                f"{case['batch']} | {case['decode']} |")
        if case.get("error"):
            lines.append(f"{head} {case['error']} | | |")
        else:
            lines.append(f"{head} {_fmt(case['images_per_s'], 3)} | {_fmt(case['seconds_per_batch'])} | "
                         f"{_fmt(case['peak_memory_gib'])} |")
    lines += ["", "cin256 rows are the UNet alone: its VQ first stage (VQ-f4, 256 px -> 64 x 64 x 3) is not run, "
              "so they leave out one decode per batch. SD's sampling rows include the VAE decode.", ""]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------

def _batch_sizes(text):
    """``256=8,512=4`` -> ``{256: 8, 512: 4}``."""
    try:
        pairs = (item.split("=") for item in text.split(","))
        return {int(size): int(batch) for size, batch in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE=BATCH[,SIZE=BATCH], e.g. 256=8,512=4, not {text!r}") \
            from None


def parse_args(argv=None):
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (cpu needs --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs (block_out_channels (32, 64)), batch 2, 2 timed steps, 3 sampling steps, "
                             "float32 on the CPU: tests every code path; writes only with --out")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (5) and one sampling batch")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also measure fine-tuning with gradient checkpointing (extra rows)")
    parser.add_argument("--finetune-batch", type=_batch_sizes, default="256=8,512=4",
                        help="fine-tuning batch size per image size (default 256=8,512=4; cin256 takes 256's)")
    parser.add_argument("--sample-batch", type=_batch_sizes, default="256=8,512=4",
                        help="sampling batch size per image size (default 256=8,512=4)")
    parser.add_argument("--guidance-scale", type=float, default=3.0,
                        help="classifier-free guidance scale (default 3; the cost does not depend on it)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per fine-tuning case (default 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per fine-tuning case (default 10, --quick 5, --tiny 2)")
    parser.add_argument("--sampling-batches", type=int, default=None,
                        help="timed batches per sampling case (default 2, --quick and --tiny 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu.json and gpu.md (default benchmarks/results; --tiny: none)")
    args = parser.parse_args(argv)
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (the full-size cases are for a GPU)")
    for name in ("finetune_batch", "sample_batch"):
        missing = {256, 512} - set(getattr(args, name))
        if missing:
            parser.error(f"--{name.replace('_', '-')} needs a batch size for {sorted(missing)} px")
    quick_or_tiny = args.quick or args.tiny
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 5 if args.quick else 10)
    args.sampling_batches = args.sampling_batches if args.sampling_batches is not None else (1 if quick_or_tiny else 2)
    if min(args.warmup, args.steps, args.sampling_batches) < 1:
        parser.error("--warmup, --steps and --sampling-batches must be at least 1")
    if args.out is None and not args.tiny:
        args.out = RESULTS
    return args


def main(argv=None):
    """Run the benchmark (see the module docstring); return the exit status."""
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu benchmark skipped: no CUDA device (torch {torch.__version__}, "
              f"cuda available: {torch.cuda.is_available()})")
        return 0
    from mindvis.utils.device import resolve_precision
    from mindvis.utils.io import write_json_atomic, write_text_atomic

    device = torch.device(args.device)
    precision = "no" if args.tiny and device.type == "cpu" else resolve_precision("auto", device)
    command = " ".join(["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"benchmark": "gpu", "command": command, "tiny": args.tiny, "precision": precision,
              "warmup_steps": args.warmup, "timed_steps": args.steps, "sampling_batches": args.sampling_batches,
              "guidance_scale": args.guidance_scale, "machine": machine_info(device), "models": [], "cases": []}
    start = time.perf_counter()
    for spec in (sd15_spec(args.tiny), cin256_spec(args.tiny)):
        model, cases = benchmark_model(spec, args, device, precision)
        report["models"].append(model)
        report["cases"] += cases
        _free_memory(device)
    report["wall_seconds"] = time.perf_counter() - start
    print(f"[gpu] done in {report['wall_seconds']:.0f} s", flush=True)
    if args.out is not None:
        write_json_atomic(args.out / "gpu.json", report)
        write_text_atomic(args.out / "gpu.md", markdown(report))
        print(f"[gpu] wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
