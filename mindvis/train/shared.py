"""One decoder for several subjects, and few-shot adaptation of it to a new subject.

``finetune_shared`` (the ``finetune_shared`` stage) fine-tunes one
:class:`~mindvis.models.shared.SharedDecoder` on the training trials of every
subject listed: a per-subject adapter (its voxels -> the shared rank-K voxel-path
space, ridge-started) and one encoder, mapper and UNet for all. Validation
averages the subjects' own val splits; each subject's decoder is written as an
ordinary decoder folder (``results/{subject}/dcldm-shared/``).

``adapt_subject`` (the ``adapt_subject`` stage) adds a subject the shared
decoder has never seen, from a share of its training trials
(``finetune.train_fraction``, or its first ``finetune.train_runs`` runs): its adapter starts from a ridge onto the shared
K directions, then trains (with ``finetune.new_subject_train`` naming shared
parts that train too). When shared parts train, the other subjects' training
trials stay in every epoch, weighted by ``finetune.prior_weight`` (Dreambooth's
prior-preservation loss), so their decoding does not drift; their decoders
after the adaptation are written beside the new one (``preserved/``) to
measure that.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from mindvis.data.pairs import MultiSubjectTrials, paired_trials, training_share
from mindvis.data.responses import load_responses
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.models.dcldm import build_decoder, condition_space, load_dcldm, responses_record, save_dcldm
from mindvis.models.ldm import load_generator
from mindvis.models.shared import (SharedDecoder, adapter_from_ridge, fit_adapter, mask_adapter_rows, rank_candidates,
                                   rank_errors, select_rank, shared_ridge_start)
from mindvis.train.engine import Trainer
from mindvis.train.finetune import finetune_param_groups, finetune_train_config, trainable_parameter_names
from mindvis.train.losses import make_loss_fn
from mindvis.train.ridge_start import condition_targets, fit_ridge_voxel_map
from mindvis.train.selection import SELECT_MODES, make_eval_fn, select_metric
from mindvis.utils.io import derive_seed, seed_everything, software_versions, write_json_atomic

log = logging.getLogger(__name__)

SHARED_META = "shared.json"
#: What adapt_subject may train: the new subject's adapter, and shared groups of finetune.train.
ADAPT_GROUPS = ("adapter", "encoder", "conditioner", "attn2", "norms")


def _subject_trials(responses, stimulus_set, generator, fraction=1.0, seed=None, runs=None):
    data = load_responses(responses, splits=("train", "val"))
    train = paired_trials(data["train"], stimulus_set, generator.image_size, generator.image_channels)
    n_all = len(train)
    train = training_share(train, fraction, runs, seed)
    val = paired_trials(data["val"], stimulus_set, generator.image_size, generator.image_channels)
    if len(train) < 2:
        raise MindvisError(f"{len(train)} training trials", path=responses, key="train",
                           fix="check the preprocessing output, or raise finetune.train_fraction or train_runs.")
    return data, train, val, n_all


def _ridge(generator, train, val, space, alphas):
    """A subject's ridge map onto the decoder's targets (fit on train, alpha on val).

    Returns the fit (weight, bias, report), the train rows with a target, and the val targets with their rows
    (``(y_val, val_known)``, reused to choose the shared rank).
    """
    y_train, known = condition_targets(generator, train.images, train.labels, space)
    y_val, val_known = condition_targets(generator, val.images, val.labels, space)
    fit = fit_ridge_voxel_map(train.fmri.numpy()[known], y_train, val.fmri.numpy()[val_known], y_val, alphas)
    return fit, known, (y_val, val_known)


def _set_trainable(shared, groups, adapters=True, only=None):
    """requires_grad: the shared groups of ``groups`` in every view, and the adapters (of ``only``, else all)."""
    for subject in shared.subjects:
        view = shared.view(subject)
        names = trainable_parameter_names(view, [g for g in groups if g != "adapter"])
        for name, parameter in view.named_parameters():
            is_adapter = name.startswith("conditioner.voxel_down.")
            if is_adapter:
                parameter.requires_grad_(adapters and (only is None or subject == only))
            else:
                parameter.requires_grad_(name in names)


def _mean_eval(shared, eval_fns, weights):
    """Validation over several subjects: each subject's metrics on its own view, averaged by val trials."""

    def eval_fn(model, epoch):
        model = getattr(model, "module", model)
        per_subject = {subject: fn(model.view(subject), epoch) for subject, fn in eval_fns.items()}
        total = sum(weights.values())
        metrics = {}
        for key in next(iter(per_subject.values())):
            metrics[key] = float(sum(weights[s] * m[key] for s, m in per_subject.items()) / total)
        for subject, values in per_subject.items():
            for key, value in values.items():
                metrics[f"{key}/{subject}"] = float(value)
        return metrics

    return eval_fn


