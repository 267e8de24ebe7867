"""Brain -> prior embedding trained for identification: ridge and residual-MLP arms, with intervals (issue 34).

Issue 34's first item, measured before it is built into the decoder: which model
maps fMRI onto the prior's embedding of the seen image best for telling the
images apart, from which input (the voxels, the SC-MBM tokens, both), and
whether MindEye's contrastive term (Scotti et al., NeurIPS 2023: BiMixCo, then
SoftCLIP; here also plain symmetric InfoNCE) adds to regression. No image is
sampled: this is about the embedding alone (the evaluate stage draws images).
Run it after ``make decode`` on the finished results folder::

    python benchmarks/brain_embedding.py [--results results] [--subjects sub-01 ...] [--seeds 0 1 2]
        [--arms ridge-voxels ...] [--decoder dcldm/start] [--prior PATH] [--epochs 60] [--patience N]
        [--n-boot 2000] [--out benchmarks/results/brain_embedding] [--threads 1]

Inputs, per subject: ``{results}/{subject}/responses.h5`` (splits train, val,
test_avg), ``{results}/bids/stimuli/stimuli.h5``, the decoder
``{results}/{subject}/{decoder}`` (default ``dcldm/start``: the subject-adapted
SC-MBM encoder before fine-tuning; its read-out features give the tokens: the
first ``input_tokens * input_dim`` columns, each token standardised) and the
prior (default the bundled ``prior-fashion-mnist``; the decoder must record the
same files). The target of every trial is the prior's embedding of its seen
image (``Generator.embed_all``, [16, 8] flattened to 128).

Arms (targets and inputs standardised per column with the training trials' statistics)
--------------------------------------------------------------------------------------
``ridge-voxels``, ``ridge-tokens``, ``ridge-both``
    scikit-learn ridge (:func:`mindvis.models.linear.fit_ridge`), alpha in 1 .. 1e5 chosen by two-way
    identification on the val trials, the chosen fit being the one on the training trials; ``both``
    concatenates the blocks and also chooses the voxel block's weight (1, 4, 16, 64) on val.
``ridge-voxels-shuffled``
    The floor: ``ridge-voxels`` fitted on shuffled training pairs (selected on val the same way).
``mlp-mse-voxels``, ``mlp-nce-voxels``, ``mlp-mixco-voxels``, ``mlp-nce-tokens`` (and ``mlp-nce-both``, not run
by default)
    A residual MLP (input dropout, Linear -> LayerNorm -> GELU -> Dropout, 2 residual blocks of width 512,
    a linear head), AdamW (lr 3e-4, weight decay 0.05, batch 64), up to 60 epochs, the epoch with the best
    val identification kept. Loss: ``mse`` mean squared error on the standardised targets; ``nce`` plus a
    symmetric InfoNCE between the predicted and true embeddings of the batch (cosine, temperature 0.1, weight
    1); ``mixco`` MindEye's schedule: BiMixCo for the first third of the epochs (half the batch's inputs mixed
    with another trial's, Beta(0.15, 0.15); soft bidirectional InfoNCE over the mixing weights; the squared
    error on the unmixed rows only, a mixed input having no target of its own), then SoftCLIP (InfoNCE against
    the softmax of the true embeddings' own similarities) with the squared error. Seeded (``--seeds``).

Every selection (alpha, block weight, epoch) reads the val split only, in the
prior's embedding space (predictions mapped back from the standardised targets),
with :func:`mindvis.models.linear.identification`: no labels, no test trial.

Metrics, on test_avg (one row per test stimulus)
------------------------------------------------
``identification``: per stimulus, the share of the other test images whose embedding is less similar to the
decoded one than its own (centred cosine: :func:`mindvis.models.linear.identification`, per row; chance 0.5).
``brain_to_image`` / ``image_to_brain``: top-1 retrieval among all test stimuli
(:func:`mindvis.evaluate.metrics.embedding_retrieval`, centred cosine, ties split; chance 1/N). Labels name only
the seen / novel subsets (``stimuli.novel_classes``) and the bootstrap's class clusters.

Intervals: :func:`decoder_seeds.summarise` (percentile bootstrap resampling seeds and, within a subject, the test
stimuli by class; the mean over subjects resamples each subject). Paired differences against ``ridge-voxels`` are
per seed and stimulus (the ridge is one deterministic row).

Outputs: ``{out}.json`` (per-stimulus values of every arm and seed, every selection record and training
history, timings, machine) and ``{out}.md``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoder_seeds import summarise
from learning_curve import SUBSETS, machine, subset_index

from mindvis.errors import MindvisError
from mindvis.evaluate.metrics import embedding_retrieval
from mindvis.models.linear import fit_ridge, identification
from mindvis.utils.io import set_threads, software_versions, write_json_atomic

log = logging.getLogger("brain_embedding")

DEFAULT_OUT = "benchmarks/results/brain_embedding"
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
VOXEL_BLOCK_WEIGHTS = (1.0, 4.0, 16.0, 64.0)
METRICS = ("identification", "brain_to_image", "image_to_brain")
METRIC_NAMES = {"identification": "two-way identification", "brain_to_image": "retrieval brain -> image, top-1",
                "image_to_brain": "retrieval image -> brain, top-1"}
#: name -> (model, input, loss); the order is the tables'.
ARMS = {
    "ridge-voxels": ("ridge", "voxels", None),
    "ridge-tokens": ("ridge", "tokens", None),
    "ridge-both": ("ridge", "both", None),
    "ridge-voxels-shuffled": ("ridge-shuffled", "voxels", None),
    "mlp-mse-voxels": ("mlp", "voxels", "mse"),
    "mlp-nce-voxels": ("mlp", "voxels", "nce"),
    "mlp-mixco-voxels": ("mlp", "voxels", "mixco"),
    "mlp-nce-tokens": ("mlp", "tokens", "nce"),
    "mlp-nce-both": ("mlp", "both", "nce"),
}
DEFAULT_ARMS = [name for name in ARMS if name != "mlp-nce-both"]
REFERENCE = "ridge-voxels"
FLOOR = "ridge-voxels-shuffled"


# -- the model ------------------------------------------------------------------------

@dataclass
class MLPSettings:
    """The residual MLP and its training (MindEye's backbone, scaled to mindvis's 128-d prior embedding)."""

    width: int = 512
    n_blocks: int = 2
    input_dropout: float = 0.2
    dropout: float = 0.15
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 64
    epochs: int = 60
    patience: int | None = None  # stop after this many epochs without a better val score (None: all epochs)
    temperature: float = 0.1
    contrastive_weight: float = 1.0
    mix_share: float = 1 / 3  # the share of the epochs trained with BiMixCo (mixco loss)
    mix_beta: float = 0.15
    mix_prob: float = 0.5


class ResidualMLP(nn.Module):
    """fMRI features [B, F] -> embedding [B, D]: input dropout, a stem, residual blocks, a linear head."""

    def __init__(self, n_inputs, n_outputs, width=512, n_blocks=2, input_dropout=0.2, dropout=0.15):
        super().__init__()

        def block(n_in):
            return nn.Sequential(nn.Linear(n_in, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout))

        self.input_dropout = nn.Dropout(input_dropout)
        self.stem = block(n_inputs)
        self.blocks = nn.ModuleList(block(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, n_outputs)

    def forward(self, features):
        hidden = self.stem(self.input_dropout(features))
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)


# -- losses -----------------------------------------------------------------------------

def symmetric_infonce(predicted, target, temperature):
    """CLIP's loss between the batch's predicted and true embeddings [B, D] (cosine / temperature, both ways)."""
    logits = F.normalize(predicted, dim=1) @ F.normalize(target, dim=1).T / temperature
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def mixco(features, beta, prob):
    """MindEye's MixCo: a random ``prob`` of the rows mixed with the row ``perm`` names, weight ``betas`` on their
    own (1 for unmixed rows). Returns mixed features [B, F], ``perm`` [B], ``betas`` [B], ``mixed`` [B] bool."""
    perm = torch.randperm(len(features))
    betas = torch.distributions.Beta(beta, beta).sample((len(features),))
    mixed = torch.rand(len(features)) <= prob
    betas = torch.where(mixed, betas, torch.ones_like(betas))
    return betas[:, None] * features + (1 - betas[:, None]) * features[perm], perm, betas, mixed


def mixco_nce(predicted, target, perm, betas, temperature):
    """BiMixCo: InfoNCE both ways whose targets are the mixing weights (own row ``betas``, the mixed-in row
    ``1 - betas``)."""
    logits = F.normalize(predicted, dim=1) @ F.normalize(target, dim=1).T / temperature
    probs = torch.diag(betas)
    probs[torch.arange(len(perm)), perm] += 1 - betas
    forward = -(logits.log_softmax(-1) * probs).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * probs.T).sum(-1).mean()
    return (forward + backward) / 2


def soft_clip(predicted, target, temperature):
    """SoftCLIP: InfoNCE both ways against the softmax of the true embeddings' similarities to each other."""
    predicted, target = F.normalize(predicted, dim=1), F.normalize(target, dim=1)
    soft = (target @ target.T / temperature).softmax(-1)
    logits = predicted @ target.T / temperature
    forward = -(logits.log_softmax(-1) * soft).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * soft).sum(-1).mean()
    return (forward + backward) / 2


