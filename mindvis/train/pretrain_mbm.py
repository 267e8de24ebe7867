"""SC-MBM pretraining on every subject's voxel vectors (the ``pretrain_mbm`` stage).

The corpus is the training split of each ``responses.h5`` (one vector per
training trial) plus every time point of each resting-state file. Test trials
(``test``, ``test_avg``) are never read. Held out for the reconstruction metric
(never trained on): the ``val`` split of each ``responses.h5`` and the last
``mbm.rest_holdout_fraction`` of every resting-state run (a contiguous block,
so neighbouring, correlated time points do not straddle the split).

Outputs in ``out_dir`` (``results/pretrain/mbm/``)
-------------------------------------------------
``config.json`` + ``diffusion_pytorch_model.safetensors``
    The model with the best held-out reconstruction correlation;
    ``MBMAutoencoder.from_pretrained(out_dir)`` loads it (``load_pretrained_mbm`` after checking the SHA-256
    ``summary.json`` records).
``metrics.jsonl``
    One line per epoch (see :mod:`mindvis.train.engine`), with
    ``val/loss`` and ``val/recon_corr``: the Pearson correlation between
    predicted and true values of the hidden real voxels of each held-out
    vector (in the loss's target space), averaged over vectors, with the same
    masks at every epoch.
``summary.json``
    Resolved config, software versions, steps, best epoch and metric, final
    metrics, the corpus (files, SHA-256, subjects, voxel and vector counts)
    and timings.
``space.json``, ``template_dseg.nii.gz``, ``template_dseg.tsv``
    Only when every corpus file was read in one shared template space
    (``preprocess.space: template``): the space's spec
    (:mod:`mindvis.data.voxel_space`: grid, voxel count, order and digest, ROI
    counts, the template's settings) with the voxel indices and ROI names, and
    the template as a label image a lab can use as ``preprocess.template_mask``.
    :func:`adapt_mbm` refuses a subject whose voxels differ from it.
``checkpoints/``, ``best/``
    The engine's resumable state (``--resume``).

Per-subject adaptation (MinD-Vis's stage A2)
--------------------------------------------
With ``mbm.base`` other than ``embedded`` (``bundled``: the encoder shipped in
:data:`mindvis.models.bundled.BUNDLED_MBM`; otherwise an SC-MBM folder),
:func:`adapt_mbm` starts from that encoder and continues masked brain modelling
for ``mbm.adapt_epochs`` on one subject's ``train`` and ``val`` fMRI (and its
``test`` fMRI only when ``mbm.transductive``; images and labels are never
read), writing the same files into ``results/{subject}/mbm/``; its
``summary.json`` records ``transductive`` and ``adapted_on`` (the splits and
their vector counts) so that reports can flag a transductive encoder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mindvis.errors import MindvisError
from mindvis.models.mbm import MBM_FILES
from mindvis.utils.io import (derive_seed, file_digests, fsync_path, fsync_tree, seed_everything, sha256_file,
                              software_versions, write_json_atomic, write_text_atomic)

log = logging.getLogger(__name__)

#: Files ``pretrain_mbm`` and ``adapt_mbm`` publish in their output folder (the Snakemake rules declare these).
OUTPUT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl", "summary.json")
#: The shared voxel space of a model pretrained in one template space, and the template as a label image.
SPACE_FILE = "space.json"
TEMPLATE_FILES = ("template_dseg.nii.gz", "template_dseg.tsv")
#: Adaptation vectors the in-sample reconstruction metric of adapt_mbm scores (a fixed, seeded subset).
ADAPT_EVAL_VECTORS = 512


class VoxelCorpus:
    """Voxel vectors of unequal lengths, zero-padded into one matrix.

    Parameters
    ----------
    vectors : list of float32 [N_i, V_i] arrays
        One block per source file.

    Attributes
    ----------
    fmri : float32 [N, V_max] tensor
        All vectors, zero-padded at the end.
    n_voxels : int64 [N] tensor
        Real voxels of each vector.
    source : int64 [N] tensor
        Index of the block each vector came from.
    """

    def __init__(self, vectors):
        vectors = [np.asarray(block, dtype=np.float32) for block in vectors]
        width = max((block.shape[1] for block in vectors), default=0)
        total = sum(len(block) for block in vectors)
        fmri = np.zeros((total, width), dtype=np.float32)
        n_voxels = np.zeros(total, dtype=np.int64)
        source = np.zeros(total, dtype=np.int64)
        row = 0
        for index, block in enumerate(vectors):
            fmri[row:row + len(block), :block.shape[1]] = block
            n_voxels[row:row + len(block)] = block.shape[1]
            source[row:row + len(block)] = index
            row += len(block)
        self.fmri = torch.from_numpy(fmri)
        self.n_voxels = torch.from_numpy(n_voxels)
        self.source = torch.from_numpy(source)

    def __len__(self):
        return len(self.n_voxels)

    @property
    def width(self):
        return self.fmri.shape[1]

    def get_batch(self, indices):
        """indices: list of int -> {"fmri": [B, V_max] float32, "voxel_mask": [B, V_max] bool}."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        voxel_mask = torch.arange(self.width)[None, :] < self.n_voxels[indices, None]
        return {"fmri": self.fmri[indices], "voxel_mask": voxel_mask}


