"""Linear models of fMRI, fitted in closed form with scikit-learn, their hyperparameter chosen on validation.

* :func:`fit_ridge`: ridge regression from fMRI to any target (the DC-LDM's
  voxel-path start maps onto the base's condition tokens, the ridge baseline
  onto VAE latents); ``alpha`` by mean squared or relative squared error.
* :func:`fit_fmri_classifier`: the multinomial logistic probe of how much
  class information the voxels hold; ``C`` by log-loss.

Both fit each candidate on the training trials, score it on the validation
trials, and refit the chosen one on train + validation. They never see test
trials: nothing here takes them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mindvis.errors import MindvisError

log = logging.getLogger(__name__)


def relative_squared_error(target, prediction):
    """Mean over rows of ``||prediction - target||^2 / ||target||^2``: the voxel path's alignment measure."""
    target, prediction = np.asarray(target, np.float64), np.asarray(prediction, np.float64)
    return float(np.mean(((prediction - target) ** 2).sum(1) / np.maximum((target ** 2).sum(1), 1e-12)))


#: Errors ``fit_ridge`` can choose ``alpha`` by: name -> (scikit-learn scoring, what it is).
def identification(decoded, truth):
    """Mean two-way identification of each row of ``decoded`` among the rows of ``truth`` (both [N, ...]).

    Rows are centred on their set's mean and compared by cosine similarity; a
    row scores the share of the other truth rows less similar to it than its
    own (0.5 is chance, 1 perfect). nan for fewer than two rows. Label-free:
    what a decoder is for, and the project's validation criterion
    (:mod:`mindvis.train.selection`).
    """
    decoded = torch.as_tensor(decoded).flatten(1).double()
    truth = torch.as_tensor(truth).flatten(1).double()
    if len(truth) < 2:
        return float("nan")
    ours = F.normalize(decoded - decoded.mean(0), dim=1)
    theirs = F.normalize(truth - truth.mean(0), dim=1)
    similarity = ours @ theirs.T
    own = similarity.diagonal()[:, None]
    return float(((similarity < own).double().sum(1) / (len(truth) - 1)).mean())


def _identification_error(y_true, y_pred):
    return 1.0 - identification(y_pred, y_true)


#: Validation errors a ridge's alpha can be chosen by (lower is better): scikit-learn scorer, description.
RIDGE_ERRORS = {
    "mse": ("neg_mean_squared_error", "mean squared error"),
    "relative": (make_scorer(relative_squared_error, greater_is_better=False),
                 "relative squared error ||y - y_hat||^2 / ||y||^2, averaged over trials"),
    # Squared error favours strong shrinkage: predictions near the training mean, between the images, from
    # which a generator draws a generic image. Identification rewards predictions that tell the images apart.
    "identification": (make_scorer(_identification_error, greater_is_better=False),
                       "1 - two-way identification among the val trials' targets (centred cosine)"),
}


def check_selection_data(n_train, n_val, what, key):
    """Raise a clear error when a fit has no training trials, or no validation trials to choose ``key`` on."""
    if n_train == 0:
        raise MindvisError(f"no training trials for the {what}", key="train",
                           fix="check the preprocessing output (responses.h5 'train' split).")
    if n_val == 0:
        raise MindvisError(f"the val split is empty, so the {what}'s {key} cannot be chosen without the test set",
                           key="val", fix="keep whole training runs aside as the val split when preprocessing.")


def select_on_validation(estimator, grid, scoring, train_x, train_y, val_x, val_y, refit=True):
    """Fit ``estimator`` for every grid value on train, score on val, refit the best on train + val.

    Returns
    -------
    search : sklearn.model_selection.GridSearchCV
        ``best_estimator_`` is refitted on train + val (``refit`` False: not refitted); ``cv_results_`` holds each
        value's val score (``mean_test_{name}`` for a dict of scorers).
    """
    split = PredefinedSplit(np.concatenate([np.full(len(train_x), -1), np.zeros(len(val_x), int)]))
    search = GridSearchCV(estimator, grid, scoring=scoring, cv=split, refit=refit, n_jobs=1)
    search.fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))
    return search


