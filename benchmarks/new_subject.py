"""A new subject from little data: the shared decoder adapted (few-shot) against a decoder trained from scratch.

Leave one subject out: one decoder is shared by the others (:func:`mindvis.train.shared.finetune_shared`,
their full training trials), then adapted to the left-out subject from a share of its training trials
(:func:`mindvis.train.shared.adapt_subject`; ``finetune.train_runs`` or ``finetune.train_fraction``; the
val split stays whole). Beside it, at each share, that subject's own decoder trained from scratch on the same trials
(:func:`mindvis.train.finetune.finetune`), and once on all of them (the full-data reference of the
target). Every decoder starts from the same SC-MBM encoder, the pretrained base (``mbm.base``), not one
adapted to the subject's fMRI (that would read all its runs). Scored as the evaluate stage scores
(the learning-curve benchmark's :func:`score_samples`): n-way top-1 (mean of k samples, against the
image classifier's top-1 on the true image) on all, seen- and novel-category test stimuli, and 2-way
identification on the classifier's features, each with a bootstrap interval over stimuli; paired
differences (few-shot minus scratch) over the same stimuli and sample seeds. The old subjects are
scored before and after the adaptation (what prior preservation keeps; with ``finetune.new_subject_train``
= [adapter] nothing they use changes: adapt_subject writes no preserved views, their decoders are the
shared ones, and their "after" is their "before").

    python benchmarks/new_subject.py --results results --config configs/default.yaml
        [--subjects sub-01 sub-02 sub-03] [--runs 1] [--fractions 0.1 0.25 0.5] [--n-samples 2]
        [--train adapter attn2] [--work-dir results/new-subject] [--out benchmarks/results/new_subject]
        [--resume] [--threads 2]

Writes {out}.json (every figure), {out}.md (the tables) and {out}.png (the learning curve).

``--runs 1`` is the new subject's first training run, whole (``finetune.train_runs``: what one
session gives; about 50 trials, 4.6 % of the simulated default's 1,090 training trials over 22 runs);
``--fractions`` are seeded random shares drawn over all training runs (``finetune.train_fraction``).
``--train`` sets ``finetune.new_subject_train``: naming shared groups beside ``adapter`` trains them
too, with the old subjects' trials in every epoch (prior preservation), and scores the old subjects
again after the adaptation.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_curve as lc  # noqa: E402  (the scoring and input helpers of the learning-curve benchmark)

from mindvis.config import load_config, subjects as config_subjects, validate  # noqa: E402
from mindvis.evaluate.metrics import bootstrap_ci  # noqa: E402
from mindvis.utils.io import derive_seed, set_threads, sha256_file, write_json_atomic  # noqa: E402

METRICS = ("n_way_top1_mean", "two_way_id")
SUBSETS = ("all", "seen", "novel")


def shares(fractions, runs):
    """The training shares measured: key -> finetune overrides (first whole runs, then random fractions)."""
    out = {f"run{n}": {"train_runs": int(n), "train_fraction": 1.0} for n in runs or ()}
    out.update({f"{f:g}": {"train_fraction": float(f), "train_runs": None} for f in fractions or ()})
    return out


def share_label(key):
    """A share key as the tables print it: ``1 run`` or ``10 %``."""
    if key.startswith("run"):
        n = int(key[3:])
        return f"{n} run" + ("s" if n > 1 else "")
    return f"{float(key):.0%}"


def run_config(config, share, n_samples, new_subject, train=None):
    config = copy.deepcopy(config)
    config["finetune"].update(share, new_subject=new_subject)
    if train:
        config["finetune"]["new_subject_train"] = list(train)
    config["generate"].update(start_row=False, lowlevel=False, attention_stimuli=0, n_samples=int(n_samples))
    return validate(config, path=f"<new-subject config, {new_subject} at {share}>")


def _generate(config, subject, model_dir, inputs, samples_dir, resume):
    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import SAMPLES_FILE, read_samples_h5

    if not (resume and (samples_dir / SAMPLES_FILE).exists()):
        generate_subject(config, subject, model_dir, inputs["responses"], inputs["stimuli"], samples_dir,
                         classifier_dir=inputs["classifier"] if inputs["domain"] else None, base=inputs["base"])
    return read_samples_h5(samples_dir / SAMPLES_FILE)


def _score(config, subject, samples, classifier, inputs):
    """The learning-curve benchmark's scores, plus 2-way identification summarised (it is scored there too)."""
    from mindvis.data.responses import load_responses
    from mindvis.evaluate.table import stimulus_categories

    data = load_responses(inputs["responses"], splits=("train", "val", "test_avg"))
    categories = stimulus_categories(data["test_avg"].label, np.concatenate([data["train"].label,
                                                                             data["val"].label]))
    scored = lc.score_samples(samples, classifier, config, subject, categories)
    n_boot, level = int(config["evaluate"]["n_bootstrap"]), float(config["evaluate"]["ci_level"])
    seed = derive_seed(config["seed"], "evaluate", subject)
    scored["metrics"]["two_way_id"] = lc.subset_summaries(scored["per_stimulus"]["two_way_id"], categories, n_boot,
                                                          level, seed)
    scored["categories"] = list(categories)
    return scored


