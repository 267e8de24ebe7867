"""SC-MBM training throughput and peak memory, by preset, precision and attention implementation.

Each configuration runs in a fresh subprocess (so peak memory is its own):
build the model, take ``--warmup`` training steps (AdamW, the engine's loss
path with augmentation), then time ``--steps`` more. Also checks correctness:
'plain' and 'sdpa' attention must give the same loss, and bf16 autocast a
loss within a few percent of float32, on the same batch and masks.

Usage::

    python benchmarks/mbm.py                       # tiny + paper, all variants, ~4,500 voxels, batch 32
    python benchmarks/mbm.py --presets tiny --steps 20 --threads 2

Prints one Markdown table row per configuration (paste into benchmarks/results/mbm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mb():
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(preset, n_voxels, batch_size, steps, warmup, mixed_precision, attention, threads, seed=0):
    """Time training steps of one configuration in this process; return a result dict."""
    import torch

    from mindvis.models.augment import FmriAugment
    from mindvis.models.mbm import MBMAutoencoder

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = MBMAutoencoder.from_preset(preset, n_voxels=n_voxels, attention=attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    augment = FmriAugment(0.1, 0.1)
    fmri = torch.randn(batch_size, n_voxels)
    voxel_mask = torch.ones_like(fmri, dtype=torch.bool)
    voxel_mask[batch_size // 2:, n_voxels - 300:] = False  # half the batch from a smaller subject: padding on
    rss_before = _rss_mb()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss, _, _ = model(augment(fmri, voxel_mask), voxel_mask, target=fmri)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps

    # Correctness on a fixed batch and mask: the loss this configuration computes, for comparison.
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        check_loss = float(model(fmri, voxel_mask, generator=torch.Generator().manual_seed(1))[0])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset, "n_voxels": n_voxels, "batch_size": batch_size, "mixed_precision": mixed_precision,
        "attention": attention, "threads": threads, "steps_timed": steps, "s_per_step": round(seconds, 4),
        "samples_per_s": round(batch_size / seconds, 1), "peak_rss_mb": round(peak_mb), "rss_before_mb": round(rss_before),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "check_loss": check_loss,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--n-voxels", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps for small presets")
    parser.add_argument("--paper-steps", type=int, default=1, help="timed steps for base/paper")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--attentions", nargs="+", default=["sdpa", "plain"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON-encoded configuration
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return 0

    import torch

    load = os.getloadavg()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {load[0]:.2f} at start")
    print("| preset | params (M) | precision | attention | s/step | samples/s | peak RSS (MiB) | check loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for preset in args.presets:
        large = preset in ("base", "paper")
        for precision in args.precisions:
            for attention in args.attentions:
                spec = dict(preset=preset, n_voxels=args.n_voxels, batch_size=args.batch_size,
                            steps=args.paper_steps if large else args.steps, warmup=1 if large else 2,
                            mixed_precision=precision, attention=attention, threads=args.threads)
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(result)
                print(f"| {preset} | {result['params_m']} | {precision} | {attention} | {result['s_per_step']:.3f} | "
                      f"{result['samples_per_s']} | {result['peak_rss_mb']} | {result['check_loss']:.4f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