def batch_loss(model, features, target, loss, settings, mixing):
    """One batch's loss: squared error, plus the arm's contrastive term."""
    if loss == "mixco" and mixing:
        mixed_features, perm, betas, mixed = mixco(features, settings.mix_beta, settings.mix_prob)
        predicted = model(mixed_features)
        squared = F.mse_loss(predicted[~mixed], target[~mixed]) if (~mixed).any() else predicted.sum() * 0
        return squared + settings.contrastive_weight * mixco_nce(predicted, target, perm, betas,
                                                                 settings.temperature)
    predicted = model(features)
    squared = F.mse_loss(predicted, target)
    if loss == "mse":
        return squared
    contrastive = (soft_clip if loss == "mixco" else symmetric_infonce)(predicted, target, settings.temperature)
    return squared + settings.contrastive_weight * contrastive


# -- fitting --------------------------------------------------------------------------------

def standardiser(train):
    """Column mean and SD of ``train`` [N, F] (SD 0 -> 1, so a constant column becomes 0)."""
    mean, sd = train.mean(axis=0), train.std(axis=0)
    return mean, np.where(sd > 0, sd, 1.0)


def _predict(model, features, batch_size=512):
    model.eval()
    with torch.no_grad():
        rows = [model(torch.as_tensor(features[i:i + batch_size], dtype=torch.float32))
                for i in range(0, len(features), batch_size)]
    return torch.cat(rows).double().numpy()


