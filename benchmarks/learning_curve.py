"""Learning curve: n-way top-1 against the share of training trials, with and without SC-MBM pretraining.

MinD-Vis's claim is that pretraining matters most when labels are few. This
benchmark retrains the DC-LDM decoder of each subject on a seeded share of its
training trials (``finetune.train_fraction``: 10, 25, 50, 100 %; the val split
stays whole) twice, from the pretrained SC-MBM encoder the workflow used and
from a random one (``baseline``), decodes the ``test_avg`` stimuli and scores
them as the evaluate stage does; beside them, at each share, three linear
probes that need no generation. Run it after ``make decode`` on the finished
results folder::

    python benchmarks/learning_curve.py [--results results] [--config configs/default.yaml]
        [--subjects sub-01 ...] [--fractions 0.1 0.25 0.5 1.0] [--n-samples 2]
        [--work-dir results/learning-curve] [--out benchmarks/results/learning_curve]
        [--resume] [--quick] [--threads 1] [--features mean]

What is measured, per subject, share and variant
------------------------------------------------
1. fine-tuning (:func:`mindvis.train.finetune.finetune`) with the resolved
   config, ``finetune.train_fraction`` = the share, and ``generate.start_row``,
   ``generate.lowlevel`` off and ``generate.attention_stimuli`` 0 (rows and
   maps the curve does not use), into ``{work-dir}/{subject}/f{share}/{variant}/dcldm``;
   ``pretrained`` starts from the encoder the workflow's decoder did (its
   ``dcldm.json`` ``inputs.mbm``), ``baseline`` from a random one;
2. decoding (:func:`mindvis.generate.run.generate_subject`) of ``test_avg`` with
   ``--n-samples`` samples per stimulus;
3. scoring with the evaluate stage's functions (:func:`mindvis.evaluate.table.make_reference`,
   :func:`~mindvis.evaluate.table.score_images`, its seed and n): n-way top-1,
   mean over the k samples, against the image classifier's top-1 on the true
   image (MinD-Vis's protocol), on all test stimuli and on the ``seen`` and
   ``novel`` ones (:func:`~mindvis.evaluate.table.stimulus_categories`: novel
   when the label is not among the labels of the subject's train + val trials),
   each with a percentile bootstrap interval over stimuli.

Per subject and share, linear probes (no generation): multinomial logistic
regression (:func:`mindvis.models.linear.fit_fmri_classifier`, C chosen on the
val split by log-loss, refitted on the training subset + val) on the same
training subset (:meth:`mindvis.data.pairs.PairedTrials.subset` with the seed
fine-tuning uses), on (a) the raw voxels, (b) the pretrained SC-MBM encoder's
features and (c) a random encoder's (``--features``: the mean of the real
patch tokens, or the class token; the random encoder is of the configured
preset, drawn from its own seed, as fine-tuning does not keep the baseline
decoder's initial weights); accuracy against the label on the ``test_avg``
stimuli of seen classes only (a probe cannot name a class it never saw), with
a bootstrap interval.

Outputs
-------
``{out}.json`` (every number, per-stimulus values, config digest, machine,
wall times), ``{out}.md`` (tables per subject and the mean over subjects, and a
reading of whether pretraining helps more at small shares, computed from the
numbers) and ``{out}.png`` (the curves). Each run also leaves ``score.json``
and a ``run.log`` in its work folder; ``--resume`` skips the steps whose
outputs exist for the same config.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mindvis.config import load_config, subjects as config_subjects, validate
from mindvis.data.pairs import PairedTrials
from mindvis.data.responses import load_responses
from mindvis.errors import MindvisError
from mindvis.evaluate.classifier_check import check_classifier
from mindvis.evaluate.metrics import bootstrap_ci
from mindvis.evaluate.table import MIN_SUBSET_STIMULI, make_reference, score_images, stimulus_categories
from mindvis.models.bundled import BUNDLED_CLASSIFIER, BUNDLED_PRIOR, resolve_bundled
from mindvis.models.linear import class_probabilities, fit_fmri_classifier
from mindvis.models.mbm import MBMAutoencoder, mbm_from_config
from mindvis.utils.io import derive_seed, seed_everything, set_threads, software_versions, write_json_atomic

log = logging.getLogger("learning_curve")

VARIANTS = ("pretrained", "baseline")
#: Test-stimulus subsets of the decoded images (the probes: seen only).
SUBSETS = ("all", "seen", "novel")
#: Linear probes: id -> what it reads.
PROBES = {"voxels": "raw voxels", "pretrained-encoder": "pretrained SC-MBM encoder features",
          "random-encoder": "random SC-MBM encoder features"}
#: Per-stimulus metrics summarised for the decoders (all are kept per stimulus in the JSON).
DECODER_METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean")
#: Config sections whose change reruns fine-tuning and decoding under --resume (fine-tuning reads the generate
#: section too: its validation samples), as the workflow's config_digest params; scoring also reads evaluate.
DIGEST_SECTIONS = ("seed", "data", "ldm", "mbm", "finetune", "generate", "classifier")
SCORE_SECTIONS = DIGEST_SECTIONS + ("evaluate",)
PROBE_NOTE = ("probes are scored on the test stimuli of seen classes only: a classifier fitted on the training "
              "labels cannot name a class it never saw")
DEFAULT_OUT = "benchmarks/results/learning_curve"


# -- config and inputs -------------------------------------------------------------

def config_digest(config, sections=DIGEST_SECTIONS):
    """A short hash of config sections (as workflow/rules/common.smk's ``config_digest``)."""
    chosen = {name: config.get(name) for name in sections}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_config(config, fraction, n_samples):
    """The resolved config of one learning-curve run: ``finetune.train_fraction`` and the cheaper generate keys."""
    config = copy.deepcopy(config)
    config["finetune"]["train_fraction"] = float(fraction)
    config["generate"].update(start_row=False, lowlevel=False, attention_stimuli=0, n_samples=int(n_samples))
    return validate(config, path=f"<learning-curve config, train_fraction {fraction}>")


def _locate(path, root):
    """A path recorded by the workflow (relative to where it ran), found from here or from the run's root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return Path(root) / path


def uses_domain_classifier(config):
    """Whether the domain classifier scores images (``evaluate.classifier``; as the workflow decides)."""
    choice = config["evaluate"]["classifier"]
    return choice == "domain" or (choice == "auto" and config["data"]["source"] == "simulated")


def resolve_inputs(config, results_dir, subject):
    """The files a subject's runs read, as the workflow resolved them.

    Returns
    -------
    dict
        ``responses``, ``stimuli``, ``base`` (``ldm.base``), ``mbm`` (the pretrained encoder of
        ``results/{subject}/dcldm/dcldm.json``), ``classifier`` (``classifier.weights``), ``domain``
        (whether that classifier scores images), ``workflow_meta`` (the workflow decoder's dcldm.json).
    """
    results_dir = Path(results_dir)
    root = results_dir.parent
    meta_path = results_dir / subject / "dcldm" / "dcldm.json"
    if not meta_path.exists():
        raise MindvisError("the workflow's fine-tuned decoder is missing", path=meta_path,
                           fix="run `make decode` first (or pass --results to a finished results folder).")
    meta = json.loads(meta_path.read_text())
    inputs = meta.get("inputs") or {}
    if not inputs.get("mbm"):
        raise MindvisError("the decoder records no pretrained SC-MBM encoder", path=meta_path, key="inputs.mbm",
                           fix="point --results at a run whose dcldm/ was fine-tuned from SC-MBM.")
    responses = results_dir / subject / "responses.h5"
    if not responses.exists():
        responses = _locate(inputs["responses"], root)
    base = (results_dir / "pretrain" / "ldm" if config["ldm"]["base"] == "embedded"
            else resolve_bundled(config["ldm"]["base"], BUNDLED_PRIOR, "ldm.base"))
    weights = config["classifier"]["weights"]
    classifier = (results_dir / "classifier" if weights is None
                  else resolve_bundled(weights, BUNDLED_CLASSIFIER, "classifier.weights"))
    found = {"responses": responses, "stimuli": _locate(inputs["stimuli"], root), "base": Path(base),
             "mbm": _locate(inputs["mbm"], root), "classifier": Path(classifier)}
    domain = uses_domain_classifier(config)
    for key, path in found.items():
        if not path.exists() and (key != "classifier" or domain):
            raise MindvisError(f"the {key} input is missing", path=path,
                               fix="run `make decode` with this config first, or pass --results / --config.")
    return {**found, "domain": domain, "workflow_meta": meta}


def training_rows(n_train, fraction, seed):
    """Row indices (sorted) of the training trials ``PairedTrials.subset(fraction, seed)`` keeps.

    The very method fine-tuning calls, on stand-in trials whose "images" are their row numbers, so the
    probes read exactly the trials the decoder trained on.
    """
    stand_in = PairedTrials(np.zeros((n_train, 1), np.float32), np.arange(n_train), np.zeros(n_train, np.int64))
    return np.asarray(stand_in.subset(fraction, seed).images, np.int64)


def fraction_seed(config):
    """The seed of the training subset (:func:`mindvis.train.finetune.finetune`'s)."""
    return derive_seed(config["seed"], "train-fraction")


# -- scoring -----------------------------------------------------------------------

def summarize_values(values, n_boot, level, seed):
    """Mean of per-stimulus values (NaN skipped) with its percentile bootstrap interval over stimuli."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < MIN_SUBSET_STIMULI:
        return {"value": None, "ci": None, "n": int(len(finite)),
                "reason": f"{len(finite)} stimuli (a bootstrap needs at least {MIN_SUBSET_STIMULI})"}
    low, high = bootstrap_ci(np.mean, finite, n_boot=n_boot, level=level, seed=seed)
    return {"value": float(finite.mean()), "ci": [low, high], "n": int(len(finite))}


def subset_index(categories, subset):
    """Rows of a subset: ``all`` every stimulus, ``seen`` / ``novel`` by category."""
    categories = np.asarray(categories, dtype=object)
    if subset == "all":
        return np.arange(len(categories))
    return np.flatnonzero(categories == subset)


def subset_summaries(values, categories, n_boot, level, seed):
    """``{subset: summary}`` of per-stimulus values for all, seen and novel test stimuli."""
    values = np.asarray(values, np.float64)
    return {subset: summarize_values(values[subset_index(categories, subset)], n_boot, level, seed)
            for subset in SUBSETS}


def score_samples(samples, classifier, config, subject, categories):
    """Score decoded images as the evaluate stage does (same reference, n and seed).

    Parameters
    ----------
    samples : dict
        :func:`mindvis.generate.writing.read_samples_h5` of a run.
    classifier : ImageClassifier
    config : dict
    subject : str
    categories : list of {"seen", "novel", None}
        Per test stimulus.

    Returns
    -------
    dict
        ``n_way``, ``trials``, ``chance``, ``classifier_check``, ``metrics`` (metric -> subset -> summary)
        and ``per_stimulus`` (metric -> list).
    """
    settings = config["evaluate"]
    class_names = list(samples["attrs"].get("class_names", classifier.class_names))
    reference = make_reference(classifier, samples, settings, derive_seed(config["seed"], "evaluate", subject),
                               list(classifier.class_names) == class_names)
    check = check_classifier(getattr(classifier, "info", {}), reference.gt_class, classifier.n_classes)
    values, _, _ = score_images(classifier, samples["samples"], reference)
    n_boot, level = int(settings["n_bootstrap"]), float(settings["ci_level"])
    metrics = {key: subset_summaries(values[key], categories, n_boot, level, reference.seed)
               for key in DECODER_METRICS if key in values}
    return {"n_way": reference.n_way, "trials": reference.trials, "chance": 1.0 / reference.n_way,
            "n_samples": int(samples["samples"].shape[1]),
            "classifier_check": {"usable": check.usable, "reason": check.reason},
            "metrics": metrics, "per_stimulus": {key: _finite_list(array) for key, array in values.items()}}


def _finite_list(values):
    """A list for JSON, non-finite values (unlabelled stimuli's label top-1) as None."""
    return [float(x) if np.isfinite(x) else None for x in np.asarray(values, np.float64)]


# -- linear probes -----------------------------------------------------------------

@torch.no_grad()
def encoder_features(encoder, fmri, pooling="mean", batch_size=256):
    """SC-MBM encoder features of whole voxel vectors: float32 [N, embed_dim].

    ``mean``: the mean of the real patch tokens (padding tokens, which are zero, left out); ``cls``: the
    class token. Vectors longer than the encoder's capacity need ``resize_positions`` first.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    encoder.eval()
    device = next(encoder.parameters()).device
    fmri = torch.as_tensor(np.asarray(fmri, np.float32))
    parts = []
    for start in range(0, len(fmri), batch_size):
        batch = fmri[start:start + batch_size].to(device)
        latent = encoder.encode(batch).float()
        if pooling == "cls":
            parts.append(latent[:, 0].cpu())
            continue
        real = encoder.token_padding_mask(encoder.pad(batch)[1]).to(latent.dtype)
        parts.append(((latent[:, 1:] * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)).cpu())
    width = encoder.config.embed_dim
    return torch.cat(parts).numpy() if parts else np.zeros((0, width), np.float32)


def probe_scores(train_x, train_y, val_x, val_y, test_x, test_y, seen_rows, n_classes, Cs, n_boot, level, seed):
    """A multinomial logistic probe (C on val, refitted on train + val), scored on the seen test stimuli.

    Parameters
    ----------
    train_x, val_x, test_x : float [N, F]
    train_y, val_y, test_y : int [N]
        Labels; training and val rows of unknown class (-1) are left out.
    seen_rows : int [M]
        The test rows scored (labelled stimuli of seen classes).
    n_classes : int

    Returns
    -------
    dict
        ``accuracy`` (a summary with its bootstrap interval), ``correct`` (per seen test stimulus), ``fit``.
    """
    keep_train, keep_val = np.asarray(train_y) >= 0, np.asarray(val_y) >= 0
    model, info = fit_fmri_classifier(np.asarray(train_x, np.float32)[keep_train], np.asarray(train_y)[keep_train],
                                      np.asarray(val_x, np.float32)[keep_val], np.asarray(val_y)[keep_val], Cs,
                                      seed=seed)
    seen_rows = np.asarray(seen_rows, np.int64)
    probs = class_probabilities(model, np.asarray(test_x, np.float32)[seen_rows], n_classes)
    correct = (probs.argmax(axis=1) == np.asarray(test_y)[seen_rows]).astype(np.float64)
    return {"accuracy": summarize_values(correct, n_boot, level, seed), "correct": correct.tolist(),
            "classes_fitted": [int(c) for c in model.classes_], "fit": info}


def subject_features(config, mbm_dir, data, pooling, subject):
    """Probe inputs of every split: raw voxels, pretrained and random encoder features."""
    n_voxels = data.n_voxels
    pretrained = MBMAutoencoder.from_pretrained(mbm_dir, local_files_only=True)
    seed_everything(derive_seed(config["seed"], "learning-curve", subject, "random-encoder"))
    random_encoder = mbm_from_config(config["mbm"], n_voxels=n_voxels)
    for encoder in (pretrained, random_encoder):
        if n_voxels > encoder.capacity:  # as build_decoder does
            encoder.resize_positions(n_voxels)
    out = {}
    for split in ("train", "val", "test_avg"):
        fmri = data[split].fmri
        out.setdefault("voxels", {})[split] = np.asarray(fmri, np.float32)
        out.setdefault("pretrained-encoder", {})[split] = encoder_features(pretrained, fmri, pooling)
        out.setdefault("random-encoder", {})[split] = encoder_features(random_encoder, fmri, pooling)
    return out


def run_probes(config, data, features, fraction, categories):
    """Every probe at one training share: ``{probe: probe_scores(...)}`` plus the subset's size."""
    settings = config["evaluate"]
    rows = training_rows(len(data["train"]), fraction, fraction_seed(config))
    test_labels = data["test_avg"].label
    seen_rows = np.flatnonzero((np.asarray(categories, dtype=object) == "seen") & (test_labels >= 0))
    out = {"n_train": int(len(rows)), "n_val": int(len(data["val"])), "n_test_seen": int(len(seen_rows)),
           "train_classes": sorted({int(c) for c in data["train"].label[rows] if c >= 0})}
    seed = derive_seed(config["seed"], "evaluate", "fmri")
    for probe in PROBES:
        table = features[probe]
        out[probe] = probe_scores(table["train"][rows], data["train"].label[rows], table["val"], data["val"].label,
                                  table["test_avg"], test_labels, seen_rows, data.n_classes,
                                  settings["fmri_classifier_C"], int(settings["n_bootstrap"]),
                                  float(settings["ci_level"]), seed)
    return out


# -- one run -----------------------------------------------------------------------

class _RunLog:
    """Send the package's log of one run to ``path`` (INFO), leaving the console to the progress lines."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, mode="a")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def __enter__(self):
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def _meta_matches(path, digest):
    """Whether a run's recorded config (dcldm.json, samples.h5 attrs) has this digest."""
    if not Path(path).exists():
        return False
    if Path(path).suffix == ".json":
        recorded = json.loads(Path(path).read_text()).get("config") or {}
    else:
        from mindvis.generate.writing import read_samples_h5

        recorded = read_samples_h5(path)["attrs"].get("config") or {}
    return isinstance(recorded, dict) and config_digest(recorded) == digest


def _checkpoint_matches(train_dir, digest):
    """Whether the newest fine-tuning checkpoint in ``train_dir`` was made with a config of this digest."""
    from mindvis.train.checkpoint import latest_checkpoint, read_checkpoint_state

    folder = latest_checkpoint(Path(train_dir) / "checkpoints")
    if folder is None or not folder.exists():
        return False
    recorded = read_checkpoint_state(folder).get("config") or {}
    return isinstance(recorded, dict) and config_digest(recorded) == digest


def decode_run(config, subject, inputs, variant, run_dir, resume, label=""):
    """Fine-tune and decode one variant at one share (with ``resume``, a step whose output exists for this
    config is reused).

    Returns
    -------
    samples : dict
        Its ``samples.h5``.
    timings : dict
        ``finetune_s`` and ``generate_s`` as the steps recorded them (``dcldm.json``, ``summary.json``), also
        for a reused step, and ``reused``: the steps taken from an earlier invocation.
    info : dict
        From its ``dcldm.json``: trial counts, the checkpoint chosen, epochs, device.
    """
    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import SAMPLES_FILE, read_samples_h5
    from mindvis.train.finetune import finetune

    digest = config_digest(config)
    model_dir, samples_dir = run_dir / "dcldm", run_dir / "samples"
    classifier_dir = inputs["classifier"] if inputs["domain"] else None
    reused = []
    with _RunLog(run_dir / "run.log"):
        if resume and _meta_matches(model_dir / "dcldm.json", digest):
            reused.append("finetune")
        else:
            print(f"{label}: fine-tuning into {model_dir} ...", flush=True)
            meta = finetune(config, subject, inputs["responses"], inputs["stimuli"], inputs["base"], model_dir,
                            mbm_dir=None if variant == "baseline" else inputs["mbm"], baseline=variant == "baseline",
                            resume=resume and _checkpoint_matches(model_dir / "train", digest))
            if meta.get("stopped_early"):
                raise MindvisError("fine-tuning stopped early (a time box): no decoder was written", path=model_dir,
                                   fix="rerun with --resume to continue it.")
        if "finetune" in reused and _meta_matches(samples_dir / SAMPLES_FILE, digest):
            reused.append("generate")
        else:
            print(f"{label}: decoding test_avg into {samples_dir} ...", flush=True)
            generate_subject(config, subject, model_dir, inputs["responses"], inputs["stimuli"], samples_dir,
                             classifier_dir=classifier_dir, base=inputs["base"])
    if reused:
        print(f"{label}: reused {' and '.join(reused)} (--resume)", flush=True)
    meta = json.loads((model_dir / "dcldm.json").read_text())
    summary = json.loads((samples_dir / "summary.json").read_text())
    timings = {"finetune_s": meta.get("wall_time_s"), "generate_s": summary.get("wall_time_s"), "reused": reused}
    info = {"n_train": meta.get("n_train"), "n_val": meta.get("n_val"), "best": meta.get("best"),
            "epochs": meta.get("epochs"), "step": meta.get("step"),
            "device": (meta.get("training") or {}).get("device")}
    return read_samples_h5(samples_dir / SAMPLES_FILE), timings, info


# -- aggregation -------------------------------------------------------------------

def stratified_ci(arrays, n_boot=1000, level=0.95, seed=0):
    """Percentile interval of the mean over subjects of per-subject means, resampling stimuli within subjects.

    ``arrays``: one per subject, its per-stimulus values (each resampled with replacement on its own).
    """
    arrays = [np.asarray(array, np.float64) for array in arrays]
    if not arrays or any(len(array) < MIN_SUBSET_STIMULI for array in arrays):
        return None
    rng = np.random.default_rng(seed)
    boots = np.mean([array[rng.integers(0, len(array), size=(int(n_boot), len(array)))].mean(axis=1)
                     for array in arrays], axis=0)
    tail = 100 * (1 - level) / 2
    return [float(x) for x in np.percentile(boots, [tail, 100 - tail])]


def _decoder_values(run, subset):
    """Per-stimulus n-way top-1 (mean of k) of a run on a subset, or None when the subset is too small."""
    index = subset_index(run["category"], subset)
    if len(index) < MIN_SUBSET_STIMULI:
        return None
    return np.asarray(run["score"]["per_stimulus"]["n_way_top1_mean"], np.float64)[index]


def curve_series(results, fractions, level, n_boot, seed):
    """Every line of the figure and tables: per subject and over subjects, value and interval per share.

    Returns
    -------
    dict
        ``subjects[subject][line][fraction]`` and ``mean[line][fraction]`` -> ``{"value", "ci"}`` where lines
        are ``{variant}/{subset}`` (decoders), ``probe/{probe}`` and ``gain/{subset}`` (pretrained - baseline,
        paired over stimuli), ``probe-gain`` (pretrained-encoder - random-encoder probe); and
        ``per_stimulus`` the arrays behind them.
    """
    per_subject, arrays = {}, {}
    for subject, entry in results.items():
        lines = per_subject.setdefault(subject, {})
        for fraction in fractions:
            key = _fraction_key(fraction)
            runs = entry["runs"].get(key, {})
            probes = entry["probes"].get(key)
            got = {}
            for subset in SUBSETS:
                values = {variant: _decoder_values(runs[variant], subset) for variant in VARIANTS if variant in runs}
                for variant, array in values.items():
                    if array is not None:
                        got[f"{variant}/{subset}"] = array
                if all(values.get(variant) is not None for variant in VARIANTS):
                    got[f"gain/{subset}"] = values["pretrained"] - values["baseline"]
            if probes:
                for probe in PROBES:
                    if len(probes[probe]["correct"]) >= MIN_SUBSET_STIMULI:
                        got[f"probe/{probe}"] = np.asarray(probes[probe]["correct"], np.float64)
                if "probe/pretrained-encoder" in got and "probe/random-encoder" in got:
                    got["probe-gain"] = got["probe/pretrained-encoder"] - got["probe/random-encoder"]
            for line, array in got.items():
                low, high = bootstrap_ci(np.mean, array, n_boot=n_boot, level=level, seed=seed)
                lines.setdefault(line, {})[key] = {"value": float(array.mean()), "ci": [low, high],
                                                   "n": int(len(array))}
                arrays.setdefault(line, {}).setdefault(key, {})[subject] = array
    mean = {}
    n_subjects = len(results)
    for line, by_fraction in arrays.items():
        for key, by_subject in by_fraction.items():
            if len(by_subject) != n_subjects:
                continue  # a mean over subjects only where every subject has the figure
            values = list(by_subject.values())
            mean.setdefault(line, {})[key] = {"value": float(np.mean([v.mean() for v in values])),
                                              "ci": stratified_ci(values, n_boot, level, seed),
                                              "n_subjects": n_subjects}
    return {"subjects": per_subject, "mean": mean, "per_stimulus": arrays}


def contrast(series, line, fractions, level, n_boot, seed):
    """How a gain line changes from the smallest share to the largest: gain(smallest) - gain(largest).

    Over subjects (each subject's per-stimulus gain differences, resampled within subjects); None
    where a share lacks the line for some subject.
    """
    small, large = _fraction_key(min(fractions)), _fraction_key(max(fractions))
    by_fraction = series["per_stimulus"].get(line, {})
    if small not in by_fraction or large not in by_fraction or small == large:
        return None
    subjects = sorted(set(by_fraction[small]) & set(by_fraction[large]))
    if not subjects:
        return None
    differences = [by_fraction[small][s] - by_fraction[large][s] for s in subjects
                   if len(by_fraction[small][s]) == len(by_fraction[large][s])]
    if len(differences) != len(subjects):
        return None
    return {"line": line, "smallest": float(min(fractions)), "largest": float(max(fractions)),
            "gain_smallest": float(np.mean([by_fraction[small][s].mean() for s in subjects])),
            "gain_largest": float(np.mean([by_fraction[large][s].mean() for s in subjects])),
            "difference": float(np.mean([d.mean() for d in differences])),
            "ci": stratified_ci(differences, n_boot, level, seed), "n_subjects": len(subjects)}


def verdict(entry):
    """Words for a contrast: whether pretraining's gain is larger at the smallest share than with all trials."""
    if entry is None:
        return "not measured"
    ci = entry["ci"]
    if ci is None:
        return "no interval (too few stimuli)"
    if ci[0] > 0:
        return "holds (the gain is larger at the smallest share: interval above 0)"
    if ci[1] < 0:
        return "reversed (the gain is smaller at the smallest share: interval below 0)"
    return "not resolved (the interval of the difference contains 0)"


def _fraction_key(fraction):
    return f"{float(fraction):.4g}"


# -- reporting ---------------------------------------------------------------------

def _cell(entry, digits=3, signed=False):
    if not entry or entry.get("value") is None:
        return "–"
    sign = "+" if signed else ""
    ci = entry.get("ci")
    interval = "" if not ci or ci[0] is None else f" [{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"
    return f"{entry['value']:{sign}.{digits}f}{interval}"


def _lines_table(lines, fractions, columns, n_train=None):
    header = "| share | " + ("n train | " if n_train else "") + " | ".join(label for _, label in columns) + " |"
    out = [header, "|---" * (len(columns) + 1 + bool(n_train)) + "|"]
    for fraction in fractions:
        key = _fraction_key(fraction)
        cells = [_cell(lines.get(line, {}).get(key), signed=line.startswith("gain") or line == "probe-gain")
                 for line, _ in columns]
        count = [str(n_train.get(key, "–"))] if n_train else []
        out.append(f"| {fraction:.0%} | " + " | ".join(count + cells) + " |")
    return out


def decoder_columns(available_subsets):
    return ([(f"{variant}/{subset}", f"{variant} {subset}") for variant in VARIANTS for subset in available_subsets]
            + [(f"gain/{subset}", f"gain {subset}") for subset in available_subsets])


def probe_columns():
    return [(f"probe/{probe}", f"probe: {label}") for probe, label in PROBES.items()] + [
        ("probe-gain", "probe gain (pretrained - random features)")]


def markdown(report):
    """The Markdown page of a finished report dict."""
    fractions, series, meta = report["fractions"], report["series"], report["run"]
    subsets_seen = [s for s in SUBSETS if any(f"pretrained/{s}" in lines for lines in series["subjects"].values())]
    lines = ["# Learning curve: pretraining against the share of training trials", "",
             f"{meta['n_way']}-way top-1 (mean of k = {meta['n_samples']} samples; ground truth: the image "
             f"classifier's top-1 on the true image, MinD-Vis's protocol; chance {meta['chance']:.3f}) of the DC-LDM "
             f"fine-tuned on a seeded share of each subject's training trials, from the pretrained SC-MBM encoder "
             f"(pretrained) and from a random one (baseline), with {report['ci_level']:.0%} percentile bootstrap "
             f"intervals over test stimuli; gain = pretrained - baseline, paired over the same stimuli and sample "
             f"seeds. Beside them, logistic probes on the same training subset: {PROBE_NOTE}; a probe's ground truth "
             f"is the data set's label (chance {meta.get('probe_chance', meta['chance']):.3f}). The val split (used "
             f"to choose the checkpoint, the ridge start's alpha and the probes' C, and refitted on by the ridge "
             f"start and the probes) stays whole at every share. SC-MBM pretraining read the unlabelled fMRI it "
             f"always reads.", "",
             f"Run: `{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['cores']} cores, torch "
             f"{meta['machine']['torch']}, {meta['machine']['torch_threads']} torch threads, device "
             f"{meta['machine']['device']}): this invocation {meta['wall_time_s'] / 60:.1f} min; as each step "
             f"recorded it, fine-tuning {meta['compute_s']['finetune'] / 60:.1f} min, decoding "
             f"{meta['compute_s']['generate'] / 60:.1f} min and probes {meta['compute_s']['probes'] / 60:.1f} min in "
             f"all; config `{meta['config']}` (digest {meta['config_digest']}).", ""]
    for subject, entry in report["subjects"].items():
        subject_lines = series["subjects"].get(subject, {})
        n_train = {key: probes["n_train"] for key, probes in entry["probes"].items()}
        counts = entry["n_test"]
        lines += [f"## {subject}", "",
                  f"test stimuli: {counts['all']} ({counts['seen']} seen, {counts['novel']} novel categories); "
                  f"training trials at 100 %: {entry.get('n_train_all', '–')}; val trials (every share): "
                  f"{entry.get('n_val', '–')}", ""]
        subsets = [s for s in subsets_seen if counts[s] >= MIN_SUBSET_STIMULI]
        lines += _lines_table(subject_lines, fractions, decoder_columns(subsets), n_train) + [""]
        lines += _lines_table(subject_lines, fractions, probe_columns(), n_train) + [""]
        for problem in sorted(set(entry.get("problems", []))):
            lines.append(f"- {problem}")
        lines.append("")
    n_subjects = len(report["subjects"])
    lines += [f"## Mean over {n_subjects} subject{'s' if n_subjects != 1 else ''}", "",
              "(intervals: stimuli resampled within each subject)", ""]
    lines += _lines_table(series["mean"], fractions, decoder_columns(subsets_seen)) + [""]
    lines += _lines_table(series["mean"], fractions, probe_columns()) + [""]
    lines += ["## Does pretraining help more when labels are few?", "",
              f"Gain at the smallest share ({min(fractions):.0%}) minus the gain with all training trials, mean over "
              f"subjects, with its interval:", "",
              "| gain | at smallest share | with all trials | difference | reading |", "|---|---|---|---|---|"]
    for entry in report["contrasts"]:
        if entry is None:
            continue
        difference = {"value": entry["difference"], "ci": entry["ci"]}
        lines.append(f"| {entry['line']} | {entry['gain_smallest']:+.3f} | {entry['gain_largest']:+.3f} | "
                     f"{_cell(difference, signed=True)} | {verdict(entry)} |")
    lines += ["", report["reading"], ""]
    return "\n".join(lines)


def reading(contrasts):
    """A sentence per contrast, from the numbers."""
    sentences = []
    for entry in contrasts:
        if entry is None:
            continue
        what = ("the decoders' n-way top-1" if entry["line"].startswith("gain/")
                else "the probe on encoder features") + (f" ({entry['line'].split('/')[1]} stimuli)"
                                                          if "/" in entry["line"] else "")
        sentences.append(f"For {what}, pretraining changes top-1 by {entry['gain_smallest']:+.3f} at "
                         f"{entry['smallest']:.0%} of the training trials and by {entry['gain_largest']:+.3f} with "
                         f"{entry['largest']:.0%}; MinD-Vis's claim: {verdict(entry)}.")
    return " ".join(sentences) or "No share was measured for both variants, so the claim is not tested."


def plot(report, path):
    """The curves: top-1 against the share of training trials (log), one panel per subject and the mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series, fractions, meta = report["series"], report["fractions"], report["run"]
    panels = list(series["subjects"].items())
    if len(panels) > 1:
        panels.append((f"mean over {len(panels)} subjects", series["mean"]))
    figure = Figure(figsize=(4.2 * len(panels), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    keys = [_fraction_key(f) for f in fractions]
    # Lines are nudged apart along x (a few % on the log axis) so that their intervals do not hide each other.
    drawn = [("pretrained/seen", "pretrained, seen", dict(color="C0", marker="o", linestyle="-")),
             ("pretrained/novel", "pretrained, novel", dict(color="C0", marker="s", linestyle="-",
                                                            markerfacecolor="white", alpha=0.8)),
             ("baseline/seen", "baseline (random encoder), seen", dict(color="C1", marker="o", linestyle="-")),
             ("baseline/novel", "baseline (random encoder), novel", dict(color="C1", marker="s", linestyle="-",
                                                                         markerfacecolor="white", alpha=0.8))]
    drawn += [(f"probe/{probe}", f"probe (seen): {PROBES[probe]}",
               dict(color=colour, marker="^", linestyle="--", markersize=4, alpha=0.9))
              for probe, colour in (("voxels", "0.45"), ("pretrained-encoder", "C0"), ("random-encoder", "C1"))]
    nudge = {line: 1.03 ** (i - (len(drawn) - 1) / 2) for i, (line, _, _) in enumerate(drawn)}
    for axis, (title, lines) in zip(axes, panels):
        for line, label, style in drawn:
            points = [(float(f), lines[line][k]) for f, k in zip(fractions, keys) if k in lines.get(line, {})]
            if not points:
                continue
            x = np.array([p[0] for p in points]) * nudge[line]
            y = np.array([p[1]["value"] for p in points])
            ci = [p[1]["ci"] for p in points]
            error = (np.abs(np.array(ci, np.float64).T - y)
                     if all(c is not None and c[0] is not None for c in ci) else None)
            axis.errorbar(x, y, yerr=error, capsize=2, linewidth=1.2, label=label, **style)
        axis.axhline(meta["chance"], color="black", linestyle=":", linewidth=1, label="chance")
        probe_chance = meta.get("probe_chance", meta["chance"])
        if not np.isclose(probe_chance, meta["chance"]):
            axis.axhline(probe_chance, color="0.45", linestyle=":", linewidth=1, label="chance (probes)")
        axis.set_xscale("log")
        axis.set_xticks(fractions)
        axis.set_xticklabels([f"{f:.0%}" for f in fractions])
        axis.minorticks_off()
        axis.set_ylim(0, 1)
        axis.set_xlabel("share of training trials (log)")
        axis.set_title(title, fontsize=10)
    axes[0].set_ylabel(f"{meta['n_way']}-way top-1 (probes: label top-1)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.tight_layout()
    figure.legend(handles, labels, loc="upper center", ncol=4, fontsize=7, frameon=False,
                  bbox_to_anchor=(0.5, 0.02))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def build_report(results, fractions, config, meta):
    """Everything the JSON, Markdown and figure show, from the per-subject results."""
    settings = config["evaluate"]
    level, n_boot, seed = float(settings["ci_level"]), int(settings["n_bootstrap"]), derive_seed(
        config["seed"], "learning-curve", "aggregate")
    series = curve_series(results, fractions, level, n_boot, seed)
    lines = [f"gain/{subset}" for subset in SUBSETS] + ["probe-gain"]
    contrasts = [contrast(series, line, fractions, level, n_boot, seed) for line in lines]
    report = {"fractions": [float(f) for f in fractions], "ci_level": level, "n_bootstrap": n_boot,
              "probe_note": PROBE_NOTE, "run": meta, "subjects": results, "contrasts": contrasts,
              "reading": reading(contrasts)}
    report["series"] = {"subjects": series["subjects"], "mean": series["mean"]}
    return report


# -- the benchmark -----------------------------------------------------------------

def machine():
    versions = software_versions()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {"cpu": versions.get("cpu") or platform.processor(), "cores": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device,
            "python": platform.python_version(), "versions": versions}


def compute_times(results):
    """Seconds spent per kind of step, summed over every run as each step recorded it (reused ones too)."""
    runs = [run for entry in results.values() for by_variant in entry["runs"].values() for run in by_variant.values()]
    return {"finetune": round(sum(run["timings_s"]["finetune_s"] or 0 for run in runs), 1),
            "generate": round(sum(run["timings_s"]["generate_s"] or 0 for run in runs), 1),
            "probes": round(sum(seconds for entry in results.values() for seconds in entry["timings_s"].values()), 1)}


def run_subject(config, subject, args, inputs, progress):
    """Every share and variant of one subject, and its probes; returns the subject's results."""
    from mindvis.models.classifiers.load import load_image_classifier

    data = load_responses(inputs["responses"], splits=("train", "val", "test_avg"))
    categories = stimulus_categories(data["test_avg"].label,
                                     np.concatenate([data["train"].label, data["val"].label]))
    counts = {subset: int(len(subset_index(categories, subset))) for subset in SUBSETS}
    trained_classes = {int(c) for c in np.concatenate([data["train"].label, data["val"].label]) if c >= 0}
    classifier = load_image_classifier(config, inputs["classifier"] if inputs["domain"] else None)
    entry = {"inputs": {key: str(inputs[key]) for key in ("responses", "stimuli", "base", "mbm", "classifier")},
             "workflow_config_matches": _workflow_config_matches(inputs["workflow_meta"].get("config") or {}, config),
             "n_test": counts, "category": categories, "stimulus_ids": [str(s) for s in data["test_avg"].stimulus_id],
             "n_train_all": int(len(data["train"])), "n_val": int(len(data["val"])),
             "probe_chance": 1.0 / max(len(trained_classes), 1),
             "runs": {}, "probes": {}, "problems": [], "timings_s": {}}
    if not entry["workflow_config_matches"]:
        entry["problems"].append("the config given differs from the one the workflow's decoder was fine-tuned with "
                                 "(seed, ldm, mbm or finetune); the 100 % runs will not reproduce it")
    if counts["novel"] < MIN_SUBSET_STIMULI:
        entry["problems"].append(f"{counts['novel']} novel-category test stimuli: the novel curves are not drawn "
                                 f"(stimuli.novel_classes is empty in this config)" if counts["novel"] == 0 else
                                 f"{counts['novel']} novel-category test stimuli: too few for a curve")
    tick = time.perf_counter()
    features = subject_features(config, inputs["mbm"], data, args.features, subject)
    entry["timings_s"]["probe_features"] = round(time.perf_counter() - tick, 1)
    for fraction in args.fractions:
        key = _fraction_key(fraction)
        fraction_config = run_config(config, fraction, args.n_samples)
        tick = time.perf_counter()
        entry["probes"][key] = run_probes(fraction_config, data, features, fraction, categories)
        entry["timings_s"][f"probes_{key}"] = round(time.perf_counter() - tick, 1)
        probes = entry["probes"][key]
        print(f"  {subject} {fraction:.0%}: probes (n train {probes['n_train']}) "
              + ", ".join(f"{probe} {probes[probe]['accuracy']['value']:.3f}" for probe in PROBES), flush=True)
        for variant in VARIANTS:
            progress["done"] += 1
            run_dir = Path(args.work_dir) / subject / f"f{key}" / variant
            score_path = run_dir / "score.json"
            digest = config_digest(fraction_config, SCORE_SECTIONS)
            label = f"[{progress['done']}/{progress['total']}] {subject} {fraction:.0%} {variant}"
            if args.resume and score_path.exists() and json.loads(score_path.read_text()).get("digest") == digest:
                entry["runs"].setdefault(key, {})[variant] = run = json.loads(score_path.read_text())
                print(f"{label}: done already ({score_path})", flush=True)
                _check_run(entry, run, probes)
                continue
            tick = time.perf_counter()
            samples, timings, info = decode_run(fraction_config, subject, inputs, variant, run_dir, args.resume,
                                                label)
            if [str(s) for s in samples["stimulus_id"]] != entry["stimulus_ids"]:
                raise MindvisError("the decoded stimuli differ from responses.h5 test_avg", path=run_dir / "samples",
                                   fix="rerun without --resume.")
            score_tick = time.perf_counter()
            score = score_samples(samples, classifier, fraction_config, subject, categories)
            timings["score_s"] = round(time.perf_counter() - score_tick, 1)
            timings["this_invocation_s"] = round(time.perf_counter() - tick, 1)
            run = {"digest": digest, "fraction": float(fraction), "variant": variant, "run_dir": str(run_dir),
                   "category": categories, "training": info, "timings_s": timings, "score": score}
            write_json_atomic(score_path, run)
            entry["runs"].setdefault(key, {})[variant] = run
            top1 = score["metrics"]["n_way_top1_mean"]
            print(f"{label}: n-way top-1 all {_cell(top1['all'])}, seen {_cell(top1['seen'])}, novel "
                  f"{_cell(top1['novel'])} (finetune {timings['finetune_s']} s, generate {timings['generate_s']} s)",
                  flush=True)
            _check_run(entry, run, probes)
    return entry


def _check_run(entry, run, probes):
    """Record what makes a run's figures doubtful: an ungrounded classifier, a training subset not the probes'."""
    check = run["score"]["classifier_check"]
    if not check["usable"]:
        entry["problems"].append(f"**classifier check failed**, so the n-way figures are not grounded (the evaluate "
                                 f"stage withholds them): {check['reason']}")
    if run["training"].get("n_train") != probes["n_train"]:
        entry["problems"].append(f"**the decoder trained on {run['training'].get('n_train')} trials at "
                                 f"{run['fraction']:.0%}, the probes on {probes['n_train']}**: the subsets differ")


def _workflow_config_matches(workflow_config, config, sections=("seed", "ldm", "mbm", "finetune")):
    """Whether the config given is the one the workflow's decoder was fine-tuned with (defaults filled in)."""
    try:
        workflow_config = validate(copy.deepcopy(workflow_config), path="<dcldm.json config>")
    except MindvisError:
        pass  # an older run's config: compared as recorded
    return config_digest(workflow_config, sections) == config_digest(config, sections)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the finished `make decode` results folder")
    parser.add_argument("--config", default="configs/default.yaml", help="the config that run used")
    parser.add_argument("--subjects", nargs="+", default=None, help="default: every subject of the config")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0],
                        help="shares of the training trials, in (0, 1]")
    parser.add_argument("--n-samples", type=int, default=2, help="samples per test stimulus (generate.n_samples)")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder of the runs (default {results}/learning-curve)")
    parser.add_argument("--out", default=None,
                        help=f"output stem: .json, .md, .png (default {DEFAULT_OUT}; with --quick {DEFAULT_OUT}-quick)")
    parser.add_argument("--features", choices=("mean", "cls"), default="mean",
                        help="encoder features of the probes: mean of the real patch tokens, or the class token")
    parser.add_argument("--resume", action="store_true", help="skip the steps whose outputs exist for the same config")
    parser.add_argument("--quick", action="store_true", help="one subject (the first of --subjects or the config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (the workflow's rules use 1)")
    args = parser.parse_args(argv)
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        parser.error(f"--fractions must lie in (0, 1], got {bad}")
    if args.n_samples < 1:
        parser.error("--n-samples must be at least 1")
    args.fractions = sorted(set(args.fractions))
    args.work_dir = args.work_dir or str(Path(args.results) / "learning-curve")
    args.out = args.out or (f"{DEFAULT_OUT}-quick" if args.quick else DEFAULT_OUT)
    return args


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # INFO to each run's run.log; the console gets warnings and the progress lines
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    root.addHandler(console)
    try:
        benchmark(args, argv)
    finally:
        root.removeHandler(console)
        root.setLevel(level)


def benchmark(args, argv=None):
    """Run every subject, share and variant of ``args`` and write the JSON, Markdown and figure."""
    started = time.perf_counter()
    try:
        config = load_config(args.config)
        subjects = args.subjects or config_subjects(config)
        if args.quick:
            subjects = subjects[:1]
        inputs = {subject: resolve_inputs(config, args.results, subject) for subject in subjects}
    except MindvisError as error:
        sys.exit(f"learning_curve: {error}")
    progress = {"done": 0, "total": len(subjects) * len(args.fractions) * len(VARIANTS)}
    print(f"learning curve: {len(subjects)} subject(s) x {len(args.fractions)} shares x {len(VARIANTS)} variants "
          f"= {progress['total']} fine-tunings, {args.n_samples} samples per stimulus; work folder {args.work_dir}",
          flush=True)
    results = {}
    try:
        for subject in subjects:
            results[subject] = run_subject(config, subject, args, inputs[subject], progress)
    except MindvisError as error:
        sys.exit(f"learning_curve: {error}\n(finished runs are kept in {args.work_dir}: rerun with --resume)")
    first = next(iter(results.values()))
    any_run = next(run for runs in first["runs"].values() for run in runs.values())
    meta = {"command": " ".join(["python", "benchmarks/learning_curve.py", *(argv or sys.argv[1:])]),
            "config": args.config, "config_digest": config_digest(config), "results": args.results,
            "work_dir": args.work_dir, "quick": args.quick, "features": args.features, "n_samples": args.n_samples,
            "n_way": any_run["score"]["n_way"], "chance": any_run["score"]["chance"],
            "trials": any_run["score"]["trials"], "probe_chance": first["probe_chance"],
            "overrides": {"finetune.train_fraction": "each share", "generate.start_row": False,
                          "generate.lowlevel": False, "generate.attention_stimuli": 0,
                          "generate.n_samples": args.n_samples},
            "subset_seed": "derive_seed(seed, 'train-fraction') (finetune's)",
            "machine": machine(), "wall_time_s": round(time.perf_counter() - started, 1),
            "compute_s": compute_times(results)}
    report = build_report(results, args.fractions, config, meta)
    write_json_atomic(f"{args.out}.json", report)
    Path(f"{args.out}.md").write_text(markdown(report) + "\n")
    plot(report, f"{args.out}.png")
    print(report["reading"])
    print(f"wrote {args.out}.json, .md and .png in {meta['wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