def _holdout_tail(runs, fraction):
    """Boolean [T]: the last ``fraction`` of each run's time points (at least one when fraction > 0)."""
    held = np.zeros(len(runs), dtype=bool)
    if fraction <= 0:
        return held
    for run in np.unique(runs):
        where = np.flatnonzero(runs == run)
        n_held = min(len(where) - 1, max(1, int(round(fraction * len(where)))))
        if n_held > 0:
            held[where[-n_held:]] = True
    return held


def build_corpus(responses_paths, rest_paths, rest_holdout_fraction=0.1):
    """Read the pretraining corpus and its held-out part.

    Parameters
    ----------
    responses_paths : list of path
        ``responses.h5`` files; their ``train`` split is trained on, their
        ``val`` split held out. ``test`` and ``test_avg`` are not read.
    rest_paths : list of path
        Resting-state HDF5 files; the tail of every run is held out.
    rest_holdout_fraction : float

    Returns
    -------
    train : VoxelCorpus
    heldout : VoxelCorpus
    sources : list of dict
        Per file: ``path``, ``sha256``, ``kind``, ``subject``, ``n_voxels``,
        ``n_train``, ``n_heldout``.
    """
    from mindvis.data.responses import load_responses, load_rest
    from mindvis.data.voxel_space import ijk_digest

    if not responses_paths and not rest_paths:
        raise MindvisError("no pretraining data: neither responses nor resting-state files were given",
                           key="pretrain-mbm --responses/--rest",
                           fix="pass at least one responses.h5 or rest HDF5 (the workflow does this for you).")
    train_blocks, heldout_blocks, sources, geometries = [], [], [], []
    for path in responses_paths:
        responses = load_responses(path, splits=("train", "val"))
        train, val = responses["train"].fmri, responses["val"].fmri
        train_blocks.append(train)
        heldout_blocks.append(val)
        sources.append({"path": str(path), "sha256": sha256_file(path), "kind": "responses",
                        "subject": responses.subject, "n_voxels": responses.n_voxels, "n_train": len(train),
                        "n_heldout": len(val), "bytes": Path(path).stat().st_size,
                        "voxel_ijk_sha256": ijk_digest(responses.voxel_ijk),
                        "space": _space_of(responses.attrs)})
        geometries.append(_geometry(responses))
    for path in rest_paths:
        rest = load_rest(path)
        held = _holdout_tail(rest.run, rest_holdout_fraction)
        train_blocks.append(rest.fmri[~held])
        heldout_blocks.append(rest.fmri[held])
        sources.append({"path": str(path), "sha256": sha256_file(path), "kind": "rest",
                        "subject": str(rest.attrs.get("subject", Path(path).stem)), "n_voxels": rest.n_voxels,
                        "n_train": int((~held).sum()), "n_heldout": int(held.sum()),
                        "bytes": Path(path).stat().st_size, "voxel_ijk_sha256": ijk_digest(rest.voxel_ijk),
                        "space": _space_of(rest.attrs)})
        geometries.append(_geometry(rest))
    train, heldout = VoxelCorpus(train_blocks), VoxelCorpus(heldout_blocks)
    del train_blocks, heldout_blocks
    if len(train) == 0:
        raise MindvisError("the pretraining corpus is empty (no training trials and no resting-state time points)",
                           path=(list(responses_paths) + list(rest_paths))[0],
                           fix="check that preprocessing wrote a non-empty train split or rest runs.")
    return train, heldout, sources, shared_space(geometries, sources)


