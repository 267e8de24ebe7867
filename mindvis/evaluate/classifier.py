"""Image classifiers that score decoded images: the domain classifier and the common interface.

:class:`ImageClassifier` is the one interface the evaluation stage sees:
``predict_proba`` and ``features`` of uint8 images, whatever the network
(:func:`load_image_classifier` picks it from ``evaluate.classifier``). Behind
it: the small domain classifier below, or an ImageNet classifier
(:mod:`mindvis.evaluate.imagenet`: EfficientNet-Lite0, ViT-H/14).

The domain classifier is a small object classifier for the stimulus domain
(Fashion-MNIST at 32 x 32 by default). It scores generated images: the top-1 class of a decoded sample (and of a
class-conditioned base sample) against the class of the image that was seen.
It is trained on the *training* images only (a stratified part of them held
out for selecting the epoch and reporting accuracy), never on test images.

Files in its folder (``results/classifier/``)
---------------------------------------------
``config.json`` + ``diffusion_pytorch_model.safetensors``
    The network, via diffusers' ``save_pretrained`` (loads with :func:`load_classifier`).
``metrics.json``
    Held-out (validation) accuracy, accuracy on the true test images (reported,
    not used for any choice), class names, the resolved config, versions.
``train/``
    The training engine's ``metrics.jsonl`` and checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mindvis.config import fill_defaults, load_schema
from mindvis.errors import MindvisError
from mindvis.utils.io import derive_seed, seed_everything, software_versions, write_json_atomic

log = logging.getLogger(__name__)


def section_settings(config, name):
    """A config section with the schema's defaults filled in (``config`` may hold only part of it).

    Parameters
    ----------
    config : dict
        An experiment config, resolved or not.
    name : str
        Top-level section, e.g. ``"classifier"`` or ``"evaluate"``.

    Returns
    -------
    dict
    """
    return fill_defaults(dict(config.get(name) or {}), load_schema()["properties"][name])


class ImageClassifier:
    """A trained image classifier behind the interface the evaluation stage uses.

    Both methods take uint8 images ``[N, H, W, C]`` (C = 1 or 3, any size),
    prepare them as the network expects (resizing, channels, normalisation),
    and run in eval mode without gradients, in batches.

    Parameters
    ----------
    name : str
        ``domain``, ``efficientnet_lite0`` or ``vit_h_14``.
    class_names : list of str
    network : torch.nn.Module
    prepare : callable
        uint8 ``[B, H, W, C]`` -> float tensor, the network's input.
    features_fn : callable
        input tensor -> ``[B, F]`` pooled penultimate features.
    head_fn : callable
        ``[B, F]`` features -> ``[B, n_classes]`` logits.
    n_features : int
        F.
    batch_size : int
    info : dict, optional
        Provenance recorded with results (weights file, packages).
    """

    def __init__(self, name, class_names, network, prepare, features_fn, head_fn, n_features, batch_size=64,
                 info=None):
        self.name = name
        self.class_names = list(class_names)
        self.n_classes = len(self.class_names)
        self.network = network.eval()
        self.prepare, self.features_fn, self.head_fn = prepare, features_fn, head_fn
        self.n_features = int(n_features)
        self.batch_size = int(batch_size)
        self.info = {"name": name, "n_classes": self.n_classes, "n_features": self.n_features, **(info or {})}

    def __repr__(self):
        return f"ImageClassifier({self.name!r}, n_classes={self.n_classes}, n_features={self.n_features})"

    def to(self, device):
        """Move the network to ``device``; returns self."""
        self.network.to(device)
        return self

    def predict_proba(self, images):
        """Class probabilities: float32 ``[N, n_classes]`` of uint8 images ``[N, H, W, C]``."""
        return self.predict_proba_and_features(images)[0]

    def features(self, images):
        """Pooled penultimate features: float32 ``[N, n_features]`` (two-way identification, FID)."""
        return self.predict_proba_and_features(images)[1]

    @torch.no_grad()
    def predict_proba_and_features(self, images):
        """Both outputs of one forward pass: (float32 ``[N, n_classes]``, float32 ``[N, n_features]``)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise MindvisError(f"images must be uint8 [N, H, W, C] with C = 1 or 3, got shape {images.shape}",
                               key="images")
        self.network.eval()
        device = next(self.network.parameters()).device
        probs, features = [np.zeros((0, self.n_classes), np.float32)], [np.zeros((0, self.n_features), np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = self.prepare(images[start:start + self.batch_size]).to(device)
            pooled = self.features_fn(batch).float()
            probs.append(F.softmax(self.head_fn(pooled).float(), dim=1).cpu().numpy())
            features.append(pooled.cpu().numpy())
        return np.concatenate(probs), np.concatenate(features)


class DomainClassifier(ModelMixin, ConfigMixin):
    """A small CNN: (conv-BN-ReLU x2, max-pool) per width, global average pool, linear.

    Parameters
    ----------
    image_size : int
        Side of its input images; other sizes are resized to it.
    in_channels : int
        1 (grey) or 3; other channel counts are converted.
    n_classes : int
    widths : list of int
        Channels of each stage.
    """

    @register_to_config
    def __init__(self, image_size: int = 32, in_channels: int = 1, n_classes: int = 10,
                 widths: tuple = (32, 64, 128)):
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, n_classes)

    def features(self, images):
        """images: float [B, C, H, W] in [-1, 1] -> [B, widths[-1]] pooled features."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images):
        """images: float [B, C, H, W] in [-1, 1] -> logits [B, n_classes]."""
        return self.head(self.features(images))

    def prepare(self, images):
        """uint8 ``[N, H, W, C]`` (any size, 1 or 3 channels) -> float ``[N, in_channels, S, S]`` in [-1, 1]."""
        from mindvis.models.ldm import images_to_tensor

        return images_to_tensor(images, self.config.image_size, self.config.in_channels)

    @torch.no_grad()
    def predict_proba(self, images, batch_size=256):
        """Class probabilities ``[N, n_classes]`` (float64 NumPy) of uint8 images ``[N, H, W, C]``."""
        return self._map(images, lambda x: F.softmax(self(x).float(), dim=1), batch_size)

    @torch.no_grad()
    def embed(self, images, batch_size=256):
        """Penultimate features ``[N, widths[-1]]`` (float64 NumPy) of uint8 images, e.g. for FID."""
        return self._map(images, lambda x: self.features(x).float(), batch_size)

    def _map(self, images, func, batch_size):
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        try:
            for start in range(0, len(images), batch_size):
                out.append(func(self.prepare(images[start:start + batch_size]).to(device)).cpu().double().numpy())
        finally:
            self.train(was_training)
        if not out:
            with torch.no_grad():
                width = func(torch.zeros(1, self.config.in_channels, self.config.image_size,
                                         self.config.image_size, device=device)).shape[1]
            return np.zeros((0, width))
        return np.concatenate(out)


def load_classifier(folder):
    """Load a trained :class:`DomainClassifier` from its folder (eval mode)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise MindvisError("no trained classifier here (config.json missing)", path=folder,
                           fix="run the train_classifier rule (mindvis train-classifier) first.")
    return DomainClassifier.from_pretrained(folder, local_files_only=True).eval()


def domain_image_classifier(folder, batch_size=256):
    """The trained domain classifier in ``folder`` as an :class:`ImageClassifier` (name ``domain``).

    Class names come from the folder's ``metrics.json`` (written by
    :func:`train_classifier`); without it they are the class indices.
    """
    folder = Path(folder)
    model = load_classifier(folder)
    n_classes = model.config.n_classes
    names = [str(index) for index in range(n_classes)]
    metrics_path = folder / "metrics.json"
    info = {"folder": str(folder)}
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        names = metrics.get("class_names") or names
        info.update({key: metrics[key] for key in ("val_accuracy", "test_accuracy") if key in metrics})
    if len(names) != n_classes:
        raise MindvisError(f"{len(names)} class names for a {n_classes}-class classifier", path=metrics_path,
                           key="class_names", fix="retrain the classifier (mindvis train-classifier).")
    return ImageClassifier("domain", names, model, model.prepare, model.features, model.head,
                           n_features=model.config.widths[-1], batch_size=batch_size, info=info)


def load_image_classifier(config, classifier_dir=None):
    """The image classifier named by ``evaluate.classifier``, ready to score images.

    Parameters
    ----------
    config : dict
        Experiment config; reads ``evaluate.classifier`` (``auto``: the domain
        classifier for the simulated data set, else EfficientNet-Lite0),
        ``evaluate.classifier_weights`` (ViT-H/14) and ``data.source``.
    classifier_dir : str or Path, optional
        The trained domain classifier's folder (``results/classifier``);
        needed for ``domain``.

    Returns
    -------
    ImageClassifier

    Raises
    ------
    MindvisError
        When the chosen classifier cannot be loaded, with the key and the fix.
    """
    settings = section_settings(config, "evaluate")
    choice = settings["classifier"]
    if choice == "auto":
        source = (config.get("data") or {}).get("source", "simulated")
        choice = "domain" if source == "simulated" else "efficientnet_lite0"
    if choice == "domain":
        if classifier_dir is None:
            raise MindvisError("the domain classifier needs its folder (classifier_dir)", key="evaluate.classifier",
                               fix="pass the train_classifier output (results/classifier), or choose "
                                   "efficientnet_lite0.")
        return domain_image_classifier(classifier_dir)
    from mindvis.evaluate import imagenet

    if choice == "efficientnet_lite0":
        return imagenet.load_efficientnet_lite0()
    if choice == "vit_h_14":
        return imagenet.load_vit_h_14(settings["classifier_weights"])
    raise MindvisError(f"unknown classifier {choice!r}", key="evaluate.classifier",
                       fix="use auto, domain, efficientnet_lite0 or vit_h_14.")


def top1_accuracy(classifier, images, labels):
    """Fraction of images whose most probable class is ``labels`` (int [N])."""
    if len(images) == 0:
        return float("nan")
    return float(np.mean(classifier.predict_proba(images).argmax(axis=1) == np.asarray(labels)))


def augment_images(images, shift_pixels, hflip):
    """Random shift (reflect padding, then crop) and horizontal flip of a batch ``[B, C, H, W]``.

    Uses torch's global generator, which the training engine seeds per step.
    """
    if hflip:
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if shift_pixels > 0:
        size = images.shape[-1]
        padded = F.pad(images, [shift_pixels] * 4, mode="reflect")
        offsets = torch.randint(0, 2 * shift_pixels + 1, (images.shape[0], 2))
        images = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])
    return images


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
    """Train the domain classifier on the training images; write it to ``out_dir``.

    Parameters
    ----------
    config : dict
        The experiment config; its ``classifier`` section holds the
        training settings (schema defaults fill what it leaves out).
    stimuli_path : str or Path
        ``stimuli.h5``; only its ``train`` split is read for training.
    out_dir : str or Path

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.train.engine import Trainer, TrainConfig

    settings = section_settings(config, "classifier")
    out_dir = Path(out_dir)
    seed = derive_seed(config["seed"], "classifier")
    seed_everything(seed)
    stimuli = load_stimulus_set(stimuli_path)
    train = stimuli.splits["train"]
    held = stratified_holdout(train.label, settings["val_fraction"], seed)
    model = DomainClassifier(image_size=int(train.images.shape[1]), in_channels=int(train.images.shape[3]),
                             n_classes=stimuli.n_classes, widths=tuple(settings["widths"]))
    images = model.prepare(train.images)
    labels = torch.from_numpy(train.label.astype(np.int64))
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
                               select_metric="val/accuracy", select_mode="max", betas=(0.9, 0.999))
    trainer = Trainer(model, data, loss_fn, train_config, out_dir / "train", eval_fn=eval_fn, run_config=config)
    summary = trainer.fit(resume=resume)
    model = trainer.load_best().eval()
    model.save_pretrained(out_dir)
    test = stimuli.splits["test"]
    metrics = {
        "val_accuracy": top1_accuracy(model, train.images[held], train.label[held]),
        "n_train": int((~held).sum()), "n_val": int(held.sum()),
        # Reported only (the classifier ceiling); nothing is chosen on it.
        "test_accuracy": top1_accuracy(model, test.images, test.label),
        "n_test": int(len(test)),
        "chance": 1.0 / stimuli.n_classes, "class_names": list(stimuli.class_names),
        "best": summary["best"], "settings": settings, "config": config, "versions": software_versions(),
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("classifier: validation accuracy %.3f, test-image accuracy %.3f", metrics["val_accuracy"],
             metrics["test_accuracy"])
    return metrics
