"""A semantic, label-free embedding: does a SimCLR embedding of the corpus decode better than the prior's? (issue 34)

Issue 34's third item, measured before any prior is retrained: the prior's
image embedding (4 x 4 x 8 conv grid, flattened to 128; spatial, trained by the
diffusion loss alone) against a self-supervised global embedding of the same
corpus (SimCLR, Chen et al., ICML 2020; the part CLIP's image embedding plays in
MindEye and unCLIP), as a target that fMRI is decoded into. No image is sampled.
Run it after ``make decode`` on the finished results folder::

    python benchmarks/semantic_embedding.py [--results results] [--subjects sub-01 ...] [--corpus DIR]
        [--epochs N] [--seed 0] [--work-dir DIR] [--n-boot 2000] [--out benchmarks/results/semantic_embedding]
        [--threads 1]

The encoder
-----------
Corpus: the training file of Fashion-MNIST, the prior's own corpus, images only (``--corpus``, default the
subset committed with mindvis, ``mindvis/data/assets/fashion-mnist``; point it to Debian's full set to use
that): every image padded and resized to the stimuli's 32 px (:func:`mindvis.data.stimuli.fit_image`). Neither
the test file (the test stimuli come from it) nor any label file is read.

:class:`ConvEncoder` (4 conv layers, BatchNorm, ReLU, global average pooling to 128 values) with a 2-layer
projection head, trained with SimCLR's NT-Xent loss (:func:`nt_xent`, temperature 0.2) on two augmented views of
each image (:func:`augment`: random resized crop of 0.6-1 of the area, horizontal flip, a shift of up to 2 px,
brightness and contrast jitter, Gaussian noise), batch 256, AdamW with a cosine schedule, a fixed number of
epochs, seeded. The embedding is the backbone's 128-d output (before the head), L2-normalised.

Diagnostic only (no decision reads it): the leave-one-out k-NN label accuracy of the stimuli's ``pool`` images
in each embedding, beside raw pixels and the same encoder untrained.

Decoding (per subject; arms)
----------------------------
From the voxels (standardised by the training trials), scikit-learn ridge with alpha chosen by two-way
identification on the val trials and refitted on train (:func:`brain_embedding.train_ridge`, the routine of
brain_embedding.py's ``ridge-voxels``), into the embedding of each trial's seen image:

``prior``               (a) the prior's embedding (``Generator.embed_all``), as brain_embedding.py's ridge-voxels
``simclr``              (b) the SimCLR embedding
``concat``              (c) both, each block scaled to unit total variance on the training trials, the SimCLR
                        block weighted by w in 0.25 .. 4; alpha and w chosen together by val identification in the
                        concatenated space
``simclr-untrained``    the same encoder, randomly initialised (what training adds)
``prior-shuffled``, ``simclr-shuffled``   floors: ridge on shuffled training pairs

Metrics, on test_avg (one row per stimulus), each for all / seen / novel stimuli (``stimuli.novel_classes``)
-------------------------------------------------------------------------------------------------------------
``identification`` (centred cosine, chance 0.5), ``brain_to_image`` / ``image_to_brain`` top-1 retrieval among
the test stimuli (:func:`mindvis.evaluate.metrics.embedding_retrieval`, chance 1/N) and ``prototype``: the
predicted embedding's nearest class prototype (cosine; the mean embedding of each class's labelled ``pool``
images, as the evaluate stage's embedding-prototype row) names the stimulus's class (chance 1/10). Each is
measured in the arm's own embedding space, so identification and retrieval in two spaces are not one
yardstick: retrieval among the same 50 test images is the comparable figure; the prototype read-out (labels
at test time only, a diagnostic as the evaluate stage's) is the semantic one. Its ceiling per space, the same
read-out of the true test images' own embeddings, is reported beside it, and each arm's predicted classes are
kept: with 3 novel classes, a near-constant prediction that falls on one scores 1/3 of the novel stimuli.

Intervals: :func:`decoder_seeds.summarise` (percentile bootstrap over the test stimuli resampled by class; the
mean over subjects resamples each subject). Paired differences against ``prior`` are per stimulus.

Outputs: ``{out}.json`` (per-stimulus values, every selection record, the encoder's training history, timings,
machine) and ``{out}.md``. With ``--work-dir`` the trained encoder is kept there (``simclr.safetensors``) and reused by a
rerun with the same settings, seed and corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brain_embedding import METRIC_NAMES as RIDGE_METRIC_NAMES
from brain_embedding import (
    RIDGE_ALPHAS,
    _fmt,
    _subset,
    rows_and_differences,
    standardiser,
    test_metrics,
    train_ridge,
)
from decoder_seeds import summarise
from learning_curve import SUBSETS, machine

from mindvis.data.stimuli import (
    BUNDLED_FASHION_MNIST,
    FASHION_MNIST_FILES,
    fashion_mnist_dir,
    fit_image,
    read_idx,
)
from mindvis.errors import MindvisError
from mindvis.utils.io import set_threads, software_versions, write_json_atomic

log = logging.getLogger("semantic_embedding")

DEFAULT_OUT = "benchmarks/results/semantic_embedding"
IMAGE_SIZE = 32  # the stimuli's side (stimuli.image_size of the default config)
METRICS = ("identification", "brain_to_image", "image_to_brain", "prototype")
METRIC_NAMES = {**RIDGE_METRIC_NAMES, "prototype": "nearest class prototype, top-1"}
#: arm -> (target embedding, shuffled training pairs); the order is the tables'.
ARMS = {
    "prior": ("prior", False),
    "simclr": ("simclr", False),
    "concat": ("concat", False),
    "simclr-untrained": ("simclr-untrained", False),
    "prior-shuffled": ("prior", True),
    "simclr-shuffled": ("simclr", True),
}
REFERENCE = "prior"
FLOORS = ("prior-shuffled", "simclr-shuffled")
CONCAT_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
KNN_K = 5


# -- the encoder -------------------------------------------------------------------------

@dataclass
class SimCLRSettings:
    """The encoder, its augmentations and its training."""

    widths: tuple = (32, 64, 128, 128)  # conv channels; the first keeps 32 px, each later one halves it
    projection_dim: int = 64
    temperature: float = 0.2
    batch_size: int = 256
    epochs: int = 25  # about 10 min on one (shared) CPU thread with the 7,500-image corpus
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop_area: tuple = (0.6, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    max_shift_px: float = 2.0
    brightness: float = 0.2  # added, uniform in +-brightness (images in [0, 1])
    contrast: float = 0.3  # about the image's mean, a factor uniform in 1 +- contrast
    noise_sd: float = 0.05


class ConvEncoder(nn.Module):
    """Grey images [B, 1, S, S] in [0, 1] -> backbone features [B, widths[-1]] and projections [B, projection_dim].

    4 conv layers (3 x 3, BatchNorm, ReLU; stride 1, then 2, 2, 2: 32 -> 4 px), global average pooling; the
    projection head (Linear, ReLU, Linear) serves the loss only.
    """

    def __init__(self, widths=(32, 64, 128, 128), projection_dim=64):
        super().__init__()
        layers, n_in = [], 1
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(n_in, width, 3, stride=1 if index == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            n_in = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(n_in, n_in), nn.ReLU(inplace=True), nn.Linear(n_in, projection_dim))

    def features(self, images):
        """[B, 1, S, S] in [0, 1] -> [B, widths[-1]]."""
        return self.backbone(images * 2 - 1)

    def forward(self, images):
        return self.head(self.features(images))


def nt_xent(first, second, temperature):
    """SimCLR's NT-Xent loss of two views' projections [B, D] (row i of both: one image).

    Of the 2B projections, each one's positive is the other view of its image and its negatives the other 2B - 2;
    cosine similarity / temperature, cross entropy, the mean over all 2B.
    """
    projections = F.normalize(torch.cat([first, second]), dim=1)
    logits = projections @ projections.T / temperature
    logits = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool), float("-inf"))
    batch = len(first)
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return F.cross_entropy(logits, positives)


def augment(images, settings, generator):
    """One random view of each image [B, 1, S, S] in [0, 1] (same shape, values in [0, 1]).

    Geometry in one affine resampling (bilinear, black outside the image): a crop of a random share of the area
    (``crop_area``) and aspect ratio (``crop_ratio``) at a random place, resized to the full side, flipped left-right
    with ``flip_prob``, shifted by up to ``max_shift_px``. Then per image a contrast factor about its mean and a
    brightness offset, Gaussian noise, clipped to [0, 1].
    """
    batch, _, side, _ = images.shape

    def uniform(low, high, size=(batch,)):
        return low + (high - low) * torch.rand(size, generator=generator)

    area = uniform(*settings.crop_area)
    log_ratio = uniform(math.log(settings.crop_ratio[0]), math.log(settings.crop_ratio[1]))
    # Half-widths of the crop in grid coordinates ([-1, 1] spans the image); a crop never leaves the image.
    scale_x = torch.clamp(torch.sqrt(area * log_ratio.exp()), max=1.0)
    scale_y = torch.clamp(torch.sqrt(area / log_ratio.exp()), max=1.0)
    shift = 2 * settings.max_shift_px / side
    centre_x = uniform(-1.0, 1.0) * (1 - scale_x) + uniform(-shift, shift)
    centre_y = uniform(-1.0, 1.0) * (1 - scale_y) + uniform(-shift, shift)
    flip = torch.where(torch.rand(batch, generator=generator) < settings.flip_prob, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(1 - settings.contrast, 1 + settings.contrast).view(batch, 1, 1, 1)
    brightness = uniform(-settings.brightness, settings.brightness).view(batch, 1, 1, 1)
    views = (views - mean) * contrast + mean + brightness
    views = views + settings.noise_sd * torch.randn(views.shape, generator=generator)
    return views.clamp(0.0, 1.0)


def train_simclr(images, settings, seed, log_every=1):
    """Train a :class:`ConvEncoder` with NT-Xent on two augmented views of ``images``.

    Parameters
    ----------
    images : uint8 [N, S, S, 1] or float [N, 1, S, S] in [0, 1]
    settings : SimCLRSettings
    seed : int
        Seeds the initialisation, the order of the images and the augmentations.

    Returns
    -------
    model : ConvEncoder
        In eval mode.
    history : list of dict
        Per epoch: ``epoch``, ``loss`` (mean over its batches), ``positive_top1`` (share of views whose nearest
        projection in the batch is their other view), ``seconds``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    corpus = as_unit_tensor(images)
    model = ConvEncoder(settings.widths, settings.projection_dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batch_size = min(settings.batch_size, len(corpus))
    steps_per_epoch = len(corpus) // batch_size  # full batches only: NT-Xent's difficulty depends on the batch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs * steps_per_epoch)
    history = []
    for epoch in range(1, settings.epochs + 1):
        tick = time.perf_counter()
        model.train()
        order = torch.randperm(len(corpus), generator=generator)
        losses, hits = [], []
        for step in range(steps_per_epoch):
            batch = corpus[order[step * batch_size:(step + 1) * batch_size]]
            first = model(augment(batch, settings, generator))
            second = model(augment(batch, settings, generator))
            loss = nt_xent(first, second, settings.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            hits.append(_positive_top1(first.detach(), second.detach()))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "positive_top1": float(np.mean(hits)),
                        "seconds": round(time.perf_counter() - tick, 2)})
        if log_every and epoch % log_every == 0:
            print(f"simclr epoch {epoch}/{settings.epochs}: loss {history[-1]['loss']:.4f}, positive top-1 "
                  f"{history[-1]['positive_top1']:.3f} ({history[-1]['seconds']:.0f} s)", flush=True)
    return model.eval(), history


