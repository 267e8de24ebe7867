"""One process against two at the same global batch: SC-MBM pretraining and DC-LDM fine-tuning on the CPU.

Two processes (``accelerate launch --multi_gpu --num_processes 2``, gloo) split every batch, so the
schedule (steps, learning rates) is the same as one process's, but each process draws its own random
masks and noise: the results agree statistically, not bit for bit. To say how close is close, the
one-process run is repeated with other training seeds, and the 1-vs-2 difference is set beside the
seed-to-seed spread.

    python benchmarks/multiprocess.py --run-dir results-test --out benchmarks/results/multiprocess

``--run-dir`` is a finished `snakemake decode --configfile configs/test.yaml` directory (its sub-01
fine-tuning is repeated); without it only SC-MBM is measured.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mindvis.cli"]


def run(command, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run((LAUNCH if processes == 2 else [str(BIN / "mindvis")]) + command, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-4000:])
    return time.perf_counter() - start


def sc_mbm(work):
    from test_mbm import write_fixture_files

    responses, rest = write_fixture_files(work, np.random.default_rng(0))
    rows = []
    for seed, processes in ((1, 1), (1, 2), (2, 1), (3, 1), (4, 1)):
        config = work / f"mbm-{seed}.yaml"
        config.write_text(yaml.safe_dump({"experiment": "multiprocess", "seed": seed, "mbm": {
            "preset": "tiny", "patch_size": 8, "epochs": 6, "batch_size": 16, "base_lr": 0.02, "warmup_epochs": 1,
            "mixed_precision": "no"}}))
        out = work / f"mbm-seed{seed}-p{processes}"
        seconds = run(["pretrain-mbm", "--config", str(config), "--threads", "1", "--responses", *map(str, responses),
                       "--rest", *map(str, rest), "--out-dir", str(out)], processes)
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"stage": "pretrain_mbm", "seed": seed, "processes": processes, "seconds": round(seconds, 1),
                     "step": summary["step"], "effective_batch": summary["training"]["effective_batch"],
                     "val/recon_corr": summary["final_metrics"]["val/recon_corr"],
                     "val/loss": summary["final_metrics"]["val/loss"]})
    return rows


def finetune(work, run_dir):
    results = Path(run_dir) / "results"
    config = yaml.safe_load((results / "config.yaml").read_text())
    rows = []
    for seed, processes in ((config["seed"], 1), (config["seed"], 2), (config["seed"] + 1, 1)):
        path = work / f"finetune-{seed}.yaml"
        path.write_text(yaml.safe_dump({**config, "seed": seed}))
        out = work / f"finetune-seed{seed}-p{processes}"
        seconds = run(["finetune", "--config", str(path), "--subject", "sub-01", "--responses",
                       str(results / "sub-01/responses.h5"), "--stimuli", str(results / "bids/stimuli/stimuli.h5"),
                       "--base", str(results / "pretrain/ldm"), "--mbm", str(results / "pretrain/mbm"),
                       "--out-dir", str(out), "--threads", "1"],
                      processes)
        meta = json.loads((out / "dcldm.json").read_text())
        history = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines()]
        last = history[-1]
        rows.append({"stage": "finetune", "seed": seed, "processes": processes, "seconds": round(seconds, 1),
                     "step": meta["step"], "effective_batch": meta["training"]["effective_batch"],
                     "val/loss": last.get("val/loss"), "val/identification": last.get("val/identification"),
                     "train/loss": last.get("train/loss")})
    return rows


def markdown(rows, machine):
    lines = ["# 1 vs 2 processes at the same global batch (CPU, gloo)\n", f"Machine: {machine}.\n",
             "| stage | training seed | processes | steps | global batch | val/recon_corr | val/loss | val/identification"
             " | train/loss | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda value: "" if value is None else f"{value:.4f}"  # noqa: E731
    for row in rows:
        lines.append(f"| {row['stage']} | {row['seed']} | {row['processes']} | {row['step']} | "
                     f"{row['effective_batch']} | {fmt(row.get('val/recon_corr'))} | {fmt(row.get('val/loss'))} | "
                     f"{fmt(row.get('val/identification'))} | {fmt(row.get('train/loss'))} | {row['seconds']} |")
    for stage, metric in (("pretrain_mbm", "val/recon_corr"), ("finetune", "val/loss")):
        chosen = [row for row in rows if row["stage"] == stage]
        if not chosen:
            continue
        base = chosen[0]
        two = next(row for row in chosen if row["processes"] == 2)
        seeds = [row[metric] for row in chosen if row["processes"] == 1]
        lines.append(f"\n{stage}: |1 vs 2 processes| {metric} = {abs(two[metric] - base[metric]):.4f}; "
                     f"spread over {len(seeds)} one-process training seeds (max - min) = "
                     f"{max(seeds) - min(seeds):.4f}.")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a finished test-config run (fine-tuning is repeated on its sub-01)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/multiprocess"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = sc_mbm(work)
        if args.run_dir:
            rows += finetune(work, args.run_dir)
    from mindvis.utils.io import software_versions

    versions = software_versions()
    machine = f"{versions.get('cpu')}, {os.cpu_count()} cores, {platform.platform()}, torch {versions.get('torch')}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