def _view_meta(config, subject, view, base, generator, data, responses, trained_groups, result, extra, stimuli):
    n_trained = sum(p.numel() for p in view.parameters() if p.requires_grad)
    return {
        "stage": extra.pop("stage"), "subject": subject, "baseline": False, "base": str(base),
        "image_size": generator.image_size, "n_voxels": int(data.n_voxels), "trained_groups": list(trained_groups),
        "n_trained_parameters": int(n_trained), "n_parameters": int(sum(p.numel() for p in view.parameters())),
        "select_metric": result.get("select_metric"), "best": result["best"], "final_metrics": result["last_metrics"],
        "condition_space": "embedding" if view.prior is not None else "condition",
        "step": result["step"], "epochs": result["epochs_done"],
        "training": {"peak_lr": result["peak_lr"], "effective_batch": result["effective_batch"],
                     "mixed_precision": result["mixed_precision"], "torch_threads": torch.get_num_threads()},
        # Trained on an image corpus that may merge every subject's images (real data: results/pretrain/stimuli.h5),
        # not the subject's own stimulus file that generate reads: the stimuli are recorded, explicitly unbound.
        "inputs": {**responses_record(responses, data), "stimuli": str(stimuli), "stimuli_sha256": None,
                   "stimuli_unbound": "a shared decoder is trained on the image corpus of every shared subject"},
        "config": config, "versions": software_versions(), **extra,
    }


def _save_view(shared, subject, out_dir, meta, groups):
    """An ordinary decoder folder for one subject: its view with the shared groups marked as trained."""
    view = shared.view(subject)
    saved = {name: p.requires_grad for name, p in view.named_parameters()}
    names = trainable_parameter_names(view, [g for g in groups if g != "adapter"])
    for name, parameter in view.named_parameters():  # save_dcldm keeps the UNet tensors marked trainable
        parameter.requires_grad_(name in names)
    save_dcldm(view, out_dir, meta, metadata={"subject": subject})
    for name, parameter in view.named_parameters():
        parameter.requires_grad_(saved[name])


def _train(shared, data, generator, scheduler, settings, train_config, out_dir, eval_fn, config, param_groups,
           inputs, select, resume):
    """The engine on a shared decoder (checkpoints of the trained tensors in ``out_dir/train``); the best weights."""
    trainer = Trainer(shared, data, make_loss_fn(generator, scheduler, settings), train_config, out_dir / "train",
                      eval_fn=eval_fn, run_config=config, param_groups=param_groups, checkpoint_params="trainable",
                      inputs=inputs)
    generator.vae.to(trainer.device)
    generator.conditioner.to(trainer.device)
    result = trainer.fit(resume=resume)
    if not result["stopped_early"]:
        shared = trainer.load_best().eval()
        result["select_metric"] = select
    return trainer, shared, result


