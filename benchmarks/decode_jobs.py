"""Where the time of a `snakemake decode` run went: per stage and per job, from the run's own records.

Reads, in a workflow directory that has run ``decode``:

* Snakemake's log (the newest ``.snakemake/log/*.snakemake.log``, or ``--log``):
  when each job started and finished, so the stage timeline, the time at which
  every decoded image existed (the last ``generate*`` job), and the largest
  number of jobs that ran at once (it should not exceed ``--cores`` with one
  thread per job);
* the ``benchmark:`` files every rule writes under ``logs/benchmarks/``
  (Snakemake's: wall seconds, CPU seconds, peak RSS per job).

Usage::

    python benchmarks/decode_jobs.py /path/to/workflow/dir

Prints Markdown (paste into benchmarks/results/decode.md).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

#: Stages in workflow order; a rule not listed is shown under its own name after them.
STAGES = [
    ("stimuli, simulate, BIDS metadata", ("stimuli", "simulate", "simulate_rest", "bids_metadata", "convert",
                                          "merge_stimuli", "convert_rest")),
    ("preprocess", ("preprocess", "preprocess_rest")),
    ("train_classifier", ("train_classifier",)),
    ("pretrain_mbm", ("pretrain_mbm",)),
    ("pretrain_ldm", ("pretrain_ldm",)),
    ("finetune (SC-MBM decoder)", ("finetune",)),
    ("finetune_baseline (no SC-MBM)", ("finetune_baseline",)),
    ("generate", ("generate",)),
    ("generate_baseline", ("generate_baseline",)),
    ("evaluate", ("evaluate",)),
    ("report, summary", ("report", "summary")),
]

#: Target rules without work of their own.
TARGETS = {"decode", "all"}

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def parse_snakemake_log(path):
    """``{jobid: {"rule", "start", "end"}}`` (datetimes) from a Snakemake 8/9 log; the decode target has no end."""
    jobs, stamp, rule = {}, None, None
    for line in Path(path).read_text().splitlines():
        if match := _STAMP.match(line):
            stamp, rule = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y"), None
        elif match := _RULE.match(line):
            rule = match.group(1)
        elif (match := _JOBID.match(line)) and rule is not None:
            jobs.setdefault(int(match.group(1)), {"rule": rule, "start": stamp, "end": None})
        elif match := _FINISHED.match(line):
            job = jobs.setdefault(int(match.group(1)), {"rule": match.group(2), "start": None, "end": None})
            job["end"] = stamp
    return {jobid: job for jobid, job in jobs.items() if job["end"] is not None and job["start"] is not None}


def read_benchmarks(folder):
    """``{(rule, name): row}`` from Snakemake benchmark TSVs under ``folder`` (``logs/benchmarks``)."""
    rows = {}
    for path in sorted(Path(folder).rglob("*.tsv")):
        with path.open() as handle:
            records = list(csv.DictReader(handle, delimiter="\t"))
        if records:
            relative = path.relative_to(folder)
            rule = relative.parts[0] if len(relative.parts) > 1 else relative.stem
            name = relative.stem if len(relative.parts) > 1 else ""
            if rule in {"finetune", "generate"} and name.endswith("-baseline"):
                rule = f"{rule}_baseline"
            rows[(rule, name)] = records[-1]
    return rows


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def max_concurrency(jobs):
    """The largest number of jobs running at once (a job ending at t does not overlap one starting at t)."""
    events = sorted([(job["start"], 1) for job in jobs.values()] + [(job["end"], -1) for job in jobs.values()],
                    key=lambda event: (event[0], event[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def report(workdir, log_path=None, out=sys.stdout):
    workdir = Path(workdir)
    if log_path is None:
        logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
        if not logs:
            raise SystemExit(f"{workdir}: no .snakemake/log/*.snakemake.log; run `snakemake decode` there first")
        log_path = logs[-1]
    jobs = parse_snakemake_log(log_path)
    if not jobs:
        raise SystemExit(f"{log_path}: no finished jobs found")
    bench = read_benchmarks(workdir / "logs" / "benchmarks")
    t0 = min(job["start"] for job in jobs.values())
    end = max(job["end"] for job in jobs.values())
    by_rule = defaultdict(list)
    for job in jobs.values():
        if job["rule"] not in TARGETS:
            by_rule[job["rule"]].append(job)
    cpu_by_rule, wall_by_rule, rss_by_rule = defaultdict(float), defaultdict(float), defaultdict(float)
    for (rule, _), row in bench.items():
        cpu_by_rule[rule] += float(row.get("cpu_time") or 0)
        wall_by_rule[rule] += float(row.get("s") or 0)
        rss_by_rule[rule] = max(rss_by_rule[rule], float(row.get("max_rss") or 0))

    print(f"Snakemake log: `{Path(log_path).name}`; {len(jobs)} jobs; at most {max_concurrency(jobs)} "
          f"running at once.\n", file=out)
    print("| stage | jobs | start -> end (m:ss from the first job) | job wall time, sum | CPU time, sum "
          "| peak RSS of a job |", file=out)
    print("| --- | --- | --- | --- | --- | --- |", file=out)
    listed = set()
    stages = STAGES + [(rule, (rule,)) for rule in sorted(by_rule) if not any(rule in r for _, r in STAGES)]
    for label, rules in stages:
        members = [job for rule in rules for job in by_rule.get(rule, [])]
        if not members or rules[0] in listed:
            continue
        listed.update(rules)
        start = min(job["start"] for job in members)
        stop = max(job["end"] for job in members)
        wall = sum(wall_by_rule[rule] for rule in rules)
        cpu = sum(cpu_by_rule[rule] for rule in rules)
        rss = max(rss_by_rule[rule] for rule in rules)
        print(f"| {label} | {len(members)} | {_clock((start - t0).total_seconds())} -> "
              f"{_clock((stop - t0).total_seconds())} | {_clock(wall) if wall else '–'} | "
              f"{_clock(cpu) if cpu else '–'} | {f'{rss:.0f} MB' if rss else '–'} |", file=out)
    generated = [job["end"] for job in jobs.values() if job["rule"] in ("generate", "generate_baseline")]
    total_cpu = sum(cpu_by_rule.values())
    print("", file=out)
    if generated:
        print(f"Every decoded image (the last `generate*` job) after {_clock((max(generated) - t0).total_seconds())}; ",
              end="", file=out)
    print(f"workflow {_clock((end - t0).total_seconds())} in all; {_clock(total_cpu)} CPU time in the jobs "
          f"(from the benchmark files).", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", default=".", help="the workflow directory (default: here)")
    parser.add_argument("--log", help="a Snakemake log file (default: the newest in .snakemake/log/)")
    args = parser.parse_args(argv)
    report(args.workdir, args.log)


if __name__ == "__main__":
    main()
