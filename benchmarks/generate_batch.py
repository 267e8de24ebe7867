"""Images per second of the generate stage by batch size, on the CPU and thread count a `make decode` job has.

Decodes a finished run's test fMRI with one subject's fine-tuned decoder (the sampler settings of the run's
config), once per batch size, and checks that every batch size draws the same images (each sample has its
own seed; batched convolutions may round a pixel by one level). The default's ``generate.batch_size`` should
be the fastest of them, or near it.

Usage::

    python benchmarks/generate_batch.py --results /path/to/run/results --out benchmarks/results/generate_batch

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mindvis.data.responses import load_responses
from mindvis.generate.decode import decode
from mindvis.generate.run import sample_seeds
from mindvis.models.dcldm import load_dcldm
from mindvis.utils.io import set_threads, software_versions


def cpu_name():
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(results, subject, batch_sizes, repeats):
    """``{batch_size: {"images_per_s", "seconds", "max_difference"}}`` over ``repeats`` timed decodes each."""
    config = yaml.safe_load((results / "config.yaml").read_text())
    settings = config["generate"]
    generator, decoder, _ = load_dcldm(results / subject / "dcldm")
    split = load_responses(results / subject / "responses.h5", splits=(settings["split"],))[settings["split"]]
    ids = [str(s) for s in split.stimulus_id]
    seeds = sample_seeds(config["seed"], subject, ids, settings["n_samples"])
    n_images = seeds.size
    reference, out = None, {}
    decode(decoder, generator, split.fmri[:2], seeds[:2], settings, batch_size=2)  # warm-up
    for batch_size in batch_sizes:
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            images = decode(decoder, generator, split.fmri, seeds, settings, batch_size=batch_size)
            times.append(time.perf_counter() - tick)
        reference = images if reference is None else reference
        seconds = float(np.median(times))
        out[batch_size] = {"images_per_s": round(n_images / seconds, 2), "seconds": round(seconds, 2),
                           "max_difference": int(np.abs(images.astype(int) - reference.astype(int)).max())}
        print(f"batch {batch_size}: {out[batch_size]}", flush=True)
    return out, {"n_images": int(n_images), "settings": {k: settings[k] for k in
                                                         ("sampler", "steps", "guidance_scale", "batch_size")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a finished run's results/ folder")
    parser.add_argument("--subject", default="sub-01")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a make decode job has 1)")
    parser.add_argument("--out", type=Path, required=True, help="output stem (writes .json and .md)")
    args = parser.parse_args(argv)
    set_threads(args.threads)  # BLAS and torch, as a make decode job
    started = time.perf_counter()
    by_batch, info = measure(args.results, args.subject, args.batch_sizes, args.repeats)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    record = {"command": "python benchmarks/generate_batch.py " + " ".join(argv or __import__("sys").argv[1:]),
              "machine": machine, "versions": software_versions(), "subject": args.subject,
              "minutes": round((time.perf_counter() - started) / 60, 1), **info,
              "by_batch": {str(k): v for k, v in by_batch.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    best = max(by_batch, key=lambda k: by_batch[k]["images_per_s"])
    lines = ["# Generate: images per second by batch size", "",
             f"`{record['command']}` on {machine} (torch {torch.__version__}); {info['n_images']} images "
             f"({args.subject}'s test stimuli x k), {info['settings']['sampler']} {info['settings']['steps']} steps, "
             f"guidance {info['settings']['guidance_scale']}; median of {args.repeats} timed decodes per size.", "",
             "| batch size | images/s | seconds | largest pixel difference from the first size |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {k}{' (config)' if k == info['settings']['batch_size'] else ''} | {v['images_per_s']} | "
              f"{v['seconds']} | {v['max_difference']} |" for k, v in by_batch.items()]
    lines += ["", f"Fastest: batch {best}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
