"""Import MinD-Vis's released fine-tuned decoder (``finetuned.pth``) as a mindvis decoder folder.

MinD-Vis releases one ``finetuned.pth`` per decoded subject (GOD subject 3,
BOLD5000 CSI1): ``torch.save({"model_state_dict": LatentDiffusion.state_dict(),
"config": Config_Generative_Model, "state": rng_state})``. Its state dict holds

==============================================  ===============================================
MinD-Vis key prefix                             mindvis part
==============================================  ===============================================
``cond_stage_model.mae.*``                      the SC-MBM encoder (``MBMAutoencoder``, no decoder;
                                                names as :mod:`mindvis.models.mindvis_checkpoint`)
``cond_stage_model.channel_mapper.{0,1}.*``     :class:`~mindvis.models.conditioning.MindVisConditioner`
``cond_stage_model.dim_mapper.*``               ``channel_mapper`` / ``dim_mapper``
``model.diffusion_model.time_embed_condtion.*``  its ``time_condition`` (the pooled condition)
``model.diffusion_model.*`` (the rest)          the UNet (:mod:`mindvis.models.compvis`)
``first_stage_model.*``                         the VQ-f4 first stage (:mod:`mindvis.models.compvis`)
schedule buffers (``betas``, ...)               checked against the LDM config's schedule
==============================================  ===============================================

The decoder folder it writes (``dcldm.safetensors``, ``encoder/``,
``conditioner/``, ``dcldm.json``) is what ``generate`` and ``evaluate`` read,
so the released model is sampled and scored like one fine-tuned here. Its base
generator is either a converted ``cin256-v2`` folder given as ``base`` (then
only the UNet tensors that MinD-Vis's fine-tuning changed are stored, as
mindvis stores its own decoders), or, without one, a ``generator/`` folder
converted from the checkpoint's own UNet and first stage.

The file is read with ``torch.load(weights_only=True)``; its pickled config
object becomes an inert stand-in (no code from the file runs). Every tensor
is mapped by name and its shape checked; anything left over is an error
unless ``strict=False``, and is listed in ``import_report.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_folder, sha256_file, software_versions, write_json_atomic

log = logging.getLogger(__name__)

ENCODER_PREFIX = "cond_stage_model.mae."
MAPPER_PREFIX = "cond_stage_model."
TIME_CONDITION_PREFIX = "time_embed_condtion."  # MinD-Vis's spelling, inside the UNet
#: MinD-Vis's GOD settings (``code/config.py``, ``Config_Generative_Model``) where the pickle lacks them.
MINDVIS_DEFAULTS = {"patch_size": 16, "img_size": 256, "global_pool": False, "use_time_cond": True,
                    "num_samples": 5, "ddim_steps": 250}


def read_release(path):
    """The state dict and recorded settings of a MinD-Vis ``finetuned.pth``.

    Returns
    -------
    state : dict of str -> Tensor
    settings : dict
        ``patch_size``, ``img_size``, ``global_pool``, ``use_time_cond``, ``num_samples``,
        ``ddim_steps`` from the pickled config, else :data:`MINDVIS_DEFAULTS`; plus ``dataset``
        and ``subjects`` when recorded.
    stand_ins : list of str
    """
    from mindvis.models.mindvis_checkpoint import load_pickled_checkpoint

    path = Path(path)
    if not path.exists():
        raise MindvisError("checkpoint not found", path=path, fix="give the path of MinD-Vis's finetuned.pth.")
    loaded, stand_ins = load_pickled_checkpoint(path)
    if not isinstance(loaded, dict) or "model_state_dict" not in loaded:
        raise MindvisError("no 'model_state_dict' in the file: not a MinD-Vis fine-tuned checkpoint", path=path,
                           key="model_state_dict",
                           fix="give finetuned.pth (or a checkpoint.pth written by MinD-Vis's stageB_ldm_finetune.py); "
                               "for fmri_encoder.pth use mindvis import-checkpoint.")
    state = loaded["model_state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MindvisError("'model_state_dict' is not a state dict of tensors", path=path, key="model_state_dict")
    recorded = vars(loaded["config"]) if hasattr(loaded.get("config"), "__dict__") else {}
    settings = {key: recorded.get(key, default) for key, default in MINDVIS_DEFAULTS.items()}
    settings["dataset"] = recorded.get("dataset")
    subjects = recorded.get("kam_subs") if settings["dataset"] == "GOD" else recorded.get("bold5000_subs")
    settings["subjects"] = list(subjects) if isinstance(subjects, (list, tuple)) else None
    return state, settings, stand_ins


def _encoder(state, patch_size, num_heads, path):
    """MinD-Vis's fine-tuned fMRI encoder -> MBMAutoencoder (no reconstruction decoder in the file)."""
    from mindvis.models.mbm import MBMAutoencoder
    from mindvis.models.mindvis_checkpoint import convert_state_dict, infer_architecture

    encoder_state = {key[len(ENCODER_PREFIX):]: value for key, value in state.items() if key.startswith(ENCODER_PREFIX)}
    if not encoder_state:
        raise MindvisError("no fMRI encoder (cond_stage_model.mae.*) in the state dict", path=path,
                           key=ENCODER_PREFIX + "patch_embed.proj.weight",
                           fix="give a MinD-Vis fine-tuned checkpoint (finetuned.pth).")
    architecture, notes = infer_architecture(encoder_state, None, num_heads, None, path)
    if architecture["patch_size"] != patch_size:
        notes.append(f"the checkpoint's config says patch_size {patch_size}, its patch embedding "
                     f"{architecture['patch_size']}: the tensor's is used")
    torch.manual_seed(0)
    model = MBMAutoencoder(**architecture)
    new_state, report = convert_state_dict(encoder_state, model.state_dict(), has_decoder=False)
    if report["shape_mismatch"]:
        key, detail = next(iter(report["shape_mismatch"].items()))
        raise MindvisError(f"encoder tensor shape does not fit: {detail}", path=path, key=ENCODER_PREFIX + key)
    model.load_state_dict(new_state, strict=True)
    # The reconstruction decoder is not in a fine-tuned file: it is never used when decoding.
    report["not_in_checkpoint"] = [k for k in report["not_in_checkpoint"] if not k.startswith(("decoder", "mask_token"))]
    return model, report, notes


