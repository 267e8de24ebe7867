"""Closed-form starts of the decoders' linear maps (ridge regression, alpha chosen on the val split).

* :func:`fit_readout_start`: the read-out route's start (``finetune.mapper: readout``,
  :class:`~mindvis.models.conditioning.ReadoutConditioner`): a ridge from the
  starting encoder's features to each trial's target, so that the encoder
  carries the condition from the first step; then everything trains.
* :func:`fit_ridge_voxel_map`: the voxel path's start (``mapper: mindvis-ext``).

The target of a trial (:func:`condition_targets`) is the base's own reading of
the image it showed: the prior's embedding of it for an image prior (no label
is read), else the class condition of a class-conditioned base.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.linear_model import Ridge

from mindvis.errors import MindvisError
from mindvis.models.linear import BlockRidgePath, fit_ridge, identification, relative_squared_error

log = logging.getLogger(__name__)


def class_condition_targets(class_conditioner, labels):
    """Flattened base conditions (context, then pooled) of ``labels``: float64 [N, T * D + P]."""
    with torch.no_grad():
        condition = class_conditioner(torch.as_tensor(labels, dtype=torch.int64).clamp_min(0))
    return torch.cat([condition.context.flatten(1), condition.pooled], dim=1).double().numpy()


@torch.no_grad()
def base_conditions(generator, images, labels):
    """The base's own condition of each trial's image (:class:`~mindvis.models.conditioning.Condition`) and which trials have one.

    An image-conditioned prior encodes the image itself, so every trial has a
    target and no label is read; a class-conditioned base takes the trial's
    class, and trials of unknown class (-1) have none.
    """
    if generator.image_conditioner is not None:
        embedding = generator.embed_all(images)
        return (generator.image_conditioner.condition(embedding),
                torch.ones(len(images), dtype=torch.bool, device=embedding.device))
    labels = torch.as_tensor(labels, dtype=torch.int64)
    device = generator.class_conditioner.context.device
    condition = generator.class_conditioner(labels.to(device).clamp_min(0))
    return condition, labels.to(device) >= 0


def condition_targets(generator, images, labels, space="condition"):
    """What the voxel path regresses onto, flattened: float64 [M, ...], and the mask of trials kept.

    In ``embedding`` space each trial's target is the prior's embedding of the image it showed
    (:meth:`~mindvis.models.ldm.Generator.embed_all`, every trial kept); in ``condition`` space the base's condition of it,
    context then pooled (:func:`base_conditions`).
    """
    if space == "embedding":
        flat = generator.embed_all(images).flatten(1)
        return flat.double().cpu().numpy(), np.ones(len(flat), dtype=bool)
    condition, known = base_conditions(generator, images, labels)
    flat = torch.cat([condition.context.flatten(1), condition.pooled], dim=1)[known]
    return flat.double().cpu().numpy(), known.cpu().numpy()


def fit_ridge_voxel_map(train_fmri, train_targets, val_fmri, val_targets, alphas, what="voxel path ridge",
                        key="finetune.ridge_init", criterion="identification"):
    """Ridge from fMRI to the base's conditions of the seen images, alpha chosen on the validation split.

    The one ridge of the project (:func:`mindvis.models.linear.fit_ridge`, in
    float64): ``train_targets`` holds each training trial's target condition
    (:func:`condition_targets`: the seen image's own embedding for an
    image-conditioned prior, label-free; its class's condition for a class
    base); the alpha best by ``criterion`` on the validation trials
    (``finetune.ridge_select``: two-way identification among them, or the
    relative squared error, the alignment loss's measure) is refitted on the
    training trials only, since the validation split goes on to select fine-tuning's checkpoint
    (and the low-level strength) with this map inside. Without validation trials the median alpha is fitted on the
    training trials, with a warning.

    Returns
    -------
    weight : float32 [T * D + P, V]
    bias : float32 [T * D + P]
    report : dict
        ``alpha``, ``criterion``, ``val_relative_error`` and ``val_identification`` per alpha, ``n_train``,
        ``n_val``.
    """
    x_train, y_train = np.asarray(train_fmri, np.float64), np.asarray(train_targets, np.float64)
    x_val, y_val = np.asarray(val_fmri, np.float64), np.asarray(val_targets, np.float64)
    if len(x_train) < 2:
        raise MindvisError(f"too few training trials with a target condition to fit the {what}", key=key,
                           fix="set finetune.ridge_init: false, or check the labels in responses.h5.")
    errors = {}
    if len(x_val):
        error = {"identification": "identification", "relative_error": "relative"}[criterion]
        model, info = fit_ridge(x_train, y_train, x_val, y_val, alphas, error=error, what=what, refit="train",
                                also=("relative", "identification"))
        alpha = info["alpha"]
        errors = dict(zip(info["alphas"], info["val_errors"]["relative"]))
        identified = {a: 1.0 - e for a, e in zip(info["alphas"], info["val_errors"]["identification"])}
    else:
        alpha = float(np.median(alphas))
        log.warning("no validation trials: the voxel path's ridge uses the median alpha %g", alpha)
        model = Ridge(alpha=alpha).fit(x_train, y_train)
        identified = {}
    report = {"alpha": alpha, "criterion": criterion, "val_relative_error": errors, "val_identification": identified,
              "n_train": int(len(x_train)), "n_val": int(len(x_val))}
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32), report


def voxel_path_record(conditioner):
    """The voxel path's shape for ``dcldm.json``: voxels, outputs, rank (0 = full) and parameter count."""
    if conditioner.voxel_map is None:
        return None
    n_parameters = sum(p.numel() for name, p in conditioner.named_parameters() if name.startswith("voxel_"))
    return {"n_voxels": int(conditioner.config.n_voxels), "n_outputs": int(conditioner.voxel_map.out_features),
            "rank": 0 if conditioner.voxel_down is None else int(conditioner.voxel_down.out_features),
            "n_parameters": int(n_parameters)}


@torch.no_grad()
def readout_features(model, fmri, batch_size=256):
    """The read-out's input for ``fmri`` [N, V] through the model's encoder as it is now (eval mode): float64 [N, F]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(fmri), batch_size):
        batch = torch.as_tensor(fmri[start:start + batch_size]).to(device)
        rows.append(model.conditioner.features(model.encoder.encode(batch), model.token_mask(batch),
                                               fmri=batch).double().cpu())
    model.train(was_training)
    return torch.cat(rows).numpy() if rows else np.zeros((0, model.conditioner.readout.in_features))


#: The voxel block's weights the read-out's ridge start chooses among (``finetune.readout_inputs: both``), beside
#: the token features (each token standardised): 0 reads the tokens alone, the largest the voxels almost alone.
VOXEL_BLOCK_WEIGHTS = (0.0, 1.0, 4.0, 16.0, 64.0)


def fit_readout_start(model, train_fmri, train_targets, val_fmri, val_targets, alphas, criterion="identification"):
    """Start a :class:`~mindvis.models.conditioning.ReadoutConditioner` at the ridge solution from the encoder's
    features to the targets (alpha best by ``criterion`` on the val trials, refitted on train only, as the val
    split then selects the checkpoint). Returns the report (``alpha``, ``val_identification`` per alpha, ...).

    A read-out that also reads the voxels (``n_voxels`` > 0) standardises them by the training trials' mean and
    SD, and weighs the voxel block against the token features by the weight of :data:`VOXEL_BLOCK_WEIGHTS` whose
    best alpha is best on the val trials by the same criterion (``voxel_weight`` in the report): one penalty
    then fits both blocks, and which input carries the condition is chosen on validation, without labels.
    """
    conditioner = model.conditioner
    n_voxels = getattr(conditioner.config, "n_voxels", 0)
    what = "read-out start, ridge encoder features -> target"
    if n_voxels:
        mean, sd = train_fmri.mean(axis=0), train_fmri.std(axis=0)
        inverse_sd = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
        conditioner.set_voxel_scaling(mean, np.ones_like(inverse_sd))
        base_train, base_val = readout_features(model, train_fmri), readout_features(model, val_fmri)
        if len(base_val) == 0:
            raise MindvisError("the read-out's voxel block weight is chosen on validation trials, and the "
                               "responses have none", key="preprocess.val_fraction",
                               fix="preprocess with validation runs (preprocess.val_fraction), or set "
                                   "finetune.readout_inputs: tokens.")
        # One ridge over [tokens, weight x standardised voxels] per weight, all solved from one pair of Gram
        # matrices (models.linear.BlockRidgePath: scikit-learn's Ridge, fitted once per weight and alpha, is the
        # same estimator at many times the cost).
        path = BlockRidgePath(base_train[:, :-n_voxels], base_train[:, -n_voxels:] * inverse_sd, train_targets,
                              base_val[:, :-n_voxels], base_val[:, -n_voxels:] * inverse_sd)
        alphas = [float(alpha) for alpha in alphas]
        fits = []
        for weight in VOXEL_BLOCK_WEIGHTS:
            predictions = [path.val_predictions(weight, alpha) for alpha in alphas]
            identified = {alpha: identification(pred, val_targets) for alpha, pred in zip(alphas, predictions)}
            errors = {alpha: relative_squared_error(val_targets, pred) for alpha, pred in zip(alphas, predictions)}
            by = identified if criterion == "identification" else {a: -e for a, e in errors.items()}
            chosen = alphas[int(np.argmax([by[alpha] for alpha in alphas]))]  # the first of ties, as fit_ridge
            fits.append((by[chosen], weight, chosen, identified, errors))
            log.info("read-out start, voxel block weight %g: alpha %g, val %s %.4f", weight, chosen, criterion,
                     abs(by[chosen]))
        _, voxel_weight, alpha, identified, errors = max(fits, key=lambda entry: entry[0])
        coef, intercept = path.solution(voxel_weight, alpha)  # refitted on train only: val then selects
        weight, bias = coef.astype(np.float32), intercept.astype(np.float32)
        conditioner.set_voxel_scaling(mean, inverse_sd * voxel_weight)
        n_features = base_train.shape[1]
        report = {"alpha": alpha, "criterion": criterion, "val_relative_error": errors,
                  "val_identification": identified, "n_train": int(len(base_train)), "n_val": int(len(base_val)),
                  "voxel_weight": float(voxel_weight),
                  "voxel_weight_scores": {str(entry[1]): float(abs(entry[0])) for entry in fits}}
    else:
        x_train = readout_features(model, train_fmri)
        x_val = readout_features(model, val_fmri)
        weight, bias, report = fit_ridge_voxel_map(x_train, train_targets, x_val, val_targets, alphas, what=what,
                                                   key="finetune.ridge_init", criterion=criterion)
        n_features = x_train.shape[1]
    conditioner.set_readout(torch.from_numpy(weight), torch.from_numpy(bias))
    report["n_features"] = int(n_features)
    return report


def start_mapper(model, generator, train_trials, val_trials, settings, space, encoder="pretrained"):
    """Start the decoder's linear map from ridge (``finetune.ridge_init``): the read-out, or the voxel path.

    Targets in ``space`` (:func:`condition_targets`). A voxel path with ``finetune.ridge_lr_scale`` 0 is frozen
    here. Returns the ridge report for ``dcldm.json`` (None when nothing was fitted: no base conditions, no linear
    map, or fewer than two training trials with a target).
    """
    ridge_report = None
    readout = getattr(model.conditioner, "readout", None) is not None
    if settings["ridge_init"] and generator.conditioner is not None and (readout or model.conditioner.voxel_map
                                                                          is not None):
        y_train, train_known = condition_targets(generator, train_trials.images, train_trials.labels, space)
        y_val, val_known = condition_targets(generator, val_trials.images, val_trials.labels, space)
        target = {"embedding": "prior image embedding",
                  "condition": "image condition" if generator.image_conditioner is not None else "class condition"}
        if len(y_train) < 2:
            log.warning("only %d training trials of known class: no ridge start (a class-conditioned base on a data "
                        "set without classes)", len(y_train))
        elif readout:
            ridge_report = fit_readout_start(model, train_trials.fmri.numpy()[train_known], y_train,
                                             val_trials.fmri.numpy()[val_known], y_val, settings["ridge_alphas"],
                                             settings["ridge_select"])
            ridge_report["target"] = target[space]
            log.info("read-out starts from ridge of the %s encoder's features onto the base's %s (alpha %g chosen "
                     "on val by %s; val identification %s)", encoder, target[space], ridge_report["alpha"],
                     settings["ridge_select"],
                     {a: round(e, 3) for a, e in ridge_report["val_identification"].items()})
        else:
            weight, bias, ridge_report = fit_ridge_voxel_map(
                train_trials.fmri.numpy()[train_known], y_train, val_trials.fmri.numpy()[val_known], y_val,
                settings["ridge_alphas"], criterion=settings["ridge_select"])
            ridge_report["target"] = target[space]
            model.conditioner.set_voxel_map(torch.from_numpy(weight), torch.from_numpy(bias))
            frozen = settings["ridge_lr_scale"] == 0
            if frozen:
                model.conditioner.voxel_map.requires_grad_(False)
                if model.conditioner.voxel_down is not None:
                    model.conditioner.voxel_down.requires_grad_(False)
            log.info("voxel path starts from ridge onto the base's %s (alpha %g chosen on val by %s; val relative "
                     "error %s)%s", target[space], ridge_report["alpha"], settings["ridge_select"],
                     {a: round(e, 3) for a, e in ridge_report["val_relative_error"].items()},
                     "; kept fixed (finetune.ridge_lr_scale 0)" if frozen else "")
    return ridge_report