def train_mlp(x_train, y_train, x_val, y_val, loss, settings, seed):
    """Fit a :class:`ResidualMLP` on standardised inputs and targets; keep the epoch best on val identification.

    Parameters
    ----------
    x_train, x_val : float [N, F]
        Standardised inputs.
    y_train, y_val : float [N, D]
        Targets in the prior's embedding space (standardised here with the training statistics).
    loss : {'mse', 'nce', 'mixco'}
    settings : MLPSettings
    seed : int

    Returns
    -------
    predict : callable
        Standardised inputs [M, F] -> embeddings [M, D] in the prior's space.
    record : dict
        ``best_epoch``, ``val_identification`` (of the kept epoch), ``history`` (per epoch: train loss and val
        identification), ``epochs_run``, ``seconds``.
    """
    tick = time.perf_counter()
    torch.manual_seed(seed)
    mean, sd = standardiser(y_train)
    model = ResidualMLP(x_train.shape[1], y_train.shape[1], settings.width, settings.n_blocks,
                        settings.input_dropout, settings.dropout)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    features = torch.as_tensor(x_train, dtype=torch.float32)
    targets = torch.as_tensor((y_train - mean) / sd, dtype=torch.float32)
    batch_size = min(settings.batch_size, len(features))
    mix_epochs = round(settings.mix_share * settings.epochs)
    best_score, best_epoch, best_state, history = -np.inf, 0, None, []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(len(features))
        losses = []
        # Full batches only: the contrastive term's difficulty depends on the batch's size.
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            value = batch_loss(model, features[rows], targets[rows], loss, settings, mixing=epoch <= mix_epochs)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            losses.append(value.item())
        score = identification(_predict(model, x_val) * sd + mean, y_val)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_identification": score})
        if score > best_score:
            best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        elif settings.patience and epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    record = {"best_epoch": best_epoch, "val_identification": float(best_score), "epochs_run": len(history),
              "history": history, "seconds": round(time.perf_counter() - tick, 1)}
    return (lambda x: _predict(model, x) * sd + mean), record


