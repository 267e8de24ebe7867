"""Baselines and ceilings scored beside the DC-LDM: what a simpler decoder, the voxels and the generator can do.

* **Ridge fMRI -> VAE latent** (:func:`ridge_images`, with :func:`mindvis.models.linear.fit_ridge`):
  scikit-learn ``Ridge`` from a trial's fMRI to the frozen VAE's posterior-mean
  latent of the image it showed (flattened, scaled by the VAE's scaling factor),
  decoded back to an image by the VAE. The field's linear reconstruction
  baseline (as the first stage of Brain-Diffuser, Ozcelik & VanRullen, Sci.
  Rep. 2023, Methods: ridge regression from fMRI to VDVAE latents), here into
  the latent space the DC-LDM denoises in.
* **Ridge fMRI -> pixels** (:func:`pixel_ridge_images`): the same ridge from
  a trial's fMRI straight to the pixels of the image it showed (at the
  generated size, in [-1, 1]), for images of side <= :data:`MAX_PIXEL_RIDGE_SIDE`:
  the linear decoder with no generator at all.
* **Ridge fMRI -> prior embedding, sampled** (:func:`embedding_ridge`): the
  field's simplest semantic decoder: the same ridge from a trial's fMRI to the
  base prior's embedding of the image it showed (``image_conditioner.embed``,
  flattened), its ``alpha`` chosen by two-way identification of the val
  trials' embeddings (:func:`mindvis.models.linear.identification`: squared
  error would choose the strongest shrinkage, predictions between the images
  from which the prior draws a generic one), refitted on train + val; each
  test prediction then conditions the frozen prior
  (:func:`mindvis.generate.decode.sample_embeddings`), sampled like the model.
  What the DC-LDM adds over a linear map into the same prior.
* **Mean training image** (:func:`mean_training_image`): the mean of the
  images of the subject's training trials, a floor that any decoder of the
  average stimulus reaches (PixCorr and SSIM are far from 0 for it).
* **Linear classifier on fMRI** (:func:`fmri_linear_probabilities`, with
  :func:`mindvis.models.linear.fit_fmri_classifier`): a multinomial
  logistic regression on standardised voxels, giving class probabilities per
  test fMRI pattern: how much class information the voxels hold, without any
  image generation.
* **Embedding-prototype ceiling** (:func:`embedding_prototype_similarity`): the
  same ridge from a trial's fMRI to the base prior's embedding of the image it
  showed (``image_conditioner.embed``, flattened), fitted on the training trials
  (seen classes only), and each test prediction classified as the class whose
  prototype (the mean embedding of that class's labelled ``pool`` images, which
  cover every class, novel ones too) is nearest by cosine similarity: how much
  of a novel category the fMRI carries into the prior's embedding, without
  sampling an image.
* **Base-generator ceiling** (:func:`base_ceiling_conditioning`): an
  image-conditioned prior given each true image's own embedding
  (:func:`mindvis.generate.decode.sample_like`: what a decoder that recovered
  the embedding exactly would draw), or a class-conditioned base given each
  stimulus's label (:func:`mindvis.generate.decode.sample_classes`), sampled
  like the model.

Model selection (ridge ``alpha``, logistic ``C``) uses the ``val`` split of
``responses.h5`` only, whose runs are held out from training; the chosen model
is then refitted on train + val. Test fMRI is never passed to a fitting or
selection function: the functions here do not take it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mindvis.data.images import images_to_tensor, tensor_to_images
from mindvis.data.pairs import paired_trials
from mindvis.errors import MindvisError
from mindvis.models.linear import class_probabilities, fit_fmri_classifier, fit_ridge

log = logging.getLogger(__name__)

#: Largest image side of the pixel ridge: its targets are every pixel (64 x 64 x 3 = 12,288 outputs), beyond
#: which the fit's memory and time grow past those of the rest of the stage.
MAX_PIXEL_RIDGE_SIDE = 64


# -- ridge regression into the VAE latent -----------------------------------------

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
    predicted, info = _ridge_predict(responses, stimulus_set, fmri, alphas, generator.image_size,
                                     generator.image_channels, lambda images: generator.encode_all(images, batch_size).flatten(1).cpu().numpy(),
                                     "ridge fMRI -> VAE latent")
    info["latent_dim"] = int(predicted.shape[1])
    return decode_latents(generator, predicted, batch_size), info


def _ridge_predict(responses, stimulus_set, fmri, alphas, image_size, image_channels, targets, what, error="mse",
                   also=()):
    """Pair the train and val trials with their images, fit ridge fMRI -> ``targets(images)`` (alpha on val
    by ``error``, :data:`mindvis.models.linear.RIDGE_ERRORS`) and predict each row of ``fmri``: float [N, T] and
    the fit's info."""
    train = paired_trials(responses["train"], stimulus_set, image_size, image_channels)
    val = paired_trials(responses["val"], stimulus_set, image_size, image_channels)
    y_train, y_val = targets(train.images), targets(val.images)
    model, info = fit_ridge(train.fmri.numpy(), y_train, val.fmri.numpy(), y_val, alphas, error=error, what=what,
                            also=also)
    predicted = model.predict(np.asarray(fmri, np.float32)) if len(fmri) else np.zeros((0, y_train.shape[1]))
    return predicted, info


