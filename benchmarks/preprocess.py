"""Benchmark the preprocess stage: time for one default simulated subject, memory of LSS on a realistic run.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/preprocess.py            # both, writes results/preprocess.md
    .venv/bin/python benchmarks/preprocess.py --only lss

1. ``subject``: simulates sub-01 of ``configs/default.yaml`` (34 runs, 1,700
   trials) into ``benchmarks/_work/`` when it is not there yet, then runs
   :func:`mindvis.preprocess.run.preprocess_subject` on it in a fresh process.
2. ``lss``: writes one synthetic run of about 300 volumes, ~21,500 ROI voxels and
   60 trials (:func:`mindvis.preprocess.synthetic.make_synthetic_bids`) and
   preprocesses it with ``glm_lss`` in a fresh process.

Each measurement runs in its own process so that its peak resident memory
(``resource.getrusage``) is the stage's alone; the peak of Python/NumPy
allocations (``tracemalloc``) is reported beside it. The machine and its load
average are recorded with the figures, since the development machine is shared.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
RESULTS = ROOT / "benchmarks" / "results" / "preprocess.md"
LSS_SHAPE = (36, 40, 30)
LSS_ROI_FRACTION = 0.8


def _machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy as np

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "platform": platform.platform()}


def _load():
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def _child(args):
    """Run this script's measure sub-command in a fresh process and return its JSON line."""
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(config_path, bids_dir, subject, out, stimuli, method=None):
    """Preprocess one subject in this process; print time and memory as JSON."""
    import tracemalloc

    from mindvis.config import load_config
    from mindvis.preprocess.run import preprocess_subject

    config = load_config(config_path)
    if method:
        config["preprocess"]["method"] = method
    load_before = _load()
    tracemalloc.start()
    started = time.perf_counter()
    report = preprocess_subject(config, bids_dir, subject, out, stimuli_path=stimuli)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of this process (imports included): the figure that contention on a shared machine does not
    # inflate; ru_maxrss is in KiB on Linux.
    cpu_seconds = usage.ru_utime + usage.ru_stime
    peak_rss = usage.ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 1),
                      "peak_rss_mb": round(peak_rss), "traced_peak_mb":
                      round(traced_peak / 2**20), "load_before": load_before, "load_after": _load(),
                      "n_trials": report["n_trials"], "n_voxels": report["n_voxels"]["kept"],
                      "ground_truth": report["ground_truth"]}))


def bench_subject(config_path):
    """Simulate (if needed) and preprocess sub-01 of the default experiment."""
    bids = WORK / "default" / "bids"
    stimuli = bids / "stimuli" / "stimuli.h5"
    manifest = bids / "derivatives" / "simulation" / "sub-01" / "sub-01_desc-simulation_manifest.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    simulate_seconds = None
    if not manifest.exists():
        started = time.perf_counter()
        for args in (["stimuli", "--config", config_path, "--out", str(stimuli)],
                     ["simulate", "--config", config_path, "--stimuli", str(stimuli), "--bids-dir", str(bids),
                      "--subject", "sub-01"]):
            subprocess.run([sys.executable, "-m", "mindvis.cli", *args], check=True, env=env)
        simulate_seconds = round(time.perf_counter() - started, 1)
    result = _child(["_measure", config_path, str(bids), "sub-01", str(WORK / "default" / "responses.h5"),
                     str(stimuli)])
    n_runs = len(list((bids / "sub-01" / "func").glob("*_bold.nii.gz")))
    result.update(n_runs=n_runs, simulate_seconds=simulate_seconds)
    return result


def bench_lss():
    """One realistic run through glm_lss: ~300 volumes, ~21,500 voxels, 60 trials."""
    root = WORK / "lss" / "bids"
    if not (root / "sub-01").exists():
        from mindvis.preprocess.synthetic import make_synthetic_bids

        # 60 training trials in one run; 2 s stimuli every ~9.5 s give about 300 volumes at TR 2 s.
        make_synthetic_bids(root, shape=LSS_SHAPE, n_classes=6, n_train_per_class=10, n_test=1, n_repeats=0,
                            trials_per_run=60, tr=2.0, snr=0.5, seed=0, dtype="int16",
                            roi_fraction=LSS_ROI_FRACTION, isi=(6.5, 8.5))
    import nibabel as nib

    bold = next((root / "sub-01" / "func").glob("*_bold.nii.gz"))
    config = WORK / "lss" / "config.yaml"
    config.write_text("seed: 0\npreprocess:\n  method: glm_lss\n")
    result = _child(["_measure", str(config), str(root), "sub-01", str(WORK / "lss" / "responses.h5"), ""])
    result.update(n_volumes=int(nib.load(bold).shape[3]), grid=list(LSS_SHAPE))
    return result


def write_markdown(results, machine):
    lines = ["# Preprocess stage benchmarks", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, NumPy "
             f"{machine['numpy']}, OMP_NUM_THREADS={machine['omp_threads']} ({machine['platform']}). The machine is "
             "shared with other jobs: the load average (1 / 5 / 15 min) before and after each measurement is "
             "given beside it.", "",
             "Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/preprocess.py`.", ""]
    if "subject" in results:
        r = results["subject"]
        lines += ["## One default simulated subject (configs/default.yaml, sub-01, glm_lss)", "",
                  "| runs | trials (train / val / test / test_avg) | voxels | wall seconds | CPU seconds (process) | "
                  "peak RSS | traced peak | load before | load after |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {r['n_runs']} | {' / '.join(str(v) for v in r['n_trials'].values())} | {r['n_voxels']} | "
                  f"{r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mb']} MB | {r['traced_peak_mb']} MB | {r['load_before']} | "
                  f"{r['load_after']} |", "",
                  f"Agreement with the simulator's noise-free responses: `{json.dumps(r['ground_truth'])}`.", ""]
        if r.get("simulate_seconds"):
            lines += [f"(Simulating the subject first took {r['simulate_seconds']} s; not part of the figure.)", ""]
    if "lss" in results:
        r = results["lss"]
        lines += ["## LSS on one realistic run", "",
                  f"One run of {r['n_volumes']} volumes on a {' x '.join(map(str, r['grid']))} grid, "
                  f"{r['n_voxels']} ROI voxels, {r['n_trials']['train'] + r['n_trials']['val']} trials, "
                  "glm_lss with OLS (closed form), read, masked, cleaned and written by the full stage.", "",
                  "| wall seconds | CPU seconds (process) | peak RSS | traced peak | load before | load after |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mb']} MB | {r['traced_peak_mb']} MB | {r['load_before']} | "
                  f"{r['load_after']} |", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = RESULTS.read_text() if RESULTS.exists() else ""
    notes = existing[existing.index("## Notes"):] if "## Notes" in existing else ""
    RESULTS.write_text("\n".join(lines) + ("\n" + notes if notes else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        _, config_path, bids_dir, subject, out, stimuli = argv[:6]
        measure(config_path, bids_dir, subject, out, stimuli or None)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["subject", "lss"], default=None)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    args = parser.parse_args(argv)
    results = {}
    if args.only in (None, "subject"):
        results["subject"] = bench_subject(args.config)
        print("subject:", json.dumps(results["subject"]))
    if args.only in (None, "lss"):
        results["lss"] = bench_lss()
        print("lss:", json.dumps(results["lss"]))
    write_markdown(results, _machine())
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
