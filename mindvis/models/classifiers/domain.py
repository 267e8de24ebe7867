"""The domain classifier: a small CNN for the stimulus domain (Fashion-MNIST at 32 x 32 by default).

It scores generated images: the top-1 class of a decoded sample (and of a
class-conditioned base sample) against the class of the image that was seen.
It is trained (:mod:`mindvis.train.classifier`) on the *training* images only,
a stratified part of them held out for selecting the epoch and reporting
accuracy, never on test images.

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mindvis.data.images import images_to_tensor
from mindvis.errors import MindvisError
from mindvis.models.classifiers.base import ImageClassifier

#: The classifier folder's metrics and class names (written by :mod:`mindvis.train.classifier`).
METRICS_FILE = "metrics.json"


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
    metrics_path = folder / METRICS_FILE
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


