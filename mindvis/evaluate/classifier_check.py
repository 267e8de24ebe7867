"""Whether the image classifier can ground the columns it scores (:func:`check_classifier`).

n-way top-1 (MinD-Vis) takes the classifier's top-1 on the true image as the
ground truth; label top-1 of an image row is the classifier's argmax on the
generated image; 2-way identification and FID compare the classifier's
features. A classifier at chance, or one that puts every true image in one
class, makes all of them meaningless: when every true image gets class c and
every generated image does too, any decoding, pure noise included, scores
n-way top-1 = 1. So, before anything is scored with it, the stage checks:

1. **Held-out accuracy clearly above chance** (domain classifiers): the lower
   bound of the 95% Wilson interval (:func:`mindvis.evaluate.metrics.wilson_interval`)
   of ``val_accuracy`` over ``n_val`` held-out training images (the classifier
   folder's ``metrics.json``) must exceed ``chance + MIN_KAPPA * (1 - chance)``.
   That held-out set also picked the classifier's checkpoint, so its accuracy
   is, if anything, optimistic. ImageNet classifiers have no held-out accuracy
   on the stimulus domain here and skip this check.
2. **More than one class**: its top-1 on the true test images covers at least
   two classes (every classifier).

When either fails, :data:`CLASSIFIER_METRICS` are reported unavailable with the
reason in every row that scores them with the classifier.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mindvis.evaluate.metrics import wilson_interval
from mindvis.models.classifiers.domain import METRICS_FILE

log = logging.getLogger(__name__)

#: How far above chance the held-out accuracy's lower bound must be, as a fraction of the way from chance
#: to perfect (a Cohen's-kappa-like scale): 0.2 is the top of "slight" agreement in Landis & Koch's
#: (Biometrics 1977) scale; below "fair" agreement the n-way ground truth is mostly the classifier's own
#: errors. Two classes: lower bound > 0.60; ten: > 0.28; a thousand: > 0.20.
MIN_KAPPA = 0.2
#: Coverage of the interval on the held-out accuracy.
HELD_OUT_LEVEL = 0.95
#: Metrics computed from the image classifier's outputs (probabilities or features).
CLASSIFIER_METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "fid")


@dataclass
class ClassifierCheck:
    """The outcome of :func:`check_classifier`.

    Attributes
    ----------
    usable : bool
    reason : str or None
        Why the classifier's figures are withheld (None when usable).
    record : dict
        What was checked, for ``metrics.json``: ``held_out_accuracy``, ``n_val``, ``chance``,
        ``held_out_lower_bound``, ``required_lower_bound``, ``min_kappa``, ``test_predicted_classes``.
    """

    usable: bool
    reason: str | None
    record: dict = field(default_factory=dict)


def held_out_record(info):
    """The classifier's held-out accuracy, its count and chance (None where unknown).

    Parameters
    ----------
    info : dict
        ``ImageClassifier.info``; a domain classifier's names its folder, whose ``metrics.json``
        (:mod:`mindvis.train.classifier`) holds ``val_accuracy``, ``n_val`` and ``chance``.
    """
    record = {key: info.get(key) for key in ("val_accuracy", "n_val", "chance")}
    folder = info.get("folder")
    if None in record.values() and folder and (Path(folder) / METRICS_FILE).exists():
        written = json.loads((Path(folder) / METRICS_FILE).read_text())
        record = {key: record[key] if record[key] is not None else written.get(key) for key in record}
    return record


def check_classifier(info, gt_class, n_classes):
    """Whether n-way top-1 and the classifier-feature metrics mean something (see the module docstring).

    Parameters
    ----------
    info : dict
        ``ImageClassifier.info``.
    gt_class : int [N]
        The classifier's top-1 on each true test image.
    n_classes : int
        The classifier's classes.

    Returns
    -------
    ClassifierCheck
    """
    held_out = held_out_record(info)
    chance = float(held_out["chance"]) if held_out["chance"] is not None else 1.0 / n_classes
    predicted = int(len(np.unique(np.asarray(gt_class))))
    record = {"held_out_accuracy": held_out["val_accuracy"], "n_val": held_out["n_val"], "chance": chance,
              "held_out_lower_bound": None, "required_lower_bound": chance + MIN_KAPPA * (1 - chance),
              "min_kappa": MIN_KAPPA, "ci_level": HELD_OUT_LEVEL, "test_predicted_classes": predicted}
    reasons = []
    if held_out["val_accuracy"] is not None:
        accuracy = float(held_out["val_accuracy"])
        if not held_out["n_val"]:
            reasons.append(f"its held-out accuracy {accuracy:.3f} has no held-out count (n_val), so it cannot "
                           f"be shown to be above chance; retrain it with this version (mindvis train-classifier)")
        else:
            n_val = int(held_out["n_val"])
            low, _ = wilson_interval(int(round(accuracy * n_val)), n_val, HELD_OUT_LEVEL)
            record["held_out_lower_bound"] = low
            if low <= record["required_lower_bound"]:
                reasons.append(f"its held-out accuracy {accuracy:.3f} on {n_val} images (95% Wilson lower bound "
                               f"{low:.3f}) is not clearly above chance {chance:.3f} (the lower bound must exceed "
                               f"{record['required_lower_bound']:.3f})")
    if predicted < 2:
        reasons.append(f"its top-1 on the true test images falls in {predicted} class, so every image, noise "
                       f"included, would match the n-way ground truth")
    if not reasons:
        return ClassifierCheck(True, None, record)
    reason = "the image classifier cannot ground these figures: " + "; and ".join(reasons)
    log.warning("%s. Withheld: %s (PixCorr and SSIM do not use it).", reason, ", ".join(CLASSIFIER_METRICS))
    return ClassifierCheck(False, reason, record)
