"""Decoder arms across training seeds: what fine-tuning, SC-MBM pretraining and the encoder add, with intervals.

Every "X adds" claim of the README is a paired difference measured here over
several training seeds (``finetune.training_seed``) and the test stimuli, never
one run. Run it after ``make decode`` on the finished results folder (it reads
the subjects' responses, the workflow's subject-adapted SC-MBM encoders and
the evaluate stage's per-stimulus baselines)::

    python benchmarks/decoder_seeds.py [--results results] [--config configs/default.yaml]
        [--subjects sub-01 ...] [--seeds 0 1 2] [--fractions 1.0] [--arms pretrained baseline ridge tokens]
        [--n-samples 2] [--epochs N] [--work-dir results/decoder-seeds] [--out benchmarks/results/decoder_seeds]
        [--threads 1] [--aggregate]

Arms (each fine-tuned with the resolved config, ``finetune.training_seed`` = the seed)
----------------------------------------------------------------------------------
``pretrained``
    The default decoder: the subject's SC-MBM encoder (the workflow's, ``dcldm.json`` ``inputs.mbm``) and the
    voxels read out by the ridge-started linear map, all trained (``finetune.mapper: readout``,
    ``readout_inputs: both``).
``baseline``
    The same from a randomly initialised encoder (MinD-Vis's no-pretraining ablation).
``ridge``
    No encoder: a ridge map from the voxels to the prior's embedding, fixed, with the same UNet training
    (``mapper: mindvis-ext``, ``ridge_lr_scale: 0``, ``train: [attn2, norms]``).
``tokens``
    The default with MinD-Vis's input: the read-out of the SC-MBM tokens alone (``readout_inputs: tokens``),
    so that ``pretrained - tokens`` measures what reading the voxels beside them adds.

Below 100 % of the training trials (``--fractions``, the learning curve) the epochs, the warm-up and the
evaluation interval are scaled by 1 / fraction, so that every share gets the optimiser steps and validation
points of the full-data run.

Each arm's decoder at its start (0 steps; ``generate.start_row``) is decoded and scored too
(``pretrained-start``, ``baseline-start``, ``tokens-start``, ``ridge-start``: the last is the ridge embedding in the frozen
prior), and the evaluate stage's ``ridge`` row (ridge fMRI -> VAE latent, no seed) is read from
``results/{subject}/evaluation/metrics.json``. Decoding is of ``test_avg`` with ``--n-samples`` samples per
stimulus, scored by the evaluate stage's own functions (n-way top-1, the mean over samples).
Where fine-tuning gave the decoder a prior in embedding space (``finetune.embedding_prior``: the ``pretrained`` and
``tokens`` arms on an image prior), the decoder is also decoded through it (``pretrained-prior``, ...), so that
``pretrained-prior - pretrained`` measures what the embedding prior adds, paired by seed and stimulus.

Intervals
---------
A paired difference a - b is computed per subject, seed and stimulus and averaged; its interval is a
percentile bootstrap that resamples seeds and, within a subject, the test stimuli by class (every stimulus of
a drawn class comes in together: stimuli of one class are not independent), on all, seen and novel stimuli;
the mean over subjects resamples each subject on its own. Rows pair by seed index (the arms' seeds are
independent draws; the pairing that matters is the stimulus's).

Outputs: ``{out}.json`` (every per-stimulus value, the selection record of every run, timings, machine) and
``{out}.md``. Each run keeps ``score.json`` in its work folder; runs whose score exists for the same config are
reused, so subjects can run in separate processes and ``--aggregate`` then writes the tables from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import (SCORE_SECTIONS, SUBSETS, _RunLog, config_digest, machine, resolve_inputs,  # noqa: E402
                            score_samples, subset_index)

from mindvis.config import load_config, subjects as config_subjects, validate  # noqa: E402
from mindvis.data.responses import load_responses  # noqa: E402
from mindvis.errors import MindvisError  # noqa: E402
from mindvis.evaluate.table import stimulus_categories  # noqa: E402
from mindvis.utils.io import set_threads, software_versions, write_json_atomic  # noqa: E402

log = logging.getLogger("decoder_seeds")

ARMS = ("pretrained", "baseline", "ridge", "tokens")
DEFAULT_OUT = "benchmarks/results/decoder_seeds"
METRIC = "n_way_top1_mean"
#: The paired comparisons of the tables: (a, b, what it measures).
COMPARISONS = (
    ("pretrained", "pretrained-start", "what fine-tuning adds to the default decoder"),
    ("pretrained", "workflow-ridge", "the default decoder against ridge fMRI -> VAE latent"),
    ("pretrained", "baseline", "what SC-MBM pretraining adds (against a random encoder)"),
    ("pretrained", "ridge", "what the encoder adds (against the ridge map into the same trained prior)"),
    ("baseline", "baseline-start", "what fine-tuning adds from a random encoder"),
    ("ridge", "ridge-start", "what the UNet's fine-tuning adds to a fixed ridge map"),
    ("pretrained", "tokens", "what reading the voxels adds (against the read-out of the SC-MBM tokens alone)"),
    ("tokens", "tokens-start", "what fine-tuning adds to the read-out of the tokens alone"),
    ("pretrained-prior", "pretrained", "what the prior in embedding space adds to the default decoder"),
    ("pretrained-prior", "workflow-ridge", "the default decoder through its embedding prior against ridge -> VAE "
                                           "latent"),
)


def arm_config(config, arm, seed, fraction, n_samples, epochs=None):
    """The resolved config of one run."""
    config = copy.deepcopy(config)
    settings = config["finetune"]
    settings.update(training_seed=int(seed), train_fraction=float(fraction))
    if epochs:
        settings["epochs"] = int(epochs)
    if fraction < 1:
        # The same optimiser steps, warm-up and evaluation points as on all the trials: fixed epochs on a tenth of
        # the trials would be a tenth of the training, and the curve would measure that instead of the labels.
        scale = 1.0 / float(fraction)
        settings.update(epochs=int(round(settings["epochs"] * scale)), warmup_epochs=settings["warmup_epochs"] * scale,
                        eval_every=max(1, int(round(settings["eval_every"] * scale))))
    if arm == "ridge":
        settings.update(mapper="mindvis-ext", voxel_path=True, ridge_lr_scale=0.0, train=["attn2", "norms"])
    if arm == "tokens":  # MinD-Vis's input: the read-out of the SC-MBM tokens, no voxels beside them
        settings.update(readout_inputs="tokens")
    config["generate"].update(start_row=True, lowlevel=False, attention_stimuli=0, n_samples=int(n_samples))
    return validate(config, path=f"<decoder_seeds config: {arm}, seed {seed}, train_fraction {fraction}>")


def run_one(config, subject, inputs, arm, run_dir, classifier, categories, label):
    """Fine-tune one arm, decode the decoder, its start and (where fine-tuning gave it one) the decoder through its
    prior in embedding space; score each; returns the run record."""
    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import SAMPLES_FILE, read_samples_h5
    from mindvis.train.finetune import finetune

    model_dir = run_dir / "dcldm"
    classifier_dir = inputs["classifier"] if inputs["domain"] else None
    tick = time.perf_counter()
    with _RunLog(run_dir / "run.log"):
        print(f"{label}: fine-tuning ...", flush=True)
        meta = finetune(config, subject, inputs["responses"], inputs["stimuli"], inputs["base"], model_dir,
                        mbm_dir=None if arm == "baseline" else inputs["mbm"], baseline=arm == "baseline")
        finetune_s = time.perf_counter() - tick
        scores = {}
        drawings = [(arm, model_dir, "samples", False), (f"{arm}-start", model_dir / "start", "samples-start", False)]
        if meta.get("embedding_prior"):
            drawings.append((f"{arm}-prior", model_dir, "samples-prior", True))
        for name, folder, out_name, through_prior in drawings:
            out = run_dir / out_name
            generate_subject(config, subject, folder, inputs["responses"], inputs["stimuli"], out,
                             classifier_dir=classifier_dir, base=inputs["base"], embedding_prior=through_prior)
            scores[name] = score_samples(read_samples_h5(out / SAMPLES_FILE), classifier, config, subject, categories)
    history = [json.loads(line) for line in (model_dir / "train" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return {"arm": arm, "seed": int(config["finetune"]["training_seed"]),
            "fraction": float(config["finetune"]["train_fraction"]), "best": meta["best"],
            "selected_start": meta["best"] is not None and int(meta["best"]["step"]) == 0,
            "n_train": meta["n_train"], "n_val": meta["n_val"], "epochs": meta["epochs"],
            "ridge_start": meta.get("voxel_path_ridge"),
            "embedding_prior": None if not meta.get("embedding_prior") else {
                key: meta["embedding_prior"][key] for key in ("k", "temperature", "weight", "without", "val_scores")},
            "val_history": [{key: value for key, value in line.items() if key.startswith(("val/", "epoch", "step"))}
                            for line in history if any(key.startswith("val/") for key in line)],
            "finetune_s": round(finetune_s, 1), "total_s": round(time.perf_counter() - tick, 1),
            "n_way": scores[arm]["n_way"],
            "per_stimulus": {name: score["per_stimulus"][METRIC] for name, score in scores.items()},
            "means": {name: score["metrics"][METRIC] for name, score in scores.items()}}


def run_subject(config, subject, args, inputs):
    """Every fraction, arm and seed of one subject (reusing finished runs); returns the subject's entry."""
    from mindvis.models.classifiers.load import load_image_classifier

    data = load_responses(inputs["responses"], splits=("train", "val", "test_avg"))
    categories = stimulus_categories(data["test_avg"].label, np.concatenate([data["train"].label,
                                                                              data["val"].label]))
    classifier = load_image_classifier(config, inputs["classifier"] if inputs["domain"] else None)
    evaluation = json.loads((Path(args.results) / subject / "evaluation" / "metrics.json").read_text())
    if [str(s) for s in evaluation["stimulus_ids"]] != [str(s) for s in data["test_avg"].stimulus_id]:
        raise MindvisError("the evaluation's stimuli differ from responses.h5 test_avg",
                           path=Path(args.results) / subject / "evaluation" / "metrics.json",
                           fix="rerun make decode on these results.")
    entry = {"category": categories, "labels": [int(x) for x in data["test_avg"].label],
             "workflow": {name: evaluation["per_stimulus"][name][METRIC]
                          for name in ("ridge", "shuffled-pairs", "dcldm") if name in evaluation["per_stimulus"]},
             "runs": []}
    for fraction in args.fractions:
        for arm in args.arms:
            for seed in args.seeds:
                config_run = arm_config(config, arm, seed, fraction, args.n_samples, args.epochs)
                digest = config_digest(config_run, SCORE_SECTIONS)
                run_dir = Path(args.work_dir) / subject / f"f{fraction:g}" / arm / f"seed{seed}"
                score_path = run_dir / "score.json"
                label = f"{subject} {fraction:.0%} {arm} seed {seed}"
                if score_path.exists() and json.loads(score_path.read_text()).get("digest") == digest:
                    entry["runs"].append(json.loads(score_path.read_text()))
                    print(f"{label}: done already", flush=True)
                    continue
                if args.aggregate:
                    print(f"{label}: missing (--aggregate writes the tables without it)", flush=True)
                    continue
                run = {"digest": digest, **run_one(config_run, subject, inputs, arm, run_dir, classifier,
                                                   categories, label)}
                write_json_atomic(score_path, run)
                entry["runs"].append(run)
                print(f"{label}: {run['means'][arm]['all']['value']:.3f} (start "
                      f"{run['means'][arm + '-start']['all']['value']:.3f}), best {run['best']}, "
                      f"{run['total_s']:.0f} s", flush=True)
    return entry


