"""Edit a decoded image through its brain tokens: a voxel group's tokens from another trial, zeroed or scaled.

The decoder's condition is built from the SC-MBM encoder's patch tokens (each
token reads ``patch_size`` contiguous voxels of the vector, so the encoder's
patch layout says which tokens a voxel group owns) and, where the decoder has
one, a linear voxel path that reads the voxels directly. A brain-token edit of
trial A changes the group's share of both:

* ``swap``: the group's patch tokens (and voxel-path inputs) come from trial B;
* ``zero``: they are set to zero;
* ``scale``: they are multiplied by ``factor``.

A token belongs to the group when most of the real voxels it reads are in the
group (``token_share`` of them; MinD-Vis's wrapped padding counts each copy of
a voxel). The edited condition is sampled beside A's own with A's
cross-attention maps injected for the first ``tau`` steps
(:mod:`mindvis.generate.control`), seeded like ``generate``.

A voxel group is a set of ROI names of ``responses.h5``'s ``voxel_roi`` (e.g.
V1-V3 against the higher visual areas) or any NIfTI mask on the voxels'
grid (:func:`mask_voxels`).

Imports :mod:`mindvis.models` and :mod:`mindvis.data` only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mindvis.errors import MindvisError

OPERATIONS = ("swap", "zero", "scale")


@dataclass
class TokenEdit:
    """A brain-token edit: which voxels, and what happens to their tokens.

    Parameters
    ----------
    voxels : bool [V]
        The voxel group.
    operation : {'swap', 'zero', 'scale'}
    factor : float
        ``scale``: the multiplier (1 leaves the condition unchanged).
    token_share : float
        A patch token is the group's when more than this share of its real voxels is in the group.
    """

    voxels: np.ndarray
    operation: str = "swap"
    factor: float = 0.0
    token_share: float = 0.5

    def __post_init__(self):
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown edit operation {self.operation!r}; use one of {OPERATIONS}")
        self.voxels = np.asarray(self.voxels, dtype=bool)


def roi_voxels(voxel_roi, rois, path=None):
    """bool [V]: the voxels whose ROI name is in ``rois``; an unknown name is an error naming the known ones."""
    names = np.asarray(voxel_roi).astype(str)
    known = sorted(set(names))
    unknown = sorted(set(rois) - set(known))
    if unknown:
        raise MindvisError(f"ROI {', '.join(unknown)} not in voxel_roi ({', '.join(known)})", path=path,
                           key="voxel_roi", fix=f"name ROIs among {', '.join(known)}, or give a NIfTI mask.")
    return np.isin(names, list(rois))


def mask_voxels(mask_path, voxel_ijk, affine, volume_shape):
    """bool [V]: the voxels inside a NIfTI mask (nonzero) that lies on the voxels' grid (same shape and affine)."""
    import nibabel as nib

    try:
        image = nib.load(str(mask_path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise MindvisError(f"cannot read the mask ({error})", path=mask_path,
                           fix="give a NIfTI mask (.nii or .nii.gz) on the responses' voxel grid.") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(volume_shape) or not np.allclose(image.affine, affine, atol=1e-4):
        raise MindvisError(f"the mask's grid {tuple(data.shape)} does not match the responses' "
                           f"{tuple(volume_shape)} (or its affine differs)", path=mask_path,
                           fix="resample the mask to the BOLD grid the responses were read on "
                               "(nilearn.image.resample_to_img, interpolation='nearest').")
    ijk = np.asarray(voxel_ijk, dtype=np.int64)
    return data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] != 0


def _input_voxels(decoder, n_voxels):
    """The voxel each position of the encoder's input reads (-1: padding), and whether a class token leads."""
    conditioner, encoder = decoder.conditioner, decoder.encoder
    if not getattr(conditioner, "class_token", True):  # MinD-Vis's mapper: fMRI wrapped to its length
        length = int(conditioner.config.n_voxels) or n_voxels
        positions = np.arange(length) % n_voxels
        return np.pad(positions, (0, encoder.capacity - length), constant_values=-1), False
    positions = np.arange(encoder.capacity)
    return np.where(positions < n_voxels, positions, -1), True


def group_tokens(decoder, voxels, token_share=0.5):
    """bool [n_tokens]: the encoder's patch tokens that belong to a voxel group (see :class:`TokenEdit`)."""
    voxels = np.asarray(voxels, dtype=bool)
    positions, _ = _input_voxels(decoder, len(voxels))
    patches = positions.reshape(-1, decoder.encoder.config.patch_size)
    real = patches >= 0
    inside = np.where(real, voxels[np.clip(patches, 0, None)], False)
    share = inside.sum(1) / np.maximum(real.sum(1), 1)
    return share > token_share


@torch.no_grad()
def edited_condition(decoder, fmri, edit, donor=None):
    """The condition of ``fmri`` with a voxel group's tokens edited (:class:`TokenEdit`).

    Parameters
    ----------
    decoder : mindvis.models.dcldm.DCLDM
    fmri : float32 [N, V]
        The trials decoded (A).
    edit : TokenEdit
    donor : float32 [N, V], optional
        ``swap``: the trials the group's tokens come from (B), row by row.

    Returns
    -------
    Condition
        What :meth:`DCLDM.condition` gives, with the edit applied.
    """
    device = next(decoder.parameters()).device
    fmri = torch.as_tensor(fmri, dtype=torch.float32, device=device)
    if edit.voxels.shape != (fmri.shape[1],):
        raise ValueError(f"the voxel group has {edit.voxels.shape[0]} voxels, the trials {fmri.shape[1]}")
    if edit.operation == "swap":
        if donor is None:
            raise ValueError("a swap needs the donor trials")
        donor = torch.as_tensor(donor, dtype=torch.float32, device=device)
        if donor.shape != fmri.shape:
            raise ValueError(f"donor trials {tuple(donor.shape)} do not match the trials {tuple(fmri.shape)}")
    conditioner, encoder = decoder.conditioner, decoder.encoder
    tokens_in_group = torch.as_tensor(group_tokens(decoder, edit.voxels, edit.token_share), device=device)
    voxel_group = torch.as_tensor(edit.voxels, device=device)

    def apply(own, other, group):
        if edit.operation == "swap":
            return torch.where(group, other, own)
        value = own * float(edit.factor) if edit.operation == "scale" else torch.zeros_like(own)
        return torch.where(group, value, own)

    mindvis_layout = not getattr(conditioner, "class_token", True)
    if mindvis_layout:
        tokens = encoder.encode(conditioner.pad_fmri(fmri), class_token=False)
        other = encoder.encode(conditioner.pad_fmri(donor), class_token=False) if donor is not None else None
        tokens = apply(tokens, other, tokens_in_group[None, :, None])
        output = conditioner(tokens)
    else:
        tokens = encoder.encode(fmri)
        other = encoder.encode(donor) if donor is not None else None
        group = torch.cat([torch.zeros(1, dtype=torch.bool, device=device), tokens_in_group])  # never the class token
        tokens = apply(tokens, other, group[None, :, None])
        # A conditioner that also reads voxels (a voxel path, or a read-out of the voxels) gets the group's voxels
        # edited as its tokens are.
        reads_voxels = bool(getattr(conditioner.config, "n_voxels", 0))
        voxel_input = apply(fmri, donor, voxel_group[None, :]) if reads_voxels else fmri
        output = conditioner(tokens, decoder.token_mask(fmri), fmri=voxel_input)
    if decoder.prior is not None:
        return decoder.prior.condition(output.context)
    return output


def changed_tokens(source, edited, tolerance=1e-6):
    """bool [T]: the condition tokens an edit changed in any row (relative change above ``tolerance``)."""
    difference = (edited.context - source.context).norm(dim=-1)
    scale = source.context.norm(dim=-1).clamp_min(1e-12)
    return ((difference / scale) > tolerance).any(dim=0).cpu()


@torch.no_grad()
def edit_trials(decoder, generator, fmri, edit, settings, seeds, *, donor=None, attention=None, record=False,
                source=None):
    """Decode trials and their brain-token edits, the edits under Prompt-to-Prompt attention control.

    Parameters
    ----------
    decoder, generator
        As for :func:`mindvis.generate.decode.decode`.
    fmri : float32 [N, V]
    edit : TokenEdit
    settings : dict
        The ``generate`` config section.
    seeds : int [N]
        One sample per trial; its edit starts from the same noise.
    donor : float32 [N, V], optional
        ``swap``'s donor trials.
    attention : mindvis.generate.control.AttentionEdit, optional
        Default: replace for no steps (the edited condition alone). ``refine`` without ``own`` keeps the edit's
        own maps on the condition tokens it changed (:func:`changed_tokens`).
    record : bool
        Keep each run's cross-attention maps.
    source : uint8 [N, H, W, C], optional
        The trials' decoded images from an earlier call with the same seeds and settings, reused where the
        attention control does nothing (below).

    Returns
    -------
    dict
        ``source`` and ``edited`` uint8 [N, H, W, C], ``changed_tokens`` bool [T], ``controllers`` (one per
        sampler call of ``generate.batch_size // 2`` trials; with ``record``, their maps; none when the control
        does nothing).

    Where the attention control does nothing (no step injected, no reweighting, nothing recorded) the edit is
    a plain run of the edited condition: both images are sampled as ``generate`` samples
    (:func:`mindvis.generate.decode.sample_conditions`), the source only when ``source`` is not given.
    """
    from mindvis.data.images import tensor_to_images
    from mindvis.generate.control import AttentionEdit, sample_edit

    device = next(decoder.parameters()).device
    source_condition = decoder.condition(torch.as_tensor(fmri, dtype=torch.float32, device=device))
    edited = edited_condition(decoder, fmri, edit, donor)
    changed = changed_tokens(source_condition, edited)
    attention = attention or AttentionEdit("replace", tau=0)
    if (attention.mode is None or int(attention.tau) == 0) and attention.weights is None and not record:
        from mindvis.generate.decode import sample_conditions

        column, batch = np.asarray(seeds, np.int64)[:, None], int(settings.get("batch_size", len(seeds)))
        if source is None:
            source = sample_conditions(generator, source_condition, decoder.null, column, settings, batch)[:, 0]
        return {"source": np.asarray(source), "changed_tokens": changed, "controllers": [],
                "edited": sample_conditions(generator, edited, decoder.null, column, settings, batch)[:, 0]}
    if attention.mode == "refine" and attention.own is None:
        attention = dataclasses.replace(attention, own=changed)
    # generate.batch_size images per sampler call: a source and its edit are two, each with its null branch.
    chunk = max(1, int(settings.get("batch_size", len(seeds))) // 2)
    seeds = [int(seed) for seed in seeds]
    sources, edits, controllers = [], [], []
    for start in range(0, len(seeds), chunk):
        rows = torch.arange(start, min(start + chunk, len(seeds)), device=source_condition.context.device)
        images, controller = sample_edit(generator, source_condition.select(rows), edited.select(rows), decoder.null,
                                         seeds[start:start + chunk], settings, attention, record=record)
        sources.append(tensor_to_images(images[0]))
        edits.append(tensor_to_images(images[1]))
        controllers.append(controller)
    return {"source": np.concatenate(sources), "edited": np.concatenate(edits), "changed_tokens": changed,
            "controllers": controllers}


EDITS_FILE = "edits.h5"
EDITS_JSON = "edits.json"


def resize_images(images, size):
    """uint8 images [N, H, W, C] at ``size`` x ``size`` (PIL's default filter), unchanged when already that size."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images
    out = np.stack([np.asarray(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).resize((size, size)))
                    for im in images]) if len(images) else np.zeros((0, size, size), np.uint8)
    return out[..., None] if out.ndim == 3 else out


#: What an edit writes in its folder (replaced as a unit, so nothing else may live there).
EDIT_OUTPUTS = (EDITS_FILE, EDITS_JSON, "grid.png")


def write_edits(out_dir, arrays, record, grid=None):
    """``edits.h5`` (``arrays``: dataset name -> array; attribute ``shown_groups`` where ``record`` has it),
    ``edits.json`` (``record``) and, given ``grid`` (rows and true images), ``grid.png``: the folder replaced as
    one unit, so ``edits.json``'s groups always index the ``edits.h5`` beside it."""
    from mindvis.generate.writing import save_grid
    from mindvis.utils.io import atomic_folder, atomic_path, check_own_folder, hdf5_for_writing, write_json_atomic

    check_own_folder(out_dir, EDIT_OUTPUTS, "edits")
    with atomic_folder(out_dir) as staging:
        with atomic_path(staging / EDITS_FILE) as tmp, hdf5_for_writing(tmp) as handle:
            for name, values in arrays.items():
                handle.create_dataset(name, data=values)
            if "shown_groups" in record:
                handle.attrs["shown_groups"] = json.dumps(record["shown_groups"])
        write_json_atomic(staging / EDITS_JSON, record)
        if grid is not None:
            save_grid(staging / "grid.png", grid[0], truth=grid[1])


def _voxel_group(responses, rois=None, mask=None, path=None):
    if (rois is None) == (mask is None):
        raise MindvisError("give the voxel group as ROI names or as a NIfTI mask, not both or neither",
                           key="--rois/--mask", fix="e.g. --rois V1 V2 V3, or --mask my_roi.nii.gz.")
    if rois is not None:
        return roi_voxels(responses.voxel_roi, rois, path=path)
    return mask_voxels(mask, responses.voxel_ijk, responses.affine, responses.volume_shape)


def check_edit_arguments(operation, donor_ids, factor, taus, steps):
    """Refuse an edit whose flags conflict or lack a value, before anything is loaded.

    ``scale`` needs its ``factor`` (no silent 0); a ``factor`` or ``donor_ids`` given to an operation that does
    not read them is refused (it would be ignored); every tau is a number of steps in ``[0, steps]``.
    """
    if operation not in OPERATIONS:
        raise MindvisError(f"unknown edit operation {operation!r}", key="--operation",
                           fix=f"use one of {', '.join(OPERATIONS)}.")
    if operation == "scale" and factor is None:
        raise MindvisError("--operation scale needs the multiplier of the group's tokens", key="--factor",
                           fix="give --factor, e.g. --factor 0.5 (1 changes nothing, 0 is --operation zero).")
    if operation != "scale" and factor is not None:
        raise MindvisError(f"--factor is read by --operation scale only, not by {operation}", key="--factor",
                           fix="drop --factor, or use --operation scale.")
    if operation != "swap" and donor_ids:
        raise MindvisError(f"--donors are read by --operation swap only, not by {operation}", key="--donors",
                           fix="drop --donors, or use --operation swap.")
    if factor is not None and not np.isfinite(factor):
        raise MindvisError(f"--factor must be a finite number, found {factor}", key="--factor",
                           fix="give a finite multiplier, e.g. --factor 0.5.")
    if not len(taus):
        raise MindvisError("no --tau given", key="--tau", fix="give at least one tau, e.g. --tau 0.")
    bad = [int(tau) for tau in taus if not 0 <= int(tau) <= int(steps)]
    if bad:
        raise MindvisError(f"--tau {', '.join(map(str, bad))} is not a number of denoising steps between 0 and "
                           f"generate.steps ({int(steps)})", key="--tau",
                           fix=f"give taus from 0 (no injection) to {int(steps)} (every step).")


def edit_subject(config, subject, model_dir, responses, stimuli, out_dir, *, stimulus_ids, operation="swap",
                 donor_ids=None, rois=None, mask=None, factor=None, taus=(0,), mode="replace", base=None,
                 device="auto", overrides=()):
    """Decode test stimuli and their brain-token edits; write ``edits.h5``, ``grid.png`` and ``edits.json``.

    Parameters
    ----------
    config : dict
        Resolved config (``generate`` section, ``seed``).
    subject, model_dir, responses, stimuli
        As for :func:`mindvis.generate.run.generate_subject`; ``generate.split`` is read.
    out_dir : path
    stimulus_ids : list of str
        The trials decoded (A).
    operation : {'swap', 'zero', 'scale'}
    donor_ids : list of str, optional
        ``swap``: the trial whose tokens each A receives (B), one per A.
    rois : list of str, optional
        The voxel group as ROI names of ``voxel_roi``; or ``mask``, a NIfTI mask on the voxels' grid.
    factor : float, optional
        ``scale``'s multiplier (required by ``scale``, refused by the other operations).
    taus : sequence of int
        Steps of the source's cross-attention injected (0: the edited condition alone).
    mode : {'replace', 'refine'}
    overrides : collection of str
        Inputs other than the decoder's own that the user means, as for
        :func:`mindvis.generate.run.generate_subject`; recorded in ``edits.json``.

    Returns
    -------
    dict
        What ``edits.json`` holds.

    Sample seeds are the ``generate`` stage's first sample's (``derive_seed(seed, "generate", subject, id, 0)``):
    the source image is that stage's first sample of the stimulus.
    """
    import time

    from mindvis.data.responses import check_stimuli_pair, load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.generate.control import AttentionEdit
    from mindvis.models.dcldm import check_decoder_inputs, check_decoder_responses, load_dcldm
    from mindvis.utils.device import select_device
    from mindvis.utils.io import check_own_folder, derive_seed, software_versions

    started = time.perf_counter()
    settings = config["generate"]
    out_dir = Path(out_dir)
    check_edit_arguments(operation, donor_ids, factor, taus, settings["steps"])
    check_own_folder(out_dir, EDIT_OUTPUTS, "edits")
    data = load_responses(responses, splits=(settings["split"],))
    split = data[settings["split"]]
    known = [str(s) for s in split.stimulus_id]

    def rows_of(ids, what):
        missing = [s for s in ids if s not in known]
        if missing:
            raise MindvisError(f"{what} {', '.join(missing[:5])} not in the {settings['split']} split", path=responses,
                               key=f"{settings['split']}/stimulus_id",
                               fix=f"name stimuli of generate.split ({settings['split']}), e.g. {', '.join(known[:3])}.")
        return [known.index(s) for s in ids]

    rows = rows_of(list(stimulus_ids), "stimulus")
    donors = None
    if operation == "swap":
        if not donor_ids or len(donor_ids) != len(rows):
            raise MindvisError(f"a swap needs one donor stimulus per stimulus ({len(rows)}), got "
                               f"{len(donor_ids or [])}", key="--donors",
                               fix=f"give --donors with one stimulus id per --ids ({len(rows)} in all), in order.")
        donors = rows_of(list(donor_ids), "donor stimulus")
    voxels = _voxel_group(data, rois, mask, path=responses)
    what = f"--rois {' '.join(rois)}" if rois is not None else f"--mask {mask}"
    if not voxels.any():
        raise MindvisError(f"the voxel group ({what}) covers none of the {data.n_voxels} voxels of the responses",
                           path=mask if mask is not None else responses, key="--mask" if mask is not None else "--rois",
                           fix="give a group that holds some of the responses' voxels (nonzero mask voxels inside "
                               "the ROI the responses were read from).")
    generator, decoder, meta = load_dcldm(model_dir, base=base, allow_other_prior="prior" in overrides)
    check_decoder_responses(meta, data, responses, model_dir)
    if "stimuli" not in overrides:  # --allow-other-stimuli: the user means another stimulus file
        check_stimuli_pair(data, responses, stimuli)
    used = check_decoder_inputs(meta, model_dir, subject=subject, data=data, responses=responses, stimuli=stimuli,
                                allow=overrides)
    used += [] if meta["prior_used"]["same_as_recorded"] else ["prior"]
    n_tokens = int(group_tokens(decoder, voxels).sum())
    if not n_tokens:
        raise MindvisError(f"the voxel group ({what}, {int(voxels.sum())} voxels) fills no encoder token (a token "
                           "is the group's when more than half its voxels are): the edit would change nothing",
                           path=mask if mask is not None else responses, key="--mask" if mask is not None else "--rois",
                           fix="give a larger group (more ROIs, or a larger mask).")
    device = select_device(device)
    generator.to(device)
    decoder.to(device)
    edit = TokenEdit(voxels, operation, 0.0 if factor is None else float(factor))
    seeds = [derive_seed(config["seed"], "generate", subject, known[r], 0) for r in rows]
    fmri = split.fmri[rows]
    donor_fmri = split.fmri[donors] if donors is not None else None
    source, edited, changed = None, [], None
    for tau in taus:
        out = edit_trials(decoder, generator, fmri, edit, settings, seeds, donor=donor_fmri,
                          attention=AttentionEdit(mode, int(tau)))
        source, changed = out["source"], out["changed_tokens"]
        edited.append(out["edited"])
    edited = np.stack(edited, axis=1)  # [N, n_tau, H, W, C]
    change = np.abs(edited.astype(np.float32) - source[:, None].astype(np.float32)).mean(axis=-1) / 255.0
    stimulus_set = load_stimulus_set(stimuli)
    truth, labels = stimulus_set.lookup([known[r] for r in rows])
    columns = [source[:, None], edited]
    if donors is not None:
        donor_truth, _ = stimulus_set.lookup([known[r] for r in donors])
        columns.insert(0, resize_images(donor_truth, source.shape[1])[:, None])
    heat = (np.clip(change * 4, 0, 1) * 255).astype(np.uint8)[..., None]
    if source.shape[-1] == 3:
        heat = np.repeat(heat, 3, axis=-1)
    grid = (np.concatenate([*columns, heat], axis=1), truth)
    record = {"stage": "edit", "subject": subject, "model_dir": str(model_dir), "operation": operation,
              "factor": None if factor is None else float(factor), "rois": list(rois) if rois is not None else None,
              "mask": None if mask is None else str(mask), "n_group_voxels": int(voxels.sum()),
              "n_group_tokens": int(group_tokens(decoder, voxels).sum()),
              "changed_condition_tokens": int(changed.sum()), "mode": mode, "taus": [int(t) for t in taus],
              "stimulus_id": [known[r] for r in rows], "donor_id": None if donors is None else [known[r] for r in donors],
              "seeds": seeds, "grid_columns": (["donor image"] if donors is not None else []) + ["decoded"]
              + [f"edit, tau {int(t)}" for t in taus] + [f"change, tau {int(taus[-1])} (x4)"],
              **{k: settings[k] for k in ("sampler", "steps", "guidance_scale", "eta", "split")},
              "responses": str(responses), "stimuli": str(stimuli), "prior": meta["prior_used"]["path"],
              "overrides": sorted(used), "config": config, "versions": software_versions()}
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    write_edits(out_dir, {"source": source, "edited": edited, "change": change.astype(np.float32),
                          "true_images": truth, "label": np.asarray(labels, np.int64)}, record, grid=grid)
    return record