def fit_ridge(train_x, train_y, val_x, val_y, alphas, error="mse", what="ridge", refit="train + val", also=()):
    """Ridge regression ``x -> y``, ``alpha`` chosen by the validation ``error``, refitted on train + val.

    With ``refit="train"`` the chosen alpha is refitted on the training rows only: for a fit that
    the validation split then goes on to judge (fine-tuning's ridge start, whose checkpoints and
    img2img strength are selected on val), which must not have seen those rows.

    Parameters
    ----------
    train_x, val_x : float [N, V]
        fMRI; float64 input is fitted in float64.
    train_y, val_y : float [N, D]
    alphas : sequence of float
    error : {'mse', 'relative', 'identification'}
        See :data:`RIDGE_ERRORS`.
    what : str
        Names the fit in errors and the log.
    refit : {'train + val', 'train'}
    also : sequence of str
        Further :data:`RIDGE_ERRORS` recorded per alpha (not chosen by).

    Returns
    -------
    model : sklearn.linear_model.Ridge
        ``coef_`` [D, V], ``intercept_`` [D].
    info : dict
        ``alpha``, ``alphas``, ``val_error`` (per candidate, in the order given), ``val_errors`` (``error`` and
        each of ``also``: per candidate), ``selection``, ``refit``, ``n_train``, ``n_val``.
    """
    check_selection_data(len(train_x), len(val_x), what, "alpha")
    if refit not in ("train + val", "train"):
        raise ValueError(f"refit must be 'train + val' or 'train', got {refit!r}")
    names = [error, *[name for name in also if name != error]]
    alphas = [float(alpha) for alpha in alphas]
    search = select_on_validation(Ridge(), {"alpha": alphas}, {name: RIDGE_ERRORS[name][0] for name in names},
                                  train_x, train_y, val_x, val_y, refit=False)
    val_errors = {name: (-search.cv_results_[f"mean_test_{name}"]).tolist() for name in names}
    val_error = val_errors[error]
    alpha = alphas[int(np.argmin(val_error))]
    info = {"alpha": alpha, "alphas": alphas, "val_error": val_error, "val_errors": val_errors,
            "selection": f"val split, {RIDGE_ERRORS[error][1]}", "refit": refit, "n_train": len(train_x),
            "n_val": len(val_x)}
    if refit == "train":
        model = Ridge(alpha=alpha).fit(train_x, train_y)
    else:
        model = Ridge(alpha=alpha).fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))
    log.info("%s: alpha %.3g chosen on %d val trials (val %s %.4g); refitted on %s", what, info["alpha"],
             len(val_x), error, min(val_error), refit)
    return model, info


class BlockRidgePath:
    """Ridge with an intercept from two weighted feature blocks, ``[A, w B] -> Y``, for many ``w`` and alphas.

    The same estimator as scikit-learn's ``Ridge(alpha)`` on ``[A, w B]`` (centred features and targets, the
    intercept unpenalised), solved in its dual form: the centred Gram matrix is ``A A' + w^2 B B'``, so the two
    blocks' Gram matrices are computed once, and one eigendecomposition per weight gives the solution for
    every alpha (the validation predictions by matrix products, no refit). Equal to fitting ``Ridge`` once
    per (weight, alpha) up to float64 rounding (tested), at a fraction of the cost.

    Parameters
    ----------
    train_a, train_b : float [N, Fa], [N, Fb]
        The two blocks of the training rows.
    train_y : float [N, D]
    val_a, val_b : float [M, Fa], [M, Fb], optional
        The validation rows, whose predictions :meth:`val_predictions` returns.
    """

    def __init__(self, train_a, train_b, train_y, val_a=None, val_b=None):
        train_a, train_b = np.asarray(train_a, np.float64), np.asarray(train_b, np.float64)
        train_y = np.asarray(train_y, np.float64)
        self.mean_a, self.mean_b, self.mean_y = train_a.mean(0), train_b.mean(0), train_y.mean(0)
        self.a, self.b = train_a - self.mean_a, train_b - self.mean_b
        self.y = train_y - self.mean_y
        self.gram_a, self.gram_b = self.a @ self.a.T, self.b @ self.b.T
        if val_a is not None:
            va = np.asarray(val_a, np.float64) - self.mean_a
            vb = np.asarray(val_b, np.float64) - self.mean_b
            self.cross_a, self.cross_b = va @ self.a.T, vb @ self.b.T
        self._last = None  # (weight, its decomposition): callers go weight by weight

    def _decomposed(self, weight):
        if self._last is None or self._last[0] != weight:
            values, vectors = np.linalg.eigh(self.gram_a + weight ** 2 * self.gram_b)
            self._last = (weight, (np.clip(values, 0.0, None), vectors, vectors.T @ self.y))
        return self._last[1]

    def dual(self, weight, alpha):
        """The dual coefficients ``(K + alpha I)^-1 Y`` [N, D] of block weight ``weight``."""
        values, vectors, projected = self._decomposed(weight)
        return vectors @ (projected / (values + alpha)[:, None])

    def val_predictions(self, weight, alpha):
        """Predictions for the validation rows [M, D]."""
        return (self.cross_a + weight ** 2 * self.cross_b) @ self.dual(weight, alpha) + self.mean_y

    def solution(self, weight, alpha):
        """``coef`` [D, Fa + Fb] (on ``[A, w B]``, as ``Ridge.coef_``) and ``intercept`` [D]."""
        dual = self.dual(weight, alpha)
        coef = np.concatenate([self.a.T @ dual, weight * (self.b.T @ dual)]).T
        intercept = self.mean_y - coef[:, :len(self.mean_a)] @ self.mean_a - coef[:, len(self.mean_a):] @ (
            weight * self.mean_b)
        return coef, intercept


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
    check_selection_data(len(train_fmri), len(val_fmri), "fMRI classifier", "C")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed % 2**32))
    search = select_on_validation(pipeline, {"logisticregression__C": [float(c) for c in Cs]}, "neg_log_loss",
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