def _geometry(data):
    """The voxel geometry of a loaded file, without its data (so the corpus is held once)."""
    from types import SimpleNamespace

    return SimpleNamespace(voxel_ijk=data.voxel_ijk, affine=data.affine, volume_shape=data.volume_shape,
                           voxel_roi=data.voxel_roi, attrs=data.attrs)


def _space_of(attrs):
    """``template`` or ``native``: how a preprocessed file chose its voxels (older files: native)."""
    return (attrs.get("voxel_space") or {}).get("space", "native")


def shared_space(geometries, sources):
    """The template space every corpus file shares, or None.

    Parameters
    ----------
    geometries : list
        The corpus files' ``voxel_ijk``, ``affine``, ``volume_shape``, ``voxel_roi`` and ``attrs``.
    sources : list of dict
        :func:`build_corpus`'s records, in the same order.

    Returns
    -------
    dict or None
        The spec (:func:`mindvis.data.voxel_space.space_spec`) with ``voxel_ijk``
        and ``voxel_roi`` lists and the template's settings (``template``: the
        ``preprocess.template_mask``, its SHA-256 and the simulator's
        resolution, field of view and nominal voxel counts), when every file was
        read at the same template voxels; None otherwise.
    """
    from mindvis.data.voxel_space import SIMULATE_SPACE_KEYS, space_spec

    if not geometries or any(source["space"] != "template" for source in sources):
        return None
    first = geometries[0]
    spec = space_spec(first.voxel_ijk, first.affine, first.volume_shape, first.voxel_roi)
    for other, source in zip(geometries[1:], sources[1:]):
        if (source["voxel_ijk_sha256"] != spec["voxel_ijk_sha256"]
                or tuple(other.volume_shape) != tuple(first.volume_shape)
                or not np.allclose(other.affine, first.affine, atol=1e-3)):
            log.warning("%s was read in another template space than %s: no shared space is recorded",
                        source["path"], sources[0]["path"])
            return None
    run_config = first.attrs.get("config") or {}
    simulate = run_config.get("simulate") or {}
    preprocess = first.attrs.get("preprocess_config") or {}
    spec["template"] = {
        "template_mask": preprocess.get("template_mask"),
        "mask_sha256": (first.attrs.get("voxel_space") or {}).get("mask_sha256"),
        "source": (run_config.get("data") or {}).get("source"),
        "simulate": {key: simulate.get(key) for key in SIMULATE_SPACE_KEYS} if simulate else None,
    }
    spec["voxel_order"] = "np.nonzero of the template mask (C order over i, j, k); token t holds voxels " \
                          "t * patch_size .. (t + 1) * patch_size - 1"
    spec["voxel_ijk"] = np.asarray(first.voxel_ijk, dtype=int).tolist()
    spec["voxel_roi"] = [str(name) for name in first.voxel_roi]
    return spec


def write_space(spec, out_dir):
    """Write ``space.json`` and the template label image + table (see the module docstring) into ``out_dir``."""
    import nibabel as nib
    import pandas as pd

    from mindvis.data.responses import voxels_to_nifti
    from mindvis.utils.io import atomic_path

    out_dir = Path(out_dir)
    names = sorted(set(spec["voxel_roi"]))
    index = {name: i + 1 for i, name in enumerate(names)}
    labels = np.array([index[name] for name in spec["voxel_roi"]], dtype=np.int16)
    image = voxels_to_nifti(labels, np.asarray(spec["voxel_ijk"], dtype=np.int32), np.asarray(spec["affine"]),
                            tuple(spec["volume_shape"]))
    image = nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine)
    image.set_sform(image.affine, code=4)  # MNI
    image.set_qform(image.affine, code=4)
    with atomic_path(out_dir / TEMPLATE_FILES[0]) as tmp:
        nib.save(image, tmp)
    write_text_atomic(out_dir / TEMPLATE_FILES[1],
                      pd.DataFrame({"index": list(index.values()), "name": names}).to_csv(sep="\t", index=False))
    write_json_atomic(out_dir / SPACE_FILE, spec)


