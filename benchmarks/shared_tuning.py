"""Calibrate simulate.shared_tuning against Haxby et al. (2011): between- vs within-subject classification.

Haxby et al. 2011 (Neuron 72:404, Fig. 2A) classified categories from ventral temporal cortex within
subjects (WSC) and between subjects after anatomical alignment (BSC, a classifier trained on other people's
patterns). Above chance, anatomically aligned BSC keeps

* faces and objects (7 categories, chance 14.3 %): (44.6 - 14.3) / (63.2 - 14.3) = 0.62 of WSC,
* animal species (6 categories, chance 16.7 %): (37.4 - 16.7) / (68.9 - 16.7) = 0.40.

This benchmark measures the same ratio on simulated subjects for several values of shared_tuning, with the
experiment's own protocol in silico: the ground truth of three subjects (``mindvis.simulate.ground_truth``)
read at the group template's higher-visual (LOC + VOT) voxels, where a template voxel a subject has no
voxel at carries no evoked response. Training patterns are single trials (the response plus Gaussian noise at
the config's single-trial SNR); test patterns are averages of ``test_repeats`` noisy trials of held-out
images, as the experiment's test set is. WSC: a logistic classifier trained on subject B's training trials,
scored on B's held-out averages; BSC: trained on subject A's, scored on B's. The ratio is
``(BSC - chance) / (WSC - chance)`` over all ordered pairs. No decoder of mindvis is trained or read.

The second part (``--pipeline``) measures the same on the workflow's own output, for a few levels:
each subject simulated as BIDS, preprocessed (GLM single-trial estimates at the group template's voxels,
``preprocess.space: template``), and classified as Haxby et al. did, within subject and between subjects:
a logistic classifier trained on subject A's training trials, scored on subject B's single test trials of
seen classes, on the template's LOC/VOT voxels (their ventral temporal cortex) and on all voxels.

    python benchmarks/shared_tuning.py [--config configs/default.yaml] [--levels 0 0.25 0.5 0.75 1]
        [--pipeline 0 0.85 1]
"""

import argparse
import copy
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from mindvis.config import load_config, subjects
from mindvis.data.stimuli import build_stimulus_set, load_stimulus_set
from mindvis.simulate import geometry, ground_truth
from mindvis.simulate.deepnet import write_stimulus_features

ROOT = Path(__file__).resolve().parents[1]
HAXBY = {"faces and objects": (63.2, 44.6, 14.3), "animal species": (68.9, 37.4, 16.7)}


def template_patterns(truth, responses, template):
    """Responses at the template's higher voxels: the subject's voxel at the same grid index, else 0."""
    index = {tuple(ijk): column for column, ijk in enumerate(truth.layout.ijk)}
    higher = np.flatnonzero(~template.is_early)
    out = np.zeros((len(responses), len(higher)), dtype=np.float64)
    for position, voxel in enumerate(higher):
        column = index.get(tuple(template.ijk[voxel]))
        if column is not None:
            out[:, position] = responses[:, column]
    return out


def classification(responses, columns):
    """WSC and BSC (as Haxby et al.) on preprocessed responses: train on A's training trials, test on B's single
    test trials of seen classes; returns (WSC, BSC, chance)."""
    names = sorted(responses)
    accuracy = {}
    for a, b in itertools.product(names, names):
        train, test = responses[a]["train"], responses[b]["test"]
        seen = np.isin(test.label, np.unique(train.label))
        x = train.fmri[:, columns]
        classifier = LogisticRegression(C=0.01, max_iter=3000).fit((x - x.mean(0)) / (x.std(0) + 1e-9), train.label)
        y = test.fmri[:, columns]
        accuracy[a, b] = float(np.mean(classifier.predict((y - y.mean(0)) / (y.std(0) + 1e-9))[seen]
                                       == test.label[seen]))
    chance = 1 / len(np.unique(responses[names[0]]["train"].label))
    return (float(np.mean([accuracy[s, s] for s in names])),
            float(np.mean([accuracy[a, b] for a, b in itertools.permutations(names, 2)])), chance)


