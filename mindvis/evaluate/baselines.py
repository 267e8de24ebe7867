"""Baselines and ceilings scored beside the DC-LDM: what a simpler decoder, the voxels and the generator can do.

* **Ridge fMRI -> VAE latent** (:func:`fit_ridge_decoder`, :func:`ridge_images`):
  scikit-learn ``Ridge`` from a trial's fMRI to the frozen VAE's posterior-mean
  latent of the image it showed (flattened, scaled by the VAE's scaling factor),
  decoded back to an image by the VAE. The field's linear reconstruction
  baseline (as the first stage of Brain-Diffuser, Ozcelik & VanRullen, Sci.
  Rep. 2023, Methods: ridge regression from fMRI to VDVAE latents), here into
  the latent space the DC-LDM denoises in.
* **Linear classifier on fMRI** (:func:`fit_fmri_classifier`): a multinomial
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
from mindvis.errors import MindvisError

log = logging.getLogger(__name__)


# -- model selection on the val split -------------------------------------------

def _predefined_split(n_train, n_val):
    """A scikit-learn split whose only fold trains on the first ``n_train`` rows and validates on the rest."""
    from sklearn.model_selection import PredefinedSplit

    return PredefinedSplit(np.concatenate([np.full(n_train, -1), np.zeros(n_val, int)]))


def _grid_search(estimator, grid, scoring, train_x, train_y, val_x, val_y):
    """Fit ``estimator`` for every grid value on train, score on val, refit the best on train + val.

    Returns
    -------
    search : sklearn.model_selection.GridSearchCV
        ``best_estimator_`` is refitted on train + val; ``cv_results_`` holds each value's val score.
    """
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(estimator, grid, scoring=scoring, cv=_predefined_split(len(train_x), len(val_x)),
                          refit=True, n_jobs=1)
    search.fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))
    return search


def _check_selection_data(n_train, n_val, what, key):
    if n_train == 0:
        raise MindvisError(f"no training trials for the {what}", key="train",
                           fix="check the preprocessing output (responses.h5 'train' split).")
    if n_val == 0:
        raise MindvisError(f"the val split is empty, so the {what}'s {key} cannot be chosen without the test set",
                           key="val", fix="keep whole training runs aside as the val split when preprocessing.")


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


def fit_ridge_decoder(train_fmri, train_latents, val_fmri, val_latents, alphas):
    """Ridge regression fMRI -> latent, ``alpha`` chosen by validation mean squared error.

    Parameters
    ----------
    train_fmri, val_fmri : float32 [N, V]
    train_latents, val_latents : float32 [N, D]
    alphas : sequence of float
        Candidates (``evaluate.ridge_alphas``).

    Returns
    -------
    model : sklearn.linear_model.Ridge
        Refitted on train + val with the chosen alpha.
    info : dict
        ``alpha``, ``val_mse`` (per candidate, in the order given), ``refit`` and the trial counts.
    """
    from sklearn.linear_model import Ridge

    _check_selection_data(len(train_fmri), len(val_fmri), "ridge decoder", "alpha")
    search = _grid_search(Ridge(), {"alpha": [float(a) for a in alphas]}, "neg_mean_squared_error",
                          train_fmri, train_latents, val_fmri, val_latents)
    val_mse = (-search.cv_results_["mean_test_score"]).tolist()
    info = {"alpha": float(search.best_params_["alpha"]), "alphas": [float(a) for a in alphas],
            "val_mse": val_mse, "selection": "val split, mean squared error of the scaled latents",
            "refit": "train + val", "n_train": len(train_fmri), "n_val": len(val_fmri)}
    log.info("ridge: alpha %.3g chosen on %d val trials (val MSE %.4f); refitted on train + val",
             info["alpha"], len(val_fmri), min(val_mse))
    return search.best_estimator_, info


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
        From :func:`fit_ridge_decoder`, plus ``latent_dim``.
    """
    train = paired_trials(responses["train"], stimulus_set, generator.image_size, generator.image_channels)
    val = paired_trials(responses["val"], stimulus_set, generator.image_size, generator.image_channels)
    train_latents = vae_latents(generator, train.images, batch_size)
    val_latents = vae_latents(generator, val.images, batch_size)
    model, info = fit_ridge_decoder(train.fmri.numpy(), train_latents, val.fmri.numpy(), val_latents, alphas)
    predicted = model.predict(np.asarray(fmri, np.float32)) if len(fmri) else np.zeros((0, train_latents.shape[1]))
    info["latent_dim"] = int(train_latents.shape[1])
    return decode_latents(generator, predicted, batch_size), info


# -- linear classifier on fMRI ----------------------------------------------------

def fit_fmri_classifier(train_fmri, train_labels, val_fmri, val_labels, Cs, seed=0):
    """Multinomial logistic regression on standardised fMRI, ``C`` chosen by validation log-loss.

    Log-loss, not accuracy, chooses ``C`` because n-way top-1 ranks the whole
    probability vector, and it does not tie on a small val split.

    Parameters
    ----------
    train_fmri, val_fmri : float32 [N, V]
    train_labels, val_labels : int [N]
        Class indices (>= 0).
    Cs : sequence of float
        Inverse regularisation strengths (``evaluate.fmri_classifier_C``).
    seed : int

    Returns
    -------
    model : sklearn.pipeline.Pipeline
        ``StandardScaler`` + ``LogisticRegression``, refitted on train + val with the chosen C.
    info : dict
        ``C``, ``val_log_loss`` per candidate, ``refit``, trial counts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_selection_data(len(train_fmri), len(val_fmri), "fMRI classifier", "C")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed % 2**32))
    search = _grid_search(pipeline, {"logisticregression__C": [float(c) for c in Cs]}, "neg_log_loss",
                          train_fmri, train_labels, val_fmri, val_labels)
    info = {"C": float(search.best_params_["logisticregression__C"]), "Cs": [float(c) for c in Cs],
            "val_log_loss": (-search.cv_results_["mean_test_score"]).tolist(),
            "selection": "val split, log-loss", "refit": "train + val (scaler and classifier)",
            "n_train": len(train_fmri), "n_val": len(val_fmri)}
    log.info("fMRI classifier: C %.3g chosen on %d val trials; refitted on train + val", info["C"], len(val_fmri))
    return search.best_estimator_, info


def class_probabilities(model, fmri, n_classes):
    """float64 [N, n_classes]: the classifier's probabilities, zero for classes it never saw in training."""
    probs = np.zeros((len(fmri), n_classes))
    if len(fmri):
        probs[:, model.classes_] = model.predict_proba(np.asarray(fmri, np.float32))
    return probs


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
