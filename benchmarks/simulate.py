"""Benchmark the simulator on a config: wall time per subject, and how decodable its data are.

Usage::

    python benchmarks/simulate.py --config configs/default.yaml --out benchmarks/results/simulate.md

Each subject runs as its own ``mindvis simulate`` process (as under Snakemake),
so its wall time includes start-up and its peak memory is its own. Decoding
uses a plain lag-average estimate (mean of the volumes 4-8 s after onset,
:func:`mindvis.simulate.validate.lag_average_trials`) and a standardised
L2-regularised logistic regression:

- single trial, cross-validated: 5-fold stratified CV over the training trials;
- test, single trial: trained on all training trials, scored on each test trial;
- test, averaged: the same classifier on each test image's mean over its repeats.

The noise ceiling is the NSD definition for the mean of ``test_repeats`` trials.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def machine():
    """nproc, CPU model and memory of this machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "memory": memory,
            "python": platform.python_version(), "platform": platform.platform()}


def run_timed(command):
    """Run a command; return wall seconds, the child's CPU seconds (user + system) and its peak RSS in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def decoding(bids_dir, subject):
    """Accuracies and noise ceiling of one simulated subject (see the module docstring)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mindvis.data.bids_layout import derivative_paths
    from mindvis.data.reliability import noise_ceiling
    from mindvis.simulate import bids
    from mindvis.simulate.validate import average_repeats, lag_average_trials

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    responses, events = lag_average_trials(bids_dir, subject, window=(4.0, 8.0))
    truth = bids.read_ground_truth(derivative_paths(bids_dir, subject)["groundtruth"])

    def classifier():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000))

    train = (events["trial_type"] == "train").to_numpy()
    classes = events["class"].to_numpy()
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv_single = cross_val_score(classifier(), responses[train], classes[train], cv=folds).mean()
    fitted = classifier().fit(responses[train], classes[train])
    test_single = fitted.score(responses[~train], classes[~train])
    averaged, _, averaged_classes = average_repeats(responses[~train], events[~train])
    test_averaged = fitted.score(averaged, averaged_classes)
    truth_cv = cross_val_score(classifier(), truth["response"], truth["label"], cv=folds).mean()
    # Fraction of the variance of the response averaged over the test repeats.
    ceiling = noise_ceiling(responses[~train], events["stimulus_id"][~train].to_numpy())[1] / 100
    with_signal = truth["snr"] > np.median(truth["snr"])
    return {
        "voxels": responses.shape[1], "train_trials": int(train.sum()), "test_trials": int((~train).sum()),
        "truth_cv": truth_cv, "cv_single": cv_single, "test_single": test_single, "test_averaged": test_averaged,
        "nc_all": float(np.median(ceiling)), "nc_signal": float(np.median(ceiling[with_signal])),
        "truth_snr": float(np.median(truth["snr"])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default="benchmarks/results/simulate.md")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the simulated data")
    parser.add_argument("--only", nargs="*", default=None,
                        help="simulate (and decode) only these subjects, e.g. sub-01 sub-rest01")
    args = parser.parse_args(argv)

    from mindvis.config import load_config, rest_subjects, subjects

    config = load_config(args.config)
    # The console script beside this interpreter (the project's virtualenv), else the one on PATH.
    beside = Path(sys.executable).with_name("mindvis")
    mindvis = [str(beside)] if beside.exists() else [shutil.which("mindvis") or "mindvis"]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mindvis-bench-"))
    bids_dir = workdir / "bids"
    stimuli = bids_dir / "stimuli" / "stimuli.h5"
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)

    task_subjects = [s for s in subjects(config) if args.only is None or s in args.only]
    resting_subjects = [s for s in rest_subjects(config) if args.only is None or s in args.only]
    rows = []
    wall, cpu, rss = run_timed(mindvis + ["stimuli", "--config", args.config, "--out", str(stimuli)])
    rows.append(("stimuli", wall, cpu, rss, None))
    features = []
    if config["simulate"]["category_model"] == "deepnet":
        # Once for every subject, as the workflow's stimulus_features rule does.
        cache = bids_dir / "derivatives" / "simulation" / "stimulus_features.h5"
        wall, cpu, rss = run_timed(mindvis + ["stimulus-features", "--config", args.config, "--stimuli", str(stimuli),
                                              "--out", str(cache), "--threads", "1"])
        rows.append(("stimulus features (deepnet, once)", wall, cpu, rss, None))
        features = ["--features", str(cache)]
    for subject in task_subjects:
        wall, cpu, rss = run_timed(mindvis + ["simulate", "--config", args.config, "--stimuli", str(stimuli),
                                         "--bids-dir", str(bids_dir), "--subject", subject, "--threads", "1"]
                                   + features)
        rows.append((subject, wall, cpu, rss, _manifest_time(bids_dir, subject)))
    for subject in resting_subjects:
        wall, cpu, rss = run_timed(mindvis + ["simulate-rest", "--config", args.config, "--bids-dir", str(bids_dir),
                                         "--subject", subject, "--threads", "1"])
        rows.append((subject, wall, cpu, rss, _manifest_time(bids_dir, subject)))
    load_after_sim = os.getloadavg()
    size_mb = sum(f.stat().st_size for f in bids_dir.rglob("*") if f.is_file()) / 2**20

    scores = {subject: decoding(bids_dir, subject)
              for subject in task_subjects}
    load_after = os.getloadavg()

    info = machine()
    section = config["simulate"]
    lines = [
        "# Simulator benchmark",
        "",
        f"Config `{args.config}` (experiment `{config['experiment']}`, seed {config['seed']}); "
        f"run {started:%Y-%m-%d %H:%M} UTC by `benchmarks/simulate.py`.",
        "",
        f"Machine: {info['nproc']} CPU cores available (`nproc`), {info['cpu']}, {info['memory']} RAM; "
        f"Python {info['python']}. OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        "each subject one process with `--threads 1`, subjects one after another.",
        "",
        f"Load average (1, 5, 15 min) before: {_load(load_before)}; after simulating: {_load(load_after_sim)}; "
        f"after decoding: {_load(load_after)}. The machine was shared with other jobs, so times are upper bounds.",
        "",
        f"{len(subjects(config))} task subjects, {len(rest_subjects(config))} rest subjects; per task subject "
        f"{section['n_early_voxels']} early + {section['n_higher_voxels']} higher voxels (each subject varies), "
        f"{config['stimuli']['n_train_per_class'] * (10 - len(config['stimuli']['novel_classes']))} training "
        "images once, "
        f"{config['stimuli']['n_test_per_class'] * 10} test images x {section['test_repeats']}, "
        f"{section['trials_per_run']} trials per run, TR {section['tr']} s, single_trial_snr "
        f"{section['single_trial_snr']}, spontaneous_to_noise {section['spontaneous_to_noise']}; category model "
        f"{section['category_model']}, shared_tuning {section['shared_tuning']}, rest_networks "
        f"{section['rest_networks']}.",
        "",
        "## Wall time",
        "",
        "| job | wall (s, incl. start-up) | in simulate function (s) | CPU time (s, user + sys) | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, wall, cpu, rss, inner in rows:
        lines.append(f"| {name} | {wall:.1f} | {'' if inner is None else f'{inner:.1f}'} | {cpu:.1f} | {rss:.0f} |")
    lines += [
        "",
        f"Dataset on disk: {size_mb:.0f} MiB.",
        "",
        "## Decoding the object class (10 classes, chance 0.10)",
        "",
        "Lag-average estimate (mean of volumes 4-8 s after onset, per-run percent change and linear detrend);",
        "standardised logistic regression (C = 0.01). Noise ceiling: NSD definition for the mean of",
        f"{section['test_repeats']} repeats, median over ROI voxels (all / above-median ground-truth SNR).",
        "",
        "| subject | voxels | noise-free truth, 5-fold CV | single trial, 5-fold CV on training trials | "
        "test, single trial | test, averaged over repeats | noise ceiling (all / with signal) | "
        "ground-truth SNR (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for subject, s in scores.items():
        lines.append(f"| {subject} | {s['voxels']} | {s['truth_cv']:.3f} | {s['cv_single']:.3f} | "
                     f"{s['test_single']:.3f} | {s['test_averaged']:.3f} | {s['nc_all']:.2f} / {s['nc_signal']:.2f} | "
                     f"{s['truth_snr']:.2f} |")
    mean = {key: np.mean([s[key] for s in scores.values()]) for key in ("cv_single", "test_single", "test_averaged")}
    lines += ["", f"Mean over subjects: single-trial CV {mean['cv_single']:.3f}, test single trial "
                  f"{mean['test_single']:.3f}, test averaged {mean['test_averaged']:.3f} (chance 0.100).", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)


def _manifest_time(bids_dir, subject):
    import json

    from mindvis.data.bids_layout import derivative_paths

    return json.loads(derivative_paths(bids_dir, subject)["manifest"].read_text())["wall_time_s"]


def _load(values):
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