def _positive_top1(first, second):
    """Share of the 2B views whose most similar other view in the batch is their own image's."""
    projections = F.normalize(torch.cat([first, second]), dim=1)
    similarity = (projections @ projections.T).fill_diagonal_(-2.0)
    batch = len(first)
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return float((similarity.argmax(1) == positives).double().mean())


def as_unit_tensor(images):
    """uint8 [N, S, S, 1] (the stimuli's layout) -> float32 [N, 1, S, S] in [0, 1]; a float tensor passes through."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return images.float()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] != 1:
        images = images.mean(axis=-1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2) / 255.0


def embed(model, images, batch_size=512):
    """The backbone's embedding of ``images`` (as :func:`as_unit_tensor` takes them), L2-normalised: float64 [N, D]."""
    tensor = as_unit_tensor(images)
    model.eval()
    with torch.no_grad():
        parts = [model.features(tensor[i:i + batch_size]) for i in range(0, len(tensor), batch_size)]
    return F.normalize(torch.cat(parts), dim=1).double().numpy()


# -- the corpus ------------------------------------------------------------------------------

def load_corpus(folder):
    """The training file's images of a Fashion-MNIST folder at the stimuli's size: uint8 [N, 32, 32, 1], its path.

    Only the training images file is read: no label file, and never the test file (the test stimuli's source).
    """
    folder = fashion_mnist_dir(folder)
    path = Path(folder) / FASHION_MNIST_FILES["train"][0]
    raw = read_idx(path)
    return np.stack([fit_image(image, IMAGE_SIZE, 1) for image in raw]), path


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def encoder_for(corpus, corpus_path, settings, seed, work_dir=None):
    """Train the encoder, or load it from ``work_dir`` when trained there with the same settings, seed and corpus.

    Returns the model, its training history, the seconds its training took (when loaded: the sum of the epochs'
    recorded times) and whether it was loaded.
    """
    # Through JSON, as stored (tuples become lists), so that a stored key compares equal.
    key = json.loads(json.dumps({"settings": asdict(settings), "seed": seed, "corpus": file_digest(corpus_path),
                                 "n_images": len(corpus)}))
    # safetensors, its key and history in the metadata: no pickle is loaded (tests/test_safe_loading.py).
    checkpoint = Path(work_dir) / "simclr.safetensors" if work_dir else None
    if checkpoint is not None and checkpoint.exists():
        with safe_open(str(checkpoint), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if json.loads(metadata.get("key", "null")) == key:
            history = json.loads(metadata["history"])
            model = ConvEncoder(settings.widths, settings.projection_dim)
            model.load_state_dict(load_file(str(checkpoint)))
            print(f"simclr: reusing {checkpoint}", flush=True)
            return model.eval(), history, sum(epoch["seconds"] for epoch in history), True
    tick = time.perf_counter()
    model, history = train_simclr(corpus, settings, seed)
    seconds = time.perf_counter() - tick
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(checkpoint),
                  metadata={"key": json.dumps(key), "history": json.dumps(history)})
    return model, history, seconds, False