# -- ridge into the prior's image embedding, scored by class prototypes ------------

def class_prototypes(generator, pool, n_classes, batch_size=256):
    """Mean prior embedding of the labelled ``pool`` images of each class.

    Returns
    -------
    prototypes : float32 [n_classes, tokens * token_dim]
    counts : int64 [n_classes]
        Labelled pool images of each class.

    Raises
    ------
    MindvisError
        When the pool has no labelled image of some class (no prototype for it).
    """
    missing = [cls for cls in range(n_classes) if not (np.asarray(pool.label) == cls).any()]
    if missing:
        raise MindvisError(f"the stimulus pool has no labelled image of {len(missing)} of the {n_classes} classes "
                           f"(e.g. {missing[:5]}): those classes have no prototype", key="pool",
                           fix="use a stimulus set whose pool holds labelled images of every class "
                               "(stimuli.n_pool).")
    sums = np.zeros((n_classes, int(np.prod(generator.image_conditioner.embedding_shape))), np.float64)
    counts = np.zeros(n_classes, np.int64)
    labelled = np.flatnonzero(np.asarray(pool.label) >= 0)
    for start in range(0, len(labelled), batch_size):  # the pool's images converted a batch at a time
        rows = labelled[start:start + batch_size]
        tensor = images_to_tensor(pool.images[rows], generator.image_size, generator.image_channels)
        np.add.at(sums, pool.label[rows], generator.embed_all(tensor, batch_size).flatten(1).cpu().numpy())
        np.add.at(counts, pool.label[rows], 1)
    return (sums / counts[:, None]).astype(np.float32), counts


def embedding_prototype_similarity(generator, responses, stimulus_set, fmri, alphas, n_classes, batch_size=256):
    """The embedding-prototype ceiling end to end: ridge fMRI -> prior embedding (fit on train, alpha on val, refit
    on train + val), then the cosine similarity of each prediction for ``fmri`` with every class prototype.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        With an ``image_conditioner`` (the base prior).
    responses : mindvis.data.responses.Responses
        With the ``train`` and ``val`` splits loaded.
    stimulus_set : mindvis.data.stimuli.StimulusSet
        Its ``pool`` gives the prototypes (:func:`class_prototypes`).
    fmri : float32 [N, V]
        The rows to classify (the test fMRI); used for prediction only.
    alphas : sequence of float
    n_classes : int
        The data set's classes.

    Returns
    -------
    similarity : float64 [N, n_classes]
        Cosine similarity of each predicted embedding with each class's prototype (argmax: the predicted class).
    info : dict
        From :func:`mindvis.models.linear.fit_ridge`, plus ``embedding_dim`` and ``prototype_images`` (labelled
        pool images per class).

    Raises
    ------
    MindvisError
        When the base has no image conditioner, or the pool lacks a class.
    """
    conditioner = generator.image_conditioner
    if conditioner is None:
        raise MindvisError("the base generator has no image conditioner (it is class- or text-conditioned): there is "
                           "no prior image embedding to regress onto", key="ldm.base")
    prototypes, counts = class_prototypes(generator, stimulus_set["pool"], n_classes, batch_size)
    predicted, info = _ridge_predict(responses, stimulus_set, fmri, alphas, generator.image_size,
                                     generator.image_channels,
                                     lambda images: generator.embed_all(images, batch_size).flatten(1).cpu().numpy(),
                                     "ridge fMRI -> prior embedding")
    info.update(embedding_dim=int(prototypes.shape[1]), prototype_images=counts.tolist())
    return _cosine(predicted, prototypes), info


