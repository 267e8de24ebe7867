"""Where the time of a `snakemake decode` run went: per stage and per job, from the run's own records.

Reads, in a workflow directory that has run ``decode``:

* Snakemake's log (the newest ``.snakemake/log/*.snakemake.log``, or ``--log``):
  when each job started and finished, so the stage timeline, the time at which
  every decoded image existed (the last ``generate*`` job), and the largest
  number of jobs that ran at once (it should not exceed ``--cores`` with one
  thread per job);
* the ``benchmark:`` file of each job, as the log names it (every rule writes one under ``logs/benchmarks/``)
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
    ("stimuli, simulate, BIDS metadata", ("stimuli", "stimulus_features", "simulate", "simulate_rest",
                                          "bids_metadata", "convert", "merge_stimuli", "convert_rest")),
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
_BENCHMARK = re.compile(r"^\s+benchmark: (\S+)$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def parse_snakemake_log(path):
    """``{jobid: {"rule", "start", "end", "benchmark"}}`` from a Snakemake 8/9 log (times as datetimes;
    ``benchmark`` the job's benchmark file or None); jobs that never finished are left out."""
    jobs, stamp, rule, current = {}, None, None, None
    for line in Path(path).read_text().splitlines():
        if match := _STAMP.match(line):
            stamp, rule, current = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y"), None, None
        elif match := _RULE.match(line):
            rule = match.group(1)
        elif (match := _JOBID.match(line)) and rule is not None:
            current = int(match.group(1))
            jobs.setdefault(current, {"rule": rule, "start": stamp, "end": None, "benchmark": None})
        elif (match := _BENCHMARK.match(line)) and current is not None:
            jobs[current]["benchmark"] = match.group(1)
        elif match := _FINISHED.match(line):
            job = jobs.setdefault(int(match.group(1)),
                                  {"rule": match.group(2), "start": None, "end": None, "benchmark": None})
            job["end"] = stamp
    return {jobid: job for jobid, job in jobs.items() if job["end"] is not None and job["start"] is not None}


def read_benchmark(path):
    """The last record of a Snakemake benchmark TSV (wall ``s``, ``cpu_time``, ``max_rss``, ...), or None."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open() as handle:
        records = list(csv.DictReader(handle, delimiter="\t"))
    return records[-1] if records else None


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
    t0 = min(job["start"] for job in jobs.values())
    end = max(job["end"] for job in jobs.values())
    by_rule = defaultdict(list)
    for job in jobs.values():
        if job["rule"] not in TARGETS:
            by_rule[job["rule"]].append(job)
    cpu_by_rule, wall_by_rule, rss_by_rule = defaultdict(float), defaultdict(float), defaultdict(float)
    for job in jobs.values():
        row = read_benchmark(workdir / job["benchmark"]) if job["benchmark"] else None
        if row is None:
            continue
        rule = job["rule"]
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