def _conditioner(state, encoder, unet, use_time_cond, path):
    """MinD-Vis's channel_mapper / dim_mapper / time_embed_condtion -> MindVisConditioner."""
    from mindvis.models.conditioning import MindVisConditioner

    def need(key):
        if key not in state:
            raise MindvisError("tensor missing from the state dict", path=path, key=key,
                               fix="give a MinD-Vis checkpoint fine-tuned with global_pool: false (the released "
                                   "ones); a global-pool mapper has no channel_mapper and is not supported.")
        return state[key]

    first = need(MAPPER_PREFIX + "channel_mapper.0.weight")
    last = need(MAPPER_PREFIX + "channel_mapper.1.weight")
    width = need(MAPPER_PREFIX + "dim_mapper.weight")
    if int(first.shape[1]) != encoder.n_tokens:
        raise MindvisError(f"channel_mapper.0 takes {first.shape[1]} tokens but the encoder makes {encoder.n_tokens}",
                           path=path, key=MAPPER_PREFIX + "channel_mapper.0.weight")
    pooled_dim = int(unet.time_embedding.linear_2.out_features) if use_time_cond else 0
    conditioner = MindVisConditioner(input_tokens=encoder.n_tokens, input_dim=int(width.shape[1]),
                                     context_tokens=int(last.shape[0]), cross_attention_dim=int(width.shape[0]),
                                     pooled_dim=pooled_dim, n_voxels=encoder.capacity)
    sources = {f"channel_mapper.{i}.{p}": f"{MAPPER_PREFIX}channel_mapper.{i}.{p}" for i in (0, 1)
               for p in ("weight", "bias")}
    sources.update({f"dim_mapper.{p}": f"{MAPPER_PREFIX}dim_mapper.{p}" for p in ("weight", "bias")})
    if use_time_cond:
        sources.update({f"time_condition.{i}.{p}": f"model.diffusion_model.{TIME_CONDITION_PREFIX}{i}.{p}"
                        for i in (0, 1, 2) for p in ("weight", "bias")})
    target = conditioner.state_dict()
    for name, key in sources.items():
        tensor = need(key)
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise MindvisError(f"shape {tuple(tensor.shape)} does not fit {name} {tuple(target[name].shape)}",
                               path=path, key=key)
        target[name] = tensor.float()
    conditioner.load_state_dict(target, strict=True)
    return conditioner, sorted(sources.values())