# -- aggregation -------------------------------------------------------------------

def _values(entry, fraction, name):
    """[seeds, stimuli] per-stimulus n-way top-1 of a row (a seedless workflow row is one line)."""
    if name.startswith("workflow-"):
        row = entry["workflow"].get(name.split("-", 1)[1])
        return None if row is None else np.asarray([row], np.float64)
    arm = name.split("-")[0]
    rows = sorted((run for run in entry["runs"] if run["arm"] == arm and run["fraction"] == fraction),
                  key=lambda run: run["seed"])
    if not rows or name not in rows[0]["per_stimulus"]:
        return None
    return np.asarray([run["per_stimulus"][name] for run in rows], np.float64)


def _draw(matrix, clusters, rng):
    """One bootstrap mean of a [seeds, stimuli] matrix: seeds resampled, stimuli resampled by class."""
    seeds = rng.integers(0, len(matrix), len(matrix))
    chosen = rng.integers(0, len(clusters), len(clusters))
    columns = np.concatenate([clusters[c] for c in chosen])
    return matrix[np.ix_(seeds, columns)].mean()


def summarise(matrices, clusters, n_boot, seed, level=0.95):
    """Mean over subjects of each subject's mean, with the percentile interval of :func:`_draw`."""
    if not matrices:
        return None
    rng = np.random.default_rng(seed)
    value = float(np.mean([m.mean() for m in matrices]))
    boots = [np.mean([_draw(m, c, rng) for m, c in zip(matrices, clusters)]) for _ in range(n_boot)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(boots, [tail, 100 - tail])
    return {"value": value, "ci": [float(low), float(high)], "n_seeds": [int(len(m)) for m in matrices],
            "n_stimuli": [int(m.shape[1]) for m in matrices]}


def _subset(entry, matrix, subset):
    """The subset's columns and its class clusters (lists of column indices)."""
    index = subset_index(entry["category"], subset)
    labels = np.asarray(entry["labels"])[index]
    clusters = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    return matrix[:, index], clusters


def aggregate(results, fractions, arms, n_boot):
    """Rows (every arm and start, the workflow's ridge) and paired comparisons, per subject and over subjects."""
    names = [name for arm in arms for name in (arm, f"{arm}-start", f"{arm}-prior")] + ["workflow-ridge"]
    tables = {}
    for fraction in fractions:
        key = f"{fraction:g}"
        for scope in [*results, "mean"]:
            subjects = list(results) if scope == "mean" else [scope]
            for subset in SUBSETS:
                for name in names:
                    got = [_subset(results[s], m, subset) for s in subjects
                           if (m := _values(results[s], fraction, name)) is not None]
                    if len(got) == len(subjects) and all(g[0].shape[1] for g in got):
                        tables.setdefault(key, {}).setdefault(scope, {}).setdefault("rows", {}).setdefault(
                            subset, {})[name] = summarise([g[0] for g in got], [g[1] for g in got], n_boot, 0)
                for a, b, what in COMPARISONS:
                    if a.split("-")[0] not in arms or (not b.startswith("workflow") and b.split("-")[0] not in arms):
                        continue
                    pairs = []
                    for s in subjects:
                        va, vb = _values(results[s], fraction, a), _values(results[s], fraction, b)
                        if va is None or vb is None:
                            break
                        n = min(len(va), len(vb)) if len(vb) > 1 else len(va)
                        diff = va[:n] - (vb[:n] if len(vb) > 1 else vb)
                        pairs.append(_subset(results[s], diff, subset))
                    if len(pairs) == len(subjects) and all(p[0].shape[1] for p in pairs):
                        summary = summarise([p[0] for p in pairs], [p[1] for p in pairs], n_boot, 1)
                        summary.update(a=a, b=b, what=what, above_zero=summary["ci"][0] > 0,
                                       below_zero=summary["ci"][1] < 0)
                        tables[key][scope].setdefault("comparisons", {}).setdefault(subset, []).append(summary)
    selection = {}
    for subject, entry in results.items():
        for run in entry["runs"]:
            cell = selection.setdefault(f"{run['fraction']:g}", {}).setdefault(run["arm"], {}).setdefault(
                subject, [])
            cell.append({"seed": run["seed"], "selected_start": run["selected_start"], "best": run["best"],
                         "finetune_s": run["finetune_s"]})
    return {"tables": tables, "selection": selection}


def _fmt(summary, signed=False):
    if summary is None:
        return "–"
    sign = "+" if signed else ""
    low, high = summary["ci"]
    return f"{summary['value']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


ROW_NAMES = {"pretrained": "DC-LDM, SC-MBM pretrained (the default)", "pretrained-start": "  its start (0 steps)",
             "pretrained-prior": "  through its prior in embedding space",
             "baseline": "DC-LDM, random encoder (no SC-MBM)", "baseline-start": "  its start (0 steps)",
             "ridge": "ridge voxels -> embedding (fixed), UNet fine-tuned", "ridge-start": "  ridge embedding, frozen prior",
             "workflow-ridge": "ridge fMRI -> VAE latent (baseline, no seed)",
             "tokens": "DC-LDM, read-out of the SC-MBM tokens alone (MinD-Vis's input)", "tokens-start": "  its start (0 steps)"}


def markdown(report):
    meta, agg = report["meta"], report["aggregate"]
    runs = [run for entry in report["results"].values() for run in entry["runs"]]
    lines = ["# Decoder arms across training seeds", "",
             f"`{meta['command']}` on {meta['machine'].get('cpu')} ({meta['machine'].get('cores')} cores, "
             f"{meta['machine'].get('torch_threads')} torch thread per process); torch {meta['versions'].get('torch')}; "
             f"{len(runs)} runs, {sum(r['total_s'] for r in runs) / 60:.0f} min in all (each run one process at one thread; "
             f"fine-tuning {np.mean([r['finetune_s'] for r in runs]):.0f} s per run on average, then decoding the "
             "decoder, its start and, where fine-tuning gave it one, the decoder through its embedding prior); inputs: the `make decode` results folder named in the command.",
             f"n-way top-1 (n = {meta['n_way']}, mean over {meta['n_samples']} samples per stimulus; chance "
             f"{1 / meta['n_way']:.2f}) on test_avg; seeds {meta['seeds']}; intervals: 95 % percentile bootstrap "
             "over seeds and test stimuli resampled by class (the mean over subjects resamples each subject)."
             + (" Below 100 % of the training trials the epochs, warm-up and evaluation interval are scaled by "
                "1 / share: every share trains the steps of the full-data run." if min(meta["fractions"]) < 1 else ""),
             ""]
    for fraction, scopes in agg["tables"].items():
        lines += [f"## {float(fraction):.0%} of the training trials", ""]
        for scope, table in scopes.items():
            lines += [f"### {'mean of ' + str(len(report['results'])) + ' subjects' if scope == 'mean' else scope}",
                      "", "| row | all | seen | novel |", "|---|---|---|---|"]
            for name in ROW_NAMES:
                if any(name in table["rows"].get(subset, {}) for subset in SUBSETS):
                    lines.append(f"| {ROW_NAMES[name]} | "
                                 + " | ".join(_fmt(table["rows"].get(subset, {}).get(name)) for subset in SUBSETS)
                                 + " |")
            lines += ["", "| a - b | measures | all | seen | novel |", "|---|---|---|---|---|"]
            for index, (a, b, what) in enumerate(c for c in COMPARISONS):
                cells = []
                for subset in SUBSETS:
                    match = [c for c in table.get("comparisons", {}).get(subset, []) if c["a"] == a and c["b"] == b]
                    cells.append(_fmt(match[0], signed=True) + (" **>0**" if match and match[0]["above_zero"] else
                                                                " <0" if match and match[0]["below_zero"] else "")
                                 if match else "–")
                if any(cell != "–" for cell in cells):
                    lines.append(f"| {a} - {b} | {what} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Selection (the checkpoint the label-free validation criterion kept; step 0 = the start):", ""]
        for arm, by_subject in agg["selection"].get(fraction, {}).items():
            cells = "; ".join(f"{subject}: " + ", ".join(f"seed {r['seed']} step {r['best']['step']}" if r["best"]
                                                          else f"seed {r['seed']} none" for r in rows)
                              for subject, rows in by_subject.items())
            seconds = [r["finetune_s"] for rows in by_subject.values() for r in rows]
            lines.append(f"- {arm}: {cells}; fine-tuning {np.mean(seconds):.0f} s per run (mean)")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--subjects", nargs="*")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="finetune.epochs instead of the config's")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aggregate", action="store_true", help="write the tables from finished runs only")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir or str(Path(args.results) / "decoder-seeds")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    logging.getLogger().setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        config = load_config(args.config)
        subjects = args.subjects or config_subjects(config)
        results = {subject: run_subject(config, subject, args, resolve_inputs(config, args.results, subject))
                   for subject in subjects}
    except MindvisError as error:
        sys.exit(f"decoder_seeds: {error}")
    any_run = next(run for entry in results.values() for run in entry["runs"])
    meta = {"command": " ".join(["python", "benchmarks/decoder_seeds.py", *(argv or sys.argv[1:])]),
            "config": args.config, "config_digest": config_digest(config), "seeds": args.seeds,
            "fractions": args.fractions, "arms": args.arms, "n_samples": args.n_samples, "epochs": args.epochs,
            "n_way": any_run["n_way"],
            "machine": machine(), "versions": software_versions(), "wall_time_s": round(time.perf_counter() - started, 1)}
    report = {"meta": meta, "aggregate": aggregate(results, args.fractions, args.arms, args.n_boot),
              "results": results}
    write_json_atomic(f"{args.out}.json", report)
    Path(f"{args.out}.md").write_text(markdown(report) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
