"""Image arrays <-> tensors: the one conversion between stored images and every network's input.

Stored images (``stimuli.h5``, ``samples.h5``) are uint8 ``[N, H, W, C]``;
generators and classifiers take float ``[N, C, S, S]`` in [-1, 1]. Imports
nothing of mindvis but its errors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mindvis.errors import MindvisError


def images_to_tensor(images, image_size, image_channels):
    """uint8 images ``[N, H, W, C]`` -> float32 ``[N, image_channels, image_size, image_size]`` in [-1, 1].

    Grey images are repeated to RGB (and RGB averaged to grey) to match the
    generator; sizes are changed with antialiased bilinear resampling.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tensor.shape[1] != image_channels:
        if tensor.shape[1] == 1:
            tensor = tensor.repeat(1, image_channels, 1, 1)
        elif image_channels == 1:
            tensor = tensor.mean(dim=1, keepdim=True)
        else:
            raise MindvisError(f"cannot convert {tensor.shape[1]}-channel images to {image_channels} channels")
    if tensor.shape[-1] != image_size or tensor.shape[-2] != image_size:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return tensor


def tensor_to_images(tensor):
    """float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (clamped, rounded)."""
    tensor = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return tensor.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