# -- the diagnostic ------------------------------------------------------------------------------

def knn_accuracy(features, labels, k=KNN_K):
    """Leave-one-out k-NN label accuracy (cosine, majority vote, ties to the nearest neighbour's class)."""
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    correct = 0
    for row, index in enumerate(neighbours):
        votes = labels[index]
        values, counts = np.unique(votes, return_counts=True)
        winners = values[counts == counts.max()]
        predicted = winners[0] if len(winners) == 1 else next(v for v in votes if v in winners)
        correct += int(predicted == labels[row])
    return correct / len(labels)


# -- one subject ------------------------------------------------------------------------------------

def load_subject(results_dir, subject, stimuli):
    """Voxels, seen images and test labels of one subject.

    Returns
    -------
    dict
        ``voxels``: ``{split: float64 [N, V]}``; ``images``: ``{split: uint8 [N, S, S, C]}``; ``labels`` (test_avg),
        ``category`` ('seen' / 'novel' per test stimulus), ``stimulus_ids``, ``sizes``.
    """
    from mindvis.data.responses import load_responses

    path = Path(results_dir) / subject / "responses.h5"
    if not path.exists():
        raise MindvisError("missing", path=path, fix="run `make decode` first, or pass --results to a finished "
                                                     "results folder.")
    splits = ("train", "val", "test_avg")
    data = load_responses(path, splits=splits)
    test_ids = [str(s) for s in data["test_avg"].stimulus_id]
    if len(set(test_ids)) != len(test_ids):
        raise MindvisError("test_avg holds a stimulus twice; the metrics need one row per stimulus", path=path,
                           key="test_avg", fix="rerun preprocessing.")
    voxels = {split: np.asarray(data[split].fmri, np.float64) for split in splits}
    images = {split: stimuli.lookup(list(data[split].stimulus_id))[0] for split in splits}
    labels = np.asarray(data["test_avg"].label)
    novel = {int(c) for c in stimuli.novel_classes}
    return {"voxels": voxels, "images": images, "labels": labels.tolist(),
            "category": ["novel" if int(label) in novel else "seen" for label in labels], "stimulus_ids": test_ids,
            "sizes": {"n_train": len(voxels["train"]), "n_val": len(voxels["val"]), "n_test": len(test_ids),
                      "n_voxels": voxels["train"].shape[1]}}