def train_ridge(x_train, y_train, x_val, y_val, alphas=RIDGE_ALPHAS):
    """Ridge on standardised inputs, alpha best on val identification, the fit on the training trials kept.

    The targets are fitted as they are: a ridge's outputs are separate problems, so standardising a target
    column scales and shifts its coefficients and predictions alike (the same model), and the selection then
    reads the prior's embedding space directly.
    """
    tick = time.perf_counter()
    model, info = fit_ridge(x_train, y_train, x_val, y_val, alphas, error="identification", what="ridge arm",
                            refit="train")
    scores = [1.0 - error for error in info["val_error"]]
    record = {"alpha": info["alpha"], "val_identification": float(max(scores)),
              "val_identification_per_alpha": dict(zip(map(str, info["alphas"]), scores)),
              "seconds": round(time.perf_counter() - tick, 1)}
    return model.predict, record


def train_ridge_both(voxels, tokens, y_train, y_val, weights=VOXEL_BLOCK_WEIGHTS, alphas=RIDGE_ALPHAS):
    """Ridge on [tokens, weight * voxels] (standardised blocks), the weight and alpha best on val identification.

    ``voxels`` and ``tokens`` are (train, val) pairs. Returns ``predict(voxels, tokens)`` and the record.
    """
    tick = time.perf_counter()
    fits = []
    for weight in weights:
        predict, record = train_ridge(np.hstack([tokens[0], weight * voxels[0]]), y_train,
                                      np.hstack([tokens[1], weight * voxels[1]]), y_val, alphas)
        fits.append((record["val_identification"], weight, predict, record))
        log.info("ridge-both, voxel block weight %g: alpha %g, val identification %.4f", weight, record["alpha"],
                 record["val_identification"])
    _, weight, predict, record = max(fits, key=lambda fit: fit[0])
    record = {**record, "voxel_weight": float(weight),
              "val_identification_per_weight": {str(fit[1]): fit[0] for fit in fits},
              "seconds": round(time.perf_counter() - tick, 1)}
    return (lambda v, t: predict(np.hstack([t, weight * v]))), record


# -- metrics ------------------------------------------------------------------------------

def identification_per_stimulus(decoded, truth):
    """Per row, :func:`mindvis.models.linear.identification`'s score ([N] float; its mean is that function's)."""
    decoded = np.asarray(decoded, np.float64).reshape(len(decoded), -1)
    truth = np.asarray(truth, np.float64).reshape(len(truth), -1)
    ours = decoded - decoded.mean(0)
    theirs = truth - truth.mean(0)
    ours /= np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    theirs /= np.maximum(np.linalg.norm(theirs, axis=1, keepdims=True), 1e-12)
    similarity = ours @ theirs.T
    return (similarity < similarity.diagonal()[:, None]).sum(1) / (len(truth) - 1)


def test_metrics(decoded, truth):
    """``{metric: float [N]}`` per test stimulus (row i of both arrays is stimulus i)."""
    brain_to_image, image_to_brain = embedding_retrieval(decoded, truth)
    return {"identification": identification_per_stimulus(decoded, truth), "brain_to_image": brain_to_image,
            "image_to_brain": image_to_brain}


# -- one subject ------------------------------------------------------------------------------

