"""The evaluation table: every row (the model, its baselines and ceilings) scored alike, with intervals.

Rows, always in this order (:data:`ROWS`): chance; the DC-LDM; the DC-LDM
without SC-MBM pretraining (when ``finetune.baseline``); a ridge decoder into
the VAE latent; a linear classifier on the test fMRI; the base generator given
the true class; the classifier on the true images. A row that cannot be
computed says why (``available: false``, ``reason``). Image rows are scored by
the same image classifier with the same metrics (:mod:`mindvis.evaluate.metrics`):

* ``n_way_top1_mean`` / ``n_way_top1_best_of_k``: n-way top-1 as MinD-Vis
  computes it (Chen et al., CVPR 2023, Sec. 4; ground truth = the classifier's
  top-1 on the true image), averaged over the k samples, or the best of them;
* ``label_top1_mean``: the classifier's argmax against the data set's label
  (when the classifier's classes are the data set's and labels exist);
* ``two_way_id``, ``pixcorr``, ``ssim`` (MindEye, Scotti et al., NeurIPS 2023,
  Sec. 3.1; Brain-Diffuser, Ozcelik & VanRullen, Sci. Rep. 2023, "Evaluation"),
  per sample and averaged over the k samples; ``fid`` (Heusel et al., NeurIPS
  2017) on classifier features of all samples.

Every figure has a bootstrap confidence interval over test stimuli; all rows
and metrics resample the same stimuli (one seed), so intervals are paired.

The stage that fills it and writes ``metrics.json`` is :mod:`mindvis.evaluate.run`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mindvis.evaluate.metrics import (best_of_k, bootstrap_ci, fid, n_way_top1, pixcorr, resolve_n_way, ssim,
                                      two_way_identification)

log = logging.getLogger(__name__)

#: (id, label, kind) of every row, in the order of the table.
ROWS = (
    ("chance", "Chance (1/n)", "baseline"),
    ("dcldm", "DC-LDM (SC-MBM pretrained)", "model"),
    ("dcldm-baseline", "DC-LDM without SC-MBM pretraining", "baseline"),
    ("ridge", "Ridge fMRI -> VAE latent", "baseline"),
    ("fmri-linear", "Linear classifier on test fMRI", "ceiling"),
    ("base-true-class", "Base generator given the true class", "ceiling"),
    ("true-images", "Classifier on the true images", "ceiling"),
)
METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "pixcorr", "ssim", "fid")
#: Per-stimulus metrics (FID is a set-level figure).
STIMULUS_METRICS = METRICS[:-1]
#: Why an FID interval may not contain the FID (stated beside it in metrics.json).
FID_CI_NOTE = ("percentile bootstrap over stimuli, like every figure; a resampled set repeats stimuli, which "
               "biases FID upwards, so the interval can lie above the full-set value")

def n_way_for(setting, n_classes):
    """n of the n-way top-1 (:func:`mindvis.evaluate.metrics.resolve_n_way`), capped at the number of classes
    (n >= C is plain top-1), so the table states the n that was actually used."""
    return int(min(resolve_n_way(setting, n_classes), n_classes))


# -- scoring ----------------------------------------------------------------------

@dataclass
class Reference:
    """The true images and what every row is compared with.

    Attributes
    ----------
    images : uint8 [N, H, W, C]
    features : float [N, F]
        Classifier features of the true images.
    gt_class : int [N]
        The classifier's top-1 on each true image (MinD-Vis's ground truth for n-way).
    labels : int [N]
        The data set's labels (-1 unknown).
    label_space : bool
        Whether the classifier's classes are the data set's classes (so argmax can be compared with labels).
    n_way, trials, seed, image_size : int
    """

    images: np.ndarray
    features: np.ndarray
    gt_class: np.ndarray
    labels: np.ndarray
    label_space: bool
    n_way: int
    trials: int
    seed: int
    image_size: int

    @property
    def labelled(self):
        return self.labels >= 0


def class_scores(probs, gt_class, reference, label_space=True):
    """n-way and label top-1 of class probabilities.

    Parameters
    ----------
    probs : float [N, k, C]
    gt_class : int [N] or None
        Ground truth for n-way top-1 (None: not applicable).
    label_space : bool
        Whether the C classes are the data set's (so argmax is compared with its labels).

    Returns
    -------
    values : dict of metric id -> float [N]
        NaN for unlabelled stimuli in ``label_top1_mean``.
    predicted : int [N, k] or None
        Argmax in the data set's label space.
    """
    values = {}
    if gt_class is not None:
        per_sample = n_way_top1(probs, gt_class, reference.n_way, trials=reference.trials, seed=reference.seed)
        values["n_way_top1_mean"] = per_sample.mean(axis=1)
        values["n_way_top1_best_of_k"] = best_of_k(per_sample)
    predicted = None
    if label_space:
        predicted = probs.argmax(axis=-1)
        if reference.labelled.any():
            correct = (predicted == reference.labels[:, None]).mean(axis=1)
            values["label_top1_mean"] = np.where(reference.labelled, correct, np.nan)
    return values, predicted


def score_images(classifier, images, reference):
    """Every per-stimulus metric of generated images against the true ones.

    Parameters
    ----------
    classifier : ImageClassifier
    images : uint8 [N, k, H, W, C]
    reference : Reference

    Returns
    -------
    values : dict of metric id -> float [N]
    features : float [N, k, F]
    predicted : int [N, k] or None
    """
    n_stimuli, n_samples = images.shape[:2]
    flat = images.reshape(n_stimuli * n_samples, *images.shape[2:])
    probs, features = classifier.predict_proba_and_features(flat)
    probs = probs.reshape(n_stimuli, n_samples, -1)
    features = features.reshape(n_stimuli, n_samples, -1)
    values, predicted = class_scores(probs, reference.gt_class, reference, reference.label_space)
    per_sample = {"two_way_id": [], "pixcorr": [], "ssim": []}
    for j in range(n_samples):
        per_sample["two_way_id"].append(two_way_identification(features[:, j], reference.features))
        per_sample["pixcorr"].append(pixcorr(images[:, j], reference.images, reference.image_size))
        per_sample["ssim"].append(ssim(images[:, j], reference.images, reference.image_size))
    values.update({key: np.stack(rows, axis=1).mean(axis=1) for key, rows in per_sample.items()})
    return values, features, predicted


def summarize(values, reference, n_boot, level, features=None):
    """Each metric's value over stimuli and its bootstrap confidence interval.

    Parameters
    ----------
    values : dict of metric id -> float [N]
    features : float [N, k, F], optional
        For FID against the true images' features (resampled by stimulus with them).

    Returns
    -------
    dict
        metric id -> ``{"value", "ci": [low, high]}``, or None where it does not apply.
    """
    metrics = {key: None for key in METRICS}
    for key, array in values.items():
        if np.isnan(array).all():
            continue
        low, high = bootstrap_ci(_nanmean, (array,), n_boot=n_boot, level=level, seed=reference.seed)
        metrics[key] = {"value": _nanmean(array), "ci": [float(low), float(high)]}
    if features is not None and len(features) > 1:
        width = features.shape[-1]

        def fid_of(gen, true):
            return fid(gen.reshape(-1, width), true)

        low, high = bootstrap_ci(fid_of, (features, reference.features), n_boot=n_boot, level=level,
                                 seed=reference.seed)
        metrics["fid"] = {"value": float(fid_of(features, reference.features)), "ci": [float(low), float(high)],
                          "ci_note": FID_CI_NOTE}
    return metrics


def _nanmean(array):
    finite = array[~np.isnan(array)]
    return float(finite.mean()) if len(finite) else float("nan")


def per_class_accuracy(predicted, labels, n_classes):
    """Accuracy of the argmax predictions [N, k] per true class (None for a class without test stimuli)."""
    out = []
    for cls in range(n_classes):
        rows = labels == cls
        out.append(float((predicted[rows] == cls).mean()) if rows.any() else None)
    return out


def confusion_counts(predicted, labels, n_classes):
    """int [C, C]: samples of true class i (rows) predicted as class j (columns); unlabelled stimuli skipped."""
    matrix = np.zeros((n_classes, n_classes), np.int64)
    rows = labels >= 0
    true = np.repeat(labels[rows], predicted.shape[1])
    np.add.at(matrix, (true, predicted[rows].reshape(-1)), 1)
    return matrix.tolist()


def chance_metrics(n_way, n_samples, n_classes, has_labels):
    """The chance row: 1/n for n-way top-1, 1 - (1 - 1/n)^k for the best of k independent samples,
    1/C for label top-1, 1/2 for two-way identification, 0 for PixCorr (no CI: these are exact)."""
    def exact(value):
        return {"value": float(value), "ci": [float(value), float(value)]}

    metrics = {key: None for key in METRICS}
    metrics.update({"n_way_top1_mean": exact(1 / n_way),
                    "n_way_top1_best_of_k": exact(1 - (1 - 1 / n_way) ** n_samples),
                    "two_way_id": exact(0.5), "pixcorr": exact(0.0)})
    if has_labels:
        metrics["label_top1_mean"] = exact(1 / n_classes)
    return metrics


# -- rows -------------------------------------------------------------------------

def make_row(row_id, available=True, metrics=None, reason=None, **extra):
    """One table row in the metrics.json layout."""
    _, label, kind = next(row for row in ROWS if row[0] == row_id)
    row = {"id": row_id, "label": label, "kind": kind, "available": bool(available)}
    if available:
        row["metrics"] = metrics
    else:
        row["reason"] = reason
        row["metrics"] = {key: None for key in METRICS}
    row.update(extra)
    return row


class Table:
    """Rows, per-class accuracies, confusions and per-stimulus values, filled row by row."""

    def __init__(self, reference, n_classes, n_boot, level):
        self.reference, self.n_classes, self.n_boot, self.level = reference, n_classes, n_boot, level
        self.rows, self.per_class, self.confusion, self.per_stimulus = {}, {}, {}, {}

    def add_scored(self, row_id, values, predicted=None, features=None, **extra):
        self.rows[row_id] = make_row(row_id, metrics=summarize(values, self.reference, self.n_boot, self.level,
                                                                 features), **extra)
        self.per_stimulus[row_id] = {key: array.tolist() for key, array in values.items()}
        labels = self.reference.labels
        if predicted is not None and (labels >= 0).any():
            self.per_class[row_id] = per_class_accuracy(predicted, labels, self.n_classes)
            self.confusion[row_id] = confusion_counts(predicted, labels, self.n_classes)

    def add_images(self, row_id, classifier, images, **extra):
        values, features, predicted = score_images(classifier, images, self.reference)
        self.add_scored(row_id, values, predicted, features, **extra)

    def unavailable(self, row_id, reason):
        log.info("%s: not available (%s)", row_id, reason)
        self.rows[row_id] = make_row(row_id, available=False, reason=reason)

    def ordered(self):
        return [self.rows[row_id] for row_id, _, _ in ROWS]


def make_reference(classifier, samples, settings, seed, n_classes_match):
    """The true images of ``samples.h5`` scored by the classifier (:class:`Reference`)."""
    images, true_images = samples["samples"], samples["true_images"]
    true_probs, true_features = classifier.predict_proba_and_features(true_images)
    return Reference(images=true_images, features=true_features, gt_class=true_probs.argmax(axis=1),
                     labels=np.asarray(samples["label"], np.int64), label_space=n_classes_match,
                     n_way=n_way_for(settings["n_way"], classifier.n_classes), trials=int(settings["trials"]),
                     seed=seed, image_size=int(settings["image_size"] or images.shape[2]))


def log_table(rows, n_way, n_samples):
    """Log the table compactly: one line per row, value [CI] per metric."""
    short = {"n_way_top1_mean": f"{n_way}-way", "n_way_top1_best_of_k": f"best{n_samples}",
             "label_top1_mean": "label", "two_way_id": "2-way", "pixcorr": "PixCorr", "ssim": "SSIM", "fid": "FID"}
    lines = [f"{'row':<16}" + "".join(f"{name:>20}" for name in short.values())]
    for row in rows:
        cells = []
        for key in short:
            entry = row["metrics"].get(key)
            cells.append(f"{entry['value']:.3f} [{entry['ci'][0]:.2f},{entry['ci'][1]:.2f}]" if entry else "-")
        lines.append(f"{row['id']:<16}" + "".join(f"{cell:>20}" for cell in cells))
    log.info("evaluation:\n%s", "\n".join(lines))