def embedding_ridge(generator, responses, stimulus_set, fmri, alphas, batch_size=256):
    """Ridge fMRI -> prior embedding end to end: fit on train (alpha on val by two-way identification), refit
    on train + val, predict each row of ``fmri``.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        With an ``image_conditioner`` (the base prior, frozen).
    responses : mindvis.data.responses.Responses
        With the ``train`` and ``val`` splits loaded.
    stimulus_set : mindvis.data.stimuli.StimulusSet
    fmri : float32 [N, V]
        The rows to decode (the test fMRI); used for prediction only.
    alphas : sequence of float

    Returns
    -------
    embeddings : float32 [N, tokens, token_dim]
        The predicted embedding of each row, in the prior's embedding space (its ``condition`` takes them).
    info : dict
        From :func:`mindvis.models.linear.fit_ridge` (val identification, and the squared error recorded beside
        it per alpha), plus ``embedding_dim``.

    Raises
    ------
    MindvisError
        When the base has no image conditioner.
    """
    conditioner = generator.image_conditioner
    if conditioner is None:
        raise MindvisError("the base generator has no image conditioner (it is class- or text-conditioned): there is "
                           "no prior image embedding to regress onto and sample from", key="ldm.base")
    predicted, info = _ridge_predict(responses, stimulus_set, fmri, alphas, generator.image_size,
                                     generator.image_channels,
                                     lambda images: generator.embed_all(images, batch_size).flatten(1).cpu().numpy(),
                                     "ridge fMRI -> prior embedding (identification)", error="identification",
                                     also=("mse",))
    info["embedding_dim"] = int(predicted.shape[1])
    return predicted.astype(np.float32).reshape(len(predicted), *conditioner.embedding_shape), info


def _cosine(first, second):
    """Cosine similarity of every row of ``first`` [N, D] with every row of ``second`` [M, D]: [N, M]."""
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    first = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
    second = second / np.maximum(np.linalg.norm(second, axis=1, keepdims=True), 1e-12)
    return first @ second.T


# -- ridge into pixels, and the mean training image --------------------------------

def pixel_ridge_images(responses, stimulus_set, fmri, alphas, image_size, image_channels):
    """Ridge fMRI -> pixels end to end: fit on train (alpha on val by pixel MSE), predict each row of ``fmri``.

    Parameters
    ----------
    responses : mindvis.data.responses.Responses
        With the ``train`` and ``val`` splits loaded.
    stimulus_set : mindvis.data.stimuli.StimulusSet
    fmri : float32 [N, V]
        The rows to decode (the test fMRI); used for prediction only.
    alphas : sequence of float
    image_size, image_channels : int
        Of the generated images (targets are the seen images at this size).

    Returns
    -------
    images : uint8 [N, S, S, C]
    info : dict
        From :func:`mindvis.models.linear.fit_ridge` (mean squared error of pixels in [-1, 1]).
    """
    if image_size > MAX_PIXEL_RIDGE_SIDE:
        raise MindvisError(f"images of {image_size} px: the pixel ridge is fitted only up to "
                           f"{MAX_PIXEL_RIDGE_SIDE} px a side", key="evaluate")
    predicted, info = _ridge_predict(responses, stimulus_set, fmri, alphas, image_size, image_channels,
                                     lambda images: images.flatten(1).numpy(), "ridge fMRI -> pixels")
    shape = (image_channels, image_size, image_size)
    info["n_pixels"] = int(np.prod(shape))
    return tensor_to_images(torch.as_tensor(predicted, dtype=torch.float32).reshape(-1, *shape)), info


def mean_training_image(responses, stimulus_set, image_size, image_channels):
    """The mean of the images of the ``train`` trials (each trial counted once): uint8 [S, S, C].

    Raises
    ------
    MindvisError
        When there are no training trials.
    """
    train = paired_trials(responses["train"], stimulus_set, image_size, image_channels)
    if len(train) == 0:
        raise MindvisError("no training trials to average", key="train")
    return tensor_to_images(train.images.float().mean(dim=0, keepdim=True))[0]


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


# -- the base generator's ceiling -------------------------------------------------

def base_ceiling_conditioning(generator, labels, n_classes):
    """How the base-ceiling row can be drawn: ``("image", None)``, ``("class", None)`` or ``(None, reason)``.

    An image-conditioned prior takes each true image's own embedding; a class-conditioned base each
    stimulus's label (it needs a label for every test stimulus and the data set's number of classes).
    """
    if generator.image_conditioner is not None:
        return "image", None
    conditioner = generator.class_conditioner
    if conditioner is None:
        return None, ("the base generator has neither an image nor a class conditioner (e.g. Stable Diffusion, "
                      "which is conditioned on text); the embedded base has one")
    if int(conditioner.config.n_classes) != int(n_classes):
        return None, (f"the base generator's class conditioner has {conditioner.config.n_classes} classes, "
                      f"the data set {n_classes}")
    if len(labels) and (np.asarray(labels) < 0).any():
        return None, "some test stimuli have no class label (the base is class-conditioned)"
    return "class", None