def finetune_shared(config, subjects, responses, stimuli, base, out_dir, view_dirs, mbm_dir=None,
                    resume=False):
    """Fine-tune one decoder for ``subjects`` and write each subject's view (see the module docstring).

    Parameters
    ----------
    config : dict
    subjects : list of str
    responses : list of path
        Each subject's ``responses.h5`` (train and val read; never test), in the order of ``subjects``.
    stimuli : path
    base : path
        The base generator folder.
    out_dir : path
        ``results/shared/dcldm``: ``train/`` (the engine's) and ``shared.json``.
    view_dirs : list of path
        Where each subject's decoder folder goes (``results/{subject}/dcldm-shared``).
    mbm_dir : path
        The SC-MBM encoder every subject's fMRI enters (the pretrained or shipped base, not one subject's).
    resume : bool
    """
    started = time.perf_counter()
    settings, generate_settings = config["finetune"], config["generate"]
    out_dir = Path(out_dir)
    if len(subjects) != len(responses) or len(subjects) != len(view_dirs):
        raise ValueError("subjects, responses and view_dirs must have the same length")
    seed = derive_seed(config["seed"], "finetune-shared", *subjects)
    seed_everything(seed)
    stimulus_set = load_stimulus_set(stimuli)
    generator = load_generator(base, image_size=config["ldm"]["image_size"])
    generator.vae.requires_grad_(False).eval()
    if generator.conditioner is None:
        raise MindvisError("the shared decoder starts its adapters from ridge onto the base's own conditions, and "
                           "this base has none (a Stable Diffusion folder)", path=base, key="finetune.shared",
                           fix="use an image-prior or class base for finetune.shared.")
    generator.conditioner.requires_grad_(False).eval()
    loaded = {subject: _subject_trials(path, stimulus_set, generator) for subject, path in zip(subjects, responses)}
    space = condition_space(config, generator)

    # The shared space from every subject's own ridge map (alpha on its own val split); its rank, up to
    # finetune.shared_rank, chosen on the pooled val error of the decoder's prediction through it.
    fits = {subject: _ridge(generator, item[1], item[2], space, settings["ridge_alphas"])
            for subject, item in loaded.items()}
    max_rank = int(settings["shared_rank"])
    up, bias, adapters, rank_info = shared_ridge_start(
        [fits[s][0][0] for s in subjects], [fits[s][0][1] for s in subjects],
        [loaded[s][1].fmri.numpy()[fits[s][1]] for s in subjects], max_rank)
    with_val = [s for s in subjects if len(loaded[s][2])]
    if with_val:
        targets = {s: fits[s][2] for s in with_val}  # the val targets each subject's ridge fit chose alpha on
        errors = rank_errors(up, bias, [fits[s][0][0] for s in with_val],
                             [loaded[s][2].fmri.numpy()[targets[s][1]] for s in with_val],
                             [targets[s][0] for s in with_val], rank_candidates(rank_info["rank"]))
        rank = select_rank(errors)
        rank_info.update(max_rank=max_rank, val_relative_error={str(r): e for r, e in errors.items()},
                         selection="pooled val relative error")
        up, adapters = up[:, :rank], [a[:rank] for a in adapters]
        rank_info["variance_kept"] = rank_info["variance_per_rank"][rank - 1]
        rank_info["rank"] = rank
    else:
        log.warning("no validation trials: the shared space keeps finetune.shared_rank %d", rank_info["rank"])
        rank = rank_info["rank"]
    # The shared decoder's subjects meet in the voxel path's rank-K space (mapper mindvis-ext).
    shaped = {**config, "finetune": {**settings, "mapper": "mindvis-ext", "voxel_path": True, "voxel_path_rank": rank}}
    first = subjects[0]
    core = build_decoder(shaped, generator, loaded[first][0].n_voxels, mbm_dir=mbm_dir)
    widest = max(item[0].n_voxels for item in loaded.values())
    if widest > core.encoder.capacity:
        core.encoder.resize_positions(widest)
    shared = SharedDecoder.from_core(core, {subject: item[0].n_voxels for subject, item in loaded.items()})
    with torch.no_grad():
        conditioner = shared.view(first).conditioner
        conditioner.voxel_map.weight.copy_(torch.from_numpy(up))
        conditioner.voxel_map.bias.copy_(torch.from_numpy(bias))
        for subject, adapter in zip(subjects, adapters):
            shared.view(subject).conditioner.voxel_down.weight.copy_(torch.from_numpy(adapter))
    groups = list(settings["train"])
    voxel_fixed = settings["ridge_lr_scale"] == 0
    _set_trainable(shared, groups, adapters=not voxel_fixed)
    if voxel_fixed:
        conditioner.voxel_map.requires_grad_(False)
    ridge_report = {"rank": rank_info, "per_subject": {s: fits[s][0][2] for s in subjects}}
    log.info("shared decoder for %s: rank-%d voxel path (of at most %d, chosen on val) holds %.1f %% of the pooled "
             "ridge predictions' variance", ", ".join(subjects), rank, max_rank, 100 * rank_info["variance_kept"])

    train = MultiSubjectTrials({subject: item[1] for subject, item in loaded.items()})
    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    select = select_metric(settings, generator)
    eval_fns = {subject: make_eval_fn(generator, scheduler, item[2], settings, generate_settings,
                                      derive_seed(seed, subject), select)
                for subject, item in loaded.items() if len(item[2])}
    eval_fn = _mean_eval(shared, eval_fns, {s: len(loaded[s][2]) for s in eval_fns}) if eval_fns else None
    if eval_fn is None:
        select = None
    n_trained = sum(p.numel() for p in shared.parameters() if p.requires_grad)
    log.info("shared decoder: training %d of %d parameters (%s%s) on %d trials of %d subjects", n_trained,
             sum(p.numel() for p in shared.parameters()), ", ".join(groups),
             "" if voxel_fixed else ", adapters", len(train), len(subjects))
    trainer, shared, result = _train(
        shared, train, generator, scheduler, settings, finetune_train_config(settings, seed, select, config), out_dir,
        eval_fn, config, finetune_param_groups(shared, settings, ridge_started=True),
        [*responses, stimuli, base, *([Path(mbm_dir) / "config.json"] if mbm_dir else [])], select, resume)
    if result["stopped_early"]:
        return result
    summary = {"stage": "finetune_shared", "subjects": list(subjects), "rank": rank_info, "ridge": ridge_report,
               "trained_groups": groups, "adapters_trained": not voxel_fixed, "n_train": len(train),
               "n_val": {s: len(loaded[s][2]) for s in subjects}, "best": result["best"],
               "final_metrics": result["last_metrics"], "step": result["step"],
               "wall_time_s": round(time.perf_counter() - started, 2), "config": config,
               "versions": software_versions()}
    if trainer.accelerator.is_main_process:
        for subject, path, view_dir in zip(subjects, responses, view_dirs):
            meta = _view_meta(config, subject, shared.view(subject), base, generator, loaded[subject][0],
                              path, groups, result, {"stage": "finetune_shared", "shared_with": list(subjects),
                                                     "shared_dir": str(out_dir), "shared_rank": rank_info["rank"],
                                                     "n_train": len(loaded[subject][1]),
                                                     "n_val": len(loaded[subject][2])}, stimuli)
            _save_view(shared, subject, view_dir, meta, groups)
        write_json_atomic(out_dir / SHARED_META, summary)
        log.info("wrote %s and %d subject decoders (best %s)", out_dir, len(subjects), result["best"])
    return summary