def block_scale(train):
    """The total SD of a block's training rows [N, D] (sqrt of the summed column variances; 0 -> 1)."""
    total = float(np.sqrt(np.asarray(train).var(axis=0).sum()))
    return total if total > 0 else 1.0


def train_ridge_concat(x_train, x_val, first, second, weights=CONCAT_WEIGHTS, alphas=RIDGE_ALPHAS):
    """Ridge into [first / sd1, w * second / sd2] (each block at unit total variance on train), w and alpha best on
    val identification in the concatenated space. ``first`` and ``second`` are (train, val) pairs of targets.

    Returns ``predict(x)`` (into the concatenated space of the chosen w), ``concat(first, second)`` (targets into that
    space) and the record.
    """
    tick = time.perf_counter()
    scales = block_scale(first[0]), block_scale(second[0])
    fits = []
    for weight in weights:
        def join(a, b, weight=weight):
            return np.hstack([np.asarray(a) / scales[0], weight * np.asarray(b) / scales[1]])

        predict, record = train_ridge(x_train, join(first[0], second[0]), x_val, join(first[1], second[1]), alphas)
        fits.append((record["val_identification"], weight, predict, join, record))
    _, weight, predict, join, record = max(fits, key=lambda fit: fit[0])
    record = {**record, "weight": float(weight), "block_scales": list(scales),
              "val_identification_per_weight": {str(fit[1]): fit[0] for fit in fits},
              "seconds": round(time.perf_counter() - tick, 1)}
    return predict, join, record


