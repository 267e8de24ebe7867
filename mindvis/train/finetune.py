"""Per-subject DC-LDM fine-tuning (the ``finetune`` stage): every route's training entry.

Loads the pretrained SC-MBM encoder (or, in ``baseline`` mode, a randomly
initialised encoder of the same size: MinD-Vis's no-pretraining ablation) and
the base generator, joins them with a fresh mapper (``finetune.mapper``; the
decoder classes are :mod:`mindvis.models.dcldm`'s), starts the mapper's linear
map from ridge where it has one (:mod:`mindvis.train.ridge_start`), and trains
on the subject's training trials (fMRI -> the image seen) with MinD-Vis's
diffusion loss and the label-free alignment losses beside it
(:mod:`mindvis.train.losses`), through the shared engine
(:mod:`mindvis.train.engine`).

Routes (``finetune.mapper``):

* ``readout`` (default): SC-MBM encoder -> one linear read-out of its tokens
  (:class:`~mindvis.models.conditioning.ReadoutConditioner`), started at the
  ridge solution from the starting encoder's features, so that the encoder
  carries the condition from the first step; nothing stays frozen but the VAE
  and the parts of the UNet MinD-Vis does not train.
* ``mindvis-ext``: the FmriConditioner, a ridge voxel path beside a zero-started
  encoder path (``finetune.ridge_lr_scale`` 0 keeps the voxel path fixed: the
  "no encoder, ridge only" arm of the benchmarks when the encoder is not trained).
* ``mindvis``: MinD-Vis's own mapper onto the UNet condition (Stable Diffusion,
  CompVis bases; configs/god_mindvis.yaml).

Trained: the parts named in ``finetune.train`` (default: the encoder, the
mapper, the UNet's cross-attention ``attn2`` layers and its norms);
everything else has ``requires_grad_(False)`` (no gradient memory) and stays
bit-identical. Conditions are dropped with probability ``finetune.cond_dropout``
(replaced by the null condition) so that classifier-free guidance works at
sampling time.

Model selection (:mod:`mindvis.train.selection`) uses the ``val`` split only,
by a criterion that reads no label and not the evaluation classifier: by
default the identification of quick samples of every validation trial among the
validation images, in the prior's own embedding space. The untrained start
competes (the engine evaluates before the first step).

Outputs in ``out_dir`` (``results/{subject}/dcldm/``)
----------------------------------------------------
The decoder folder of :mod:`mindvis.models.dcldm` (``dcldm.safetensors``,
``encoder/``, ``conditioner/``, ``dcldm.json``), and ``train/``: the engine's
``metrics.jsonl``, checkpoints (``--resume``) and ``best/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from mindvis.config import embedding_prior_wanted
from mindvis.data.pairs import paired_trials, training_share
from mindvis.data.responses import check_stimuli_pair, load_responses
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.models.dcldm import START_DIR, build_decoder, responses_record, save_dcldm, save_lowlevel
from mindvis.models.embedding_prior import save_embedding_prior
from mindvis.models.ldm import load_generator
from mindvis.models.mindvis_release import import_mindvis_finetuned
from mindvis.train.embedding_prior import fit_embedding_prior
from mindvis.train.engine import Trainer, TrainConfig, checkpoint_minutes
from mindvis.train.losses import make_loss_fn
from mindvis.train.ridge_start import start_mapper, voxel_path_record
from mindvis.train.selection import SELECT_MODES, fit_lowlevel_start, make_eval_fn, select_metric
from mindvis.utils.io import derive_seed, seed_everything, software_versions

log = logging.getLogger(__name__)

TRAINABLE_GROUPS = ("encoder", "conditioner", "attn2", "cross_attn_norms", "norms", "unet")


# -- what is trained ------------------------------------------------------------

def trainable_parameter_names(model, groups):
    """Names of the decoder's parameters that the ``finetune.train`` groups train.

    Parameters
    ----------
    model : mindvis.models.ldm.DCLDM
    groups : sequence of str
        From :data:`TRAINABLE_GROUPS`: ``encoder`` (the SC-MBM encoder, not its
        unused reconstruction decoder), ``conditioner``, ``attn2`` (every UNet
        cross-attention layer), ``cross_attn_norms`` (the LayerNorm before each
        cross-attention, a transformer block's ``norm2``: what MinD-Vis's
        ``configure_optimizers`` adds by the name ``norm2``, which in CompVis's UNet
        names only these), ``norms`` (every UNet GroupNorm / LayerNorm), ``unet``
        (the whole UNet).
    """
    unknown = sorted(set(groups) - set(TRAINABLE_GROUPS))
    if unknown:
        raise MindvisError(f"unknown trainable groups {unknown}", key="finetune.train",
                           fix=f"choose from {', '.join(TRAINABLE_GROUPS)}.")
    names = set()
    if "encoder" in groups:
        names |= {f"encoder.{name}" for name, _ in model.encoder.named_parameters()
                  if not name.startswith(("decoder", "mask_token"))}
    if "conditioner" in groups:
        # Under an image prior the prior's null condition is the unconditional branch: the conditioner's own
        # never enters the loss, and a parameter without a gradient stalls multi-process (DDP) training.
        unused = ("null_context", "null_pooled") if model.prior is not None else ()
        names |= {f"conditioner.{name}" for name, _ in model.conditioner.named_parameters() if name not in unused}
    for module_name, module in model.unet.named_modules():
        if "cross_attn_norms" in groups and getattr(module, "attn2", None) is not None:
            names |= {f"unet.{module_name}.norm2.{name}" for name, _ in module.norm2.named_parameters()}
        is_attn2 = "attn2" in groups and module_name.endswith("attn2")
        is_norm = "norms" in groups and isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        if "unet" in groups or is_attn2 or is_norm:
            names |= {f"unet.{module_name}.{name}" for name, _ in module.named_parameters()}
    return names


def freeze_for_finetuning(model, groups):
    """Set ``requires_grad`` so that only the named groups train; return the trained names (sorted)."""
    names = trainable_parameter_names(model, groups)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


# -- optimiser groups ------------------------------------------------------------

def finetune_param_groups(model, settings, ridge_started=False, voxel_lr_scale=None):
    """Optimizer groups: the encoder and a ridge-started map learn at their own rates, the rest at ``lr``.

    The encoder starts pretrained (``finetune.encoder_lr_scale``). A read-out or voxel path
    started from ridge holds a closed-form solution with small weights (thousands
    of z-scored voxels): Adam moves every weight by about the learning rate per
    step whatever its gradient, so at the full rate the noisy diffusion-loss
    gradient overwrites that solution within the warm-up
    (``finetune.ridge_lr_scale``; at 0 the path is frozen before this is called).
    ``voxel_lr_scale`` sets the voxel path's rate instead (a shared decoder's new adapter).
    """
    groups = {"encoder": [], "voxel": [], "other": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("views."):  # a shared decoder's views.<subject>.<name>
            name = name.split(".", 2)[2]
        if name.startswith("encoder."):
            groups["encoder"].append(parameter)
        elif name.startswith(("conditioner.voxel_map.", "conditioner.voxel_down.", "conditioner.readout.")):
            groups["voxel"].append(parameter)
        else:
            groups["other"].append(parameter)
    voxel = settings["ridge_lr_scale"] if ridge_started else 1.0
    scales = {"encoder": settings["encoder_lr_scale"], "voxel": voxel if voxel_lr_scale is None else voxel_lr_scale,
              "other": 1.0}
    return [{"params": params, "lr_scale": float(scales[key]), "weight_decay": settings["weight_decay"]}
            for key, params in groups.items() if params]


# -- the stage -----------------------------------------------------------------

def finetune_train_config(settings, seed, select, config, epochs=None):
    """The engine's settings of a fine-tuning run (``finetune`` section; ``select``: the selection metric)."""
    return TrainConfig(
        epochs=epochs or settings["epochs"], batch_size=settings["batch_size"],
        grad_accum_steps=settings["grad_accum_steps"], lr=settings["lr"], lr_schedule=settings["lr_schedule"],
        weight_decay=settings["weight_decay"], warmup_epochs=settings["warmup_epochs"], betas=(0.9, 0.999),
        clip_grad_norm=settings["clip_grad_norm"] or None, mixed_precision=settings["mixed_precision"], seed=seed,
        eval_every=settings["eval_every"], eval_at_start=select is not None, select_metric=select,
        select_mode=SELECT_MODES.get(select, "min"), optimizer=settings["optimizer"],
        checkpoint_every_minutes=checkpoint_minutes(config))


