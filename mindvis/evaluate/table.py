"""The evaluation table: every row (the model, its floors, baselines and ceilings) scored alike, with intervals.

Rows, always in this order (:data:`ROWS`):

========================  =====================================================
id                        what it is
========================  =====================================================
``chance``                exact chance levels (1/n, 1/C, 1/2, and 1/N for
                          retrieval where a row has it; best-of-k by
                          simulation where the closed form does not hold); no
                          PixCorr or SSIM: they have no exact chance level
``shuffled-pairs``        floor: each DC-LDM sample scored against another
                          stimulus's truth (a fixed derangement, config seed)
``mean-train-image``      floor: the mean of the subject's training images as
                          the decoded image of every test stimulus
``dcldm``                 the model
``dcldm-start``           the model at its start (0 fine-tuning steps), when
                          its samples are given
``dcldm-lowlevel``        the model started from the ridge latent (img2img),
                          when its samples are given
``dcldm-prior``           the model through its prior in embedding space (its
                          decoded embedding moved onto real images' embeddings)
``dcldm-prior-lowlevel``  the same, from the low-level start (img2img)
``dcldm-shared``          one decoder shared by the subjects (finetune.shared)
``dcldm-fewshot``         the shared decoder adapted to this new subject
                          (finetune.new_subject); its ``dcldm`` row is then
                          trained from scratch on the same share of trials
``dcldm-baseline``        the model without SC-MBM pretraining
``ridge``                 ridge fMRI -> VAE latent, decoded by the VAE
``ridge-pixels``          ridge fMRI -> pixels (images of side <= 64 px)
``ridge-embedding``       ridge fMRI -> the prior's image embedding (alpha by
                          val identification), each prediction sampled by the
                          frozen prior like the model (image priors only)
``fmri-linear``           a linear classifier on the test fMRI (label column only)
``embedding-prototype``   ridge fMRI -> the prior's image embedding, fitted on
                          seen-class trials, scored by the nearest class
                          prototype among all classes (label column only): the
                          novel-category ceiling
``base-ceiling``          the base generator given the true image's embedding
                          (image-conditioned prior) or the true class
``true-images``           the true images scored as if decoded
========================  =====================================================

A row that cannot be computed says why (``available: false``, ``reason``).
Image rows are scored by the same image classifier with the same metrics
(:mod:`mindvis.evaluate.metrics`); each column has one ground truth
(:data:`GROUND_TRUTH`):

* ``n_way_top1_mean`` / ``n_way_top1_best_of_k``: n-way top-1 as MinD-Vis
  computes it (Chen et al., CVPR 2023, Sec. 4; ground truth = the classifier's
  top-1 on the true image), averaged over the k samples, or the best of them;
* ``label_top1_mean``: top-1 against the data set's label (image rows: the
  classifier's argmax, when its classes are the data set's; ``fmri-linear``:
  the fMRI probe's);
* ``two_way_id`` (on classifier features), ``two_way_id_pixels`` (on the pixels
  PixCorr compares: independent of the classifier), ``pixcorr``, ``ssim`` (MindEye,
  Scotti et al., NeurIPS 2023, Sec. 3.1; Brain-Diffuser, Ozcelik & VanRullen,
  Sci. Rep. 2023, "Evaluation"), per sample and averaged over the k samples;
  ``fid`` (Heusel et al., NeurIPS 2017) on classifier features of all samples;
* ``retrieval_brain_to_image_top1`` / ``retrieval_image_to_brain_top1``: top-1
  retrieval in the image prior's embedding space, as MindEye reports it
  (:func:`mindvis.evaluate.metrics.embedding_retrieval`): each trial's decoded
  embedding against the prior's embeddings of all N test images, and each
  image against all trials' decoded embeddings (chance 1/N). Only rows with a
  decoded embedding have them (:meth:`Table.add_images` ``embeddings``: a
  decoder whose ``samples.h5`` records one, the ``ridge-embedding`` row), and
  only when the base is an image prior (:attr:`Reference.embeddings`); on a
  subset, the figure stays retrieval among all N, averaged over the subset.

A metric entry is ``{"value", "ci"}``, null where it does not apply, or
``{"value": null, "ci": null, "reason"}`` where it applies but is withheld:
every figure computed from the classifier when :mod:`mindvis.evaluate.classifier_check`
finds it unable to ground them, and the chance row's PixCorr and SSIM (see the floors).

Every figure has a bootstrap confidence interval over test stimuli; all rows
and metrics resample the same stimuli (one seed), so intervals are paired.

Seen and novel categories (:func:`stimulus_categories`): a test stimulus is
``novel`` when its label is not among the labels of the subject's training
trials (as GOD's 50 test categories, none of them trained on), ``seen`` when it
is; an unlabelled one is in neither subset. :meth:`Table.subsets` scores every
row again on each subset from the same per-stimulus values (no FID: it is a set
figure; exact rows keep their value), and :meth:`Table.comparisons` gives the
paired differences of :data:`COMPARISONS` (a paired bootstrap: the same
resampled stimuli for both rows).

The stage that fills it and writes ``metrics.json`` is :mod:`mindvis.evaluate.run`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mindvis.evaluate.classifier_check import CLASSIFIER_METRICS
from mindvis.evaluate.metrics import (best_of_k, bootstrap_ci, embedding_retrieval, fid, n_way_top1, pixcorr,
                                      pixcorr_mindvis, prepare_images, resolve_n_way, ssim, ssim_mindvis,
                                      two_way_identification)

log = logging.getLogger(__name__)

#: (id, label, kind) of every row, in the order of the table (kinds: floor, baseline, model, ceiling).
ROWS = (
    ("chance", "Chance (guessing)", "floor"),
    ("shuffled-pairs", "Shuffled pairs (DC-LDM samples vs. another stimulus's truth)", "floor"),
    ("mean-train-image", "Mean training image as every decoding", "floor"),
    ("dcldm", "DC-LDM (SC-MBM pretrained)", "model"),
    ("dcldm-start", "DC-LDM at its start (0 fine-tuning steps)", "model"),
    ("dcldm-lowlevel", "DC-LDM, low-level start (img2img from the ridge latent)", "model"),
    ("dcldm-prior", "DC-LDM + embedding prior (projected onto real images' embeddings)", "model"),
    ("dcldm-prior-lowlevel", "DC-LDM + embedding prior, low-level start (img2img from the ridge latent)", "model"),
    ("dcldm-shared", "DC-LDM shared by the subjects (one decoder, a linear adapter each)", "model"),
    ("dcldm-fewshot", "DC-LDM shared, adapted to this new subject from finetune.train_fraction of its trials",
     "model"),
    ("dcldm-baseline", "DC-LDM without SC-MBM pretraining", "baseline"),
    ("ridge", "Ridge fMRI -> VAE latent", "baseline"),
    ("ridge-pixels", "Ridge fMRI -> pixels", "baseline"),
    ("ridge-embedding", "Ridge fMRI -> prior embedding, frozen prior", "baseline"),
    # Label-only baselines (no image is drawn): what a linear read of the fMRI names, not a bound on decoding.
    ("fmri-linear", "Linear classifier on test fMRI", "baseline"),
    ("embedding-prototype", "Ridge fMRI -> prior embedding, nearest class prototype", "baseline"),
    ("base-ceiling", "Base generator given the truth", "ceiling"),
    ("true-images", "Classifier on the true images", "ceiling"),
)
#: Labels of the base-ceiling row, by how the base generator is conditioned.
BASE_CEILING_LABELS = {"image": "Prior given the true image's embedding",
                       "class": "Base generator given the true class"}
#: Top-1 retrieval in the image prior's embedding space (brain -> image, image -> brain).
RETRIEVAL_METRICS = ("retrieval_brain_to_image_top1", "retrieval_image_to_brain_top1")
METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "two_way_id_pixels",
           "pixcorr", "ssim", *RETRIEVAL_METRICS, "fid")
#: The one ground truth of each column.
GROUND_TRUTH = {
    "n_way_top1_mean": "the classifier's top-1 on the true image (MinD-Vis's protocol)",
    "n_way_top1_best_of_k": "the classifier's top-1 on the true image (MinD-Vis's protocol)",
    "label_top1_mean": "the data set's label",
    "two_way_id": "the true image's classifier features",
    "two_way_id_pixels": "the true image's pixels (no classifier)",
    "pixcorr": "the true image's pixels",
    "ssim": "the true image's pixels",
    "fid": "the true images' classifier features (as a set)",
    "retrieval_brain_to_image_top1": "the prior's embedding of each trial's own image, among all test images",
    "retrieval_image_to_brain_top1": "each image's own trial's decoded embedding, among all test trials",
}
#: MinD-Vis's own pixel metrics (evaluate.mindvis_metrics), only in the tables of configs that ask for them.
MINDVIS_GROUND_TRUTH = {
    "pixcorr_mindvis": "the true image's RGB pixels, against the other true images (MinD-Vis's pair-wise PCC)",
    "ssim_mindvis": "the true image's RGB pixels, against the other true images (MinD-Vis's pair-wise SSIM)",
}
#: Why the chance row has no PixCorr or SSIM.
NO_PIXEL_CHANCE = ("no exact chance level (it depends on the images); see the measured floors: rows shuffled-pairs "
                   "and mean-train-image")
#: Simulated stimuli of the best-of-k chance level where its closed form does not hold.
CHANCE_DRAWS = 2000
#: Per-stimulus metrics (FID is a set-level figure).
STIMULUS_METRICS = tuple(metric for metric in METRICS if metric != "fid")
#: Why an FID interval may not contain the FID (stated beside it in metrics.json).
FID_CI_NOTE = ("percentile bootstrap over stimuli, like every figure; a resampled set repeats stimuli, which "
               "biases FID upwards, so the interval can lie above the full-set value")
#: The test-stimulus subsets scored apart (beside all stimuli).
SUBSETS = ("seen", "novel")
#: Paired comparisons (a, b) of metrics.json: the mean over stimuli of a - b, when both rows are available.
#: (dcldm, ridge-embedding): what the DC-LDM adds over a ridge into the same frozen prior.
COMPARISONS = (("dcldm", "dcldm-start"), ("dcldm", "dcldm-baseline"), ("dcldm-lowlevel", "dcldm"), ("dcldm", "ridge"),
               ("dcldm", "ridge-embedding"), ("dcldm-prior", "dcldm"), ("dcldm-prior-lowlevel", "dcldm-prior"),
               ("dcldm-prior-lowlevel", "ridge"), ("dcldm-shared", "dcldm"), ("dcldm-fewshot", "dcldm"))
#: Fewest stimuli a subset is scored on (a bootstrap of one stimulus has no spread).
MIN_SUBSET_STIMULI = 2

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
    mindvis_metrics : bool
        Also score MinD-Vis's own PixCorr and SSIM (``pixcorr_mindvis``, ``ssim_mindvis``).
    embeddings : float [N, ...] or None
        The image prior's embedding of each true image (``Generator.embed_all``), against which decoded
        embeddings are retrieved; None when the base has no image conditioner (no retrieval is scored).
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
    mindvis_metrics: bool = False
    embeddings: np.ndarray | None = None

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
    per_sample = {"two_way_id": [], "two_way_id_pixels": [], "pixcorr": [], "ssim": []}
    if reference.mindvis_metrics:
        per_sample.update(pixcorr_mindvis=[], ssim_mindvis=[])
    true_pixels = prepare_images(reference.images, reference.image_size).reshape(len(reference.images), -1)
    for j in range(n_samples):
        per_sample["two_way_id"].append(two_way_identification(features[:, j], reference.features))
        pixels = prepare_images(images[:, j], reference.image_size).reshape(n_stimuli, -1)
        per_sample["two_way_id_pixels"].append(two_way_identification(pixels, true_pixels))
        per_sample["pixcorr"].append(pixcorr(images[:, j], reference.images, reference.image_size))
        per_sample["ssim"].append(ssim(images[:, j], reference.images, reference.image_size))
        if reference.mindvis_metrics:
            per_sample["pixcorr_mindvis"].append(pixcorr_mindvis(images[:, j], reference.images))
            per_sample["ssim_mindvis"].append(ssim_mindvis(images[:, j], reference.images))
    values.update({key: np.stack(rows, axis=1).mean(axis=1) for key, rows in per_sample.items()})
    return values, features, predicted


def retrieval_scores(embeddings, reference):
    """Top-1 retrieval of decoded embeddings among the true images' prior embeddings, per stimulus.

    Parameters
    ----------
    embeddings : float [N, ...]
        Each stimulus's decoded embedding (row i: stimulus i's trial).
    reference : Reference
        With ``embeddings`` (else nothing is scored).

    Returns
    -------
    dict of metric id -> float [N]
        :data:`RETRIEVAL_METRICS` (:func:`mindvis.evaluate.metrics.embedding_retrieval`, centred), or {} when
        the base has no image embedding.
    """
    if reference.embeddings is None:
        return {}
    brain_to_image, image_to_brain = embedding_retrieval(embeddings, reference.embeddings)
    return dict(zip(RETRIEVAL_METRICS, (brain_to_image, image_to_brain)))


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


def withheld(reason):
    """A metric entry that applies but is not reported, with the reason."""
    return {"value": None, "ci": None, "reason": str(reason)}


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


def best_of_k_chance(n_way, n_samples, n_classes, trials, seed, n_draws=CHANCE_DRAWS):
    """Best-of-k n-way top-1 of a decoder that guesses, by simulation: mean and its 95% Monte Carlo interval.

    Each sample's score is a success rate over ``trials`` trials (:func:`mindvis.evaluate.metrics.n_way_top1`),
    not a success or failure, so the closed form 1 - (1 - 1/n)^k of k independent binary outcomes holds only
    when n >= C (plain top-1). Here random class probabilities (the ground truth's rank uniform) go through
    the same :func:`n_way_top1` and :func:`best_of_k` as the model's samples.
    """
    rng = np.random.default_rng(seed)
    best = []
    for start in range(0, n_draws, 200):  # chunks bound the trials' memory (draws x k x trials)
        size = min(200, n_draws - start)
        probs = rng.random((size, n_samples, n_classes))
        gt_class = rng.integers(0, n_classes, size)
        best.append(best_of_k(n_way_top1(probs, gt_class, n_way, trials=trials, seed=int(rng.integers(2 ** 31)))))
    best = np.concatenate(best)
    half = 1.96 * best.std(ddof=1) / np.sqrt(len(best))
    return float(best.mean()), [float(best.mean() - half), float(best.mean() + half)]


def chance_metrics(n_way, n_samples, n_classes, n_label_classes, has_labels, trials=1000, seed=0):
    """The chance row: exact chance levels (no CI: they are exact), or simulated where no closed form holds.

    1/n for n-way top-1 (mean of k); best-of-k: 1 - (1 - 1/n)^k when n >= C (each sample a success or
    a failure), else :func:`best_of_k_chance`; 1/C for label top-1; 1/2 for two-way identification. PixCorr
    and SSIM have no exact chance level: withheld, pointing to the measured floors.

    Parameters
    ----------
    n_way, n_samples : int
    n_classes : int
        The image classifier's classes (n-way).
    n_label_classes : int
        The data set's classes (label top-1).
    has_labels : bool
    trials, seed : int
        As for the model's n-way top-1 (the simulation uses them).

    Returns
    -------
    metrics : dict
    note : str
    """
    def exact(value):
        return {"value": float(value), "ci": [float(value), float(value)]}

    metrics = {key: None for key in METRICS}
    if n_way >= n_classes:
        metrics["n_way_top1_best_of_k"] = exact(1 - (1 - 1 / n_way) ** n_samples)
        best_note = "best-of-k is 1 - (1 - 1/n)^k (k independent samples, plain top-1)"
    else:
        value, ci = best_of_k_chance(n_way, n_samples, n_classes, trials, seed)
        metrics["n_way_top1_best_of_k"] = {"value": value, "ci": ci, "simulated": CHANCE_DRAWS}
        best_note = (f"best-of-k simulated ({CHANCE_DRAWS} stimuli of random class probabilities through the same "
                     f"n-way trials; interval: 95% Monte Carlo), as each sample's n-way score is a rate over "
                     f"trials, not a success or failure")
    metrics.update({"n_way_top1_mean": exact(1 / n_way), "two_way_id": exact(0.5), "two_way_id_pixels": exact(0.5),
                    "pixcorr": withheld(NO_PIXEL_CHANCE), "ssim": withheld(NO_PIXEL_CHANCE)})
    if has_labels:
        metrics["label_top1_mean"] = exact(1 / n_label_classes)
    return metrics, f"chance levels of a decoder that guesses; {best_note}"


def derangement(n, seed):
    """A fixed permutation of ``range(n)`` without fixed points (n >= 2): ``order[i] != i``.

    A uniformly random single cycle through all n positions, drawn with ``seed``.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    cycle = np.random.default_rng(seed).permutation(n)
    order = np.empty(n, np.int64)
    order[cycle] = np.roll(cycle, -1)
    return order


# -- rows -------------------------------------------------------------------------

def make_row(row_id, available=True, metrics=None, reason=None, label=None, **extra):
    """One table row in the metrics.json layout (``label``: instead of :data:`ROWS`'s)."""
    _, default_label, kind = next(row for row in ROWS if row[0] == row_id)
    label = label or default_label
    row = {"id": row_id, "label": label, "kind": kind, "available": bool(available)}
    if available:
        row["metrics"] = metrics
    else:
        row["reason"] = reason
        row["metrics"] = {key: None for key in METRICS}
    row.update(extra)
    return row


class Table:
    """Rows, per-class accuracies, confusions and per-stimulus values, filled row by row.

    ``withheld``: metric id -> reason for the figures computed from the image classifier when it cannot
    ground them (:func:`mindvis.evaluate.classifier_check.check_classifier`); set before rows are added.
    """

    def __init__(self, reference, n_classes, n_boot, level, withheld_reason=None):
        self.reference, self.n_classes, self.n_boot, self.level = reference, n_classes, n_boot, level
        self.rows, self.per_class, self.confusion, self.per_stimulus = {}, {}, {}, {}
        self.withheld = {key: withheld_reason for key in CLASSIFIER_METRICS} if withheld_reason else {}

    def _withhold(self, metrics, keys):
        """Replace the figures ``keys`` (those a row has) computed by the classifier by the reason they are
        withheld."""
        for key in keys:
            if key in self.withheld:
                metrics[key] = withheld(self.withheld[key])
        return metrics

    def add_scored(self, row_id, values, predicted=None, features=None, uses_classifier=CLASSIFIER_METRICS,
                   **extra):
        """Summarise per-stimulus ``values`` into a row.

        ``uses_classifier``: the metrics the image classifier produced here (withheld, numbers and all, when
        it cannot ground them; the fMRI probe's label top-1, for one, does not use it).
        """
        has = set(values) | ({"fid"} if features is not None and len(features) > 1 else set())
        hidden = {key for key in has if key in self.withheld and key in uses_classifier}
        values = {key: array for key, array in values.items() if key not in hidden}
        metrics = summarize(values, self.reference, self.n_boot, self.level, None if "fid" in hidden else features)
        self.rows[row_id] = make_row(row_id, metrics=self._withhold(metrics, hidden), **extra)
        self.per_stimulus[row_id] = {key: array.tolist() for key, array in values.items()}
        labels = self.reference.labels
        if predicted is not None and (labels >= 0).any() and "label_top1_mean" not in hidden:
            self.per_class[row_id] = per_class_accuracy(predicted, labels, self.n_classes)
            self.confusion[row_id] = confusion_counts(predicted, labels, self.n_classes)

    def add_images(self, row_id, classifier, images, pairs=True, set_level=True, embeddings=None, **extra):
        """Score generated images ``[N, k, H, W, C]``.

        ``pairs=False`` leaves out the per-class accuracies and confusion (rows whose images are not their
        stimulus's own decodings); ``set_level=False`` leaves out FID (rows whose set of images is another
        row's). ``embeddings`` (float [N, ...]): the row's decoded prior embedding of each stimulus, scored by
        :func:`retrieval_scores` beside the images (without it the retrieval columns do not apply).
        """
        values, features, predicted = score_images(classifier, images, self.reference)
        if embeddings is not None:
            values.update(retrieval_scores(embeddings, self.reference))
        self.add_scored(row_id, values, predicted if pairs else None, features if set_level else None, **extra)

    def withhold(self, row_id, metrics, reason):
        """Withhold ``metrics`` of an added row with ``reason`` (figures that apply but would mislead)."""
        row = self.rows[row_id]
        for metric in metrics:
            row["metrics"][metric] = withheld(reason)
            self.per_stimulus.get(row_id, {}).pop(metric, None)

    def add_retrieval_chance(self):
        """Give the chance row retrieval's exact chance level, 1/N, once some row has retrieval figures."""
        if "chance" not in self.rows or not any(metric in values for values in self.per_stimulus.values()
                                                for metric in RETRIEVAL_METRICS):
            return
        level = 1.0 / len(self.reference.labels)
        row = self.rows["chance"]
        row["metrics"].update({metric: {"value": level, "ci": [level, level]} for metric in RETRIEVAL_METRICS})
        addition = "retrieval top-1 is 1/N among the N test stimuli"
        row["note"] = f"{row['note']}; {addition}" if row.get("note") else addition

    def add_exact(self, row_id, metrics, uses_classifier=CLASSIFIER_METRICS, **extra):
        """A row of exact (not resampled) figures, such as chance; ``uses_classifier`` as in :meth:`add_scored`."""
        has = [key for key, entry in metrics.items() if entry is not None and key in uses_classifier]
        self.rows[row_id] = make_row(row_id, metrics=self._withhold(metrics, has), **extra)

    def unavailable(self, row_id, reason):
        log.info("%s: not available (%s)", row_id, reason)
        self.rows[row_id] = make_row(row_id, available=False, reason=reason)

    def ordered(self):
        return [self.rows[row_id] for row_id, _, _ in ROWS]

    def subsets(self, categories):
        """Every row scored on the seen and on the novel test stimuli (the ``subsets`` of metrics.json).

        Parameters
        ----------
        categories : list of {"seen", "novel", None}
            Per stimulus (:func:`stimulus_categories`).

        Returns
        -------
        dict
            ``seen`` / ``novel`` -> ``{"n_stimuli", "available": True, "rows": {row id: {metric id: entry}}}``
            (entries as in the rows: a value with its bootstrap interval over the subset's stimuli, withheld as
            withheld, FID null, exact figures as they are), or ``{"n_stimuli", "available": False, "reason"}``
            for a subset of fewer than :data:`MIN_SUBSET_STIMULI` stimuli.
        """
        out = {}
        for name in SUBSETS:
            index = np.flatnonzero(np.asarray(categories, dtype=object) == name)
            if len(index) < MIN_SUBSET_STIMULI:
                out[name] = {"n_stimuli": int(len(index)), "available": False,
                             "reason": _subset_reason(name, len(index))}
                continue
            rows = {}
            for row_id, row in self.rows.items():
                values = self.per_stimulus.get(row_id)
                rows[row_id] = {metric: self._subset_entry(entry, metric, values, index)
                                for metric, entry in row["metrics"].items()}
            out[name] = {"n_stimuli": int(len(index)), "available": True,
                         "rows": {row_id: rows[row_id] for row_id, _, _ in ROWS}}
        return out

    def _subset_entry(self, entry, metric, values, index):
        if entry is None or metric == "fid":  # FID compares sets: not a per-stimulus figure to subset
            return None
        if entry.get("value") is None or values is None:  # withheld, or an exact row (chance): as it is
            return dict(entry)
        if metric not in values:
            return None
        array = np.asarray(values[metric], dtype=np.float64)[index]
        if np.isnan(array).all():
            return None
        low, high = bootstrap_ci(_nanmean, (array,), n_boot=self.n_boot, level=self.level, seed=self.reference.seed)
        return {"value": _nanmean(array), "ci": [float(low), float(high)]}

    def comparisons(self, categories):
        """Paired differences of :data:`COMPARISONS` on all, seen and novel stimuli (``comparisons`` of metrics.json).

        For each pair whose rows are both available, each subset scored (all stimuli, and seen / novel when they
        have at least :data:`MIN_SUBSET_STIMULI`) and each per-stimulus metric both rows report (not FID, not a
        withheld figure): the mean over stimuli of a - b and its percentile interval from a paired bootstrap
        (the same resampled stimuli for both rows).

        Returns
        -------
        list of dict
            ``a``, ``b``, ``subset``, ``metric``, ``difference``, ``ci`` ([low, high]), ``n_stimuli``.
        """
        categories = np.asarray(categories, dtype=object)
        subsets = {"all": np.arange(len(categories))}
        for name in SUBSETS:
            index = np.flatnonzero(categories == name)
            if len(index) >= MIN_SUBSET_STIMULI:
                subsets[name] = index
        out = []
        for first, second in COMPARISONS:
            if not (self.rows.get(first, {}).get("available") and self.rows.get(second, {}).get("available")):
                continue
            values_a, values_b = self.per_stimulus.get(first, {}), self.per_stimulus.get(second, {})
            for subset, index in subsets.items():
                for metric in STIMULUS_METRICS:
                    if metric not in values_a or metric not in values_b:
                        continue
                    difference = (np.asarray(values_a[metric], np.float64)[index]
                                  - np.asarray(values_b[metric], np.float64)[index])
                    if np.isnan(difference).all():
                        continue
                    low, high = bootstrap_ci(_nanmean, (difference,), n_boot=self.n_boot, level=self.level,
                                             seed=self.reference.seed)
                    out.append({"a": first, "b": second, "subset": subset, "metric": metric,
                                "difference": _nanmean(difference), "ci": [float(low), float(high)],
                                "n_stimuli": int(np.isfinite(difference).sum())})
        return out


def _subset_reason(name, n_stimuli):
    what = ("test stimuli of categories absent from the training trials" if name == "novel"
            else "test stimuli of categories among the training trials")
    return (f"{n_stimuli} {what}: a subset is scored from {MIN_SUBSET_STIMULI} stimuli up"
            if n_stimuli else f"no {what}")


def stimulus_categories(labels, training_labels):
    """Whether each test stimulus's category was seen in training: ``"seen"``, ``"novel"`` or None.

    Data-driven, so it holds for any data set: ``novel`` when the stimulus's label (>= 0) is not among the
    labels of the subject's training trials (the ``train`` and ``val`` splits of ``responses.h5``; all of
    GOD's test categories), ``seen`` when it is; None for an unlabelled stimulus (in neither subset).

    Parameters
    ----------
    labels : int [N]
        The test stimuli's labels (-1 unknown).
    training_labels : int [M]
        The labels of the training trials (-1 entries are ignored).

    Returns
    -------
    list of str or None, length N
    """
    trained = {int(label) for label in np.asarray(training_labels).ravel() if label >= 0}
    return [None if label < 0 else ("seen" if int(label) in trained else "novel") for label in np.asarray(labels)]


def make_reference(classifier, samples, settings, seed, n_classes_match):
    """The true images of ``samples.h5`` scored by the classifier (:class:`Reference`)."""
    images, true_images = samples["samples"], samples["true_images"]
    true_probs, true_features = classifier.predict_proba_and_features(true_images)
    return Reference(images=true_images, features=true_features, gt_class=true_probs.argmax(axis=1),
                     labels=np.asarray(samples["label"], np.int64), label_space=n_classes_match,
                     n_way=n_way_for(settings["n_way"], classifier.n_classes), trials=int(settings["trials"]),
                     seed=seed, image_size=int(settings["image_size"] or images.shape[2]),
                     mindvis_metrics=bool(settings.get("mindvis_metrics", False)))


def log_table(rows, n_way, n_samples):
    """Log the table compactly: one line per row, value [CI] per metric."""
    short = {"n_way_top1_mean": f"{n_way}-way", "n_way_top1_best_of_k": f"best{n_samples}",
             "label_top1_mean": "label", "two_way_id": "2-way", "two_way_id_pixels": "2-way px",
             "pixcorr": "PixCorr", "ssim": "SSIM", "retrieval_brain_to_image_top1": "brain->image",
             "retrieval_image_to_brain_top1": "image->brain", "fid": "FID"}
    lines = [f"{'row':<16}" + "".join(f"{name:>20}" for name in short.values())]
    for row in rows:
        cells = []
        for key in short:
            entry = row["metrics"].get(key)
            if entry is None or entry.get("value") is None:
                cells.append("-" if entry is None else "withheld")
            else:
                cells.append(f"{entry['value']:.3f} [{entry['ci'][0]:.2f},{entry['ci'][1]:.2f}]")
        lines.append(f"{row['id']:<16}" + "".join(f"{cell:>20}" for cell in cells))
    log.info("evaluation:\n%s", "\n".join(lines))