def load_subject(results_dir, subject, decoder, generator, prior_dir, stimuli_path=None):
    """Inputs, targets and test labels of one subject.

    Returns
    -------
    dict
        ``voxels`` and ``tokens``: ``{split: float64 [N, F]}``; ``targets``: ``{split: float64 [N, 128]}`` (the
        prior's embedding of each trial's image); ``labels`` (test_avg), ``category`` ('seen' / 'novel' per
        test stimulus), ``stimulus_ids``, ``sizes``.
    """
    from mindvis.data.pairs import paired_trials
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.models.dcldm import load_dcldm
    from mindvis.train.ridge_start import readout_features

    results_dir = Path(results_dir)
    responses_path = results_dir / subject / "responses.h5"
    stimuli_path = Path(stimuli_path) if stimuli_path else results_dir / "bids" / "stimuli" / "stimuli.h5"
    decoder_dir = results_dir / subject / decoder
    for path, fix in ((responses_path, "run `make decode` first, or pass --results to a finished results folder."),
                      (stimuli_path, "pass --stimuli to the stimulus HDF5 the responses were made with."),
                      (decoder_dir, "run `make decode` first, or pass --decoder to a fine-tuning output folder.")):
        if not path.exists():
            raise MindvisError("missing", path=path, fix=fix)
    splits = ("train", "val", "test_avg")
    data = load_responses(responses_path, splits=splits)
    stimuli = load_stimulus_set(stimuli_path)
    test_ids = [str(s) for s in data["test_avg"].stimulus_id]
    if len(set(test_ids)) != len(test_ids):
        raise MindvisError("test_avg holds a stimulus twice; the metrics need one row per stimulus",
                           path=responses_path, key="test_avg", fix="rerun preprocessing.")
    _, model, _ = load_dcldm(decoder_dir, base=prior_dir)
    if not hasattr(model.conditioner, "features"):
        raise MindvisError("this decoder has no read-out (an older mapper), so its tokens cannot be read",
                           path=decoder_dir / "conditioner", key="_class_name",
                           fix="pass --decoder to a folder fine-tuned with finetune.mapper: readout.")
    config = model.conditioner.config
    n_token_features = config.input_tokens * config.input_dim
    voxels, tokens, targets = {}, {}, {}
    for split in splits:
        fmri = np.asarray(data[split].fmri, np.float32)
        voxels[split] = fmri.astype(np.float64)
        # The read-out's features end with the scaled voxels (finetune.readout_inputs: both): the tokens only.
        tokens[split] = readout_features(model, fmri)[:, :n_token_features]
        images = paired_trials(data[split], stimuli, generator.image_size, generator.image_channels).images
        targets[split] = generator.embed_all(images).flatten(1).double().cpu().numpy()
    labels = np.asarray(data["test_avg"].label)
    novel = {int(c) for c in stimuli.novel_classes}
    return {"voxels": voxels, "tokens": tokens, "targets": targets, "labels": labels.tolist(),
            "category": ["novel" if int(label) in novel else "seen" for label in labels], "stimulus_ids": test_ids,
            "sizes": {"n_train": len(voxels["train"]), "n_val": len(voxels["val"]), "n_test": len(test_ids),
                      "n_voxels": voxels["train"].shape[1], "n_token_features": int(n_token_features),
                      "embedding_dim": targets["train"].shape[1]}}


def standardised_inputs(subject_data):
    """``{'voxels' | 'tokens' | 'both': (train, val, test_avg)}``, each column standardised by the training trials."""
    blocks = {}
    for name in ("voxels", "tokens"):
        mean, sd = standardiser(subject_data[name]["train"])
        blocks[name] = tuple((subject_data[name][split] - mean) / sd for split in ("train", "val", "test_avg"))
    blocks["both"] = tuple(np.hstack([t, v]) for t, v in zip(blocks["tokens"], blocks["voxels"]))
    return blocks


def run_arm(arm, blocks, targets, seed, settings):
    """Fit one arm (one seed) and decode the test stimuli: (test predictions [N, D], selection record)."""
    kind, source, loss = ARMS[arm]
    y_train, y_val = targets["train"], targets["val"]
    if kind == "ridge" and source == "both":
        predict, record = train_ridge_both(blocks["voxels"][:2], blocks["tokens"][:2], y_train, y_val)
        return predict(blocks["voxels"][2], blocks["tokens"][2]), record
    x_train, x_val, x_test = blocks[source]
    if kind == "ridge":
        predict, record = train_ridge(x_train, y_train, x_val, y_val)
    elif kind == "ridge-shuffled":
        shuffled = np.random.default_rng(seed).permutation(len(y_train))
        predict, record = train_ridge(x_train, y_train[shuffled], x_val, y_val)
    else:
        predict, record = train_mlp(x_train, y_train, x_val, y_val, loss, settings, seed)
    return predict(x_test), record


