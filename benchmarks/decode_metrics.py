"""The metrics of a finished `snakemake decode` run as Markdown tables, and whether two runs agree.

Usage::

    python benchmarks/decode_metrics.py RUN_DIR [--compare OTHER_RUN_DIR]

Prints, per subject, every row of ``results/{subject}/evaluation/metrics.json``
(value and 95% bootstrap interval) and the mean over subjects of the rows the
README's table shows. With ``--compare``, also counts the metric values and
per-stimulus lists that differ between the two runs, and compares the
trained weights file by file (SHA-256): the repeatability check of one seed on
one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

COLUMNS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "two_way_id_pixels", "pixcorr",
           "ssim", "fid")
#: Result parts of metrics.json (the rest records paths, timings and versions).
RESULT_KEYS = ("rows", "per_stimulus", "per_class", "confusion")
WEIGHTS = ("pretrain/mbm/*.safetensors", "classifier/*.safetensors", "pretrain/ldm/*/*.safetensors",
           "sub-*/dcldm*/dcldm.safetensors")


def _cell(entry, key):
    if entry is None:
        return "–"
    if entry["value"] is None:  # withheld, with entry["reason"]
        return "withheld"
    if key == "fid" or entry["ci"] is None:
        return f"{entry['value']:.2f}"
    return f"{entry['value']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"


def metrics_files(run):
    return sorted(Path(run).glob("results/sub-*/evaluation/metrics.json"))


def tables(run, out=sys.stdout):
    means = {}
    files = metrics_files(run)
    for path in files:
        metrics = json.loads(path.read_text())
        print(f"**{metrics['subject']}** (n = {metrics['n_way']}, k = {metrics['n_samples']}, "
              f"{metrics['n_stimuli']} stimuli, {metrics['ci_level']:.0%} bootstrap CI)\n", file=out)
        print("| row | " + " | ".join(COLUMNS) + " |", file=out)
        print("|---" * (len(COLUMNS) + 1) + "|", file=out)
        for row in metrics["rows"]:
            print(f"| {row['label']} | " + " | ".join(_cell((row["metrics"] or {}).get(k), k) for k in COLUMNS) + " |",
                  file=out)
            for key in COLUMNS:
                entry = (row["metrics"] or {}).get(key)
                if entry is not None and entry["value"] is not None:
                    means.setdefault((row["id"], key), []).append(entry["value"])
        reasons = sorted({entry["reason"] for row in metrics["rows"] for entry in (row["metrics"] or {}).values()
                          if entry is not None and entry["value"] is None})
        for reason in reasons:
            print(f"- withheld: {reason}", file=out)
        if not metrics.get("classifier", {}).get("usable", True):
            print(f"- classifier: {metrics['classifier']['reason']}", file=out)
        print(file=out)
    print(f"Mean over the {len(files)} subjects:", file=out)
    for (row, key), values in means.items():
        if key in ("n_way_top1_mean", "n_way_top1_best_of_k", "two_way_id", "two_way_id_pixels", "pixcorr", "ssim"):
            print(f"- {row} {key}: {sum(values) / len(values):.3f}", file=out)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(run, other, out=sys.stdout):
    """Print and return the number of differing metric values (0: the runs agree)."""
    n_values = n_differ = 0
    for path in metrics_files(run):
        first = json.loads(path.read_text())
        second = json.loads((Path(other) / path.relative_to(run)).read_text())
        for row_a, row_b in zip(first["rows"], second["rows"]):
            for key in COLUMNS:
                n_values += 1
                n_differ += row_a["metrics"].get(key) != row_b["metrics"].get(key)
        same = [key for key in RESULT_KEYS if first[key] == second[key]]
        print(f"{first['subject']}: identical {', '.join(same) or 'nothing'}", file=out)
    print(f"metric cells (value and interval) that differ: {n_differ} of {n_values}", file=out)
    for pattern in WEIGHTS:
        for path in sorted((Path(run) / "results").glob(pattern)):
            twin = Path(other) / path.relative_to(run)
            verdict = "same" if twin.exists() and _sha(twin) == _sha(path) else "DIFFERENT"
            print(f"  {verdict:9s} {path.relative_to(Path(run) / 'results')}", file=out)
    return n_differ


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--compare", default=None)
    args = parser.parse_args(argv)
    tables(args.run)
    if args.compare:
        print()
        compare(args.run, args.compare)


if __name__ == "__main__":
    main()