def adapt_subject(config, subject, responses, stimuli, shared_views, out_dir, old_responses=(),
                  resume=False):
    """Adapt a shared decoder to a subject it has not seen, from a share of its training trials.

    Parameters
    ----------
    config : dict
        ``finetune.train_fraction`` (the share), ``finetune.new_subject_train`` (what trains),
        ``finetune.adapt_epochs``, ``finetune.prior_weight``.
    subject : str
    responses : path
        The new subject's ``responses.h5``.
    stimuli : path
    shared_views : dict of str -> path
        The shared decoder's subject folders (``results/{old}/dcldm-shared``).
    out_dir : path
        The new subject's decoder folder (``results/{subject}/dcldm-fewshot``), with ``train/`` and, when
        shared parts trained, ``preserved/{old}/`` (each old subject's decoder after the adaptation).
    old_responses : dict of str -> path
        The old subjects' ``responses.h5``: their training trials are the prior-preservation set,
        their val trials measure what it keeps.
    resume : bool
    """
    started = time.perf_counter()
    settings, generate_settings = config["finetune"], config["generate"]
    out_dir = Path(out_dir)
    old_responses = dict(old_responses)
    fraction = float(settings["train_fraction"])
    groups = list(settings["new_subject_train"])
    unknown = sorted(set(groups) - set(ADAPT_GROUPS))
    if unknown or "adapter" not in groups:
        raise MindvisError(f"finetune.new_subject_train {groups} must name 'adapter' and only {list(ADAPT_GROUPS)}",
                           key="finetune.new_subject_train", fix="e.g. [adapter] or [adapter, attn2].")
    seed = derive_seed(config["seed"], "adapt-subject", subject)
    seed_everything(seed)
    loaded_views, generator = {}, None
    for old, folder in shared_views.items():
        gen, view, meta = load_dcldm(folder)
        if meta.get("stage") != "finetune_shared":
            raise MindvisError("not a shared decoder's subject folder", path=Path(folder) / "dcldm.json", key="stage",
                               fix="point at results/{subject}/dcldm-shared, written by finetune_shared.")
        loaded_views[old] = view
        generator = generator or gen
        base = meta["base"]
    shared = SharedDecoder.from_views(loaded_views)  # the first view's modules (and its generator's UNet) are kept
    generator.vae.requires_grad_(False).eval()
    generator.conditioner.requires_grad_(False).eval()
    stimulus_set = load_stimulus_set(stimuli)
    train_runs = settings["train_runs"]
    data, train, val, n_all = _subject_trials(responses, stimulus_set, generator, fraction,
                                              derive_seed(config["seed"], "train-fraction"), train_runs)
    log.info("%s: %d of %d training trials (finetune.train_fraction %.2f, train_runs %s), %d val trials", subject,
             len(train), n_all, fraction, train_runs, len(val))
    view = shared.add_subject(subject, data.n_voxels)
    space = condition_space(config, generator)
    voxel_map = shared.view(shared.subjects[0]).conditioner.voxel_map
    up, shared_bias = (voxel_map.weight.detach().double().numpy(), voxel_map.bias.detach().double().numpy())
    if len(val):
        # The adapter's rank (how many shared directions its few trials can estimate) and alpha, on its val.
        y_train, known = condition_targets(generator, train.images, train.labels, space)
        y_val, val_known = condition_targets(generator, val.images, val.labels, space)
        adapter, adapter_rank, ridge_report = fit_adapter(
            up, shared_bias, train.fmri.numpy()[known], y_train, val.fmri.numpy()[val_known], y_val,
            settings["ridge_alphas"])
    else:
        (weight, _bias, ridge_report), _, _ = _ridge(generator, train, val, space, settings["ridge_alphas"])
        adapter, adapter_rank = adapter_from_ridge(up, weight), up.shape[1]
        ridge_report["rank"] = adapter_rank
    log.info("%s: adapter onto the first %d of %d shared directions (alpha %g, chosen on val)", subject,
             adapter_rank, up.shape[1], ridge_report["alpha"])
    with torch.no_grad():
        view.conditioner.voxel_down.weight.copy_(torch.from_numpy(adapter))
    _set_trainable(shared, groups, adapters=True, only=subject)
    mask_hook = mask_adapter_rows(view.conditioner.voxel_down.weight, adapter_rank)
    trains_shared = any(g != "adapter" for g in groups)

    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    select = select_metric(settings, generator) if len(val) else None
    trials = {subject: train}
    old_val = {}
    if trains_shared:
        # Dreambooth's prior preservation: the old subjects' trials stay in every epoch, weighted.
        for old, path in old_responses.items():
            _, old_train, old_val[old], _ = _subject_trials(path, stimulus_set, generator)
            trials[old] = old_train
    prior_weight = float(settings["prior_weight"])
    data_set = MultiSubjectTrials(trials, weights={old: prior_weight for old in trials if old != subject},
                                  subjects=shared.subjects)
    eval_fns = {subject: make_eval_fn(generator, scheduler, val, settings, generate_settings,
                                      derive_seed(seed, subject), select)} if len(val) else {}
    eval_fn = _mean_eval(shared, eval_fns, {subject: len(val)}) if eval_fns else None
    old_eval = {old: make_eval_fn(generator, scheduler, v, settings, generate_settings, derive_seed(seed, old),
                                  select) for old, v in old_val.items() if len(v)}
    before = {old: fn(shared.view(old), -1) for old, fn in old_eval.items()}
    n_trained = sum(p.numel() for p in shared.parameters() if p.requires_grad)
    log.info("%s: training %d parameters (%s) on %d trials%s", subject, n_trained, ", ".join(groups), len(data_set),
             f" ({len(data_set) - len(train)} of them the other subjects', prior weight {prior_weight:g})"
             if trains_shared else "")
    adapt_settings = {**settings, "epochs": settings["adapt_epochs"]}
    trainer, shared, result = _train(
        shared, data_set, generator, scheduler, settings, finetune_train_config(adapt_settings, seed, select, config),
        out_dir, eval_fn, config, finetune_param_groups(shared, settings, voxel_lr_scale=settings["adapter_lr_scale"]),
        [responses, stimuli, *[Path(f) / "dcldm.safetensors" for f in shared_views.values()]], select, resume)
    if mask_hook is not None:
        mask_hook.remove()
    if result["stopped_early"]:
        return result
    after = {old: fn(shared.view(old), -1) for old, fn in old_eval.items()}
    shared_groups = sorted(set(groups) | set(settings["train"])) if trains_shared else list(settings["train"])
    meta = _view_meta(config, subject, shared.view(subject), base, generator, data, responses,
                      shared_groups, result, {
                          "stage": "adapt_subject", "adapted_from": {old: str(f) for old, f in shared_views.items()},
                          "new_subject_train": groups, "train_fraction": fraction, "train_runs": train_runs,
                          "n_train": len(train),
                          "n_train_all": n_all, "n_val": len(val), "voxel_path_ridge": ridge_report,
                          "adapter_rank": adapter_rank,
                          "prior_preservation": {"weight": prior_weight if trains_shared else None,
                                                 "old_val_before": before, "old_val_after": after},
                          "wall_time_s": round(time.perf_counter() - started, 2)}, stimuli)
    if trainer.accelerator.is_main_process:
        if trains_shared:
            for old in old_eval:
                _save_view(shared, old, out_dir / "preserved" / old,
                           {**meta, "subject": old, "stage": "adapt_subject (preserved)"}, shared_groups)
        _save_view(shared, subject, out_dir, meta, shared_groups)
        log.info("wrote %s (best %s)", out_dir, result["best"])
    return meta