def run_subject(subject_data, arms, seeds, settings, label=""):
    """Every arm (every seed of a seeded arm) of one subject: per-stimulus test metrics and selection records."""
    blocks = standardised_inputs(subject_data)
    truth = subject_data["targets"]["test_avg"]
    entry = {key: subject_data[key] for key in ("labels", "category", "stimulus_ids", "sizes")}
    entry["arms"] = {}
    for arm in arms:
        arm_seeds = list(seeds) if ARMS[arm][0] == "mlp" else [0]
        cell = {"seeds": arm_seeds, "records": [], "per_stimulus": {metric: [] for metric in METRICS}}
        for seed in arm_seeds:
            predicted, record = run_arm(arm, blocks, subject_data["targets"], seed, settings)
            for metric, values in test_metrics(predicted, truth).items():
                cell["per_stimulus"][metric].append([float(v) for v in values])
            cell["records"].append({"seed": seed, **record})
            means = {metric: np.mean(cell["per_stimulus"][metric][-1]) for metric in METRICS}
            print(f"{label}{arm} seed {seed}: val identification {record['val_identification']:.3f}; test "
                  + ", ".join(f"{metric} {value:.3f}" for metric, value in means.items())
                  + f" ({record['seconds']:.0f} s)", flush=True)
        entry["arms"][arm] = cell
    return entry


# -- aggregation -----------------------------------------------------------------------------

def _matrix(entry, arm, metric):
    return np.asarray(entry["arms"][arm]["per_stimulus"][metric], np.float64)


def _subset(entry, matrix, subset):
    """The subset's columns of a [seeds, stimuli] matrix and its class clusters (lists of column indices)."""
    index = subset_index(entry["category"], subset)
    labels = np.asarray(entry["labels"])[index]
    return matrix[:, index], [np.flatnonzero(labels == label) for label in np.unique(labels)]


def rows_and_differences(table, results, subjects, arms, n_boot, matrix, metrics=METRICS, reference=REFERENCE):
    """Each arm's row and its paired difference against ``reference``, over ``subjects``, into ``table['rows']`` and
    ``table['differences']`` ([metric][subset][arm]); ``matrix(entry, arm, metric)`` gives [seeds, stimuli]."""
    for metric in metrics:
        for subset in SUBSETS:
            for arm in arms:
                got = [_subset(results[s], matrix(results[s], arm, metric), subset) for s in subjects]
                if all(g[0].shape[1] for g in got):
                    table["rows"].setdefault(metric, {}).setdefault(subset, {})[arm] = summarise(
                        [g[0] for g in got], [g[1] for g in got], n_boot, 0)
                if reference not in arms or arm == reference:
                    continue
                # The reference is one deterministic row: each seed of the arm pairs with it, stimulus by stimulus.
                got = [_subset(results[s], matrix(results[s], arm, metric) - matrix(results[s], reference, metric),
                               subset) for s in subjects]
                if all(g[0].shape[1] for g in got):
                    summary = summarise([g[0] for g in got], [g[1] for g in got], n_boot, 1)
                    summary.update(above_zero=summary["ci"][0] > 0, below_zero=summary["ci"][1] < 0)
                    table["differences"].setdefault(metric, {}).setdefault(subset, {})[arm] = summary


def aggregate(results, arms, n_boot):
    """Rows and paired differences against :data:`REFERENCE`, per subject and over subjects, and val scores."""
    tables = {}
    for scope in [*results, "mean"]:
        subjects = list(results) if scope == "mean" else [scope]
        table = tables.setdefault(scope, {"rows": {}, "differences": {}, "val": {}})
        rows_and_differences(table, results, subjects, arms, n_boot, _matrix)
        for arm in arms:
            per_subject = [np.mean([r["val_identification"] for r in results[s]["arms"][arm]["records"]])
                           for s in subjects]
            table["val"][arm] = float(np.mean(per_subject))
    return tables