def finetune(config, subject, responses, stimuli, base, out_dir, mbm_dir=None, baseline=False, resume=False,
             released=None):
    """Fine-tune the DC-LDM decoder for one subject and write ``out_dir`` (see the module docstring).

    Parameters
    ----------
    config : dict
        The resolved experiment config.
    subject : str
        ``sub-XX``.
    responses : path
        The subject's ``responses.h5`` (train and val splits are read; never test).
    stimuli : path
        ``stimuli.h5``.
    base : path
        The base generator folder (``results/pretrain/ldm`` or a Stable Diffusion folder).
    out_dir : path
    mbm_dir : path, optional
        The pretrained SC-MBM folder (unused in baseline mode).
    baseline : bool
        Fine-tune from a random encoder (no SC-MBM pretraining).
    resume : bool
        Continue from the last checkpoint in ``out_dir/train``.
    released : path, optional
        MinD-Vis's released ``finetuned.pth`` for this subject (``finetune.released``): it is imported
        as the decoder (:func:`mindvis.models.mindvis_release.import_mindvis_finetuned`, against ``base``)
        instead of training one. Ignored for the ``baseline`` ablation, which is trained.

    Returns
    -------
    dict
        The contents of ``dcldm.json``.
    """
    started = time.perf_counter()
    settings, generate_settings = config["finetune"], config["generate"]
    out_dir = Path(out_dir)
    if released and not baseline:
        n_voxels = load_responses(responses, splits=("train",)).n_voxels
        log.info("%s: importing MinD-Vis's released decoder %s (nothing is trained)", subject, released)
        meta = import_mindvis_finetuned(released, out_dir, base=base, ldm_config=config["ldm"].get("compvis_config"),
                                        subject=subject, n_voxels=n_voxels, config=config)
        return meta
    # finetune.training_seed draws the training run (start, data order, noise, dropout) anew on the same data.
    seed = derive_seed(config["seed"], "finetune", subject, "baseline" if baseline else "pretrained",
                       settings["training_seed"])
    seed_everything(seed)
    data = load_responses(responses, splits=("train", "val"))
    check_stimuli_pair(data, responses, stimuli)
    stimulus_set = load_stimulus_set(stimuli)
    generator = load_generator(base, image_size=config["ldm"]["image_size"])
    generator.vae.requires_grad_(False).eval()
    if generator.conditioner is not None:
        generator.conditioner.requires_grad_(False).eval()
    elif settings["align_weight"] > 0:
        raise MindvisError("finetune.align_weight needs the base generator's own conditions, and this base has "
                           "none (a Stable Diffusion folder)", path=base, key="finetune.align_weight",
                           fix="set finetune.align_weight: 0 for a Stable Diffusion base (MinD-Vis's own loss).")
    model = build_decoder(config, generator, data.n_voxels, mbm_dir=mbm_dir, baseline=baseline)
    freeze_for_finetuning(model, settings["train"])
    if settings["gradient_checkpointing"]:
        generator.unet.enable_gradient_checkpointing()  # active in train mode only, so sampling is unchanged
    train_trials = paired_trials(data["train"], stimulus_set, generator.image_size, generator.image_channels)
    if (settings["train_fraction"] < 1.0 or settings["train_runs"]) and settings.get("new_subject") in (None, subject):
        # The learning curve (benchmarks/learning_curve.py), or the few-shot subject's from-scratch decoder
        # (finetune.new_subject: the same trials its adaptation sees): fewer labelled trials, the same val split.
        n_all = len(train_trials)
        train_trials = training_share(train_trials, settings["train_fraction"], settings["train_runs"],
                                      derive_seed(config["seed"], "train-fraction"))
        log.info("finetune.train_fraction %.2f, train_runs %s: %d of %d training trials", settings["train_fraction"],
                 settings["train_runs"], len(train_trials), n_all)
    val_trials = paired_trials(data["val"], stimulus_set, generator.image_size, generator.image_channels)
    if len(train_trials) == 0:
        raise MindvisError("no training trials", path=responses, key="train", fix="check the preprocessing output.")
    space = "embedding" if model.prior is not None else "condition"
    ridge_report = start_mapper(model, generator, train_trials, val_trials, settings, space,
                                "random" if baseline else "pretrained")
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    start_meta = None
    if generate_settings.get("start_row", False):  # the workflow decodes the main decoder's; benchmarks both
        # The decoder before any fine-tuning step (ridge start, zero encoder path), to measure what training adds.
        start_meta = {"stage": "finetune", "subject": subject, "baseline": bool(baseline), "base": str(base),
                      "image_size": generator.image_size, "n_voxels": int(data.n_voxels), "step": 0,
                      "start_of": str(out_dir), "voxel_path_ridge": ridge_report,
                      "inputs": {**responses_record(responses, data), "stimuli": str(stimuli)}, "config": config,
                      "versions": software_versions()}
    log.info("%s%s: training %d of %d decoder parameters (%s); %d training, %d validation trials",
             subject, " (baseline, random encoder)" if baseline else "", n_trained, n_total,
             ", ".join(settings["train"]), len(train_trials), len(val_trials))

    scheduler = DDPMScheduler.from_config(generator.scheduler_config)
    eval_fn = select = None
    if len(val_trials):
        select = select_metric(settings, generator)
        eval_fn = make_eval_fn(generator, scheduler, val_trials, settings, generate_settings, seed, select)
    else:
        log.warning("the val split is empty: no checkpoint selection, the last epoch's model is kept")
    param_groups = finetune_param_groups(model, settings, ridge_started=ridge_report is not None)
    train_config = finetune_train_config(settings, seed, select, config)
    trained_on = [responses, stimuli, base, *([Path(mbm_dir) / "diffusion_pytorch_model.safetensors"] if mbm_dir else [])]
    trainer = Trainer(model, train_trials, make_loss_fn(generator, scheduler, settings), train_config,
                      out_dir / "train", eval_fn=eval_fn, run_config=config, param_groups=param_groups,
                      checkpoint_params="trainable", inputs=trained_on)
    generator.vae.to(trainer.device)  # outside the trained model, so the engine does not place it
    if generator.conditioner is not None:
        generator.conditioner.to(trainer.device)
    if start_meta is not None and trainer.accelerator.is_main_process:
        save_dcldm(model, out_dir / START_DIR, start_meta, metadata={"subject": subject, "step": "0"})
    result = trainer.fit(resume=resume)
    if result["stopped_early"]:
        return result
    model = trainer.load_best().eval()
    lowlevel = None
    if generate_settings.get("lowlevel", False) and len(val_trials) and not baseline:
        generator.vae.eval()
        lowlevel = fit_lowlevel_start(model, generator, train_trials, val_trials, settings, generate_settings, seed)
    embedding_prior = None
    if embedding_prior_wanted(config) and not baseline:
        if not len(val_trials):
            raise MindvisError("the embedding prior's settings are chosen on the val split, and it is empty",
                               path=responses, key="finetune.embedding_prior",
                               fix="set preprocess.val_fraction above 0, or finetune.embedding_prior: false.")
        embedding_prior, no_prior = fit_embedding_prior(model, generator, val_trials, stimulus_set, config, seed)
        if embedding_prior is None:
            raise MindvisError(f"no embedding prior: {no_prior}", path=base, key="finetune.embedding_prior",
                               fix="set finetune.embedding_prior: false for this base, or name the image prior's "
                                   "corpus in finetune.embedding_prior_corpus.")
    meta = {
        "stage": "finetune", "subject": subject, "baseline": bool(baseline), "base": str(base),
        "image_size": generator.image_size, "n_voxels": int(data.n_voxels), "trained_groups": list(settings["train"]),
        "n_trained_parameters": int(n_trained), "n_parameters": int(n_total), "trained_parameter_names": trained,
        "select_metric": select, "best": result["best"], "final_metrics": result["last_metrics"],
        "voxel_path_ridge": ridge_report, "condition_space": space,
        "voxel_path": voxel_path_record(model.conditioner),
        "lowlevel": None if lowlevel is None else {"strength": lowlevel.strength, **lowlevel.info},
        "embedding_prior": (None if embedding_prior is None else
                            {**embedding_prior.settings(), **embedding_prior.info}),
        "step": result["step"], "epochs": result["epochs_done"],
        "training": {"peak_lr": result["peak_lr"], "effective_batch": result["effective_batch"],
                     "mixed_precision": result["mixed_precision"], "device": str(trainer.device),
                     "torch_threads": torch.get_num_threads()},
        "inputs": {**responses_record(responses, data), "stimuli": str(stimuli),
                   "mbm": None if baseline else str(mbm_dir)},
        "n_train": len(train_trials), "n_val": len(val_trials),
        "wall_time_s": round(time.perf_counter() - started, 2), "config": config, "versions": software_versions(),
    }
    if trainer.accelerator.is_main_process:
        if lowlevel is not None:
            save_lowlevel(out_dir, lowlevel)
        if embedding_prior is not None:
            save_embedding_prior(out_dir, embedding_prior)
        save_dcldm(model, out_dir, meta, metadata={"subject": subject})
        log.info("wrote %s (best %s)", out_dir, result["best"])
    return meta