def import_mindvis_finetuned(checkpoint, out_dir, base=None, ldm_config=None, subject=None, n_voxels=None,
                             num_heads=None, strict=True, config=None):
    """Convert MinD-Vis's ``finetuned.pth`` into a mindvis decoder folder (see the module docstring).

    Parameters
    ----------
    checkpoint : path
        ``finetuned.pth``.
    out_dir : path
        The decoder folder to write (``results/{subject}/dcldm/``).
    base : path, optional
        A ``cin256-v2`` generator folder converted by :func:`mindvis.models.compvis.import_compvis_checkpoint`
        (``ldm.base`` of ``configs/god_mindvis.yaml``). Without it the checkpoint's own UNet and first stage
        are converted into ``out_dir/generator/``.
    ldm_config : path or dict, optional
        The latent-diffusion YAML (MinD-Vis's ``pretrains/ldm/label2img/config.yaml``); default ``cin256-v2``'s.
    subject : str, optional
        Recorded in ``dcldm.json``.
    n_voxels : int, optional
        The subject's voxel count in ``responses.h5``: checked against the encoder's capacity
        (MinD-Vis pads each vector to it by wrapping).
    num_heads : int, optional
        Encoder heads (not recorded in the file; MinD-Vis's 16).
    strict : bool
        Fail when any tensor of the file is left unmapped.
    config : dict, optional
        The resolved mindvis config, recorded in ``dcldm.json``.

    Returns
    -------
    dict
        The contents of ``dcldm.json`` (the import report is ``import_report.json`` beside it).
    """
    from mindvis.models.compvis import CIN256_V2, compvis_generator_modules, load_ldm_config
    from mindvis.models.dcldm import DCLDM, save_dcldm
    from mindvis.models.ldm import Generator, load_generator, save_generator

    path = Path(checkpoint)
    out_dir = Path(out_dir)
    state, settings, stand_ins = read_release(path)
    params = ldm_config if isinstance(ldm_config, dict) else (load_ldm_config(ldm_config) if ldm_config else CIN256_V2)
    unet_state = {k: v for k, v in state.items() if not k.startswith(f"model.diffusion_model.{TIME_CONDITION_PREFIX}")}
    vq, unet, scheduler_config, ldm_report = compvis_generator_modules(unet_state, params)
    encoder, encoder_report, notes = _encoder(state, settings["patch_size"], num_heads, path)
    if n_voxels is not None and int(n_voxels) > encoder.capacity:
        raise MindvisError(f"the subject has {n_voxels} voxels and the released encoder takes {encoder.capacity}",
                           path=path, key="cond_stage_model.mae.pos_embed",
                           fix="decode the subject and ROI the checkpoint was trained on (MinD-Vis: GOD VC, "
                               "padded to whole 16-voxel patches).")
    conditioner, conditioner_keys = _conditioner(state, encoder, unet, settings["use_time_cond"], path)

    encoder_keys = {ENCODER_PREFIX + key for key in encoder_report["mapped"]}
    handled = set(ldm_report["mapped_keys"]) | encoder_keys | set(conditioner_keys)
    ignored, unmapped = {}, {}
    for key in state:
        if key in handled:
            continue
        if not key.startswith(("model.", "first_stage_model.", "cond_stage_model.")) or key.startswith("model_ema."):
            ignored[key] = "schedule buffer or EMA copy (the scheduler recomputes the schedule)"
        elif key == ENCODER_PREFIX + "mask_token":
            ignored[key] = "the encoder's mask token (never used when the whole vector is encoded)"
        else:
            unmapped[key] = ldm_report["not_mapped"].get(key, "no counterpart in mindvis")
    if strict and unmapped:
        key = next(iter(unmapped))
        raise MindvisError(f"{len(unmapped)} tensors of the checkpoint are not mapped (first: {unmapped[key]})",
                           path=path, key=key, fix="pass strict=False (--no-strict) to import what maps; the rest "
                                                   "is listed in import_report.json.")

    image_size = int(settings["img_size"])
    # An interrupted import leaves the older folder (or none), never half of one.
    with atomic_folder(out_dir) as staging:
        if base is None:
            generator = Generator(vae=vq, unet=unet, scheduler_config=scheduler_config, image_size=image_size,
                                  context_tokens=conditioner.config.context_tokens, source=str(path))
            save_generator(generator, staging / "generator", extra={"source": "mindvis-release",
                                                                   "checkpoint": str(path)})
            base_folder, changed = out_dir / "generator", []
            unet.requires_grad_(False)
        else:
            base_unet = load_generator(base).unet.state_dict()
            changed = []
            for name, parameter in unet.named_parameters():
                if name not in base_unet or tuple(base_unet[name].shape) != tuple(parameter.shape):
                    raise MindvisError(f"the base UNet has no tensor {name} of shape {tuple(parameter.shape)}",
                                       path=base, key=name, fix="give the cin256-v2 folder MinD-Vis fine-tuned from "
                                                                "(ldm.base), or no base.")
                differs = not torch.equal(base_unet[name].to(parameter.dtype), parameter.detach())
                parameter.requires_grad_(differs)
                changed += [name] if differs else []
            base_folder = Path(base)
        decoder = DCLDM(encoder, conditioner, unet)
        meta = {"stage": "finetune", "imported_from": "mindvis-release", "subject": subject, "baseline": False,
                "base": str(base_folder), "image_size": image_size, "n_voxels": int(n_voxels or encoder.capacity),
                "encoder_capacity": int(encoder.capacity), "condition_space": "condition",
                "unet_tensors_stored": len(changed), "mindvis_settings": settings,
                "trained_parameter_names": [f"unet.{name}" for name in changed],
                "inputs": {"checkpoint": str(path), "checkpoint_sha256": sha256_file(path)},
                "config": config, "versions": software_versions()}
        save_dcldm(decoder, staging, meta, metadata={"subject": str(subject), "source": "mindvis-release"},
                   prior_files_at=staging / "generator" if base is None else None)
        report = {"source": str(path), "source_sha256": meta["inputs"]["checkpoint_sha256"],
                  "n_tensors_in_checkpoint": len(state), "pickled_classes_replaced": stand_ins,
                  "settings": settings, "encoder": {"n_mapped": len(encoder_report["mapped"]),
                                                    "architecture_notes": notes},
                  "conditioner_tensors": conditioner_keys, "ldm": {k: v for k, v in ldm_report.items()
                                                                   if k != "mapped_keys"},
                  "not_mapped": unmapped, "ignored": ignored, "unet_tensors_changed_from_base": changed if base is not None else None,
                  "versions": software_versions()}
        write_json_atomic(staging / "import_report.json", report)
    log.info("imported MinD-Vis's decoder %s -> %s (%d encoder tensors, %d conditioner tensors, %d UNet tensors "
             "changed from the base; %d not mapped)", path, out_dir, len(encoder_report["mapped"]),
             len(conditioner_keys), len(changed), len(unmapped))
    return json.loads((out_dir / "dcldm.json").read_text())