def paired(a, b, categories, subset, n_boot, level, seed):
    """Mean of a - b over the stimuli of a subset (both scored on the same stimuli), with its interval."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rows = lc.subset_index(categories, subset)
    diff = (a - b)[rows]
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return None
    low, high = bootstrap_ci(np.mean, diff, n_boot=n_boot, level=level, seed=seed)
    return {"value": float(diff.mean()), "ci": [low, high], "n": int(len(diff))}


def leave_out(config, left_out, subjects, args, classifier):
    from mindvis.train.finetune import finetune
    from mindvis.train.pretrain_mbm import resolve_base
    from mindvis.train.shared import adapt_subject, finetune_shared

    work = Path(args.work_dir) / left_out
    others = [s for s in subjects if s != left_out]
    inputs = {s: lc.resolve_inputs(config, args.results, s) for s in subjects}
    encoder = resolve_base(config)[0]  # every decoder here starts from the pretrained base encoder
    for found in inputs.values():
        found["mbm"] = encoder
    n_boot, level = int(config["evaluate"]["n_bootstrap"]), float(config["evaluate"]["ci_level"])
    entry = {"left_out": left_out, "shared_subjects": others, "encoder": str(encoder), "runs": {}, "old": {},
             "timings_s": {}, "responses_sha256": sha256_file(inputs[left_out]["responses"])}
    base_config = run_config(config, {"train_fraction": 1.0}, args.n_samples, left_out)
    tick = time.perf_counter()
    view_dirs = [work / "shared" / "views" / s for s in others]
    if not (args.resume and all((d / "dcldm.json").exists() for d in view_dirs)):
        finetune_shared(base_config, others, [inputs[s]["responses"] for s in others], inputs[left_out]["stimuli"],
                        inputs[left_out]["base"], work / "shared", view_dirs, mbm_dir=encoder)
    entry["timings_s"]["finetune_shared"] = round(time.perf_counter() - tick, 1)
    entry["shared_rank"] = json.loads((work / "shared" / "shared.json").read_text())["rank"]
    before = {}
    for subject, view_dir in zip(others, view_dirs):
        samples = _generate(base_config, subject, view_dir, inputs[subject], work / "shared" / "samples" / subject,
                            args.resume)
        before[subject] = (samples, _score(base_config, subject, samples, classifier, inputs[subject]))
        entry["old"].setdefault(subject, {})["shared_before"] = before[subject][1]["metrics"]
    # The full-data reference: the subject's own decoder on all its training trials.
    tick = time.perf_counter()
    full_dir = work / "full"
    if not (args.resume and (full_dir / "dcldm" / "dcldm.json").exists()):
        finetune(base_config, left_out, inputs[left_out]["responses"], inputs[left_out]["stimuli"],
                 inputs[left_out]["base"], full_dir / "dcldm", mbm_dir=encoder)
    samples = _generate(base_config, left_out, full_dir / "dcldm", inputs[left_out], full_dir / "samples", args.resume)
    entry["full"] = _score(base_config, left_out, samples, classifier, inputs[left_out])
    entry["timings_s"]["full"] = round(time.perf_counter() - tick, 1)
    for key, share in shares(args.fractions, args.runs).items():
        cfg = run_config(config, share, args.n_samples, left_out, args.train)
        run_dir = work / (key if key.startswith("run") else f"f{key}")
        run = {}
        tick = time.perf_counter()
        fewshot = run_dir / "fewshot"
        if not (args.resume and (fewshot / "dcldm.json").exists()):
            meta = adapt_subject(cfg, left_out, inputs[left_out]["responses"], inputs[left_out]["stimuli"],
                                 dict(zip(others, view_dirs)), fewshot,
                                 old_responses={s: inputs[s]["responses"] for s in others})
        meta = json.loads((fewshot / "dcldm.json").read_text())
        samples = _generate(cfg, left_out, fewshot, inputs[left_out], run_dir / "samples-fewshot", args.resume)
        run["fewshot"] = _score(cfg, left_out, samples, classifier, inputs[left_out])
        run["n_train"], run["n_train_all"] = meta["n_train"], meta["n_train_all"]
        run["fewshot_best"] = meta["best"]
        run["adapter_rank"] = meta.get("adapter_rank")
        run["adapter_ridge"] = meta.get("voxel_path_ridge")
        scratch = run_dir / "scratch"
        if not (args.resume and (scratch / "dcldm.json").exists()):
            finetune(cfg, left_out, inputs[left_out]["responses"], inputs[left_out]["stimuli"], inputs[left_out]["base"],
                     scratch, mbm_dir=encoder)
        samples = _generate(cfg, left_out, scratch, inputs[left_out], run_dir / "samples-scratch", args.resume)
        run["scratch"] = _score(cfg, left_out, samples, classifier, inputs[left_out])
        categories = run["fewshot"]["categories"]
        run["fewshot_minus_scratch"] = {
            metric: {subset: paired(run["fewshot"]["per_stimulus"][metric], run["scratch"]["per_stimulus"][metric],
                                    categories, subset, n_boot, level, derive_seed(config["seed"], "paired"))
                     for subset in SUBSETS} for metric in METRICS}
        # The old subjects after the adaptation: the preserved views when shared parts trained, else their own
        # (unchanged) views, whose samples must then be identical.
        for subject in others:
            preserved = fewshot / "preserved" / subject
            if preserved.exists():
                after = _generate(cfg, subject, preserved, inputs[subject], run_dir / "samples-preserved" / subject,
                                  args.resume)
                scored = _score(cfg, subject, after, classifier, inputs[subject])
                entry["old"][subject][f"after_{run_dir.name}"] = scored["metrics"]
                entry["old"][subject][f"change_{run_dir.name}"] = {
                    metric: paired(scored["per_stimulus"][metric], before[subject][1]["per_stimulus"][metric],
                                   scored["categories"], "all", n_boot, level, 0) for metric in METRICS}
            else:
                entry["old"][subject][f"after_{run_dir.name}"] = "unchanged: only the new subject's adapter trained"
        run["timings_s"] = round(time.perf_counter() - tick, 1)
        entry["runs"][key] = run
        print(f"{left_out} at {share_label(key)} ({run['n_train']} trials): few-shot n-way {run['fewshot']['metrics']['n_way_top1_mean']['all']['value']:.3f}"
              f", scratch {run['scratch']['metrics']['n_way_top1_mean']['all']['value']:.3f}, full "
              f"{entry['full']['metrics']['n_way_top1_mean']['all']['value']:.3f}", flush=True)
    return entry


def _cell(summary):
    if not summary or summary.get("value") is None:
        return "–"
    low, high = summary["ci"]
    return f"{summary['value']:.3f} [{low:.3f}, {high:.3f}]"


def _signed(summary):
    if not summary:
        return "–"
    low, high = summary["ci"]
    return f"{summary['value']:+.3f} [{low:+.3f}, {high:+.3f}]"


def pooled(entries, fraction, variant, metric, subset, n_boot, level):
    """Mean over left-out subjects (stimuli resampled within each), and the share of the full-data figure.

    ``variant`` ``fewshot - scratch`` pools the paired per-stimulus differences.
    """
    arrays = []
    for entry in entries:
        if variant == "fewshot - scratch":
            run = entry["runs"][fraction]
            values = (np.asarray(run["fewshot"]["per_stimulus"][metric], np.float64)
                      - np.asarray(run["scratch"]["per_stimulus"][metric], np.float64))
            scored = run["fewshot"]
        else:
            scored = entry["full"] if variant == "full" else entry["runs"][fraction][variant]
            values = np.asarray(scored["per_stimulus"][metric], np.float64)
        arrays.append(values[lc.subset_index(scored["categories"], subset)])
    ci = lc.stratified_ci(arrays, n_boot=n_boot, level=level, seed=0)
    value = float(np.mean([np.nanmean(array) for array in arrays]))
    return {"value": value, "ci": ci} if ci is not None else {"value": value, "ci": [value, value]}


def markdown(report):
    lines = ["# A new subject from little data: the shared decoder adapted vs trained from scratch\n",
             report["description"] + "\n", f"Run: `{report['command']}` on {report['machine']['cpu']} "
             f"({report['machine']['cores']} cores, torch {report['machine']['torch']}); this invocation "
             f"{report['wall_min']:.1f} min (with --resume, steps reused from an earlier invocation are not timed "
             "again).\n"]
    for entry in report["entries"]:
        lines.append(f"## {entry['left_out']} left out (shared by {', '.join(entry['shared_subjects'])})\n")
        full = entry["full"]["metrics"]
        rank = entry.get("shared_rank") or {}
        if "val_relative_error" in rank:
            errors = ", ".join(f"{r}: {e:.3f}" for r, e in rank["val_relative_error"].items())
            lines.append(f"Shared space: rank {rank['rank']} of at most {rank['max_rank']}, chosen on the shared "
                         f"subjects' val trials (pooled relative error per rank: {errors}).\n")
        lines.append(f"Own decoder on all its training trials: n-way all {_cell(full['n_way_top1_mean']['all'])}, "
                     f"seen {_cell(full['n_way_top1_mean']['seen'])}, novel {_cell(full['n_way_top1_mean']['novel'])}; "
                     f"2-way {_cell(full['two_way_id']['all'])}.\n")
        lines.append("| share | n train | adapter rank | few-shot n-way all | scratch n-way all | few-shot - scratch | few-shot seen | "
                     "scratch seen | few-shot novel | scratch novel | few-shot 2-way | scratch 2-way | few-shot / full n-way |")
        lines.append("|" + "---|" * 13)
        for key, run in entry["runs"].items():
            few, scr = run["fewshot"]["metrics"], run["scratch"]["metrics"]
            ratio = few["n_way_top1_mean"]["all"]["value"] / max(full["n_way_top1_mean"]["all"]["value"], 1e-9)
            lines.append(f"| {share_label(key)} | {run['n_train']} | {run.get('adapter_rank', '')} | "
                         f"{_cell(few['n_way_top1_mean']['all'])} | "
                         f"{_cell(scr['n_way_top1_mean']['all'])} | "
                         f"{_signed(run['fewshot_minus_scratch']['n_way_top1_mean']['all'])} | "
                         f"{_cell(few['n_way_top1_mean']['seen'])} | {_cell(scr['n_way_top1_mean']['seen'])} | "
                         f"{_cell(few['n_way_top1_mean']['novel'])} | {_cell(scr['n_way_top1_mean']['novel'])} | "
                         f"{_cell(few['two_way_id']['all'])} | {_cell(scr['two_way_id']['all'])} | {ratio:.2f} |")
        lines.append("\nOld subjects (shared decoder, n-way all), before the adaptation and after it:\n")
        for subject, values in entry["old"].items():
            after = [f"{key[6:]}: {value if isinstance(value, str) else _cell(value['n_way_top1_mean']['all'])}"
                     for key, value in values.items() if key.startswith("after_")]
            lines.append(f"- {subject}: before {_cell(values['shared_before']['n_way_top1_mean']['all'])}; after "
                         + "; ".join(after))
        lines.append("")
    if report.get("pooled"):
        lines.append("## Mean over left-out subjects (stimuli resampled within each)\n")
        lines.append("| share | few-shot n-way all | scratch n-way all | few-shot - scratch | full-data n-way all | "
                     "few-shot / full | few-shot 2-way | scratch 2-way |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for key, row in report["pooled"].items():
            two = row.get("two_way", {})
            lines.append(f"| {share_label(key)} | {_cell(row['fewshot'])} | {_cell(row['scratch'])} | "
                         f"{_signed(row['fewshot - scratch']) if 'fewshot - scratch' in row else ''} | "
                         f"{_cell(row['full'])} | {row['ratio']:.2f} | "
                         f"{_cell(two['fewshot']) if two else ''} | {_cell(two['scratch']) if two else ''} |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    """The learning curve: n-way top-1 against the new subject's training trials, adapted vs from scratch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = report["entries"]
    chance, n_way = entries[0]["full"]["chance"], entries[0]["full"]["n_way"]
    figure = Figure(figsize=(4.2 * len(entries), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(entries), squeeze=False)[0]
    drawn = [("fewshot", "all", "adapted from the shared decoder", dict(color="C0", marker="o")),
             ("scratch", "all", "trained from scratch", dict(color="C1", marker="o")),
             ("fewshot", "novel", "adapted, novel categories", dict(color="C0", marker="s", linestyle="--",
                                                                    markerfacecolor="white")),
             ("scratch", "novel", "from scratch, novel categories", dict(color="C1", marker="s", linestyle="--",
                                                                         markerfacecolor="white"))]
    for axis, entry in zip(axes, entries):
        runs = sorted(entry["runs"].values(), key=lambda run: run["n_train"])
        for index, (variant, subset, label, style) in enumerate(drawn):
            x = np.array([run["n_train"] for run in runs], np.float64) * 1.03 ** (index - 1.5)
            cells = [run[variant]["metrics"]["n_way_top1_mean"][subset] for run in runs]
            y = np.array([cell["value"] for cell in cells])
            error = np.abs(np.array([cell["ci"] or [cell["value"]] * 2 for cell in cells], np.float64).T - y)
            axis.errorbar(x, y, yerr=error, capsize=2, linewidth=1.2, label=label, **style)
        full = entry["full"]["metrics"]["n_way_top1_mean"]["all"]["value"]
        axis.axhline(full, color="0.3", linewidth=1, label="own decoder, all training trials")
        axis.axhline(0.8 * full, color="0.3", linestyle="-.", linewidth=1, label="80 % of it (the target)")
        axis.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
        axis.set_xscale("log")
        axis.set_xticks([run["n_train"] for run in runs])
        axis.set_xticklabels([str(run["n_train"]) for run in runs])
        axis.minorticks_off()
        axis.set_ylim(0, 1)
        axis.set_xlabel("the new subject's training trials (log)")
        axis.set_title(f"{entry['left_out']} left out", fontsize=10)
    axes[0].set_ylabel(f"{n_way}-way top-1 (mean of k samples)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.tight_layout()
    figure.legend(handles, labels, loc="upper center", ncol=4, fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.02))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--subjects", nargs="*", default=None, help="the subjects left out in turn (default: all)")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--runs", nargs="*", type=int, default=[1],
                        help="shares of whole runs: the new subject's first N training runs (finetune.train_runs)")
    parser.add_argument("--train", nargs="+", default=None,
                        help="finetune.new_subject_train (default: the config's); shared groups add prior preservation")
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--work-dir", default="results/new-subject")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/new_subject"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    config = load_config(args.config)
    subjects = config_subjects(config)
    from mindvis.models.classifiers.load import load_image_classifier

    inputs = lc.resolve_inputs(config, args.results, subjects[0])
    classifier = load_image_classifier(config, inputs["classifier"] if inputs["domain"] else None)
    entries = [leave_out(config, subject, subjects, args, classifier) for subject in (args.subjects or subjects)]
    n_boot, level = int(config["evaluate"]["n_bootstrap"]), float(config["evaluate"]["ci_level"])
    pooled_rows = {}
    for key in entries[0]["runs"]:
        row = {variant: pooled(entries, key, variant, "n_way_top1_mean", "all", n_boot, level)
               for variant in ("fewshot", "scratch", "full", "fewshot - scratch")}
        row["two_way"] = {variant: pooled(entries, key, variant, "two_way_id", "all", n_boot, level)
                          for variant in ("fewshot", "scratch", "fewshot - scratch")}
        row["ratio"] = row["fewshot"]["value"] / max(row["full"]["value"], 1e-9)
        pooled_rows[key] = row
    report = {"description": __doc__.split("\n\n")[0], "command": "python benchmarks/new_subject.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "machine": lc.machine(),
              "wall_min": (time.perf_counter() - started) / 60, "entries": entries, "pooled": pooled_rows,
              "config": config}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