def prototypes(pool_embeddings, pool_labels, n_classes):
    """Mean embedding of each class's labelled pool images: [n_classes, D]."""
    pool_labels = np.asarray(pool_labels)
    missing = [c for c in range(n_classes) if not (pool_labels == c).any()]
    if missing:
        raise MindvisError(f"the stimulus pool has no labelled image of classes {missing}", key="pool",
                           fix="use a stimulus set whose pool holds labelled images of every class (stimuli.n_pool).")
    return np.stack([np.asarray(pool_embeddings)[pool_labels == c].mean(0) for c in range(n_classes)])


def nearest_prototype(embeddings, class_prototypes):
    """The class of each row's nearest prototype (cosine, uncentred as the evaluate stage's): int [N]."""
    ours = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    theirs = class_prototypes / np.maximum(np.linalg.norm(class_prototypes, axis=1, keepdims=True), 1e-12)
    return (ours @ theirs.T).argmax(1)


def prototype_correct(embeddings, class_prototypes, labels):
    """1 where the nearest prototype is the stimulus's class, else 0: float [N]."""
    return (nearest_prototype(embeddings, class_prototypes) == np.asarray(labels)).astype(np.float64)


def run_subject(subject_data, embedders, pool, arms, seed=0, label=""):
    """Every arm of one subject: per-stimulus test metrics and selection records.

    ``embedders``: ``{space: images -> float [N, D]}`` for ``prior``, ``simclr``, ``simclr-untrained``;
    ``pool``: ``(images, labels, n_classes)`` for the prototypes.
    """
    mean, sd = standardiser(subject_data["voxels"]["train"])
    x_train, x_val, x_test = ((subject_data["voxels"][s] - mean) / sd for s in ("train", "val", "test_avg"))
    spaces = {ARMS[arm][0] for arm in arms} | ({"prior", "simclr"} if "concat" in arms else set())
    spaces.discard("concat")
    targets = {space: {split: embedders[space](subject_data["images"][split]) for split in ("train", "val",
                                                                                            "test_avg")}
               for space in spaces}
    pool_images, pool_labels, n_classes = pool
    pool_embeddings = {space: embedders[space](pool_images) for space in spaces}
    labels = subject_data["labels"]
    entry = {key: subject_data[key] for key in ("labels", "category", "stimulus_ids", "sizes")}
    entry["arms"] = {}
    for arm in arms:
        space, shuffled = ARMS[arm]
        if space == "concat":
            predict, join, record = train_ridge_concat(x_train, x_val, (targets["prior"]["train"],
                                                                        targets["prior"]["val"]),
                                                       (targets["simclr"]["train"], targets["simclr"]["val"]))
            truth = join(targets["prior"]["test_avg"], targets["simclr"]["test_avg"])
            class_prototypes = prototypes(join(pool_embeddings["prior"], pool_embeddings["simclr"]), pool_labels,
                                          n_classes)
        else:
            y_train = targets[space]["train"]
            if shuffled:
                y_train = y_train[np.random.default_rng(seed).permutation(len(y_train))]
            predict, record = train_ridge(x_train, y_train, x_val, targets[space]["val"])
            truth = targets[space]["test_avg"]
            class_prototypes = prototypes(pool_embeddings[space], pool_labels, n_classes)
        predicted = predict(x_test)
        values = {**test_metrics(predicted, truth), "prototype": prototype_correct(predicted, class_prototypes,
                                                                                     labels)}
        entry["arms"][arm] = {
            "record": record, "per_stimulus": {m: [float(v) for v in values[m]] for m in METRICS},
            "predicted_class": nearest_prototype(predicted, class_prototypes).tolist(),
            # The prototype read-out's ceiling in this space: the true test images' own embeddings.
            "ceiling_prototype": prototype_correct(truth, class_prototypes, labels).tolist()}
        print(f"{label}{arm}: val identification {record['val_identification']:.3f}; test "
              + ", ".join(f"{m} {np.mean(values[m]):.3f}" for m in METRICS) + f" ({record['seconds']:.0f} s)",
              flush=True)
    return entry


# -- aggregation -----------------------------------------------------------------------------------

def _row(entry, arm, metric):
    return np.asarray(entry["arms"][arm]["per_stimulus"][metric], np.float64)[None, :]


def aggregate(results, arms, n_boot):
    """Rows and paired differences against :data:`REFERENCE`, per subject and over subjects, and val scores."""
    tables = {}
    for scope in [*results, "mean"]:
        subjects = list(results) if scope == "mean" else [scope]
        table = tables.setdefault(scope, {"rows": {}, "differences": {}, "val": {}})
        rows_and_differences(table, results, subjects, arms, n_boot, _row, METRICS, REFERENCE)
        for arm in arms:
            table["val"][arm] = float(np.mean([results[s]["arms"][arm]["record"]["val_identification"]
                                               for s in subjects]))
            if ARMS[arm][1]:
                continue  # a floor's space is its arm's
            for subset in SUBSETS:
                got = [_subset(results[s], np.asarray(results[s]["arms"][arm]["ceiling_prototype"], np.float64)[None],
                               subset) for s in subjects]
                table.setdefault("ceiling", {}).setdefault(arm, {})[subset] = summarise(
                    [g[0] for g in got], [g[1] for g in got], n_boot, 0)
    return tables