def corpus_digest(sources):
    """One SHA-256 over the corpus files' SHA-256 (sorted by subject, then path): equal digests, equal corpora."""
    import hashlib

    lines = sorted(f"{source['subject']}\t{Path(source['path']).name}\t{source['sha256']}\n" for source in sources)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def masked_correlation(pred, target, weight):
    """Pearson correlation of ``pred`` and ``target`` over the entries where ``weight`` is 1, per sample.

    Parameters
    ----------
    pred, target : [B, ...] float
    weight : [B, ...] float (0 or 1)

    Returns
    -------
    Tensor
        [B] float32; NaN for a sample with fewer than two weighted entries.
    """
    pred, target, weight = (t.float().reshape(t.shape[0], -1) for t in (pred, target, weight))
    count = weight.sum(1)
    mean_pred = (pred * weight).sum(1) / count.clamp(min=1)
    mean_target = (target * weight).sum(1) / count.clamp(min=1)
    centred_pred = (pred - mean_pred[:, None]) * weight
    centred_target = (target - mean_target[:, None]) * weight
    cov = (centred_pred * centred_target).sum(1)
    denom = (centred_pred.pow(2).sum(1) * centred_target.pow(2).sum(1)).sqrt()
    corr = cov / denom.clamp(min=1e-12)
    return torch.where(count >= 2, corr, torch.full_like(corr, float("nan")))


@torch.no_grad()
def reconstruction_metrics(model, corpus, mask_ratio, seed, batch_size=64, device=None):
    """Held-out loss and reconstruction correlation of hidden voxels.

    Masks come from a generator seeded with ``seed``, so every call (epoch)
    scores the same hidden voxels.

    Parameters
    ----------
    model : MBMAutoencoder
    corpus : VoxelCorpus
    mask_ratio : float
    seed : int
    batch_size : int
    device : torch.device, optional
        Default: the model's device.

    Returns
    -------
    dict
        ``val/loss`` (mean squared error over hidden real voxels) and
        ``val/recon_corr`` (mean over vectors of the per-vector correlation).
    """
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    squared_sum, weight_sum, correlations = 0.0, 0.0, []
    for start in range(0, len(corpus), batch_size):
        batch = corpus.get_batch(list(range(start, min(start + batch_size, len(corpus)))))
        fmri, voxel_mask = batch["fmri"].to(device), batch["voxel_mask"].to(device)
        _, pred, mask = model(fmri, voxel_mask, mask_ratio=mask_ratio, generator=generator)
        padded, full_mask = model.pad(fmri, voxel_mask)
        target = model.loss_target(padded, full_mask)
        weight = mask.float()[..., None] * model.patchify(full_mask).float()
        squared_sum += float(((pred.float() - target) ** 2 * weight).sum())
        weight_sum += float(weight.sum())
        correlations.append(masked_correlation(pred, target, weight).cpu())
    corr = torch.cat(correlations) if correlations else torch.zeros(0)
    return {"val/loss": squared_sum / max(weight_sum, 1.0), "val/recon_corr": float(torch.nanmean(corr))}


def make_loss_fn(augment):
    """The training loss: augment the input, reconstruct the clean vector's hidden voxels."""

    def loss_fn(model, batch):
        clean, voxel_mask = batch["fmri"], batch["voxel_mask"]
        loss, _, _ = model(augment(clean, voxel_mask), voxel_mask, target=clean)
        return loss, {}

    return loss_fn