def reading(tables, arms):
    """Plain sentences: what won on validation, and on test, over the subjects."""
    table = tables["mean"]
    candidates = [arm for arm in arms if arm != FLOOR]
    val_winner = max(candidates, key=lambda arm: table["val"][arm])
    lines = [f"On validation (val identification, mean over seeds and subjects) **{val_winner}** wins "
             f"({table['val'][val_winner]:.3f}; " + ", ".join(f"{arm} {table['val'][arm]:.3f}" for arm in candidates
                                                              if arm != val_winner) + ")."]
    for metric in METRICS:
        rows = table["rows"].get(metric, {}).get("all", {})
        if not rows:
            continue
        best = max(rows[arm]["value"] for arm in candidates if arm in rows)
        tied = [arm for arm in candidates if arm in rows and rows[arm]["value"] >= best - 1e-12]
        winner = tied[-1] if tied[-1] != REFERENCE else tied[0]  # of tied arms, one with a paired difference
        sentence = (f"On test, {METRIC_NAMES[metric]} (all stimuli): **{winner}** {rows[winner]['value']:.3f}"
                    + (f" (tied with {', '.join(arm for arm in tied if arm != winner)})" if len(tied) > 1 else ""))
        difference = table["differences"].get(metric, {}).get("all", {}).get(winner)
        if difference is not None:
            sign = ("above zero" if difference["above_zero"] else "below zero" if difference["below_zero"]
                    else "interval spans zero")
            sentence += (f", {difference['value']:+.3f} [{difference['ci'][0]:+.3f}, {difference['ci'][1]:+.3f}] "
                         f"against {REFERENCE} ({sign})")
        lines.append(sentence + ".")
    if val_winner != max((arm for arm in candidates if arm in table["rows"]["identification"]["all"]),
                         key=lambda arm: table["rows"]["identification"]["all"][arm]["value"]):
        lines.append("The validation winner is not the test winner on identification: the val split (trials of "
                     "training images, single trials) and test_avg (averaged trials, novel classes) differ.")
    return lines


# -- report -------------------------------------------------------------------------------------

