"""The one interface through which every image classifier scores images (:class:`ImageClassifier`).

``predict_proba`` and ``features`` of uint8 images, whatever the network
behind it: the domain classifier (:mod:`.domain`) or an ImageNet classifier
(:mod:`.imagenet`). :func:`mindvis.models.classifiers.load.load_image_classifier`
picks one from the config.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.errors import MindvisError
from mindvis.utils.device import autocast


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
        self.precision = "no"
        self.images_scored, self.seconds = 0, 0.0  # throughput, for the stage summaries

    def __repr__(self):
        return f"ImageClassifier({self.name!r}, n_classes={self.n_classes}, n_features={self.n_features})"

    def to(self, device, precision="no"):
        """Move the network to ``device`` and run it under ``precision`` autocast (resolved:
        ``no``, ``bf16`` or ``fp16``; :mod:`mindvis.utils.device`); returns self."""
        self.network.to(device)
        self.precision = precision
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
        tick = time.perf_counter()
        probs, features = [np.zeros((0, self.n_classes), np.float32)], [np.zeros((0, self.n_features), np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = self.prepare(images[start:start + self.batch_size]).to(device)
            with autocast(device, self.precision):
                pooled = self.features_fn(batch).float()
                logits = self.head_fn(pooled)
            probs.append(F.softmax(logits.float(), dim=1).cpu().numpy())
            features.append(pooled.cpu().numpy())
        self.images_scored += len(images)
        self.seconds += time.perf_counter() - tick  # .cpu() above has synchronised the device
        return np.concatenate(probs), np.concatenate(features)
