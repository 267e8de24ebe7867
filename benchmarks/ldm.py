"""DC-LDM speed and sampler quality on this CPU.

``speed``: for the default config's generator sizes (``configs/default.yaml``),
each measurement in a fresh subprocess (so peak memory is its own):

* ``pretrain-vae`` / ``pretrain-unet``: one pretrain_ldm optimiser step (batch ``ldm.batch_size``);
* ``finetune``: one fine-tuning step (default trained groups: encoder + mapper +
  UNet attn2 + norms; frozen VAE encoding inside the step, as in the stage), at
  ``finetune.batch_size``, with an SC-MBM encoder of the configured preset on
  ``--voxels`` voxels;
* ``ddim50``: DDIM-50 sampling with classifier-free guidance, at ``generate.batch_size``.

``samplers``: on a *trained* base generator (``results/pretrain/ldm``), draw
``--per-class`` class-conditioned samples per class with DDIM-50 and with the
250-step PLMS sampler MinD-Vis used (diffusers' PNDMScheduler, PRK steps
skipped), same seeds and guidance; report seconds per image and the domain
classifier's top-1 on the samples, and the mean absolute pixel difference
between the two samplers' images.

Usage::

    python benchmarks/ldm.py speed --threads 2
    python benchmarks/ldm.py samplers --base results/pretrain/ldm --classifier results/classifier --threads 2

Prints Markdown table rows (paste into benchmarks/results/ldm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _default_config():
    from mindvis.config import load_config

    return load_config("configs/default.yaml")


def measure(kind, steps, warmup, threads, voxels):
    """Time ``steps`` repetitions of one kind of work after ``warmup``; return a result dict."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from mindvis.models.ldm import build_embedded_generator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = _default_config()
    ldm, size = config["ldm"], config["stimuli"]["image_size"]
    generator = build_embedded_generator(size, 1, 10, ldm)
    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    rss_before = _peak_rss_mb()

    if kind in ("pretrain-vae", "pretrain-unet", "finetune"):
        batch = ldm["batch_size"] if kind.startswith("pretrain") else config["finetune"]["batch_size"]
        images = torch.rand(batch, 1, size, size) * 2 - 1
        if kind == "pretrain-vae":
            model = generator.vae
            params = list(model.parameters())

            def step():
                posterior = model.encode(images).latent_dist
                loss = F.mse_loss(model.decode(posterior.sample()).sample, images) + 1e-4 * posterior.kl().mean()
                loss.backward()
        elif kind == "pretrain-unet":
            unet, classes = generator.unet, generator.class_conditioner
            params = list(unet.parameters()) + list(classes.parameters())
            labels = torch.randint(0, 10, (batch,))

            def step():
                with torch.no_grad():
                    latents = generator.encode(images)
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (batch,))
                cond = classes(labels)
                pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond.context,
                            class_labels=cond.pooled).sample
                F.mse_loss(pred, noise).backward()
        else:
            from mindvis.models.dcldm import build_decoder
            from mindvis.train.finetune import freeze_for_finetuning

            generator.vae.requires_grad_(False)
            model = build_decoder(config, generator, voxels, baseline=True)
            freeze_for_finetuning(model, config["finetune"]["train"])
            params = [p for p in model.parameters() if p.requires_grad]
            fmri = torch.randn(batch, voxels)

            def step():
                with torch.no_grad():
                    latents = generator.encode(images)
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (batch,))
                F.mse_loss(model(scheduler.add_noise(latents, noise, t), t, fmri), noise).backward()
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def work():
            step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        unit, per = "steps/s", 1
    elif kind == "ddim50":
        from mindvis.generate.sampling import sample_images

        batch = config["generate"]["batch_size"]
        classes = generator.class_conditioner
        labels = torch.arange(batch) % 10

        def work():
            with torch.no_grad():
                sample_images(generator, classes(labels), null_condition=classes.null(batch), sampler="ddim",
                              num_steps=50, guidance_scale=config["generate"]["guidance_scale"],
                              seeds=list(range(batch)))
        unit, per = "images/s", batch
        steps, warmup = max(1, steps // 10), min(warmup, 1)
    else:
        raise ValueError(kind)
    for _ in range(warmup):
        work()
    start = time.perf_counter()
    for _ in range(steps):
        work()
    seconds = time.perf_counter() - start
    return {"kind": kind, "batch": batch, "rate": steps * per / seconds, "unit": unit,
            "seconds_per_call": seconds / steps, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": rss_before, "threads": threads}


def cmd_speed(args):
    print(f"load average before: {os.getloadavg()}")
    print("| work | batch | rate | s per call | peak RSS (MiB) | threads |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in args.kinds:
        out = subprocess.run([sys.executable, __file__, "_one", kind, str(args.steps), str(args.warmup),
                              str(args.threads), str(args.voxels)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {kind} | {result['batch']} | {result['rate']:.2f} {result['unit']} | "
              f"{result['seconds_per_call']:.3f} | {result['peak_rss_mb']:.0f} | {result['threads']} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def cmd_samplers(args):
    import numpy as np
    import torch

    from mindvis.data.images import tensor_to_images
    from mindvis.generate.sampling import sample_images
    from mindvis.models.classifiers.domain import load_classifier
    from mindvis.models.ldm import load_generator

    torch.set_num_threads(args.threads)
    generator = load_generator(args.base)
    classifier = load_classifier(args.classifier)
    n_classes = generator.class_conditioner.config.n_classes
    labels = np.repeat(np.arange(n_classes), args.per_class)
    print(f"load average before: {os.getloadavg()}")
    print("| sampler | steps | guidance | images | s per image | classifier top-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    images = {}
    for sampler, steps in (("ddim", 50), ("plms", 250), ("dpmsolver++", 20)):
        out, start = [], time.perf_counter()
        for begin in range(0, len(labels), args.batch_size):
            chunk = torch.as_tensor(labels[begin:begin + args.batch_size])
            with torch.no_grad():
                cond = generator.class_conditioner(chunk)
                out.append(tensor_to_images(sample_images(
                    generator, cond, null_condition=generator.class_conditioner.null(len(chunk)), sampler=sampler,
                    num_steps=steps, guidance_scale=args.guidance, seeds=list(range(begin, begin + len(chunk))))))
        seconds = time.perf_counter() - start
        images[sampler] = np.concatenate(out)
        top1 = float(np.mean(classifier.predict_proba(images[sampler]).argmax(axis=1) == labels))
        print(f"| {sampler} | {steps} | {args.guidance} | {len(labels)} | {seconds / len(labels):.3f} | {top1:.3f} |",
              flush=True)
    difference = np.abs(images["ddim"].astype(float) - images["plms"].astype(float)).mean()
    print(f"mean |DDIM-50 - PLMS-250| per pixel (0-255, same seeds): {difference:.2f}")
    print(f"load average after: {os.getloadavg()}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        kind, steps, warmup, threads, voxels = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(measure(kind, steps, warmup, threads, voxels)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed")
    speed.add_argument("--kinds", nargs="+", default=["pretrain-vae", "pretrain-unet", "finetune", "ddim50"])
    speed.add_argument("--steps", type=int, default=20)
    speed.add_argument("--warmup", type=int, default=3)
    speed.add_argument("--threads", type=int, default=2)
    speed.add_argument("--voxels", type=int, default=1600, help="voxels of the synthetic subject (default ~ simulated)")
    samplers = commands.add_parser("samplers")
    samplers.add_argument("--base", required=True)
    samplers.add_argument("--classifier", required=True)
    samplers.add_argument("--per-class", type=int, default=10)
    samplers.add_argument("--batch-size", type=int, default=50)
    samplers.add_argument("--guidance", type=float, default=3.0)
    samplers.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    {"speed": cmd_speed, "samplers": cmd_samplers}[args.command](args)


if __name__ == "__main__":
    main()