def _publish(model, out_dir):
    """save_pretrained into a temporary folder, then move each file into ``out_dir`` atomically; returns their
    SHA-256 (``summary.json`` ``sha256``, written after). ``summary.json`` is removed first, so a write cut short
    leaves no summary over new weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fsync_tree(tmp)
        for name in MBM_FILES:
            os.replace(tmp / name, out_dir / name)
        fsync_path(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return file_digests(out_dir, MBM_FILES)


def pretrain_mbm(config, responses, rest, out_dir, resume=False):
    """Pretrain the SC-MBM encoder on all subjects and write ``out_dir`` (see the module docstring).

    Parameters
    ----------
    config : dict
        The resolved experiment config (its ``mbm`` section and ``seed``).
    responses : list of path
        ``results/{subject}/responses.h5`` files.
    rest : list of path
        ``results/pretrain/rest/{subject}.h5`` files.
    out_dir : path
    resume : bool
        Continue from the last checkpoint in ``out_dir/checkpoints``.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    from mindvis.models.augment import FmriAugment
    from mindvis.models.mbm import mbm_from_config
    from mindvis.train.engine import TrainConfig, Trainer, checkpoint_minutes

    started = time.perf_counter()
    out_dir = Path(out_dir)
    mbm = config["mbm"]
    train, heldout, sources, space = build_corpus(list(responses), list(rest), mbm["rest_holdout_fraction"])
    log.info("pretraining corpus: %d vectors (%d held out) from %d files, %d to %d voxels", len(train), len(heldout),
             len(sources), min(s["n_voxels"] for s in sources), train.width)

    seed_everything(derive_seed(config["seed"], "mbm", "init"))
    model = mbm_from_config(mbm, n_voxels=train.width)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("SC-MBM preset '%s': %d tokens x %d voxels, %.2f M parameters", mbm["preset"], model.n_tokens,
             mbm["patch_size"], n_params / 1e6)
    augment = FmriAugment(mbm["voxel_dropout"], mbm["noise_std"])
    eval_seed = derive_seed(config["seed"], "mbm", "heldout-masks")
    eval_fn = None
    if len(heldout):
        def eval_fn(model, epoch):
            return reconstruction_metrics(model, heldout, model.config.mask_ratio, eval_seed, mbm["batch_size"])
    else:
        log.warning("no held-out vectors (empty val splits and rest_holdout_fraction 0): no reconstruction metric, "
                    "the last epoch's model is kept")
    train_config = TrainConfig.from_mapping(
        mbm, seed=derive_seed(config["seed"], "mbm", "train"), checkpoint_every_minutes=checkpoint_minutes(config),
        select_metric="val/recon_corr" if eval_fn else None, select_mode="max")
    trainer = Trainer(model, train, make_loss_fn(augment), train_config, out_dir, eval_fn=eval_fn, run_config=config,
                      inputs=[*responses, *rest])
    result = trainer.fit(resume=resume)
    if result["stopped_early"]:
        log.info("stopped at step %d of %d as asked (stop_at_step); rerun with --resume to finish", result["step"],
                 result["total_steps"])
        return result
    model = trainer.load_best()
    summary = {
        "stage": "pretrain_mbm", "config": config, "versions": software_versions(), "step": result["step"],
        "epochs": result["epochs_done"], "best": result["best"], "final_metrics": result["last_metrics"],
        "model": {"class": type(model).__name__, "preset": mbm["preset"], "n_parameters": n_params,
                  "n_tokens": model.n_tokens, "n_voxels": model.config.n_voxels},
        "training": {"peak_lr": result["peak_lr"], "effective_batch": result["effective_batch"],
                     "mixed_precision": result["mixed_precision"], "device": str(trainer.device),
                     "processes": trainer.world_size, "torch_threads": torch.get_num_threads()},
        "corpus": {"n_train": len(train), "n_heldout": len(heldout), "n_vectors": len(train) + len(heldout),
                   "n_subjects": len({source["subject"] for source in sources}),
                   "bytes": sum(source["bytes"] for source in sources), "sha256": corpus_digest(sources),
                   "sources": sources},
        "space": None if space is None else {key: value for key, value in space.items()
                                             if key not in ("voxel_ijk", "voxel_roi")},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    if trainer.accelerator.is_main_process:
        summary["sha256"] = _publish(model, out_dir)
        if space is not None:
            write_space(space, out_dir)
        else:
            for name in (SPACE_FILE,) + TEMPLATE_FILES:  # an older run's, not this model's
                (out_dir / name).unlink(missing_ok=True)
        write_json_atomic(out_dir / "summary.json", summary)
    trainer.accelerator.wait_for_everyone()
    best = result["best"]
    log.info("wrote %s (best %s)", out_dir,
             f"{best['metric']} = {best['value']:.4f} at epoch {best['epoch']}" if best else "n/a")
    return summary


# -- per-subject adaptation (MinD-Vis's stage A2) ---------------------------------

def adaptation_splits(transductive):
    """The splits of a subject's ``responses.h5`` that adaptation reads: ``train`` and ``val`` (+ ``test`` if
    ``transductive``; ``test_avg`` never, it only repeats ``test``)."""
    return ("train", "val", "test") if transductive else ("train", "val")


def adaptation_corpus(responses_path, transductive):
    """One subject's fMRI for adaptation: only the splits :func:`adaptation_splits` names are read.

    Parameters
    ----------
    responses_path : path
    transductive : bool

    Returns
    -------
    responses : Responses
        The loaded file (its ``splits`` hold only those splits).
    vectors : float32 [N, V]
        Their fMRI, stacked in split order.
    counts : dict
        Vectors per split.
    """
    from mindvis.data.responses import load_responses

    splits = adaptation_splits(transductive)
    responses = load_responses(responses_path, splits=splits)
    vectors = np.concatenate([responses[name].fmri for name in splits]).astype(np.float32)
    return responses, vectors, {name: len(responses[name]) for name in splits}


def resolve_base(config, config_path=None):
    """The SC-MBM folder ``mbm.base`` names, verified, and its template space (or None).

    ``bundled`` is :data:`mindvis.models.bundled.BUNDLED_MBM` (hash-checked); any
    other value but ``embedded`` is a folder. When the folder holds a
    ``space.json``, the config must read its subjects in that space
    (:func:`mindvis.data.voxel_space.check_space_config`).

    Returns
    -------
    folder : Path
    space : dict or None
    """
    import json

    from mindvis.data.voxel_space import check_space_config
    from mindvis.models.bundled import BUNDLED_MBM, resolve_bundled

    value = config["mbm"]["base"]
    if value == "embedded":
        raise MindvisError("mbm.base is 'embedded': the encoder is pretrained here (pretrain-mbm), not adapted",
                           path=config_path, key="mbm.base",
                           fix="set mbm.base: bundled (or an SC-MBM folder) to adapt a pretrained encoder per subject.")
    folder = resolve_bundled(value, BUNDLED_MBM, "mbm.base")
    if not (folder / "config.json").exists():
        raise MindvisError("not an SC-MBM folder (config.json + diffusion_pytorch_model.safetensors)", path=folder,
                           key="mbm.base", fix="point mbm.base at a pretrain-mbm output folder, or use bundled.")
    space = json.loads((folder / SPACE_FILE).read_text()) if (folder / SPACE_FILE).exists() else None
    if space is not None:
        what = "the shipped SC-MBM encoder (mbm.base: bundled)" if value == "bundled" else f"the encoder in {folder}"
        check_space_config(config, space, what, path=config_path)
    return folder, space


def adapt_mbm(config, subject, responses, out_dir, resume=False, config_path=None):
    """Adapt a pretrained SC-MBM encoder to one subject (MinD-Vis's stage A2); write ``out_dir``.

    Masked brain modelling continues from ``mbm.base`` for ``mbm.adapt_epochs``
    on the subject's ``train`` and ``val`` fMRI, and its ``test`` fMRI only when
    ``mbm.transductive`` (no image or label is read). No epoch is selected (the
    last is kept): the metric in ``metrics.jsonl`` (``adapt/loss``,
    ``adapt/recon_corr``) scores a fixed subset of the adaptation vectors
    themselves, in-sample, with the same masks every epoch.

    Parameters
    ----------
    config : dict
    subject : str
    responses : path
        The subject's ``responses.h5``.
    out_dir : path
        ``results/{subject}/mbm/``.
    resume : bool
    config_path : path, optional
        The config file, named in errors.

    Returns
    -------
    dict
        The summary written to ``summary.json``: ``transductive``, ``adapted_on``
        (``splits``, ``n_vectors`` per split), ``base`` (value, folder, bundle
        SHA-256), the in-sample metric before and after, config, versions.
    """
    import json

    from mindvis.data.voxel_space import check_same_space
    from mindvis.models.augment import FmriAugment
    from mindvis.models.bundled import PROVENANCE_FILE
    from mindvis.models.mbm import load_pretrained_mbm
    from mindvis.train.engine import TrainConfig, Trainer, checkpoint_minutes

    started = time.perf_counter()
    out_dir = Path(out_dir)
    mbm = config["mbm"]
    base_dir, space = resolve_base(config, config_path)
    data, vectors, counts = adaptation_corpus(responses, mbm["transductive"])
    if space is not None:
        what = "the shipped SC-MBM encoder" if mbm["base"] == "bundled" else f"the SC-MBM encoder in {base_dir}"
        check_same_space(space, data.voxel_ijk, data.affine, data.volume_shape, path=responses, what=what)
    log.info("%s: adapting %s on %d vectors (%s)%s", subject, base_dir, len(vectors),
             ", ".join(f"{name} {n}" for name, n in counts.items()),
             " -- transductive: test fMRI included" if mbm["transductive"] else "")

    model = load_pretrained_mbm(base_dir)
    model.resize_positions(data.n_voxels)  # a no-op in the encoder's own space
    corpus = VoxelCorpus([vectors])
    generator = np.random.default_rng(derive_seed(config["seed"], "mbm", "adapt-eval", subject))
    scored = VoxelCorpus([vectors[np.sort(generator.permutation(len(vectors))[:ADAPT_EVAL_VECTORS])]])
    eval_seed = derive_seed(config["seed"], "mbm", "adapt-masks", subject)

    def eval_fn(model, epoch):
        metrics = reconstruction_metrics(model, scored, model.config.mask_ratio, eval_seed, mbm["batch_size"])
        return {"adapt/loss": metrics["val/loss"], "adapt/recon_corr": metrics["val/recon_corr"]}

    model.eval()
    before = eval_fn(model, -1)
    base_provenance = base_dir / PROVENANCE_FILE
    base_record = {"value": mbm["base"], "folder": str(base_dir),
                   "bundle_sha256": json.loads(base_provenance.read_text()).get("bundle_sha256")
                   if base_provenance.exists() else None}
    if mbm["adapt_epochs"] == 0:
        result = {"step": 0, "epochs_done": 0, "last_metrics": before, "peak_lr": None, "effective_batch": None}
        log.info("%s: mbm.adapt_epochs is 0: the base encoder is used as it is", subject)
    else:
        seed_everything(derive_seed(config["seed"], "mbm", "adapt", subject))
        settings = {**mbm, "epochs": mbm["adapt_epochs"], "base_lr": mbm["adapt_base_lr"]}
        train_config = TrainConfig.from_mapping(settings, seed=derive_seed(config["seed"], "mbm", "adapt", subject),
                                                select_metric=None, checkpoint_every_minutes=checkpoint_minutes(config))
        trainer = Trainer(model, corpus, make_loss_fn(FmriAugment(mbm["voxel_dropout"], mbm["noise_std"])),
                          train_config, out_dir, eval_fn=eval_fn, run_config=config,
                          inputs=[responses, base_dir / "diffusion_pytorch_model.safetensors"])
        result = trainer.fit(resume=resume)
        if result["stopped_early"]:
            return result
        model = trainer.load_best()
    summary = {
        "stage": "adapt_mbm", "subject": subject, "transductive": bool(mbm["transductive"]),
        "adapted_on": {"splits": list(counts), "n_vectors": counts, "images_or_labels_read": False},
        "base": base_record, "config": config, "versions": software_versions(),
        "step": result["step"], "epochs": result["epochs_done"],
        "metric_note": "adapt/* score a fixed subset of the adaptation vectors themselves (in-sample)",
        "before": before, "final_metrics": result["last_metrics"],
        "model": {"class": type(model).__name__, "n_tokens": model.n_tokens, "n_voxels": model.config.n_voxels},
        "responses": {"path": str(responses), "sha256": sha256_file(responses)},
        "space": None if space is None else {key: value for key, value in space.items()
                                             if key not in ("voxel_ijk", "voxel_roi")},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    from mindvis.utils.device import is_main_process

    if not is_main_process():  # under accelerate launch: one process writes
        return summary
    summary["sha256"] = _publish(model, out_dir)
    for name in (SPACE_FILE,) + TEMPLATE_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)
    if mbm["adapt_epochs"] == 0:  # one line: the base's in-sample metric
        write_text_atomic(out_dir / "metrics.jsonl", json.dumps({"epoch": -1, "step": 0, **before}) + "\n")
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("%s: wrote %s (adapt/recon_corr %.4f -> %.4f)", subject, out_dir, before["adapt/recon_corr"],
             (result["last_metrics"] or before).get("adapt/recon_corr", float("nan")))
    return summary
