"""Training the domain classifier on the stimulus set's training images (the ``train_classifier`` stage).

The network and its folder's files are described in
:mod:`mindvis.models.classifiers.domain`; training goes through the shared
engine (:mod:`mindvis.train.engine`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.config import section_settings
from mindvis.data.stimuli import load_stimulus_set
from mindvis.models.augment import augment_images
from mindvis.models.classifiers.domain import METRICS_FILE, DomainClassifier
from mindvis.train.engine import Trainer, TrainConfig, checkpoint_minutes
from mindvis.utils.io import derive_seed, seed_everything, software_versions, write_json_atomic

log = logging.getLogger(__name__)


def top1_accuracy(classifier, images, labels):
    """Fraction of images whose most probable class is ``labels`` (int [N])."""
    if len(images) == 0:
        return float("nan")
    return float(np.mean(classifier.predict_proba(images).argmax(axis=1) == np.asarray(labels)))


class _ImageData:
    """In-memory images for the engine's fast path: ``get_batch(indices) -> {images, labels}``."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices):
        return {"images": self.images[indices], "labels": self.labels[indices]}


def stratified_holdout(labels, fraction, seed):
    """Boolean mask ``[N]`` holding out ``fraction`` of each class (at least one when the class has two)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        count = int(round(fraction * len(rows)))
        count = min(max(count, 1 if len(rows) > 1 else 0), len(rows) - 1)
        held[rng.choice(rows, size=count, replace=False)] = True
    return held


def train_classifier(config, stimuli_path, out_dir, resume=False):
    """Train the domain classifier on the training images and the labelled pool images; write it to ``out_dir``.

    Parameters
    ----------
    config : dict
        The experiment config; its ``classifier`` section holds the
        training settings (schema defaults fill what it leaves out).
    stimuli_path : str or Path
        ``stimuli.h5``; its ``train`` split and the labelled images of its ``pool`` are read for
        training (a stratified part held out), never ``test``.
    out_dir : str or Path

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    settings = section_settings(config, "classifier")
    out_dir = Path(out_dir)
    seed = derive_seed(config["seed"], "classifier")
    seed_everything(seed)
    stimuli = load_stimulus_set(stimuli_path)
    train, pool = stimuli.splits["train"], stimuli.splits["pool"]
    # The labelled pool images too (never shown in the experiment, never test images): more images to learn
    # from and to hold out, so that the held-out accuracy the evaluation checks is measured on more than a few.
    labelled_pool = pool.label >= 0
    all_images = np.concatenate([train.images, pool.images[labelled_pool]])
    all_labels = np.concatenate([train.label, pool.label[labelled_pool]]).astype(np.int64)
    held = stratified_holdout(all_labels, settings["val_fraction"], seed)
    model = DomainClassifier(image_size=int(train.images.shape[1]), in_channels=int(train.images.shape[3]),
                             n_classes=stimuli.n_classes, widths=tuple(settings["widths"]))
    images = model.prepare(all_images)
    labels = torch.from_numpy(all_labels)
    data = _ImageData(images[~held], labels[~held])
    val_images, val_labels = images[held], labels[held]

    def loss_fn(net, batch):
        x = augment_images(batch["images"], settings["shift_pixels"], settings["hflip"])
        logits = net(x)
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"accuracy": (logits.argmax(1) == batch["labels"]).float().mean()}

    def eval_fn(net, epoch):
        device = next(net.parameters()).device
        logits = torch.cat([net(val_images[i:i + 256].to(device)) for i in range(0, len(val_images), 256)])
        return {"val/loss": F.cross_entropy(logits, val_labels.to(device)),
                "val/accuracy": (logits.argmax(1).cpu() == val_labels).float().mean()}

    train_config = TrainConfig(epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                               weight_decay=settings["weight_decay"], warmup_epochs=1.0, seed=seed,
                               select_metric="val/accuracy", select_mode="max", betas=(0.9, 0.999),
                               checkpoint_every_minutes=checkpoint_minutes(config))
    trainer = Trainer(model, data, loss_fn, train_config, out_dir / "train", eval_fn=eval_fn, run_config=config,
                      inputs=[stimuli_path])
    summary = trainer.fit(resume=resume)
    model = trainer.load_best().eval()
    model.save_pretrained(out_dir)
    test = stimuli.splits["test"]
    metrics = {
        "val_accuracy": top1_accuracy(model, all_images[held], all_labels[held]),
        "n_pool_images": int(labelled_pool.sum()),
        "n_train": int((~held).sum()), "n_val": int(held.sum()),
        # Reported only (the classifier ceiling); nothing is chosen on it.
        "test_accuracy": top1_accuracy(model, test.images, test.label),
        "n_test": int(len(test)),
        "chance": 1.0 / stimuli.n_classes, "class_names": list(stimuli.class_names),
        "best": summary["best"], "settings": settings, "config": config, "versions": software_versions(),
    }
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    log.info("classifier: validation accuracy %.3f, test-image accuracy %.3f", metrics["val_accuracy"],
             metrics["test_accuracy"])
    return metrics
