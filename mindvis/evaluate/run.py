"""The ``evaluate`` stage: the model, its baselines and ceilings, scored alike, in one ``metrics.json``.

The rows and metrics are defined in :mod:`mindvis.evaluate.table`; this
module reads the inputs, checks that the image classifier can ground the
figures it scores (:mod:`mindvis.evaluate.classifier_check`), draws or fits
the rows that need it (the floors, the ridges, the ridge into the prior's
embedding sampled by the frozen prior, the fMRI classifier, the
embedding-prototype and base-generator ceilings), scores the seen- and
novel-category test stimuli apart, compares rows pairwise and writes the
outputs.

Retrieval in embedding space (MindEye's brain -> image and image -> brain
top-1, :func:`mindvis.evaluate.metrics.embedding_retrieval`) is scored for
every row with a decoded embedding of each test stimulus: the decoders whose
``samples.h5`` records one (``embedding``, written by the generate stage for a
decoder in the image prior's embedding space: ``dcldm`` and its start,
low-level, shared, few-shot and no-pretraining rows) and ``ridge-embedding``,
against the base prior's embeddings of the true test images. A ``samples.h5``
without it (a decoder in the UNet's condition space, or a file written before
it) leaves the two columns null for its row; a class- or text-conditioned base
leaves them null everywhere; a decoder fine-tuned on another prior than the
evaluation's (``--allow-other-prior``) has them withheld with the reason (its
embeddings are of that prior). The chance row then gives 1/N.

Outputs in ``out_dir`` (``results/{subject}/evaluation/``)
--------------------------------------------------------
``metrics.json``
    =====================  ==========================================================
    key                    meaning
    =====================  ==========================================================
    ``subject``            the subject
    ``split``              the responses split decoded (``test_avg``)
    ``n_way``, ``trials``  n of the n-way top-1 (capped at the classifier's classes)
                           and its trials per sample
    ``n_samples``          k, the model's samples per stimulus
    ``n_stimuli``          N, the test stimuli (the bootstrap's unit)
    ``chance``             1 / n
    ``ci_level``,          coverage and resamples of every interval
    ``n_bootstrap``
    ``image_size``         side (px) at which PixCorr and SSIM were computed
    ``classifier``         ``name``, ``n_classes``, ``held_out_accuracy`` (domain
                           classifier, on training images it did not train on),
                           ``test_label_accuracy`` (on the true test images),
                           ``usable`` and ``reason`` (the check of
                           :mod:`mindvis.evaluate.classifier_check`) and ``check``
                           (what was checked: ``n_val``, the Wilson lower bound, the
                           bound required, the classes predicted on the true images)
    ``prior``              whether the prior, given the true images' embeddings, draws
                           them above the mean-image floor
                           (:mod:`mindvis.evaluate.prior_check`): ``usable`` (null:
                           not checked), ``reason`` (with the fix) and ``check``
    ``ground_truth``       metric id -> the one ground truth of that column
    ``class_names``        the data set's classes (index = label)
    ``rows``               :data:`ROWS` in order: ``id``, ``label``, ``kind``
                           (floor / model / baseline / ceiling), ``available``, ``reason``
                           (when not available), ``metrics`` (every id of
                           :data:`METRICS` -> ``{"value", "ci": [low, high]}``,
                           null where it does not apply, or ``{"value": null,
                           "ci": null, "reason"}`` where it is withheld), and per
                           row ``note``,
                           ``n_samples``, ``fit`` (the chosen alpha / C and the
                           validation scores of every candidate), ``source``
    ``per_class``          row id -> accuracy of the argmax against the label, per
                           class (rows whose predictions are data-set classes)
    ``confusion``          row id -> counts [C, C], true label x predicted, over all
                           samples
    ``per_stimulus``       row id -> metric id -> N values (order: ``stimulus_ids``)
    ``stimulus_ids``,      the order of the per-stimulus lists
    ``labels``
    ``category``           per stimulus (same order): ``"seen"`` (its label is among
                           the labels of the subject's train and val trials),
                           ``"novel"`` (it is not: all of GOD's test categories) or
                           null (unlabelled: in neither subset)
    ``subsets``            ``seen`` / ``novel`` -> ``n_stimuli``, ``available`` and
                           ``rows``: row id -> metric id -> ``{"value", "ci"}``, the
                           rows' per-stimulus values averaged over the subset with a
                           bootstrap over its stimuli (same ``n_bootstrap``,
                           ``ci_level``; withheld figures stay withheld, FID is null,
                           exact figures such as chance keep their value; n-way top-1
                           stays n-way among all the classifier's classes); or
                           ``reason`` when the subset has fewer than 2 stimuli
    ``comparisons``        paired differences: a list of ``{"a", "b", "subset"
                           (all / seen / novel), "metric", "difference" (mean of
                           a - b over stimuli), "ci", "n_stimuli"}``, by a paired
                           bootstrap (the same resampled stimuli for both rows), for
                           (dcldm, dcldm-start), (dcldm, dcldm-baseline),
                           (dcldm-lowlevel, dcldm), (dcldm, ridge), (dcldm,
                           ridge-embedding), (dcldm-prior, dcldm), (dcldm-prior-lowlevel,
                           dcldm-prior), (dcldm-prior-lowlevel, ridge), (dcldm-shared,
                           dcldm) and (dcldm-fewshot,
                           dcldm) where both rows are available, every per-stimulus
                           metric (not FID)
    ``inputs``             path -> sha256 of every input file (model folders: their
                           weights and configs)
    ``timings_s``,         seconds per row and for the whole stage
    ``wall_time_s``
    ``config``,            the resolved config and software versions
    ``versions``
    =====================  ==========================================================

    Non-finite numbers are written as null (JSON has no NaN).
``ridge/``, ``ridge-pixels/``, ``ridge-embedding/``, ``base-ceiling/``
    ``samples.h5`` (:mod:`mindvis.generate.writing` layout; the two ridges
    decoded without a sampler: k = 1 and seeds -1, as no noise is drawn;
    ``ridge-embedding`` and ``base-ceiling``: the model's k and seeds, and
    ``ridge-embedding`` its predicted embeddings as ``embedding``) and
    ``grid.png``, when the row is available.

The folder is the stage's own (:data:`OUTPUT_NAMES`; a folder holding other
files is refused) and is replaced as one unit when everything is scored
(:func:`mindvis.utils.io.atomic_folder`): a full disk or a kill leaves the
previous evaluation whole, never this run's ridge images beside the previous
run's ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mindvis.config import embedding_prior_wanted, shared_subjects
from mindvis.data.images import images_to_tensor
from mindvis.data.responses import check_stimuli_pair, load_responses
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.evaluate.baselines import (MAX_PIXEL_RIDGE_SIDE, base_ceiling_conditioning, embedding_prototype_similarity,
                                        embedding_ridge, fmri_linear_probabilities, mean_training_image,
                                        pixel_ridge_images, ridge_images)
from mindvis.evaluate.classifier_check import CLASSIFIER_METRICS, check_classifier
from mindvis.evaluate.prior_check import check_prior
from mindvis.evaluate.table import (BASE_CEILING_LABELS, GROUND_TRUTH, MINDVIS_GROUND_TRUTH, RETRIEVAL_METRICS,
                                    SUBSETS, Table, chance_metrics, class_scores, derangement, log_table,
                                    make_reference, stimulus_categories)
from mindvis.generate.decode import sample_classes, sample_embeddings, sample_like
from mindvis.generate.writing import SAMPLES_FILE, read_samples_attrs, read_samples_h5, save_grid, write_samples_h5
from mindvis.models.classifiers.load import load_image_classifier
from mindvis.models.ldm import load_generator
from mindvis.utils.device import device_name, resolve_precision, select_device
from mindvis.utils.io import (atomic_folder, check_own_folder, derive_seed, sha256_file, software_versions,
                              write_json_atomic)

log = logging.getLogger(__name__)

#: Folders (under out_dir) of the images the stage draws itself.
IMAGE_ROWS = ("ridge", "ridge-pixels", "ridge-embedding", "base-ceiling")
#: What evaluate writes in its folder (replaced as a unit, so nothing else may live there).
OUTPUT_NAMES = ("metrics.json", *IMAGE_ROWS)
#: The optional model rows from further samples.h5: row id -> (whether the config asks for them for a subject,
#: the setting that does, the command-line flag that passes them, what is missing when they were not asked for).
EXTRA_MODEL_ROWS = {
    "dcldm-start": (lambda config, subject: config["generate"].get("start_row", False), "generate.start_row",
                    "--start-samples", "the DC-LDM was not sampled at its start (0 fine-tuning steps)"),
    "dcldm-lowlevel": (lambda config, subject: config["generate"].get("lowlevel", False), "generate.lowlevel",
                       "--lowlevel-samples",
                       "the DC-LDM was not sampled from the ridge latent (img2img low-level start)"),
    "dcldm-prior": (lambda config, subject: embedding_prior_wanted(config), "finetune.embedding_prior",
                    "--prior-samples", "the DC-LDM was not given a prior in embedding space"),
    "dcldm-prior-lowlevel": (lambda config, subject: embedding_prior_wanted(config)
                             and config["generate"].get("lowlevel", False),
                             "finetune.embedding_prior and generate.lowlevel", "--prior-lowlevel-samples",
                             "the DC-LDM was not sampled through its embedding prior from the low-level start"),
    "dcldm-shared": (lambda config, subject: subject in shared_subjects(config), "finetune.shared",
                     "--shared-samples", "this subject is not in a decoder shared by several subjects"),
    "dcldm-fewshot": (lambda config, subject: config["finetune"].get("new_subject") == subject,
                      "finetune.new_subject", "--fewshot-samples",
                      "this subject is not finetune.new_subject (no few-shot adaptation of the shared decoder)"),
}


# -- inputs -----------------------------------------------------------------------

def _load_samples(path, what):
    if not Path(path).exists():
        raise MindvisError(f"{what} not found", path=path, fix="run the generate stage for this subject first.")
    return read_samples_h5(path)


def _check_same_stimuli(samples, other, path):
    if list(other["stimulus_id"]) != list(samples["stimulus_id"]):
        raise MindvisError("these samples are of other stimuli than the model's samples", path=path,
                           key="stimulus_id", fix="regenerate both with the same config and responses.")


def check_samples_decoder(samples, samples_path, subject, data, responses, stimuli, base, overrides=()):
    """Refuse samples whose decoder was trained on another subject, other stimuli or another prior than the
    evaluation is given (:func:`mindvis.models.dcldm.check_decoder_inputs`, :func:`~mindvis.models.dcldm.check_prior`).

    What the decoder was bound to is read from the samples (``decoder``: the generate stage copies it from the
    decoder's ``dcldm.json``), so a moved or deleted decoder folder does not stop the check. Mismatches the user
    means (``overrides``, and those the generate stage was already told of and recorded in the samples) are let
    through.

    Returns
    -------
    list of str
        The overrides used (recorded in ``metrics.json``).
    """
    from mindvis.models.dcldm import check_decoder_inputs, check_prior

    attrs = samples["attrs"]
    record = attrs.get("decoder")
    if not isinstance(record, dict):
        raise MindvisError("samples.h5 has no record of the decoder that made them (subject, SHA-256 of its stimuli "
                           "and prior), so they cannot be checked against this evaluation's inputs",
                           path=samples_path, key="decoder", fix="rerun the generate stage for this subject.")
    allowed = set(overrides) | set(attrs.get("overrides") or [])
    used = []
    if str(attrs.get("subject", subject)) != str(subject):
        if "subject" not in allowed:
            raise MindvisError(f"samples of {attrs.get('subject')}, but the evaluation is of {subject}",
                               path=samples_path, key="subject",
                               fix=f"evaluate {subject}'s own samples, or pass --allow-other-subject if you mean it "
                                   "(recorded in the outputs).")
        used.append("subject")
    folder = record.get("model_dir") or Path(samples_path).parent
    used += check_decoder_inputs(record, folder, subject=subject, data=data, responses=responses, stimuli=stimuli,
                                 allow=allowed)
    if not check_prior(record, folder, base, allow="prior" in allowed):
        used.append("prior")
    return sorted(set(used))


def _test_split(responses, samples, samples_path):
    """The responses split the samples decode, checked row by row against the samples' stimulus ids."""
    split = str(samples["attrs"].get("split", "test_avg"))
    rows = responses[split]
    if [str(s) for s in rows.stimulus_id] != [str(s) for s in samples["stimulus_id"]]:
        raise MindvisError(f"samples.h5 and responses.h5 '{split}' list different stimuli", path=samples_path,
                           key="stimulus_id", fix="regenerate the samples from this responses.h5.")
    return split, rows


def input_hashes(paths, folders):
    """sha256 of every input file, and of the weight and config files of model folders."""
    hashes = {}
    for path in paths:
        if path is not None:
            hashes[str(path)] = sha256_file(path)
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        for file in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
            hashes[str(file)] = sha256_file(file)
        for sub in ("vae", "unet", "scheduler", "class_conditioner", "image_conditioner"):
            for file in sorted((folder / sub).glob("*.json")) + sorted((folder / sub).glob("*.safetensors")):
                hashes[str(file)] = sha256_file(file)
    return hashes


def _held_out_accuracy(classifier):
    """The domain classifier's accuracy on training images held out from its training (None for ImageNet ones)."""
    value = getattr(classifier, "info", {}).get("val_accuracy")
    return None if value is None else float(value)


def _finite(obj):
    """Replace NaN and infinities with None, recursively (JSON has no NaN; browsers reject it)."""
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


class _Drawn(NamedTuple):
    """A row's images drawn or decoded here, written to its folder as ``samples.h5``."""

    images: np.ndarray  # uint8 [N, k, H, W, C]
    seeds: np.ndarray  # int64 [N, k] (-1: no noise drawn)
    attrs: dict  # samples.h5 attributes
    embedding: np.ndarray | None = None  # float32 [N, tokens, token_dim]: the row's decoded prior embeddings


def _write_image_row(out_dir, drawn, samples, subject):
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples_h5(out_dir / SAMPLES_FILE, samples=drawn.images, true_images=samples["true_images"],
                     stimulus_id=list(samples["stimulus_id"]), label=samples["label"], seeds=drawn.seeds,
                     attrs={"subject": subject, "split": samples["attrs"].get("split", "test_avg"),
                            "n_samples": int(drawn.images.shape[1]),
                            "class_names": samples["attrs"].get("class_names", []), **drawn.attrs,
                            "versions": software_versions()},
                     embedding=drawn.embedding)
    if len(drawn.images):
        save_grid(out_dir / "grid.png", drawn.images, truth=samples["true_images"])


def _write_outputs(out_dir, inputs, metrics):
    """The drawn rows' folders and ``metrics.json``, into ``out_dir``."""
    for row_id, drawn in inputs.drawn.items():
        _write_image_row(out_dir / row_id, drawn, inputs.samples, inputs.subject)
    write_json_atomic(out_dir / "metrics.json", metrics)


# -- the rows that draw or fit something ------------------------------------------

@dataclass
class _Inputs:
    """What the baseline rows read: the config, the model's samples, responses and stimuli, the base generator."""

    config: dict
    subject: str
    samples: dict
    responses: object
    split_name: str
    test_fmri: np.ndarray
    stimulus_set: object
    generator: object
    base: str
    #: The samples.h5 files (as str) whose decoder was fine-tuned on another prior than ``base``.
    other_prior: set = field(default_factory=set)
    #: Row id -> :class:`_Drawn` of the rows drawn here, written with metrics.json.
    drawn: dict = field(default_factory=dict)
    #: Resolved samples.h5 path -> the decoder row scoring it (to name the row a copied drawing came from).
    row_of_path: dict = field(default_factory=dict)


def _add_decoder_row(table, classifier, inputs, row_id, samples, path):
    """Score a decoder's ``samples.h5`` as row ``row_id``: its images, and the retrieval of its decoded
    embeddings where it records them (withheld when its decoder was fine-tuned on another prior)."""
    embeddings = samples.get("embedding")
    other_prior = embeddings is not None and str(path) in inputs.other_prior
    same = samples["attrs"].get("same_decoder_as") or None
    extra = {}
    if same:  # generate --same-as: a decoder with the weights of another (validation kept the start) is drawn once
        twin = inputs.row_of_path.get(str(Path(same).resolve()), str(same))
        extra = {"same_decoder_as": twin,
                 "note": f"the same decoder as {twin} (identical weights and sampling): its images were copied, "
                         f"not drawn again, so this row's figures equal that row's"}
    table.add_images(row_id, classifier, samples["samples"], embeddings=None if other_prior else embeddings,
                     n_samples=int(samples["samples"].shape[1]), source=str(path), **extra)
    if other_prior and table.reference.embeddings is not None:
        table.withhold(row_id, RETRIEVAL_METRICS,
                       "the decoder was fine-tuned on another prior than this evaluation's base "
                       "(--allow-other-prior): its decoded embeddings are not in this prior's embedding space")


def _samples_row(table, classifier, inputs, row_id, path, what):
    """Score another ``samples.h5`` of the model's stimuli as row ``row_id``."""
    other = _load_samples(path, what)
    _check_same_stimuli(inputs.samples, other, path)
    _add_decoder_row(table, classifier, inputs, row_id, other, path)


def _model_rows(table, classifier, inputs, samples_path, baseline_samples, extra_samples):
    """The DC-LDM row, its start and low-level-start rows and its no-pretraining ablation (or why one is missing).

    ``extra_samples``: row id of :data:`EXTRA_MODEL_ROWS` -> ``samples.h5`` path or None.
    """
    given = {"dcldm": samples_path, "dcldm-baseline": baseline_samples, **extra_samples}
    inputs.row_of_path = {str(Path(path).resolve()): row_id for row_id, path in given.items() if path is not None}
    _add_decoder_row(table, classifier, inputs, "dcldm", inputs.samples, samples_path)
    for row_id, (wanted, key, flag, missing) in EXTRA_MODEL_ROWS.items():
        path = extra_samples.get(row_id)
        if path is not None:
            _samples_row(table, classifier, inputs, row_id, path, f"the {row_id} samples.h5")
        elif wanted(inputs.config, inputs.subject):
            table.unavailable(row_id, f"{key} asks for this row but no samples were given ({flag})")
        else:
            table.unavailable(row_id, f"{key}: {missing}")
    if baseline_samples is not None:
        _samples_row(table, classifier, inputs, "dcldm-baseline", baseline_samples, "the baseline's samples.h5")
    elif inputs.config["finetune"]["baseline"]:
        table.unavailable("dcldm-baseline", "finetune.baseline is true but no baseline samples were given "
                                            "(--baseline-samples)")
    else:
        table.unavailable("dcldm-baseline", "finetune.baseline is false: the no-pretraining ablation was not trained")


def _floor_rows(table, classifier, inputs):
    """The measured floors: shuffled pairs of the model's samples, and the mean training image."""
    images = inputs.samples["samples"]
    order = derangement(len(images), derive_seed(inputs.config["seed"], "evaluate", "shuffled-pairs"))
    # FID compares sets, which shuffling leaves as they are: the model's own FID is its value here.
    table.add_images("shuffled-pairs", classifier, images[order], pairs=False, set_level=False,
                     n_samples=int(images.shape[1]), order=order.tolist(),
                     note="the DC-LDM samples of stimulus order[i] scored against the truth of stimulus i "
                          "(a fixed derangement drawn with the config seed); no FID: shuffling leaves the set "
                          "of images, and so the model's FID, as it is")
    size, channels = int(images.shape[2]), int(images.shape[-1])
    try:
        mean_image = mean_training_image(inputs.responses, inputs.stimulus_set, size, channels)
    except MindvisError as err:
        table.unavailable("mean-train-image", str(err))
        return
    repeated = np.broadcast_to(mean_image, (len(images), 1, *mean_image.shape)).copy()
    table.add_images("mean-train-image", classifier, repeated, pairs=False, n_samples=1,
                     note=f"the mean of the {len(inputs.responses['train'])} training trials' images, as the "
                          f"decoding of every test stimulus (k = 1)")


def _ridge_row(table, classifier, inputs):
    """Ridge fMRI -> VAE latent, decoded by the VAE: one image per stimulus, written to ``ridge/``."""
    try:
        images, info = ridge_images(inputs.generator, inputs.responses, inputs.stimulus_set, inputs.test_fmri,
                                    inputs.config["evaluate"]["ridge_alphas"])
    except MindvisError as err:
        table.unavailable("ridge", str(err))
        return
    _add_ridge(table, classifier, inputs, "ridge", images, info, {"method": "ridge", "base": str(inputs.base)})


def _pixel_ridge_row(table, classifier, inputs):
    """Ridge fMRI -> pixels, where images are small: one image per stimulus, written to ``ridge-pixels/``."""
    images = inputs.samples["samples"]
    size, channels = int(images.shape[2]), int(images.shape[-1])
    if size > MAX_PIXEL_RIDGE_SIDE:
        table.unavailable("ridge-pixels", f"images of {size} px: the pixel ridge is fitted only up to "
                                          f"{MAX_PIXEL_RIDGE_SIDE} px a side")
        return
    try:
        decoded, info = pixel_ridge_images(inputs.responses, inputs.stimulus_set, inputs.test_fmri,
                                           inputs.config["evaluate"]["ridge_alphas"], size, channels)
    except MindvisError as err:
        table.unavailable("ridge-pixels", str(err))
        return
    _add_ridge(table, classifier, inputs, "ridge-pixels", decoded, info, {"method": "ridge fMRI -> pixels"})


def _add_ridge(table, classifier, inputs, row_id, images, info, attrs):
    images = images[:, None]
    table.add_images(row_id, classifier, images, n_samples=1, fit=info,
                     note=f"one image per stimulus (k = 1, so best-of-k = mean); predicted from the "
                          f"'{inputs.split_name}' fMRI")
    inputs.drawn[row_id] = _Drawn(images, np.full((len(images), 1), -1, np.int64),
                                  {**attrs, "fit": info, "config": inputs.config})


def _ridge_embedding_row(table, classifier, inputs):
    """Ridge fMRI -> prior embedding, each prediction sampled by the frozen prior with the model's seeds and
    sampler settings; scored like the model (retrieval too) and written to ``ridge-embedding/``."""
    try:
        embeddings, info = embedding_ridge(inputs.generator, inputs.responses, inputs.stimulus_set,
                                           inputs.test_fmri, inputs.config["evaluate"]["ridge_alphas"])
    except MindvisError as err:
        table.unavailable("ridge-embedding", str(err))
        return
    settings = inputs.config["generate"]
    seeds = inputs.samples["seeds"]
    drawn = sample_embeddings(inputs.generator, embeddings, seeds, settings)
    table.add_images("ridge-embedding", classifier, drawn, embeddings=embeddings, n_samples=int(drawn.shape[1]),
                     fit=info,
                     note=f"the ridge's predicted embedding of each '{inputs.split_name}' fMRI row conditions the "
                          f"frozen prior; the model's per-sample seeds and the generate section's sampler settings")
    inputs.drawn["ridge-embedding"] = _Drawn(drawn, seeds, {
        "method": "ridge fMRI -> prior embedding, sampled by the frozen prior", "base": str(inputs.base),
        "fit": info, "config": inputs.config,
        **{key: settings[key] for key in ("sampler", "steps", "guidance_scale", "eta")}}, embeddings)


def _fmri_linear_row(table, inputs, n_classes):
    """Logistic regression on the fMRI: its top-1 against the data set's label (the label column only)."""
    reference = table.reference
    labels = reference.labels
    if not (labels >= 0).any() or not (inputs.responses["train"].label >= 0).any():
        table.unavailable("fmri-linear", "the data set has no class labels")
        return
    try:
        probs, info = fmri_linear_probabilities(inputs.responses, inputs.test_fmri, n_classes,
                                                inputs.config["evaluate"]["fmri_classifier_C"],
                                                seed=derive_seed(inputs.config["seed"], "evaluate", "fmri"))
    except MindvisError as err:
        table.unavailable("fmri-linear", str(err))
        return
    # Its ground truth is the data set's label, not the image classifier's top-1 on the true image: it sits
    # under the label column only, and uses no image classifier (so nothing of it is withheld).
    values, predicted = class_scores(probs[:, None], None, reference, label_space=True)
    table.add_scored("fmri-linear", values, predicted, uses_classifier=(), fit=info,
                     note="class probabilities from fMRI alone (no image): one prediction per stimulus, "
                          "against the data set's label")


def _embedding_prototype_row(table, inputs, n_classes):
    """Ridge fMRI -> the prior's image embedding, classified by the nearest class prototype (label column only)."""
    if not (table.reference.labels >= 0).any():
        table.unavailable("embedding-prototype", "the test stimuli have no class labels")
        return
    try:
        similarity, info = embedding_prototype_similarity(inputs.generator, inputs.responses, inputs.stimulus_set,
                                                          inputs.test_fmri, inputs.config["evaluate"]["ridge_alphas"],
                                                          n_classes)
    except MindvisError as err:
        table.unavailable("embedding-prototype", str(err))
        return
    # Like the fMRI probe, its ground truth is the data set's label and it uses no image classifier.
    values, predicted = class_scores(similarity[:, None], None, table.reference, label_space=True)
    table.add_scored("embedding-prototype", values, predicted, uses_classifier=(), fit=info,
                     note="fMRI -> prior embedding regression fitted on seen-class trials, scored by the nearest "
                          "class prototype among all classes (cosine similarity to the mean embedding of each "
                          "class's labelled pool images); one prediction per stimulus, against the data set's "
                          "label")


def _base_ceiling_row(table, classifier, inputs, n_classes):
    """The base generator given the truth, with the model's seeds, written to ``base-ceiling/``.

    An image-conditioned prior is given each true image's own embedding; a class-conditioned base each
    stimulus's label.
    """
    settings = inputs.config["generate"]
    labels = table.reference.labels
    conditioning, reason = base_ceiling_conditioning(inputs.generator, labels, n_classes)
    if reason:
        table.unavailable("base-ceiling", reason)
        return
    seeds = inputs.samples["seeds"]
    if conditioning == "image":
        drawn = sample_like(inputs.generator, inputs.samples["true_images"], seeds, settings)
    else:
        drawn = sample_classes(inputs.generator, labels, seeds, settings)
    label = BASE_CEILING_LABELS[conditioning]
    table.add_images("base-ceiling", classifier, drawn, label=label, conditioning=conditioning,
                     n_samples=int(drawn.shape[1]),
                     note="the model's per-sample seeds and the generate section's sampler settings")
    inputs.drawn["base-ceiling"] = _Drawn(drawn, seeds, {
        "method": label, "conditioning": conditioning, "base": str(inputs.base), "config": inputs.config,
        **{key: settings[key] for key in ("sampler", "steps", "guidance_scale", "eta")}})


def _timed(timings, name, func, *args):
    tick = time.perf_counter()
    func(*args)
    timings[name] = round(time.perf_counter() - tick, 2)


# -- the stage --------------------------------------------------------------------

def evaluate_subject(config, subject, responses, stimuli, samples, base, out_dir, baseline_samples=None,
                     classifier_dir=None, start_samples=None, lowlevel_samples=None, shared_samples=None,
                     fewshot_samples=None, device="auto", overrides=(), prior_samples=None,
                     prior_lowlevel_samples=None):
    """Score a subject's decoded images beside every baseline and ceiling; write ``metrics.json``.

    Parameters
    ----------
    config : dict
        The resolved experiment config (``evaluate``, ``generate``, ``finetune``, ``seed``).
    subject : str
    responses : path
        The subject's ``responses.h5``: train and val for the ridge and fMRI-classifier baselines
        (fitting and selection), the samples' split (``test_avg``) for their predictions.
    stimuli : path
        ``stimuli.h5``.
    samples : path
        The DC-LDM's ``samples.h5``.
    base : path
        The base generator folder (its VAE for the ridge baseline, its image or class conditioner for
        the base-ceiling row).
    out_dir : path
    baseline_samples : path, optional
        ``samples.h5`` of the decoder fine-tuned without SC-MBM pretraining.
    classifier_dir : path, optional
        The domain classifier folder (``evaluate.classifier`` auto / domain).
    start_samples : path, optional
        ``samples.h5`` of the DC-LDM at its start (0 fine-tuning steps): row ``dcldm-start``.
    lowlevel_samples : path, optional
        ``samples.h5`` of the DC-LDM sampled from the ridge latent (img2img): row ``dcldm-lowlevel``.
    prior_samples, prior_lowlevel_samples : path, optional
        ``samples.h5`` of the DC-LDM through its prior in embedding space, from noise and from the low-level
        start: rows ``dcldm-prior`` and ``dcldm-prior-lowlevel``.
    shared_samples : path, optional
        ``samples.h5`` of the decoder shared by several subjects (finetune_shared): row ``dcldm-shared``.
    fewshot_samples : path, optional
        ``samples.h5`` of the shared decoder adapted to this new subject (adapt_subject): row ``dcldm-fewshot``.
    device : str
        Where the classifier and the base generator run (:func:`mindvis.utils.device.select_device`),
        the classifier under ``evaluate.mixed_precision`` autocast.
    overrides : collection of str
        Inputs other than the decoder's own that the user means (:func:`check_samples_decoder`); recorded in
        ``metrics.json`` (``overrides``).

    Returns
    -------
    dict
        The contents of ``metrics.json``.
    """
    started = time.perf_counter()
    settings = config["evaluate"]
    out_dir = Path(out_dir)
    check_own_folder(out_dir, OUTPUT_NAMES, "evaluate")
    model_samples = _load_samples(samples, "the model's samples.h5")
    n_stimuli, n_samples = model_samples["samples"].shape[:2]
    if n_stimuli < 2:
        raise MindvisError(f"{n_stimuli} test stimuli: identification and confidence intervals need at least 2",
                           path=samples, key="stimulus_id", fix="decode a split with more stimuli.")
    data = load_responses(responses, splits=("train", "val", str(model_samples["attrs"].get("split", "test_avg"))))
    split_name, test_rows = _test_split(data, model_samples, samples)
    if "stimuli" not in overrides:  # --allow-other-stimuli: the user means another stimulus file
        check_stimuli_pair(data, responses, stimuli)
    used = check_samples_decoder(model_samples, samples, subject, data, responses, stimuli, base, overrides)
    # A decoder fine-tuned on another prior (allowed by the user) decodes embeddings of that prior.
    other_prior = {str(samples)} if "prior" in used else set()
    # Every other decoder's samples scored beside the model's are held to the same inputs.
    for other in (baseline_samples, start_samples, lowlevel_samples, prior_samples, prior_lowlevel_samples,
                  shared_samples, fewshot_samples):
        if other is not None and Path(other).is_file():
            other_used = check_samples_decoder({"attrs": read_samples_attrs(other)}, other, subject, data, responses,
                                               stimuli, base, overrides)
            used = sorted(set(used) | set(other_used))
            other_prior |= {str(other)} if "prior" in other_used else set()
    stimulus_set = load_stimulus_set(stimuli)
    class_names = list(stimulus_set.class_names)
    device = select_device(device)
    classifier = load_image_classifier(config, classifier_dir).to(
        device, resolve_precision(settings["mixed_precision"], device))
    reference = make_reference(classifier, model_samples, settings, derive_seed(config["seed"], "evaluate", subject),
                               list(classifier.class_names) == class_names)
    log.info("%s: %d stimuli x %d samples; classifier %s (%d classes), %d-way top-1 (%d trials); PixCorr and SSIM "
             "at %d px", subject, n_stimuli, n_samples, classifier.name, classifier.n_classes, reference.n_way,
             reference.trials, reference.image_size)
    check = check_classifier(getattr(classifier, "info", {}), reference.gt_class, classifier.n_classes)
    table = Table(reference, len(class_names), int(settings["n_bootstrap"]), float(settings["ci_level"]),
                  withheld_reason=check.reason)
    has_labels = reference.label_space and bool(reference.labelled.any())
    chance, note = chance_metrics(reference.n_way, n_samples, classifier.n_classes, len(class_names), has_labels,
                                  trials=reference.trials, seed=reference.seed)
    # The label chance level also serves the fMRI probe, which uses no image classifier.
    table.add_exact("chance", chance, uses_classifier=tuple(k for k in CLASSIFIER_METRICS if k != "label_top1_mean"),
                    note=note)
    generator = load_generator(base, image_size=int(model_samples["samples"].shape[2])).to(device)
    generator.vae.eval()
    generator.unet.eval()
    if generator.image_conditioner is not None:  # what decoded embeddings are retrieved among
        reference.embeddings = generator.embed_all(images_to_tensor(
            model_samples["true_images"], generator.image_size, generator.image_channels)).cpu().numpy()
    inputs = _Inputs(config=config, subject=subject, samples=model_samples, responses=data, split_name=split_name,
                     test_fmri=test_rows.fmri, stimulus_set=stimulus_set, generator=generator, base=str(base),
                     other_prior=other_prior)
    timings = {}
    _timed(timings, "dcldm", _model_rows, table, classifier, inputs, samples, baseline_samples,
           {"dcldm-start": start_samples, "dcldm-lowlevel": lowlevel_samples, "dcldm-prior": prior_samples,
            "dcldm-prior-lowlevel": prior_lowlevel_samples, "dcldm-shared": shared_samples,
            "dcldm-fewshot": fewshot_samples})
    _timed(timings, "floors", _floor_rows, table, classifier, inputs)
    _timed(timings, "ridge", _ridge_row, table, classifier, inputs)
    _timed(timings, "ridge-pixels", _pixel_ridge_row, table, classifier, inputs)
    _timed(timings, "ridge-embedding", _ridge_embedding_row, table, classifier, inputs)
    _timed(timings, "fmri-linear", _fmri_linear_row, table, inputs, len(class_names))
    _timed(timings, "embedding-prototype", _embedding_prototype_row, table, inputs, len(class_names))
    _timed(timings, "base-ceiling", _base_ceiling_row, table, classifier, inputs, len(class_names))
    table.add_images("true-images", classifier, reference.images[:, None], n_samples=1,
                     note="the true images scored as if decoded: n-way top-1 is 1 by definition; label top-1 is "
                          "the classifier's accuracy")
    table.add_retrieval_chance()

    rows = table.ordered()
    prior_check = check_prior(rows)
    categories = stimulus_categories(reference.labels, np.concatenate([data["train"].label, data["val"].label]))
    subsets = table.subsets(categories)
    comparisons = table.comparisons(categories)
    log.info("%s: %s", subject, ", ".join(f"{subsets[name]['n_stimuli']} {name}" for name in SUBSETS))
    true_labels = reference.labels[reference.labelled]
    test_label_accuracy = (float(np.mean(reference.gt_class[reference.labelled] == true_labels))
                           if reference.label_space and len(true_labels) else None)
    metrics = {
        "subject": subject, "n_way": reference.n_way, "trials": reference.trials, "n_samples": int(n_samples),
        "n_stimuli": int(n_stimuli), "chance": 1.0 / reference.n_way, "ci_level": table.level,
        "n_bootstrap": table.n_boot, "image_size": reference.image_size, "split": split_name,
        "classifier": {"name": classifier.name, "n_classes": int(classifier.n_classes),
                       "held_out_accuracy": _held_out_accuracy(classifier),
                       "test_label_accuracy": test_label_accuracy, "usable": check.usable,
                       "reason": check.reason, "check": check.record},
        "prior": {"usable": prior_check.usable, "reason": prior_check.reason, "check": prior_check.record},
        "ground_truth": {**GROUND_TRUTH, **(MINDVIS_GROUND_TRUTH if reference.mindvis_metrics else {})},
        "class_names": class_names, "rows": rows, "per_class": table.per_class,
        "confusion": table.confusion,
        "per_stimulus": table.per_stimulus,
        # The order of every per_stimulus list.
        "stimulus_ids": [str(s) for s in model_samples["stimulus_id"]], "labels": reference.labels.tolist(),
        "category": categories, "subsets": subsets, "comparisons": comparisons,
        "inputs": input_hashes([responses, stimuli, samples, baseline_samples, start_samples, lowlevel_samples,
                                prior_samples, prior_lowlevel_samples, shared_samples, fewshot_samples],
                               [base, classifier_dir]),
        "overrides": used,
        "timings_s": timings,
        "throughput": {"device": device_name(device), "classifier_precision": classifier.precision,
                       "classifier_images": int(classifier.images_scored),
                       "classifier_images_per_s": round(classifier.images_scored / max(classifier.seconds, 1e-9), 2)},
        "config": config, "versions": software_versions(),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    metrics = _finite(metrics)
    # The folder is replaced as one unit: a full disk or a kill leaves the previous evaluation whole, never this
    # run's ridge images beside the previous run's metrics.json (nor a row's folder that this run no longer
    # draws). Snakemake names only metrics.json, but the folder is evaluate's alone (report reads the rows there).
    with atomic_folder(out_dir) as staging:
        _write_outputs(staging, inputs, metrics)
    log_table(rows, reference.n_way, n_samples)
    log.info("%s: wrote %s in %.1f s", subject, out_dir / "metrics.json", metrics["wall_time_s"])
    return metrics
