"""The metrics of a finished `snakemake decode` run as Markdown tables, and whether two runs agree.

Usage::

    python benchmarks/decode_metrics.py RUN_DIR [--compare OTHER_RUN_DIR]

Prints, per subject, every row of ``results/{subject}/evaluation/metrics.json``
(value and 95% bootstrap interval) for all test stimuli, then for the
seen-category and the novel-category stimuli (or why a subset is omitted), and
the paired comparisons (a - b with its paired-bootstrap interval, and whether
it lies above 0); then, per subset, the mean over subjects of every row. With
``--compare``, also counts the metric values and
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
           "ssim", "retrieval_brain_to_image_top1", "retrieval_image_to_brain_top1", "fid")
#: Result parts of metrics.json (the rest records paths, timings and versions).
RESULT_KEYS = ("rows", "per_stimulus", "per_class", "confusion", "subsets", "comparisons")
#: The subsets of every table: all test stimuli, seen categories, novel categories.
SUBSETS = ("all", "seen", "novel")
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


def _subset_metrics(metrics, row, subset):
    """A row's metric entries on a subset (all: its own), or None when the subset is not recorded or omitted."""
    if subset == "all":
        return row["metrics"] or {}
    entry = (metrics.get("subsets") or {}).get(subset)
    if not entry or not entry.get("available", "rows" in entry):
        return None
    return entry["rows"].get(row["id"]) or {}


def _subset_heading(metrics, subset):
    if subset == "all":
        return f"all {metrics['n_stimuli']} test stimuli"
    entry = (metrics.get("subsets") or {}).get(subset)
    if entry is None:
        return None
    text = f"{subset} categories, {entry['n_stimuli']} test stimuli"
    return text if entry.get("available", "rows" in entry) else f"{text}: omitted ({entry.get('reason', '')})"


def _markdown_table(lines, out):
    print("| row | " + " | ".join(COLUMNS) + " |", file=out)
    print("|---" * (len(COLUMNS) + 1) + "|", file=out)
    for label, cells in lines:
        print(f"| {label} | " + " | ".join(cells) + " |", file=out)


def _comparisons(metrics, out):
    comparisons = metrics.get("comparisons") or []
    if not comparisons:
        return
    print("Paired comparisons (mean of a - b over stimuli, paired bootstrap interval):\n", file=out)
    print("| a - b | stimuli | metric | difference | interval | interval above 0 |", file=out)
    print("|---|---|---|---|---|---|", file=out)
    for entry in comparisons:
        ci = entry["ci"]
        above = "n/a" if not ci or ci[0] is None else ("yes" if ci[0] > 0 else "no")
        interval = "–" if not ci or ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
        print(f"| {entry['a']} - {entry['b']} | {entry['subset']} | {entry['metric']} | {entry['difference']:+.3f} "
              f"| {interval} | {above} |", file=out)
    print(file=out)


def tables(run, out=sys.stdout):
    means = {}
    labels = {}
    files = metrics_files(run)
    for path in files:
        metrics = json.loads(path.read_text())
        print(f"**{metrics['subject']}** (n = {metrics['n_way']}, k = {metrics['n_samples']}, "
              f"{metrics['n_stimuli']} stimuli, {metrics['ci_level']:.0%} bootstrap CI)\n", file=out)
        for subset in SUBSETS:
            heading = _subset_heading(metrics, subset)
            if heading is None:
                continue
            print(f"*{heading}*\n", file=out)
            if subset != "all" and _subset_metrics(metrics, metrics["rows"][0], subset) is None:
                continue
            lines = []
            for row in metrics["rows"]:
                labels[row["id"]] = row["label"]
                entries = _subset_metrics(metrics, row, subset)
                lines.append((row["label"], [_cell(entries.get(k), k) for k in COLUMNS]))
                for key in COLUMNS:
                    entry = entries.get(key)
                    if entry is not None and entry["value"] is not None:
                        means.setdefault((subset, row["id"], key), []).append(entry["value"])
            _markdown_table(lines, out)
            print(file=out)
        reasons = sorted({entry["reason"] for row in metrics["rows"] for entry in (row["metrics"] or {}).values()
                          if entry is not None and entry["value"] is None})
        for reason in reasons:
            print(f"- withheld: {reason}", file=out)
        if not metrics.get("classifier", {}).get("usable", True):
            print(f"- classifier: {metrics['classifier']['reason']}", file=out)
        print(file=out)
        _comparisons(metrics, out)
    for subset in SUBSETS:
        row_ids = list(dict.fromkeys(row_id for (name, row_id, _) in means if name == subset))
        if not row_ids:
            continue
        print(f"Mean over the {len(files)} subjects, {subset} test stimuli (subjects with the figure):\n", file=out)
        lines = []
        for row_id in row_ids:
            cells = []
            for key in COLUMNS:
                values = means.get((subset, row_id, key))
                cells.append("–" if not values else f"{sum(values) / len(values):.{2 if key == 'fid' else 3}f}"
                             + ("" if len(values) == len(files) else f" ({len(values)})"))
            lines.append((labels.get(row_id, row_id), cells))
        _markdown_table(lines, out)
        print(file=out)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(run, other, out=sys.stdout):
    """Print and return the number of differing metric values (0: the runs agree)."""
    n_values = n_differ = 0
    for path in metrics_files(run):
        first = json.loads(path.read_text())
        second = json.loads((Path(other) / path.relative_to(run)).read_text())
        # Rows by id: a run of newer code may list rows the other has not (then unavailable in it).
        by_id = {row["id"]: row for row in second["rows"]}
        for row_a in first["rows"]:
            row_b = by_id.get(row_a["id"], {"metrics": None})
            if row_a["metrics"] is None and row_b["metrics"] is None:
                continue
            for key in COLUMNS:
                n_values += 1
                n_differ += (row_a["metrics"] or {}).get(key) != (row_b["metrics"] or {}).get(key)
        same = [key for key in RESULT_KEYS if first.get(key) == second.get(key)]
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
