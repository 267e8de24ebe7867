"""Training augmentations: of voxel vectors (SC-MBM pretraining) and of images (every image model).

The voxel augmentations act on real voxels only (``voxel_mask``), draw from torch's generator (so
the training engine's per-step seeding makes them reproducible) and are tested
to change their input. Training applies them to the model's input and keeps
the clean vector as the reconstruction target, so the encoder learns to see
through missing voxels and noise.

:func:`augment_images` (random shift and horizontal flip) serves the domain
classifier, the embedded base generator's VAE and DC-LDM fine-tuning alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _uniform(shape, like, generator):
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def voxel_dropout(fmri, rate, voxel_mask=None, generator=None):
    """Set a random ``rate`` of each vector's voxels to zero (their z-scored mean).

    The drop pattern is independent per voxel and per sample (sparse), not per
    patch or per feature column. Kept values are not rescaled: a z-scored voxel
    set to 0 reads as "no response", and the rescaling of inverted dropout
    would inflate the kept responses.

    Parameters
    ----------
    fmri : [B, V] float
    rate : float in [0, 1)
    voxel_mask : [B, V] bool, optional
        Only True entries may be dropped.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor
        [B, V], a new tensor.
    """
    if rate <= 0:
        return fmri.clone()
    drop = _uniform(fmri.shape, fmri, generator) < rate
    if voxel_mask is not None:
        drop &= voxel_mask.bool()
    return fmri.masked_fill(drop, 0.0)


def gaussian_noise(fmri, std, voxel_mask=None, generator=None):
    """Add independent N(0, std^2) noise to every real voxel.

    Parameters
    ----------
    fmri : [B, V] float
    std : float
        In units of the (z-scored) data.
    voxel_mask : [B, V] bool, optional
        Padding (False) stays untouched.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor
        [B, V], a new tensor.
    """
    if std <= 0:
        return fmri.clone()
    device = generator.device if generator is not None else fmri.device
    noise = torch.randn(fmri.shape, generator=generator, device=device).to(fmri.device, fmri.dtype) * std
    if voxel_mask is not None:
        noise = noise * voxel_mask.to(noise.dtype)
    return fmri + noise


class FmriAugment(nn.Module):
    """Voxel dropout then Gaussian noise, in training mode only (identity in eval mode).

    Parameters
    ----------
    dropout_rate : float
        See :func:`voxel_dropout`.
    noise_std : float
        See :func:`gaussian_noise`.
    """

    def __init__(self, dropout_rate=0.0, noise_std=0.0):
        super().__init__()
        self.dropout_rate = float(dropout_rate)
        self.noise_std = float(noise_std)

    def forward(self, fmri, voxel_mask=None, generator=None):
        """fmri: [B, V] float -> [B, V] float (unchanged in eval mode)."""
        if not self.training:
            return fmri
        fmri = voxel_dropout(fmri, self.dropout_rate, voxel_mask, generator)
        return gaussian_noise(fmri, self.noise_std, voxel_mask, generator)

    def extra_repr(self):
        return f"dropout_rate={self.dropout_rate}, noise_std={self.noise_std}"


def augment_images(images, shift_pixels, hflip, crop_mode="shift", crop_p=1.0):
    """Random shift (reflect padding, then crop) and horizontal flip of a batch ``[B, C, H, W]``.

    ``crop_mode`` 'resized' replaces the shift by :func:`resized_crop` (``shift_pixels`` smaller, with
    probability ``crop_p``). Uses torch's global generator, which the training engine seeds per step.
    """
    if crop_mode == "resized":
        if hflip:
            images = augment_images(images, 0, hflip)
        return resized_crop(images, shift_pixels, crop_p)
    if crop_mode != "shift":
        raise ValueError(f"crop_mode must be 'shift' or 'resized', not {crop_mode!r}")
    if hflip:
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if shift_pixels > 0 and crop_p < 1.0:
        keep = images
        shifted = augment_images(images, shift_pixels, False)
        chosen = torch.rand(images.shape[0], device=images.device) < crop_p
        return torch.where(chosen[:, None, None, None], shifted, keep)
    if shift_pixels > 0:
        size = images.shape[-1]
        padded = F.pad(images, [shift_pixels] * 4, mode="reflect")
        offsets = torch.randint(0, 2 * shift_pixels + 1, (images.shape[0], 2))
        images = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])
    return images


def resized_crop(images, crop_pixels, p=1.0):
    """MinD-Vis's image augmentation: with probability ``p`` a square crop ``crop_pixels`` smaller than the
    image at a uniform position, resized back to the image's size (bilinear, antialiased, as torchvision's
    ``RandomCrop`` then ``Resize`` on tensors); other images unchanged. ``[B, C, H, W]`` -> same shape."""
    if crop_pixels <= 0 or p <= 0:
        return images
    height, width = images.shape[-2:]
    if crop_pixels >= min(height, width):
        raise ValueError(f"crop_pixels ({crop_pixels}) must be smaller than the image ({height} x {width})")
    chosen = (torch.rand(images.shape[0]) < p).tolist()
    offsets = torch.randint(0, crop_pixels + 1, (images.shape[0], 2)).tolist()
    out = []
    for image, crop, (y, x) in zip(images, chosen, offsets):
        if crop:
            patch = image[None, :, y:y + height - crop_pixels, x:x + width - crop_pixels]
            image = F.interpolate(patch.float(), size=(height, width), mode="bilinear", align_corners=False,
                                  antialias=True)[0].to(images.dtype)
        out.append(image)
    return torch.stack(out)