def _verdict(summary):
    if summary["above_zero"]:
        return "above zero"
    return "below zero" if summary["below_zero"] else "the interval spans zero"


def reading(tables, arms):
    """Plain sentences on the mean over subjects: which embedding decodes better, and on novel classes."""
    table = tables["mean"]
    lines = []
    if "simclr" not in arms or REFERENCE not in arms:
        return lines
    for metric, what in (("brain_to_image", "comparable figure: retrieval among the same test images"),
                         ("image_to_brain", "the other direction"),
                         ("prototype", "the semantic figure, a diagnostic: labels at test time only")):
        parts = []
        for subset in SUBSETS:
            rows = table["rows"][metric][subset]
            difference = table["differences"][metric][subset]["simclr"]
            parts.append(f"{subset} simclr {_fmt(rows['simclr'])} vs prior {_fmt(rows['prior'])}, difference "
                         f"{_fmt(difference, signed=True)} ({_verdict(difference)})")
        lines.append(f"{METRIC_NAMES[metric].capitalize()} ({what}): " + "; ".join(parts) + ".")
    comparable = [table["differences"][m]["all"]["simclr"] for m in ("brain_to_image", "image_to_brain")]
    if all(d["above_zero"] for d in comparable):
        verdict = "the SimCLR embedding decodes better than the prior's (retrieval, both directions)"
    elif any(d["below_zero"] for d in comparable) and not any(d["above_zero"] for d in comparable):
        verdict = "the prior's embedding decodes better than the SimCLR embedding (retrieval)"
    else:
        verdict = "neither embedding decodes clearly better on retrieval (an interval spans zero or they disagree)"
    novel = table["differences"]["prototype"]["novel"]["simclr"]
    novel_retrieval = table["differences"]["brain_to_image"]["novel"]["simclr"]
    lines.append(f"In short: {verdict}. Novel classes: nearest-prototype {_fmt(novel, signed=True)} "
                 f"({_verdict(novel)}), brain -> image retrieval {_fmt(novel_retrieval, signed=True)} "
                 f"({_verdict(novel_retrieval)}), SimCLR minus prior.")
    floor = table["rows"]["prototype"]["novel"].get("simclr-shuffled")
    ceilings = table.get("ceiling", {})
    if floor is not None and "simclr" in ceilings:
        lines.append(f"Caveat on novel classes: there are 3 of them, so a near-constant prediction that falls on one "
                     f"scores about 1/3 of novel stimuli; the shuffled-pairs floor reaches {_fmt(floor)} there "
                     f"(prior-shuffled {_fmt(table['rows']['prototype']['novel']['prior-shuffled'])}). Which classes "
                     "each arm predicts is in the JSON (predicted_class). Ceiling of the prototype read-out (the "
                     f"true test images' own embeddings): prior all {_fmt(ceilings['prior']['all'])}, novel "
                     f"{_fmt(ceilings['prior']['novel'])}; simclr all {_fmt(ceilings['simclr']['all'])}, novel "
                     f"{_fmt(ceilings['simclr']['novel'])}.")
    if "concat" in arms:
        parts = [f"{METRIC_NAMES[m]}, {s} {_fmt(table['differences'][m][s]['concat'], signed=True)} "
                 f"({_verdict(table['differences'][m][s]['concat'])})"
                 for m in ("brain_to_image", "image_to_brain", "prototype") for s in ("all", "novel")]
        lines.append("Both embeddings at once (concat, in its own space, SimCLR block weight chosen on val) minus "
                     "prior: " + "; ".join(parts) + ".")
    return lines


# -- report ----------------------------------------------------------------------------------------