def _fmt(summary, signed=False):
    if summary is None:
        return "–"
    sign = "+" if signed else ""
    low, high = summary["ci"]
    return f"{summary['value']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def markdown(report):
    meta, tables, results = report["meta"], report["aggregate"], report["results"]
    arms = meta["arms"]
    sizes = {subject: entry["sizes"] for subject, entry in results.items()}
    n_test = sorted({s["n_test"] for s in sizes.values()})
    lines = ["# Brain -> prior embedding, trained for identification (issue 34)", "",
             f"`{meta['command']}`", "",
             (f"Machine: {meta['machine'].get('cpu')}, {meta['machine'].get('cores')} cores "
              f"({meta['machine'].get('torch_threads')} torch thread), torch {meta['machine'].get('torch')}; "
              f"wall time {meta['wall_time_s'] / 60:.1f} min (loading {meta['load_s']:.0f} s). Inputs: the `make "
              f"decode` results folder of the command, decoder `{meta['decoder']}`, prior `{meta['prior']}`."),
             "",
             "Per subject: " + "; ".join(f"{subject} {s['n_train']} train / {s['n_val']} val / {s['n_test']} test "
                                          f"stimuli, {s['n_voxels']} voxels, {s['n_token_features']} token features"
                                          for subject, s in sizes.items())
             + f". Target: the prior's embedding of the seen image ({next(iter(sizes.values()))['embedding_dim']} "
             f"values). MLP seeds {meta['seeds']} (ridge: one deterministic fit). Metrics on test_avg, centred "
             f"cosine; chance: identification 0.5, retrieval 1/{'/'.join(map(str, n_test))}. Intervals: 95 % "
             "percentile bootstrap over seeds and test stimuli resampled by class (the mean over subjects "
             "resamples each subject); differences are paired by stimulus against ridge-voxels. "
             f"{FLOOR} is the floor (ridge on shuffled training pairs).", "",
             "## Reading", "", *[f"- {line}" for line in reading(tables, arms)], ""]
    for scope, table in tables.items():
        if scope == "mean" and len(results) == 1:
            continue  # the one subject's table
        title = f"mean of {len(results)} subjects" if scope == "mean" else scope
        lines += [f"## {title}", "", "| arm | val identification | "
                  + " | ".join(f"{METRIC_NAMES[m]}: {s}" for m in METRICS for s in SUBSETS) + " |",
                  "|---|---|" + "---|" * (len(METRICS) * len(SUBSETS))]
        for arm in arms:
            lines.append(f"| {arm} | {table['val'][arm]:.3f} | " + " | ".join(
                _fmt(table["rows"].get(m, {}).get(s, {}).get(arm)) for m in METRICS for s in SUBSETS) + " |")
        lines += ["", f"Paired differences, arm - {REFERENCE} (**>0** / <0: the interval excludes zero):", "",
                  "| arm | " + " | ".join(f"{m}: {s}" for m in METRICS for s in SUBSETS) + " |",
                  "|---|" + "---|" * (len(METRICS) * len(SUBSETS))]
        for arm in arms:
            if arm == REFERENCE:
                continue
            cells = []
            for metric in METRICS:
                for subset in SUBSETS:
                    summary = table["differences"].get(metric, {}).get(subset, {}).get(arm)
                    cells.append(_fmt(summary, signed=True) + (" **>0**" if summary and summary["above_zero"] else
                                                               " <0" if summary and summary["below_zero"] else ""))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Selection (val split only)", ""]
    for subject, entry in results.items():
        for arm, cell in entry["arms"].items():
            parts = []
            for record in cell["records"]:
                if "best_epoch" in record:
                    parts.append(f"seed {record['seed']}: epoch {record['best_epoch']}/{record['epochs_run']}, val "
                                 f"{record['val_identification']:.3f}, {record['seconds']:.0f} s")
                else:
                    weight = f", voxel weight {record['voxel_weight']:g}" if "voxel_weight" in record else ""
                    parts.append(f"alpha {record['alpha']:g}{weight}, val {record['val_identification']:.3f}, "
                                 f"{record['seconds']:.0f} s")
            lines.append(f"- {subject} {arm}: " + "; ".join(parts))
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results", help="a finished `make decode` results folder")
    parser.add_argument("--subjects", nargs="+", default=["sub-01", "sub-02", "sub-03"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the MLP arms' seeds")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--decoder", default="dcldm/start", help="the decoder folder under {results}/{subject}")
    parser.add_argument("--stimuli", default=None, help="default: {results}/bids/stimuli/stimuli.h5")
    parser.add_argument("--prior", default=None, help="default: the bundled prior-fashion-mnist")
    parser.add_argument("--epochs", type=int, default=MLPSettings.epochs)
    parser.add_argument("--patience", type=int, default=None, help="stop an MLP after N epochs without a better val")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)  # BLAS and the torch already imported
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    settings = MLPSettings(epochs=args.epochs, patience=args.patience)
    try:
        from mindvis.models.bundled import BUNDLED_PRIOR
        from mindvis.models.ldm import load_generator

        prior_dir = Path(args.prior) if args.prior else BUNDLED_PRIOR
        generator = load_generator(prior_dir)
        results, load_s = {}, 0.0
        for subject in args.subjects:
            tick = time.perf_counter()
            subject_data = load_subject(args.results, subject, args.decoder, generator, prior_dir, args.stimuli)
            load_s += time.perf_counter() - tick
            results[subject] = run_subject(subject_data, args.arms, args.seeds, settings, label=f"{subject} ")
    except MindvisError as error:
        sys.exit(f"brain_embedding: {error}")
    tables = aggregate(results, args.arms, args.n_boot)
    meta = {"command": " ".join(["python", "benchmarks/brain_embedding.py", *(argv if argv is not None
                                                                              else sys.argv[1:])]),
            "results": str(args.results), "decoder": args.decoder, "prior": str(prior_dir), "arms": args.arms,
            "seeds": args.seeds, "mlp": asdict(settings), "ridge_alphas": list(RIDGE_ALPHAS),
            "voxel_block_weights": list(VOXEL_BLOCK_WEIGHTS), "n_boot": args.n_boot, "machine": machine(),
            "versions": software_versions(), "load_s": round(load_s, 1),
            "wall_time_s": round(time.perf_counter() - started, 1)}
    report = {"meta": meta, "aggregate": tables, "results": results}
    write_json_atomic(f"{args.out}.json", report)
    Path(f"{args.out}.md").write_text(markdown(report) + "\n")
    print("\n".join(reading(tables, args.arms)))
    print(f"wrote {args.out}.json and .md ({meta['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