def pipeline_rows(base, levels, work, stimuli_path, features_path, overrides=None):
    """Simulate, preprocess and classify every subject at each shared_tuning level (``overrides``: other
    ``simulate`` keys for this sweep, e.g. ``{"misalignment_mm": 0.0}``)."""
    from mindvis.data.responses import load_responses
    from mindvis.preprocess.run import preprocess_subject
    from mindvis.simulate.bids import write_dataset_metadata
    from mindvis.simulate.run import simulate_subject

    rows = []
    for level in levels:
        config = copy.deepcopy(base)
        config["simulate"].update(overrides or {})
        config["simulate"]["shared_tuning"] = level
        tag = "".join(f"-{key}{value:g}" for key, value in (overrides or {}).items())
        bids_dir = work / f"bids-{level:g}{tag}"
        write_dataset_metadata(config, bids_dir)
        responses = {}
        for subject in subjects(config):
            simulate_subject(config, stimuli_path, bids_dir, subject, features_path=features_path)
            out = work / f"responses-{level:g}{tag}" / subject / "responses.h5"
            preprocess_subject(config, bids_dir, subject, out, stimuli_path=stimuli_path)
            responses[subject] = load_responses(out, splits=("train", "test"))
        import h5py

        with h5py.File(out, "r") as handle:
            roi = np.array([r.decode() if isinstance(r, bytes) else r for r in handle["voxel_roi"][()]])
        higher = np.isin(roi, ["LOC", "VOT"])
        row = [", ".join([f"shared_tuning {level:g}"] + [f"{key} {value:g}" for key, value in
                                                          (overrides or {}).items()])]
        for columns in (higher, np.ones(len(roi), dtype=bool)):
            within, between, chance = classification(responses, columns)
            row += [within, between, (between - chance) / (within - chance)]
        rows.append(row)
        print(f"pipeline, {row[0]}: higher WSC {row[1]:.3f} BSC {row[2]:.3f} ratio {row[3]:.2f}; "
              f"all WSC {row[4]:.3f} BSC {row[5]:.3f} ratio {row[6]:.2f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--levels", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 0.85, 0.9, 1.0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/shared_tuning.md"))
    parser.add_argument("--seed", type=int, default=0, help="noise and split seed of the benchmark")
    parser.add_argument("--pipeline", type=float, nargs="*", default=[],
                        help="shared_tuning levels to measure through simulation and preprocessing as well")
    parser.add_argument("--diagnose", nargs="*", default=[], metavar="KEY=VALUE",
                        help="with --pipeline: also measure its highest level with one simulate key changed, "
                             "one row per KEY=VALUE (e.g. misalignment_mm=0 spontaneous_to_noise=0)")
    args = parser.parse_args()
    started = time.perf_counter()
    base = load_config(args.config)
    section = base["simulate"]
    work = Path(tempfile.mkdtemp(prefix="shared-tuning-"))
    stimuli_path = work / "stimuli.h5"
    build_stimulus_set(base, stimuli_path)
    features_path = None
    if section["category_model"] == "deepnet":
        features_path = write_stimulus_features(stimuli_path, work / "features.h5", section["feature_network"])
    stimuli = load_stimulus_set(stimuli_path, splits=("train",))
    images, labels = stimuli["train"].images, stimuli["train"].label
    rng = np.random.default_rng(args.seed)
    held_out = np.zeros(len(images), dtype=bool)
    held_out[rng.permutation(len(images))[: len(images) * 3 // 10]] = True
    classes = np.unique(labels)
    chance = 1 / len(classes)
    template = geometry.template_layout(section["resolution_mm"], section["field_of_view"],
                                        section["n_early_voxels"], section["n_higher_voxels"])
    names = subjects(base)

    pipeline = pipeline_rows(base, args.pipeline, work, stimuli_path, features_path) if args.pipeline else []
    for setting in args.diagnose if args.pipeline else []:
        key, value = setting.split("=")
        pipeline += pipeline_rows(base, [max(args.pipeline)], work, stimuli_path, features_path,
                                  overrides={key: float(value)})
    rows = []
    for level in args.levels:
        config = copy.deepcopy(base)
        config["simulate"]["shared_tuning"] = level
        patterns, tuning = {}, {}
        for subject in names:
            truth = ground_truth(config, stimuli_path, subject, features_path=features_path)
            clean = template_patterns(truth, truth.respond(images)[0], template)
            noise_sd = clean.std(axis=0).mean() / section["single_trial_snr"]
            train = clean[~held_out] + rng.normal(0, noise_sd, clean[~held_out].shape)
            repeats = section["test_repeats"]
            test = clean[held_out] + rng.normal(0, noise_sd / np.sqrt(repeats), clean[held_out].shape)
            patterns[subject] = (train, test)
            tuning[subject] = clean
        accuracy = {}
        for a, b in itertools.product(names, names):
            train = patterns[a][0]
            mean, sd = train.mean(axis=0), train.std(axis=0) + 1e-9
            classifier = LogisticRegression(C=0.01, max_iter=3000).fit((train - mean) / sd, labels[~held_out])
            test = patterns[b][1]
            test = (test - test.mean(axis=0)) / (test.std(axis=0) + 1e-9)
            accuracy[a, b] = float(np.mean(classifier.predict(test) == labels[held_out]))
        within = np.mean([accuracy[s, s] for s in names])
        between = np.mean([accuracy[a, b] for a, b in itertools.permutations(names, 2)])
        correlations = []
        for a, b in itertools.combinations(names, 2):
            ta, tb = tuning[a], tuning[b]
            both = (ta.std(axis=0) > 0) & (tb.std(axis=0) > 0)
            za = (ta[:, both] - ta[:, both].mean(0)) / ta[:, both].std(0)
            zb = (tb[:, both] - tb[:, both].mean(0)) / tb[:, both].std(0)
            correlations.append(np.median((za * zb).mean(axis=0)))
        ratio = (between - chance) / (within - chance)
        rows.append((level, within, between, ratio, float(np.mean(correlations))))
        print(f"shared_tuning {level}: WSC {within:.3f}, BSC {between:.3f}, ratio {ratio:.2f}", flush=True)

    lines = ["# shared_tuning calibrated against Haxby et al. 2011\n",
             f"Run: `python benchmarks/shared_tuning.py {' '.join(sys.argv[1:])}` "
             f"({time.perf_counter() - started:.0f} s on {platform.processor() or platform.machine()}, "
             f"{platform.system()}; stimuli from the committed Fashion-MNIST subset unless Debian's "
             f"dataset-fashion-mnist is installed). Subjects {', '.join(names)}; "
             f"{(~held_out).sum()} single training trials and {held_out.sum()} held-out images averaged over "
             f"{section['test_repeats']} noisy trials, {len(classes)} classes (chance {chance:.3f}); "
             f"{int((~template.is_early).sum())} template LOC/VOT voxels; category model "
             f"{section['category_model']}, misalignment {section['misalignment_mm']} mm per axis.\n",
             "Published (anatomically aligned BSC vs WSC, ventral temporal cortex; Haxby et al. 2011, Fig. 2A):\n",
             "| experiment | WSC % | BSC (anatomical) % | chance % | (BSC - chance) / (WSC - chance) |",
             "|---|---|---|---|---|"]
    for name, (wsc, bsc, chance_pct) in HAXBY.items():
        lines.append(f"| {name} | {wsc} | {bsc} | {chance_pct} | {(bsc - chance_pct) / (wsc - chance_pct):.2f} |")
    lines += ["\nSimulated (this config, in silico, noise as in the experiment):\n",
              "| shared_tuning | WSC | BSC | (BSC - chance) / (WSC - chance) | median per-voxel tuning r between "
              "subjects (noise-free, shared voxels) |", "|---|---|---|---|---|"]
    for level, within, between, ratio, r in rows:
        lines.append(f"| {level:g} | {within:.3f} | {between:.3f} | {ratio:.2f} | {r:.3f} |")
    if pipeline:
        lines += ["\nThrough the workflow (simulated as BIDS, preprocessed to GLM single-trial estimates at the "
                  "template's voxels; trained on A's training trials, scored on B's single test trials of seen "
                  "classes):\n",
                  "| simulation | LOC/VOT WSC | LOC/VOT BSC | LOC/VOT ratio | all voxels WSC | all voxels BSC | "
                  "all voxels ratio |", "|---|---|---|---|---|---|---|"]
        for setting, *values in pipeline:
            lines.append(f"| {setting} | " + " | ".join(f"{v:.3f}" if i % 3 != 2 else f"{v:.2f}"
                                                        for i, v in enumerate(values)) + " |")
    target = np.mean([(b - c) / (w - c) for w, b, c in HAXBY.values()])
    if rows:
        best = min(rows, key=lambda row: abs(row[3] - target))
        lines.append(f"\nThe published ratios average {target:.2f}; in silico the level whose ratio is nearest "
                     f"is shared_tuning = {best[0]:g} (ratio {best[3]:.2f}).")
    lines.append(f"The default is {section['shared_tuning']:g}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