def markdown(report):
    meta, tables, results = report["meta"], report["aggregate"], report["results"]
    arms = meta["arms"]
    sizes = {subject: entry["sizes"] for subject, entry in results.items()}
    n_test = sorted({s["n_test"] for s in sizes.values()})
    encoder = meta["encoder"]
    last = encoder["history"][-1] if encoder["history"] else {}
    lines = ["# A semantic, label-free embedding: SimCLR against the prior's embedding (issue 34)", "",
             f"`{meta['command']}`", "",
             (f"Machine: {meta['machine'].get('cpu')}, {meta['machine'].get('cores')} cores "
              f"({meta['machine'].get('torch_threads')} torch thread), torch {meta['machine'].get('torch')}; "
              f"wall time {meta['wall_time_s'] / 60:.1f} min ("
              + (f"the encoder loaded from the work folder, where an earlier run of this command with the same "
                 f"settings, seed and corpus trained it in {encoder['train_s'] / 60:.1f} min, not counted here"
                 if encoder["reused"] else f"encoder training {encoder['train_s'] / 60:.1f} min") + "). Results folder "
              f"`{meta['results']}`, prior `{meta['prior']}`."), "",
             (f"Encoder: SimCLR (NT-Xent, temperature {encoder['settings']['temperature']}), conv widths "
              f"{list(encoder['settings']['widths'])}, batch {encoder['settings']['batch_size']}, "
              f"{encoder['settings']['epochs']} epochs, seed {meta['seed']}, on {encoder['n_images']} images of "
              f"`{encoder['corpus']}` (the training file only, no labels); last epoch: loss {last.get('loss', 0):.3f}, "
              f"positive top-1 in the batch {last.get('positive_top1', 0):.3f}. Embedding: the 128-d backbone output, "
              "L2-normalised."), "",
             "Per subject: " + "; ".join(f"{subject} {s['n_train']} train / {s['n_val']} val / {s['n_test']} test "
                                          f"stimuli, {s['n_voxels']} voxels" for subject, s in sizes.items())
             + f". Ridge from the voxels, alpha by val identification, fit on train. Metrics on test_avg; chance: "
             f"identification 0.5, retrieval 1/{'/'.join(map(str, n_test))}, prototype 0.1. Intervals: 95 % "
             "percentile bootstrap over the test stimuli resampled by class (the mean over subjects resamples "
             "each subject; novel stimuli are 3 classes, so their intervals are coarse); differences are paired "
             f"by stimulus against {REFERENCE}. {', '.join(FLOORS)}: floors (ridge on shuffled training pairs).", "",
             ("**Yardsticks.** Identification and retrieval are computed in each arm's own embedding space, so "
             "identification in two spaces is not one yardstick (a space whose test images are easier to tell "
             "apart scores higher for the same brain information). Retrieval among the same test images is the "
             "comparable figure; the nearest-class-prototype read-out (class prototypes: the mean embedding of the "
             "labelled pool images; labels used at test time only, a diagnostic as the evaluate stage's "
             "embedding-prototype row) is the semantic figure. The concat arm's block weight is chosen on val in "
             "its own space."), "",
             "## Reading", "", *[f"- {line}" for line in reading(tables, arms)], "",
             "## Diagnostic: leave-one-out k-NN label accuracy of the pool images", "",
             (f"Labels read for this diagnostic only; k = {KNN_K}, cosine, {meta['knn']['n_images']} pool "
              "images, chance 0.1."), "", "| embedding | k-NN accuracy |", "|---|---|",
             *[f"| {name} | {value:.3f} |" for name, value in meta["knn"]["accuracy"].items()], ""]
    for scope, table in tables.items():
        if scope == "mean" and len(results) == 1:
            continue
        title = f"mean of {len(results)} subjects" if scope == "mean" else scope
        lines += [f"## {title}", ""]
        for metric in METRICS:
            lines += [f"### {METRIC_NAMES[metric]}", "",
                      "| arm | val identification | " + " | ".join(SUBSETS) + " | "
                      + " | ".join(f"- {REFERENCE}: {s}" for s in SUBSETS) + " |",
                      "|---|---|" + "---|" * (2 * len(SUBSETS))]
            for arm in arms:
                cells = [_fmt(table["rows"].get(metric, {}).get(s, {}).get(arm)) for s in SUBSETS]
                for subset in SUBSETS:
                    summary = table["differences"].get(metric, {}).get(subset, {}).get(arm)
                    cells.append("–" if summary is None else _fmt(summary, signed=True)
                                 + (" **>0**" if summary["above_zero"] else " <0" if summary["below_zero"] else ""))
                lines.append(f"| {arm} | {table['val'][arm]:.3f} | " + " | ".join(cells) + " |")
            lines.append("")
            if metric == "prototype" and table.get("ceiling"):
                lines += ["Ceiling: the same read-out of the true test images' own embeddings, per space.", "",
                          "| space | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * len(SUBSETS),
                          *[f"| {arm} | " + " | ".join(_fmt(by_subset[s]) for s in SUBSETS) + " |"
                            for arm, by_subset in table["ceiling"].items()], ""]
    lines += ["## Selection (val split only)", ""]
    for subject, entry in results.items():
        parts = []
        for arm, cell in entry["arms"].items():
            record = cell["record"]
            weight = f", SimCLR block weight {record['weight']:g}" if "weight" in record else ""
            parts.append(f"{arm} alpha {record['alpha']:g}{weight} (val {record['val_identification']:.3f})")
        lines.append(f"- {subject}: " + "; ".join(parts))
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results", help="a finished `make decode` results folder")
    parser.add_argument("--subjects", nargs="+", default=["sub-01", "sub-02", "sub-03"])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--stimuli", default=None, help="default: {results}/bids/stimuli/stimuli.h5")
    parser.add_argument("--prior", default=None, help="default: the bundled prior-fashion-mnist")
    parser.add_argument("--corpus", default=str(BUNDLED_FASHION_MNIST),
                        help="a Fashion-MNIST folder; only its training images file is read")
    parser.add_argument("--epochs", type=int, default=SimCLRSettings.epochs)
    parser.add_argument("--seed", type=int, default=0, help="the encoder's seed")
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) the trained encoder here")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)  # BLAS and the torch already imported
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    settings = SimCLRSettings(epochs=args.epochs)
    try:
        from mindvis.data.images import images_to_tensor
        from mindvis.data.stimuli import load_stimulus_set
        from mindvis.models.bundled import BUNDLED_PRIOR
        from mindvis.models.ldm import load_generator

        prior_dir = Path(args.prior) if args.prior else BUNDLED_PRIOR
        generator = load_generator(prior_dir)
        stimuli_path = Path(args.stimuli) if args.stimuli else Path(args.results) / "bids" / "stimuli" / "stimuli.h5"
        stimuli = load_stimulus_set(stimuli_path)
        corpus, corpus_path = load_corpus(args.corpus)
        print(f"corpus: {len(corpus)} images from {corpus_path}", flush=True)
        model, history, train_s, reused = encoder_for(corpus, corpus_path, settings, args.seed, args.work_dir)
        torch.manual_seed(args.seed)
        untrained = ConvEncoder(settings.widths, settings.projection_dim).eval()

        def prior_embed(images):
            tensor = images_to_tensor(images, generator.image_size, generator.image_channels)
            return generator.embed_all(tensor).flatten(1).double().cpu().numpy()

        embedders = {"prior": prior_embed, "simclr": lambda images: embed(model, images),
                     "simclr-untrained": lambda images: embed(untrained, images)}
        pool = stimuli["pool"]
        labelled = np.asarray(pool.label) >= 0
        pool_images, pool_labels = pool.images[labelled], np.asarray(pool.label)[labelled]
        knn = {"n_images": int(labelled.sum()), "k": KNN_K, "accuracy": {
            "simclr": knn_accuracy(embedders["simclr"](pool_images), pool_labels),
            "simclr-untrained": knn_accuracy(embedders["simclr-untrained"](pool_images), pool_labels),
            "prior": knn_accuracy(prior_embed(pool_images), pool_labels),
            "pixels": knn_accuracy(pool_images.reshape(len(pool_images), -1).astype(np.float64), pool_labels)}}
        print("k-NN diagnostic on the pool: " + ", ".join(f"{k} {v:.3f}" for k, v in knn["accuracy"].items()),
              flush=True)
        results = {}
        for subject in args.subjects:
            subject_data = load_subject(args.results, subject, stimuli)
            results[subject] = run_subject(subject_data, embedders, (pool_images, pool_labels, stimuli.n_classes),
                                           args.arms, seed=args.seed, label=f"{subject} ")
    except MindvisError as error:
        sys.exit(f"semantic_embedding: {error}")
    tables = aggregate(results, args.arms, args.n_boot)
    meta = {"command": " ".join(["python", "benchmarks/semantic_embedding.py", *(argv if argv is not None
                                                                                 else sys.argv[1:])]),
            "results": str(args.results), "prior": str(prior_dir), "arms": args.arms, "seed": args.seed,
            "encoder": {"settings": asdict(settings), "corpus": str(corpus_path), "n_images": len(corpus),
                        "corpus_sha256_16": file_digest(corpus_path), "history": history,
                        "train_s": round(train_s, 1), "reused": reused},
            "knn": knn, "ridge_alphas": list(RIDGE_ALPHAS), "concat_weights": list(CONCAT_WEIGHTS),
            "n_boot": args.n_boot, "machine": machine(), "versions": software_versions(),
            "wall_time_s": round(time.perf_counter() - started, 1)}
    report = {"meta": meta, "aggregate": tables, "results": results}
    write_json_atomic(f"{args.out}.json", report)
    Path(f"{args.out}.md").write_text(markdown(report) + "\n")
    print("\n".join(reading(tables, args.arms)))
    print(f"wrote {args.out}.json and .md ({meta['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
