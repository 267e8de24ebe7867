"""Which part of the decoded image does each brain region carry? An in-silico check of brain-token edits.

On the simulated default the ground truth says what the voxels encode: early visual cortex (V1-V3) the
image's local contrast, the higher visual areas (LOC, VOT) its category (through HMAX-like C2 features;
mindvis/simulate/encoding.py). So for a decoded test stimulus A and a donor stimulus B of another class,
swapping the higher-visual tokens of A for B's (:func:`mindvis.generate.edit.edit_trials`; scored by :func:`mindvis.evaluate.edits.swap_scores`, as the
report's check is) should move
the image classifier's decision towards B's class more than swapping the early-visual tokens, and the
early-visual swap should move the image's pixels towards B's image (PixCorr with B's true image) more.

Per left-out pair (each test stimulus A once, its donor B drawn at random among the test stimuli of
other classes, seeded), sample 0 of A's ``generate`` seed, for each group and each tau (steps of A's
cross-attention injected):

* ``donor_prob``: the classifier's probability of B's class on the edited image minus on A's own;
* ``donor_top1``: whether the edited image's top-1 is B's class (A's own decoding: its rate is the floor);
* ``donor_pixcorr``: PixCorr(edited, B's true image) minus PixCorr(A's decoded image, B's true image).

Means with 95 % bootstrap intervals over pairs, per subject and pooled (pairs resampled within each
subject), and the paired difference higher - early.

    python benchmarks/brain_edit.py --results results --config configs/default.yaml [--subjects ...]
        [--tau 0 10] [--out benchmarks/results/brain_edit] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_curve as lc  # noqa: E402  (input resolution, machine description, stratified intervals)

from mindvis.config import load_config, subjects as config_subjects  # noqa: E402
from mindvis.utils.io import derive_seed, set_threads, write_json_atomic  # noqa: E402

GROUPS = {"early (V1-V3)": ["V1", "V2", "V3"], "higher (LOC, VOT)": ["LOC", "VOT"]}
MEASURES = ("donor_prob", "donor_top1", "donor_pixcorr")


def edit_subject_pairs(config, subject, args, classifier):
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.evaluate.edits import donor_rows, summarise, swap_scores
    from mindvis.generate.control import AttentionEdit
    from mindvis.generate.edit import TokenEdit, edit_trials, group_tokens, roi_voxels
    from mindvis.models.dcldm import load_dcldm

    inputs = lc.resolve_inputs(config, args.results, subject)
    settings = config["generate"]
    data = load_responses(inputs["responses"], splits=(settings["split"],))
    split = data[settings["split"]]
    ids = [str(s) for s in split.stimulus_id]
    stimulus_set = load_stimulus_set(inputs["stimuli"])
    truth, labels = stimulus_set.lookup(ids)
    labels = np.asarray(labels)
    donors = donor_rows(labels, derive_seed(config["seed"], "edit", subject))  # the report check's donors
    generator, decoder, _ = load_dcldm(Path(args.results) / subject / "dcldm", base=inputs["base"])
    seeds = [derive_seed(config["seed"], "generate", subject, sid, 0) for sid in ids]
    n_boot, level = int(config["evaluate"]["n_bootstrap"]), float(config["evaluate"]["ci_level"])
    size = generator.image_size
    entry = {"subject": subject, "n_pairs": len(ids), "groups": {}, "per_pair": {}}
    for name, rois in GROUPS.items():
        voxels = roi_voxels(data.voxel_roi, rois, path=inputs["responses"])
        entry["groups"][name] = {"rois": rois, "n_voxels": int(voxels.sum()),
                                 "n_tokens": int(group_tokens(decoder, voxels).sum()), "taus": {}}
        for tau in args.tau:
            out = edit_trials(decoder, generator, split.fmri, TokenEdit(voxels, "swap"), settings, seeds,
                              donor=split.fmri[donors], attention=AttentionEdit("replace", int(tau)))
            values = swap_scores(out["edited"], out["source"], truth[donors], labels[donors], classifier, size)
            floor = values.pop("floor_top1")
            if "source" not in entry:
                entry["source"] = {"donor_top1": summarise(floor, n_boot, level),
                                   "own_top1": summarise(classifier.predict_proba(out["source"]).argmax(1) == labels,
                                                         n_boot, level)}
            entry["per_pair"][f"{name} | tau {tau}"] = {k: v.tolist() for k, v in values.items()}
            entry["groups"][name]["taus"][str(tau)] = {
                k: summarise(v, n_boot, level) for k, v in values.items()}
            print(f"{subject} {name} tau {tau}: " + ", ".join(
                f"{k} {v.mean():+.3f}" for k, v in values.items()), flush=True)
    entry["higher_minus_early"] = {}
    early, higher = list(GROUPS)
    for tau in args.tau:
        entry["higher_minus_early"][str(tau)] = {
            k: summarise(np.asarray(entry["per_pair"][f"{higher} | tau {tau}"][k])
                         - np.asarray(entry["per_pair"][f"{early} | tau {tau}"][k]), n_boot, level)
            for k in MEASURES}
    entry["stimulus_id"], entry["donor_id"] = ids, [ids[d] for d in donors]
    return entry


def pooled(entries, key, measure, n_boot, level, difference=False):
    early, higher = list(GROUPS)
    arrays = []
    for entry in entries:
        if difference:
            arrays.append(np.asarray(entry["per_pair"][f"{higher} | {key}"][measure])
                          - np.asarray(entry["per_pair"][f"{early} | {key}"][measure]))
        else:
            arrays.append(np.asarray(entry["per_pair"][key][measure]))
    ci = lc.stratified_ci(arrays, n_boot=n_boot, level=level, seed=0)
    return {"value": float(np.mean([a.mean() for a in arrays])), "ci": ci}


def _cell(summary, signed=True):
    """A shift (signed) or a rate, with its interval."""
    form = "+.3f" if signed else ".3f"
    low, high = summary["ci"]
    return f"{summary['value']:{form}} [{low:{form}}, {high:{form}}]"


def markdown(report):
    lines = ["# Brain-token edits: which part of the decoded image each region carries (in-silico check)\n",
             report["description"] + "\n",
             f"Run: `{report['command']}` on {report['machine']['cpu']} ({report['machine']['cores']} cores, torch "
             f"{report['machine']['torch']}), {report['wall_min']:.1f} min.\n",
             "Swap of the group's tokens from a donor stimulus of another class; tau = steps of the decoded "
             "stimulus's cross-attention injected (of " f"{report['config']['generate']['steps']}).\n",
             "## Pooled over subjects (pairs resampled within each)\n",
             "| group | tau | donor-class probability shift | donor-class top-1 | PixCorr with the donor image, shift |",
             "|---|---|---|---|---|"]
    for key, row in report["pooled"].items():
        group, tau = key.split(" | ")
        lines.append(f"| {group} | {tau[4:]} | {_cell(row['donor_prob'])} | {_cell(row['donor_top1'], False)} | "
                     f"{_cell(row['donor_pixcorr'])} |")
    for tau, row in report["pooled_difference"].items():
        lines.append(f"| higher - early | {tau[4:]} | {_cell(row['donor_prob'])} | {_cell(row['donor_top1'])} | "
                     f"{_cell(row['donor_pixcorr'])} |")
    lines.append("\nFloor: the decoded (unedited) images' top-1 is the donor's class at "
                 + ", ".join(f"{e['subject']} {e['source']['donor_top1']['value']:.3f}" for e in report["entries"])
                 + " (own class: " + ", ".join(f"{e['source']['own_top1']['value']:.3f}" for e in report["entries"])
                 + ").\n")
    lines.append("## Per subject\n")
    lines.append("| subject | group | voxels | tokens | tau | donor-class probability shift | donor-class top-1 | "
                 "PixCorr shift |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for entry in report["entries"]:
        for name, group in entry["groups"].items():
            for tau, row in group["taus"].items():
                lines.append(f"| {entry['subject']} | {name} | {group['n_voxels']} | {group['n_tokens']} | {tau} | "
                             f"{_cell(row['donor_prob'])} | {_cell(row['donor_top1'], False)} | "
                             f"{_cell(row['donor_pixcorr'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--subjects", nargs="*", default=None)
    parser.add_argument("--tau", nargs="+", type=int, default=[0, 10])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/brain_edit"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    config = load_config(args.config)
    subjects = args.subjects or config_subjects(config)
    from mindvis.models.classifiers.load import load_image_classifier

    inputs = lc.resolve_inputs(config, args.results, subjects[0])
    classifier = load_image_classifier(config, inputs["classifier"] if inputs["domain"] else None)
    entries = [edit_subject_pairs(config, subject, args, classifier) for subject in subjects]
    n_boot, level = int(config["evaluate"]["n_bootstrap"]), float(config["evaluate"]["ci_level"])
    report = {"description": __doc__.split("\n\n")[0], "command": "python benchmarks/brain_edit.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "machine": lc.machine(),
              "wall_min": (time.perf_counter() - started) / 60, "entries": entries,
              "pooled": {key: {m: pooled(entries, key, m, n_boot, level) for m in MEASURES}
                         for key in entries[0]["per_pair"]},
              "pooled_difference": {f"tau {tau}": {m: pooled(entries, f"tau {tau}", m, n_boot, level, difference=True)
                                                   for m in MEASURES} for tau in args.tau},
              "config": config}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
