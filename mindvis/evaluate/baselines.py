"""Baselines and ceilings scored beside the DC-LDM: what a simpler decoder, the voxels and the generator can do.

* **Ridge fMRI -> VAE latent** (:func:`ridge_images`, with :func:`mindvis.models.linear.fit_ridge`):
  scikit-learn ``Ridge`` from a trial's fMRI to the frozen VAE's posterior-mean
  latent of the image it showed (flattened, scaled by the VAE's scaling factor),
  decoded back to an image by the VAE. The field's linear reconstruction
  baseline (as the first stage of Brain-Diffuser, Ozcelik & VanRullen, Sci.
  Rep. 2023, Methods: ridge regression from fMRI to VDVAE latents), here into
  the latent space the DC-LDM denoises in.
* **Linear classifier on fMRI** (:func:`fmri_linear_probabilities`, with
  :func:`mindvis.models.linear.fit_fmri_classifier`): a multinomial
  logistic regression on standardised voxels, giving class probabilities per
  test fMRI pattern: how much class information the voxels hold, without any
  image generation.
* **Base generator given the true class** (:func:`true_class_unavailable_reason`;
  drawn by :func:`mindvis.generate.decode.sample_classes`): the embedded base
  generator's class conditioner with each test stimulus's label, sampled like
  the model: how well the generator can draw each class at all.

Model selection (ridge ``alpha``, logistic ``C``) uses the ``val`` split of
``responses.h5`` only, whose runs are held out from training; the chosen model
is then refitted on train + val. Test fMRI is never passed to a fitting or
selection function: the functions here do not take it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mindvis.data.images import tensor_to_images
from mindvis.data.pairs import paired_trials
from mindvis.models.linear import class_probabilities, fit_fmri_classifier, fit_ridge

log = logging.getLogger(__name__)


# -- ridge regression into the VAE latent -----------------------------------------

@torch.no_grad()
def vae_latents(generator, images, batch_size=64):
    """Posterior-mean VAE latents of images, flattened.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
    images : torch.Tensor
        float32 [N, C, S, S] in [-1, 1] at the generator's size and channels.

    Returns
    -------
    numpy.ndarray
        float32 [N, c * h * w], scaled by the VAE's scaling factor (the UNet's latent space).
    """
    device = next(generator.vae.parameters()).device
    dtype = next(generator.vae.parameters()).dtype
    out = [generator.encode(images[start:start + batch_size].to(device, dtype), sample=False).float().cpu()
           for start in range(0, len(images), batch_size)]
    if not out:
        return np.zeros((0, int(np.prod(generator.latent_shape(1)[1:]))), np.float32)
    return torch.cat(out).flatten(1).numpy()


@torch.no_grad()
def decode_latents(generator, latents, batch_size=64):
    """Flattened scaled latents [N, D] -> uint8 images [N, H, W, C] through the VAE decoder."""
    shape = generator.latent_shape(1)[1:]
    device = next(generator.vae.parameters()).device
    dtype = next(generator.vae.parameters()).dtype
    tensor = torch.as_tensor(np.asarray(latents, np.float32)).reshape(-1, *shape)
    out = [tensor_to_images(generator.decode(tensor[start:start + batch_size].to(device, dtype)).float())
           for start in range(0, len(tensor), batch_size)]
    if not out:
        return np.zeros((0, generator.image_size, generator.image_size, generator.image_channels), np.uint8)
    return np.concatenate(out)


def ridge_images(generator, responses, stimulus_set, fmri, alphas, batch_size=64):
    """The ridge baseline end to end: fit on train (alpha on val), decode one image per row of ``fmri``.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        Its frozen VAE defines the latent space.
    responses : mindvis.data.responses.Responses
        With the ``train`` and ``val`` splits loaded.
    stimulus_set : mindvis.data.stimuli.StimulusSet
    fmri : float32 [N, V]
        The rows to decode (the test fMRI); used for prediction only.
    alphas : sequence of float

    Returns
    -------
    images : uint8 [N, H, W, C]
    info : dict
        From :func:`mindvis.models.linear.fit_ridge` (mean squared error of the scaled latents), plus
        ``latent_dim``.
    """
    train = paired_trials(responses["train"], stimulus_set, generator.image_size, generator.image_channels)
    val = paired_trials(responses["val"], stimulus_set, generator.image_size, generator.image_channels)
    train_latents = vae_latents(generator, train.images, batch_size)
    val_latents = vae_latents(generator, val.images, batch_size)
    model, info = fit_ridge(train.fmri.numpy(), train_latents, val.fmri.numpy(), val_latents, alphas, error="mse",
                            what="ridge fMRI -> VAE latent")
    predicted = model.predict(np.asarray(fmri, np.float32)) if len(fmri) else np.zeros((0, train_latents.shape[1]))
    info["latent_dim"] = int(train_latents.shape[1])
    return decode_latents(generator, predicted, batch_size), info


# -- linear classifier on fMRI ----------------------------------------------------

def fmri_linear_probabilities(responses, fmri, n_classes, Cs, seed=0):
    """The fMRI-classifier ceiling end to end: fit on labelled train trials (C on val), predict ``fmri``.

    Returns
    -------
    probs : float64 [N, n_classes]
    info : dict
    """
    train, val = responses["train"], responses["val"]
    keep_train, keep_val = train.label >= 0, val.label >= 0
    model, info = fit_fmri_classifier(train.fmri[keep_train], train.label[keep_train], val.fmri[keep_val],
                                      val.label[keep_val], Cs, seed=seed)
    return class_probabilities(model, fmri, n_classes), info


# -- the base generator given the true class -------------------------------------

def true_class_unavailable_reason(generator, labels, n_classes):
    """Why the base-true-class ceiling cannot be drawn (None when it can)."""
    conditioner = generator.class_conditioner
    if conditioner is None:
        return ("the base generator has no class conditioner (e.g. Stable Diffusion, which is conditioned on "
                "text); the embedded base has one")
    if int(conditioner.config.n_classes) != int(n_classes):
        return (f"the base generator's class conditioner has {conditioner.config.n_classes} classes, "
                f"the data set {n_classes}")
    if len(labels) and (np.asarray(labels) < 0).any():
        return "some test stimuli have no class label"
    return None
