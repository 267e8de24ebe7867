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
    ``MBMAutoencoder.from_pretrained(out_dir)`` loads it.
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
``checkpoints/``, ``best/``
    The engine's resumable state (``--resume``).
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
from mindvis.utils.io import derive_seed, seed_everything, sha256_file, software_versions, write_json_atomic

log = logging.getLogger(__name__)

#: Files ``pretrain_mbm`` publishes in its output folder (the Snakemake rule declares these).
OUTPUT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl", "summary.json")


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

    if not responses_paths and not rest_paths:
        raise MindvisError("no pretraining data: neither responses nor resting-state files were given",
                           key="pretrain-mbm --responses/--rest",
                           fix="pass at least one responses.h5 or rest HDF5 (the workflow does this for you).")
    train_blocks, heldout_blocks, sources = [], [], []
    for path in responses_paths:
        responses = load_responses(path, splits=("train", "val"))
        train, val = responses["train"].fmri, responses["val"].fmri
        train_blocks.append(train)
        heldout_blocks.append(val)
        sources.append({"path": str(path), "sha256": sha256_file(path), "kind": "responses",
                        "subject": responses.subject, "n_voxels": responses.n_voxels, "n_train": len(train),
                        "n_heldout": len(val)})
    for path in rest_paths:
        rest = load_rest(path)
        held = _holdout_tail(rest.run, rest_holdout_fraction)
        train_blocks.append(rest.fmri[~held])
        heldout_blocks.append(rest.fmri[held])
        sources.append({"path": str(path), "sha256": sha256_file(path), "kind": "rest",
                        "subject": str(rest.attrs.get("subject", Path(path).stem)), "n_voxels": rest.n_voxels,
                        "n_train": int((~held).sum()), "n_heldout": int(held.sum())})
    train, heldout = VoxelCorpus(train_blocks), VoxelCorpus(heldout_blocks)
    if len(train) == 0:
        raise MindvisError("the pretraining corpus is empty (no training trials and no resting-state time points)",
                           path=(list(responses_paths) + list(rest_paths))[0],
                           fix="check that preprocessing wrote a non-empty train split or rest runs.")
    return train, heldout, sources


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
    """save_pretrained into a temporary folder, then move each file into ``out_dir`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    from mindvis.train.engine import TrainConfig, Trainer

    started = time.perf_counter()
    out_dir = Path(out_dir)
    mbm = config["mbm"]
    train, heldout, sources = build_corpus(list(responses), list(rest), mbm["rest_holdout_fraction"])
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
        mbm, seed=derive_seed(config["seed"], "mbm", "train"),
        select_metric="val/recon_corr" if eval_fn else None, select_mode="max")
    trainer = Trainer(model, train, make_loss_fn(augment), train_config, out_dir, eval_fn=eval_fn, run_config=config)
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
        "corpus": {"n_train": len(train), "n_heldout": len(heldout), "sources": sources},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    if trainer.accelerator.is_main_process:
        _publish(model, out_dir)
        write_json_atomic(out_dir / "summary.json", summary)
    trainer.accelerator.wait_for_everyone()
    best = result["best"]
    log.info("wrote %s (best %s)", out_dir,
             f"{best['metric']} = {best['value']:.4f} at epoch {best['epoch']}" if best else "n/a")
    return summary
