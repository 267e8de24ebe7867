"""The one training engine every mindvis stage uses (SC-MBM pretraining, DC-LDM fine-tuning).

A stage hands the engine a model, a data set, a loss function and (optionally)
an evaluation hook; the engine does the rest: device placement and multi-process
data parallel through Hugging Face Accelerate, bf16 autocast, AdamW with linear
warmup and cosine decay, the base-LR x batch / 256 rule, gradient clipping,
``tqdm`` progress, one JSON line of metrics per epoch, atomic checkpoints and
exact resume, and best-checkpoint selection on a validation metric.

Public API
----------
``TrainConfig``
    Dataclass of the optimisation settings (``TrainConfig.from_mapping(section)``
    picks its keys out of a config section and ignores the rest).
``Trainer(model, train_data, loss_fn, config, out_dir, *, eval_fn=None,
run_config=None, param_groups=None, collate_fn=None)``
    ``fit(resume=False) -> dict`` trains and returns a summary;
    ``load_best() -> nn.Module`` loads the best (else the last) weights into
    the model and returns it; ``model`` is the unwrapped module;
    ``accelerator`` the :class:`accelerate.Accelerator`.
``scaled_lr(base_lr, effective_batch)``, ``lr_factor(step, warmup_steps,
total_steps, min_ratio)``, ``resolve_mixed_precision(value, device)``.

Weights files are written and read by :mod:`mindvis.models.weights`, checkpoint
folders by :mod:`mindvis.train.checkpoint`.

Contracts
---------
``train_data``
    A map-style data set (``len`` + ``__getitem__``) whose items ``collate_fn``
    (default: torch's) stacks into a batch, or any object with ``__len__`` and
    ``get_batch(indices) -> batch`` (the fast path for in-memory tensors). A
    batch is a tensor, or a dict / list / tuple of tensors; the engine moves it
    to the device.
``loss_fn(model, batch) -> (loss, logs)``
    ``loss`` a scalar tensor; ``logs`` a dict of floats or scalar tensors
    averaged over the epoch into the metrics line as ``train/<name>``. It must
    call ``model(...)`` (its ``forward``) so that data-parallel gradient
    hooks fire. It runs under the engine's autocast.
``eval_fn(model, epoch) -> dict``
    Called after an epoch (every ``eval_every`` and after the last) on every
    process, with the unwrapped model in eval mode, under ``torch.no_grad``
    and autocast, after seeding torch with the same seed each time (so random
    masks are the same from epoch to epoch). Its values go into the metrics
    line under their own names; ``select_metric`` names one of them.
``param_groups``
    Optional list of ``{"params": [...], "lr_scale": float, "weight_decay":
    float}``; by default every trainable parameter is used, with no weight
    decay on biases, norms and 1-D parameters (and on names the model lists in
    ``no_weight_decay()``).

Randomness and exact resume
---------------------------
The data order of epoch ``e`` is a permutation drawn from ``derive_seed(seed,
"order", e)``, and torch's global generator is reseeded with
``derive_seed(seed, "step", step, rank)`` before every optimiser step, so
every random draw of a step (masks, noise, dropout) is a function of the step
alone. A checkpoint therefore only needs the weights, the optimiser and
scheduler state and the step counters to continue exactly as if never stopped.

Files under ``out_dir``
-----------------------
``metrics.jsonl``
    One JSON object per epoch: ``epoch`` (0-based), ``step`` (optimiser steps
    done), ``lr``, ``train/loss`` and the other ``train/*`` means,
    ``train/grad_norm``, eval metrics, ``time_s``, ``samples_per_s``.
``checkpoints/step-XXXXXXXX/``
    ``model.safetensors`` (weights), ``optimizer.safetensors`` (every optimiser
    state tensor, keyed ``state.<param index>.<name>``) and ``state.json``
    (format, step, epoch, step in epoch, optimiser param groups and scalar
    state, scheduler state, best so far, metrics history, train config,
    resolved run config, software versions). ``checkpoints/latest.json``
    points at the newest. Written to a temporary folder and renamed, so a
    crash never leaves a half checkpoint; nothing is pickled.
``best/``
    ``model.safetensors`` + ``state.json`` of the epoch with the best
    ``select_metric``.

``fit()`` without ``resume`` removes an older run's ``checkpoints/`` and
``best/`` first, so nothing of it can be mistaken for this run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mindvis.errors import MindvisError
from mindvis.models.weights import load_weights
from mindvis.train.checkpoint import (CHECKPOINT_FORMAT, check_checkpoint, latest_checkpoint, point_latest,
                                     prune_checkpoints, read_checkpoint_state, read_optimizer, write_checkpoint)
from mindvis.utils.io import derive_seed, inputs_digest, software_versions, write_text_atomic
from mindvis.utils.device import accelerator_available, is_cuda, resolve_precision

log = logging.getLogger(__name__)

MIXED_PRECISION_CHOICES = ("no", "bf16", "auto")


@dataclass
class TrainConfig:
    """Optimisation settings of one training run.

    Attributes
    ----------
    epochs : int
        Passes over the training data.
    batch_size : int
        Samples per micro-step over all processes (each of n processes takes
        ``batch_size / n``), so the process count does not change the science.
    grad_accum_steps : int
        Micro-steps accumulated into one optimiser step.
    base_lr : float
        Learning rate for an effective batch of 256; the used rate is
        ``base_lr * batch_size * grad_accum_steps / 256``.
    lr : float or None
        Absolute learning rate; overrides ``base_lr`` when given.
    min_lr : float
        Learning rate the cosine decays to.
    lr_schedule : {'cosine', 'constant'}
        After the warmup, half a cosine down to ``min_lr``, or the peak rate to the end (MinD-Vis's
        fine-tuning).
    warmup_epochs : float
        Linear warmup length in epochs (fractions allowed).
    weight_decay : float
        AdamW decoupled weight decay (not applied to biases and norms).
    betas : tuple of 2 float
        AdamW betas.
    clip_grad_norm : float or None
        Clip the global gradient norm to this value; None or 0 disables it.
    mixed_precision : {'no', 'bf16', 'auto'}
        bf16 autocast; 'auto' picks bf16 where the device runs it natively
        (see :func:`resolve_mixed_precision`).
    seed : int
        Seed of the data order and of every step's random draws.
    eval_every : int
        Run the eval hook every this many epochs (and after the last one).
    eval_at_start : bool
        Also run it once before the first step (history line ``epoch`` -1, ``step`` 0), so that the
        untrained model competes for ``best/`` too and what training adds is on record.
    checkpoint_every_steps : int
        Also checkpoint every this many optimiser steps (0: at epoch ends only).
    checkpoint_every_minutes : float
        Also checkpoint when this many minutes have passed since the last
        checkpoint (0: never by time); what a job killed by a scheduler's time
        limit resumes from. The main process's clock decides for all.
    keep_checkpoints : int
        How many step checkpoints to keep.
    select_metric : str or None
        Eval metric that picks the best checkpoint; None keeps no ``best/``.
    select_mode : {'max', 'min'}
        Whether a larger or a smaller ``select_metric`` is better.
    stop_at_step : int or None
        Stop (after checkpointing) once this many steps are done, leaving the
        schedule unchanged; for time-boxed runs and resume tests.
    num_workers : int
        DataLoader worker processes (0: load in the main process).
    progress : bool
        Show a tqdm progress bar (main process only).
    ema_decay : float
        Keep an exponential moving average of the trainable weights (diffusers'
        ``EMAModel``, with its warm-up: the decay grows from 0 towards this
        value); 0 keeps none. Evaluation, ``best/`` and :meth:`Trainer.load_best`
        use the averaged weights; checkpoints store both.
    max_steps : int or None
        Train this many optimiser steps in all (the epoch count becomes
        ``ceil(max_steps / steps_per_epoch)``, the last epoch ends early), so a
        small data set trains as long as a large one; None: ``epochs`` decides.
    optimizer : {'adamw', 'adamw8bit'}
        torch's AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: about
        6 bytes less per trained parameter; CUDA only, ``pip install bitsandbytes``).
    """

    epochs: int = 10
    batch_size: int = 32
    grad_accum_steps: int = 1
    base_lr: float = 1e-3
    lr: float | None = None
    min_lr: float = 0.0
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    eval_every: int = 1
    eval_at_start: bool = False
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 1
    select_metric: str | None = None
    select_mode: str = "max"
    stop_at_step: int | None = None
    num_workers: int = 0
    progress: bool = True
    ema_decay: float = 0.0
    max_steps: int | None = None
    optimizer: str = "adamw"

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, not {self.mixed_precision!r}")
        if self.select_mode not in ("max", "min"):
            raise ValueError(f"select_mode must be 'max' or 'min', not {self.select_mode!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}")
        for name in ("epochs", "batch_size", "grad_accum_steps", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.betas = tuple(float(b) for b in self.betas)

    @classmethod
    def from_mapping(cls, mapping, **overrides):
        """Build from a config section, taking only the keys this class knows."""
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in dict(mapping).items() if key in names}
        values.update(overrides)
        return cls(**values)


def checkpoint_minutes(run_config):
    """``compute.checkpoint_minutes`` of a resolved config (0 for a config without the section)."""
    return float((run_config or {}).get("compute", {}).get("checkpoint_minutes", 0) or 0)


def run_fingerprint(run_config, inputs=None):
    """A short hash of a run's config and input files: a checkpoint is resumed only by the run it belongs to.

    Parameters
    ----------
    run_config : dict
        The resolved experiment config.
    inputs : list of path, optional
        Files or folders the run trains on (see :func:`mindvis.utils.io.inputs_digest`).
    """
    text = json.dumps({"config": run_config, "inputs": inputs_digest(inputs) if inputs else None},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scaled_lr(base_lr, effective_batch):
    """The linear scaling rule: ``base_lr * effective_batch / 256``."""
    return float(base_lr) * float(effective_batch) / 256.0


def lr_factor(step, warmup_steps, total_steps, min_ratio=0.0, schedule="cosine"):
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warmup from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps,
    then half a cosine down to ``min_ratio`` at ``total_steps`` (``schedule``
    'cosine'), or 1 to the end ('constant').

    Kept by hand rather than diffusers' ``get_scheduler``: its cosine has no floor (MAE's and SC-MBM's
    ``min_lr``), and its warm-up starts at 0, so the first step of every run (and of every resumed
    short fine-tuning) would not move the weights; changing it would change every trained decoder.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(value, device):
    """Turn 'auto' into 'bf16' or 'no' for training on ``device``.

    bf16 on a GPU that supports it natively; 'no' on CPU, where bf16 autocast
    is emulated on most cores and slowed small models down in our benchmarks
    (benchmarks/results/mbm.md); choose 'bf16' explicitly for large CPU models.
    An older GPU without bf16 trains in float32: fp16 training would need a
    loss scaler, which this engine does not have.
    """
    if value != "auto":
        return value
    return "bf16" if resolve_precision("auto", device) == "bf16" else "no"


def make_optimizer(name, param_groups, lr, betas, weight_decay, device):
    """AdamW over ``param_groups``: torch's (``adamw``) or bitsandbytes' 8-bit one (``adamw8bit``).

    Raises
    ------
    MindvisError
        For ``adamw8bit`` without bitsandbytes, or off a CUDA device (its 8-bit kernels are CUDA's).
    """
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name != "adamw8bit":
        raise MindvisError(f"unknown optimizer '{name}'", key="optimizer", fix="use adamw or adamw8bit.")
    if not is_cuda(device):
        raise MindvisError(f"8-bit AdamW needs a CUDA device; this run is on {device}", key="optimizer",
                           fix="use optimizer: adamw here (8-bit Adam saves memory on 24 GB GPUs only).")
    try:
        import bitsandbytes
    except ImportError as error:
        raise MindvisError(f"8-bit AdamW needs bitsandbytes, which does not import ({error})", key="optimizer",
                           fix="pip install bitsandbytes, or use optimizer: adamw.") from None
    return bitsandbytes.optim.AdamW8bit(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)


def _to_float(value):
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


# -- the engine -------------------------------------------------------------------

class Trainer:
    """Train ``model`` on ``train_data`` with ``loss_fn``; see the module docstring.

    Parameters
    ----------
    model : torch.nn.Module
    train_data : Dataset or object with ``get_batch``
    loss_fn : callable
        ``loss_fn(model, batch) -> (loss, logs)``.
    config : TrainConfig
    out_dir : str or Path
        Receives ``metrics.jsonl``, ``checkpoints/`` and ``best/``.
    eval_fn : callable, optional
        ``eval_fn(model, epoch) -> dict of float``.
    run_config : dict, optional
        The resolved experiment config, stored in every checkpoint.
    param_groups : list of dict, optional
        Custom parameter groups (see the module docstring).
    collate_fn : callable, optional
        Stacks data set items into a batch.
    checkpoint_params : {'all', 'trainable'}
        Which model tensors checkpoints store.
    """

    def __init__(self, model, train_data, loss_fn, config, out_dir, *, eval_fn=None, run_config=None,
                 param_groups=None, collate_fn=None, checkpoint_params="all", inputs=None):
        from accelerate import Accelerator

        self.config = config
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.run_config = run_config or {}
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.checkpoint_params = checkpoint_params
        # What a checkpoint must belong to for resume to continue it: this run's config and input files.
        self.fingerprint = run_fingerprint(self.run_config, inputs)
        # Precision is applied by this engine's own autocast, not by Accelerator(mixed_precision=...):
        # accelerate's state is process-global and refuses a second precision in the same process
        # (tests, notebooks, a fine-tuning stage after pretraining).
        # Without a GPU, say so: accelerate only sets up multi-process CPU training (gloo) when told cpu=True.
        self.accelerator = Accelerator(cpu=not accelerator_available())
        self.device = self.accelerator.device
        self.mixed_precision = resolve_mixed_precision(config.mixed_precision, self.device)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

        n_samples = len(train_data)
        global_batch = int(config.batch_size)
        if n_samples < global_batch * config.grad_accum_steps:
            global_batch = n_samples // config.grad_accum_steps
            log.warning("batch_size %d is larger than the data allows (%d samples); using %d",
                        config.batch_size, n_samples, global_batch)
        # Each process takes an equal share of the global batch.
        self.batch_size = global_batch // self.world_size
        if self.batch_size < 1:
            raise MindvisError(f"only {n_samples} training samples for {self.world_size} processes x "
                               f"{config.grad_accum_steps} accumulation steps", key="batch_size",
                               fix="add training data or lower grad_accum_steps / the process count.")
        if global_batch % self.world_size:
            log.warning("batch_size %d does not split into %d processes: %d per process, %d in all",
                        global_batch, self.world_size, self.batch_size, self.batch_size * self.world_size)
        self.effective_batch = self.batch_size * config.grad_accum_steps * self.world_size
        self.steps_per_epoch = n_samples // self.effective_batch
        if config.max_steps:
            self.n_epochs = max(1, math.ceil(int(config.max_steps) / self.steps_per_epoch))
            self.total_steps = int(config.max_steps)
        else:
            self.n_epochs = int(config.epochs)
            self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.peak_lr = float(config.lr) if config.lr is not None else scaled_lr(config.base_lr, self.effective_batch)

        model.to(self.device)
        self.optimizer = make_optimizer(config.optimizer, self._param_groups(model, param_groups), self.peak_lr,
                                        config.betas, config.weight_decay, self.device)
        min_ratio = config.min_lr / self.peak_lr if self.peak_lr > 0 else 0.0
        # Each group's lr is peak_lr x its lr_scale; the schedule multiplies all of them alike.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.warmup_steps, self.total_steps, min_ratio, config.lr_schedule))
        # Only the model and optimizer go through accelerate: its scheduler wrapper steps once per
        # process, which would change the schedule with the process count.
        self._wrapped, self._accel_optimizer = self.accelerator.prepare(model, self.optimizer)
        self.model = self.accelerator.unwrap_model(self._wrapped)

        self.ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            self._ema_params = [p for p in self.model.parameters() if p.requires_grad]
            self.ema = EMAModel(self._ema_params, decay=float(config.ema_decay), use_ema_warmup=True,
                                inv_gamma=1.0, power=0.75)
            self.ema.to(self.device)

        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.history = []
        self.best = None
        self._epoch_sums = {}
        self._last_lr = self.peak_lr

    # -- set-up -----------------------------------------------------------------

    def _param_groups(self, model, param_groups):
        if param_groups is not None:
            groups = []
            for group in param_groups:
                group = dict(group)
                scale = float(group.pop("lr_scale", 1.0))
                group["params"] = [p for p in group["params"] if p.requires_grad]
                group["lr"] = self.peak_lr * scale
                group["lr_scale"] = scale
                groups.append(group)
            return groups
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.endswith(".bias") or name in skip:
                no_decay.append(param)
            else:
                decay.append(param)
        return [{"params": decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.mixed_precision == "bf16")

    def _epoch_batches(self, epoch):
        """This process's index lists for every micro-step of ``epoch``: [steps][accum] -> indices."""
        order = np.random.default_rng(derive_seed(self.config.seed, "order", epoch)).permutation(len(self.train_data))
        per_micro = self.batch_size * self.world_size
        batches = []
        for step in range(min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)):
            start = step * self.effective_batch
            micro = []
            for k in range(self.config.grad_accum_steps):
                chunk = order[start + k * per_micro: start + (k + 1) * per_micro]
                micro.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist())
            batches.append(micro)
        return batches

    def _fetch(self, indices):
        if hasattr(self.train_data, "get_batch"):
            batch = self.train_data.get_batch(indices)
        else:
            collate = self.collate_fn or torch.utils.data.default_collate
            batch = collate([self.train_data[i] for i in indices])
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.device)

    def _iter_batches(self, step_lists):
        """Yield batches for a list of micro-step index lists, through DataLoader workers if asked."""
        flat = [indices for micro in step_lists for indices in micro]
        if self.config.num_workers > 0 and not hasattr(self.train_data, "get_batch"):
            from accelerate.utils import send_to_device

            loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=flat,
                                                 num_workers=self.config.num_workers,
                                                 collate_fn=self.collate_fn or torch.utils.data.default_collate)
            for batch in loader:
                yield send_to_device(batch, self.device)
        else:
            for indices in flat:
                yield self._fetch(indices)

    # -- training ------------------------------------------------------------------

    def fit(self, resume=False):
        """Train to the end (or to ``stop_at_step``); return a summary dict.

        Parameters
        ----------
        resume : bool
            Continue from ``out_dir/checkpoints/latest.json`` when it exists
            (otherwise start fresh, with a log line saying so).

        Returns
        -------
        dict
            ``step``, ``epochs_done``, ``total_steps``, ``stopped_early``,
            ``best`` (metric, value, epoch, step or None), ``last_metrics``,
            ``checkpoint`` (path of the newest), ``peak_lr``,
            ``effective_batch``, ``mixed_precision``.
        """
        cfg = self.config
        if resume:
            self._resume()
        else:
            self._clear_previous_run()
        log.info("training %d epochs x %d steps (effective batch %d, peak lr %.3g, warmup %d steps, mixed precision %s, "
                 "%d process(es) on %s)", self.n_epochs, self.steps_per_epoch, self.effective_batch, self.peak_lr,
                 self.warmup_steps, self.mixed_precision, self.world_size, self.device)
        stopped = False
        last_checkpoint = None
        self._last_checkpoint_time = time.monotonic()
        progress = None
        if cfg.progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            # In a log file (Snakemake), refresh rarely: every refresh is a new line there.
            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                            mininterval=2.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        if cfg.eval_at_start and self.eval_fn is not None and self.step == 0:
            self._evaluate_start()
        self._wrapped.train()
        while self.epoch < self.n_epochs and not stopped:
            epoch_start = time.perf_counter()
            step_lists = self._epoch_batches(self.epoch)[self.step_in_epoch:]
            batches = self._iter_batches(step_lists)
            for _ in range(len(step_lists)):
                self._train_step(batches)
                self.step += 1
                self.step_in_epoch += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{self._epoch_sums['loss'][0] / self._epoch_sums['loss'][1]:.4f}",
                                         refresh=False)
                at_stop = cfg.stop_at_step is not None and self.step >= cfg.stop_at_step
                end_of_epoch = self.step_in_epoch == self.steps_per_epoch or self.step == self.total_steps
                if end_of_epoch:
                    self._end_epoch(time.perf_counter() - epoch_start)
                every = cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0
                if end_of_epoch or at_stop or every or self._checkpoint_due():
                    last_checkpoint = self._save_checkpoint()
                if at_stop:
                    stopped = self.epoch < self.n_epochs
                    break
        if progress is not None:
            progress.close()
        self.accelerator.wait_for_everyone()
        return {
            "step": self.step, "epochs_done": self.epoch, "total_steps": self.total_steps, "stopped_early": stopped,
            "best": self.best, "last_metrics": self.history[-1] if self.history else None,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None, "peak_lr": self.peak_lr,
            "effective_batch": self.effective_batch, "mixed_precision": self.mixed_precision,
        }

    def _train_step(self, batches):
        cfg = self.config
        torch.manual_seed(derive_seed(cfg.seed, "step", self.step, self.rank))
        for micro in range(cfg.grad_accum_steps):
            batch = next(batches)
            last = micro == cfg.grad_accum_steps - 1
            # Skip the gradient all-reduce on all but the last micro-step.
            sync = self.accelerator.no_sync(self._wrapped) if not last and self.world_size > 1 else nullcontext()
            with sync:
                with self._autocast():
                    loss, logs = self.loss_fn(self._wrapped, batch)
                if not torch.isfinite(loss):
                    raise MindvisError(f"the training loss became {loss.item()} at step {self.step}",
                                       key="base_lr", fix="lower base_lr or raise warmup_epochs, then rerun.")
                self.accelerator.backward(loss / cfg.grad_accum_steps)
            self._accumulate("loss", loss)
            for name, value in (logs or {}).items():
                self._accumulate(name, value)
        if cfg.clip_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
            self._accumulate("grad_norm", norm)
        self._accel_optimizer.step()
        if self.ema is not None:
            self.ema.step(self._ema_params)
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, for the metrics line
        self.scheduler.step()
        self._accel_optimizer.zero_grad(set_to_none=True)

    def _steps_this_epoch(self):
        return min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)

    def _accumulate(self, name, value):
        total, count = self._epoch_sums.get(name, (0.0, 0))
        self._epoch_sums[name] = (total + _to_float(value), count + 1)

    def _evaluate_start(self):
        line = {"epoch": -1, "step": 0, **self._evaluate()}
        self.history.append(line)
        log.info("before training: %s", ", ".join(f"{k}={v:.4g}" for k, v in line.items()
                                                   if isinstance(v, float)))
        self._maybe_save_best(line)
        if self.accelerator.is_main_process:
            write_text_atomic(self.out_dir / "metrics.jsonl",
                              "".join(json.dumps(entry) + "\n" for entry in self.history))

    def _end_epoch(self, seconds):
        cfg = self.config
        line = {"epoch": self.epoch, "step": self.step, "lr": self._last_lr}
        names = sorted(self._epoch_sums)
        means = torch.tensor([self._epoch_sums[n][0] / max(1, self._epoch_sums[n][1]) for n in names],
                             device=self.device, dtype=torch.float64)
        if self.world_size > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        line.update({f"train/{name}": float(value) for name, value in zip(names, means.tolist())})
        is_last = self.epoch == self.n_epochs - 1
        if self.eval_fn is not None and ((self.epoch + 1) % cfg.eval_every == 0 or is_last):
            line.update(self._evaluate())
        line["time_s"] = round(seconds, 3)
        line["samples_per_s"] = round(self._steps_this_epoch() * self.effective_batch / max(seconds, 1e-9), 2)
        self.history.append(line)
        log.info("epoch %d/%d: %s", self.epoch + 1, self.n_epochs,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()
                           if k not in ("epoch",)))
        self._maybe_save_best(line)
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_sums = {}
        if self.accelerator.is_main_process:
            write_text_atomic(self.out_dir / "metrics.jsonl",
                              "".join(json.dumps(entry) + "\n" for entry in self.history))

    @contextmanager
    def averaged_weights(self):
        """Within the block the model holds its EMA weights (no-op without EMA); restored after."""
        if self.ema is None:
            yield self.model
            return
        self.ema.store(self._ema_params)
        self.ema.copy_to(self._ema_params)
        try:
            yield self.model
        finally:
            self.ema.restore(self._ema_params)

    def _evaluate(self):
        self._wrapped.eval()
        torch.manual_seed(derive_seed(self.config.seed, "eval"))
        try:
            with torch.no_grad(), self._autocast(), self.averaged_weights():
                metrics = self.eval_fn(self.model, self.epoch)
        finally:
            self._wrapped.train()
        return {name: _to_float(value) for name, value in (metrics or {}).items()}

    # -- checkpoints -------------------------------------------------------------

    def _maybe_save_best(self, line):
        cfg = self.config
        if cfg.select_metric is None or cfg.select_metric not in line:
            return
        value = line[cfg.select_metric]
        better = (self.best is None or (value > self.best["value"] if cfg.select_mode == "max"
                                        else value < self.best["value"]))
        if not better or not math.isfinite(value):
            return
        self.best = {"metric": cfg.select_metric, "value": value, "epoch": line.get("epoch", self.epoch),
                     "step": self.step}
        if self.accelerator.is_main_process:
            with self.averaged_weights():
                self._write_folder(self.out_dir / "best", with_optimizer=False)
        self.accelerator.wait_for_everyone()

    def _state(self):
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "effective_batch": self.effective_batch, "world_size": self.world_size,
            "scheduler": self.scheduler.state_dict(), "best": self.best, "history": self.history,
            "epoch_sums": self._epoch_sums, "train_config": asdict(self.config), "config": self.run_config,
            "versions": software_versions(), "checkpoint_params": self.checkpoint_params,
            "fingerprint": self.fingerprint,
        }

    def _ema_tensors(self):
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        return {name: tensor for name, tensor in zip(names, self.ema.shadow_params)}

    def _write_folder(self, final, with_optimizer=True):
        extra = None
        if with_optimizer and self.ema is not None:
            extra = {"ema": self._ema_tensors()}
        state = self._state()
        if self.ema is not None:
            state["ema_optimization_step"] = int(self.ema.optimization_step)
        return write_checkpoint(final, self.model, self.checkpoint_params, state,
                                optimizer=self.optimizer if with_optimizer else None, extra_tensors=extra)

    def _checkpoint_due(self):
        """Whether checkpoint_every_minutes have passed since the last checkpoint (the main process decides)."""
        minutes = self.config.checkpoint_every_minutes
        if not minutes:
            return False
        due = time.monotonic() - self._last_checkpoint_time >= 60.0 * minutes
        if self.world_size > 1:
            from accelerate.utils import broadcast

            flag = broadcast(torch.tensor([int(due)], device=self.device), from_process=0)
            due = bool(flag.item())
        return due

    def _save_checkpoint(self):
        folder = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        if self.accelerator.is_main_process:
            self._write_folder(folder)
            point_latest(folder, step=self.step, epoch=self.epoch)
            prune_checkpoints(folder.parent, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self._last_checkpoint_time = time.monotonic()
        log.info("checkpoint at step %d of %d: %s", self.step, self.total_steps, folder)
        return folder

    def _clear_previous_run(self):
        """A fresh run must not inherit an older run's checkpoints or best weights (load_best would pick them)."""
        stale = [self.out_dir / "checkpoints", self.out_dir / "best"]
        if not any(path.exists() for path in stale):
            return
        log.info("starting afresh in %s: removing the previous run's checkpoints (pass resume to continue it)",
                 self.out_dir)
        if self.accelerator.is_main_process:
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self):
        folder = latest_checkpoint(self.out_dir / "checkpoints")
        if folder is None:
            log.info("resume: no checkpoint in %s; starting from step 0", self.out_dir / "checkpoints")
            return
        state = read_checkpoint_state(folder)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MindvisError(f"unknown checkpoint format {state.get('format')!r}", path=folder / "state.json",
                               key="format", fix="start over without --resume.")
        if state.get("fingerprint") != self.fingerprint:
            # Another run's checkpoint (a changed config or changed inputs): continuing it would be wrong.
            log.warning("resume: %s was written by a run with another config or other inputs; starting afresh",
                        folder)
            self._clear_previous_run()
            return
        if state["total_steps"] != self.total_steps or state["effective_batch"] != self.effective_batch:
            raise MindvisError(
                f"the checkpoint was made for {state['total_steps']} steps at effective batch "
                f"{state['effective_batch']}, this run has {self.total_steps} at {self.effective_batch}",
                path=folder / "state.json", key="train_config",
                fix="resume with the same epochs, batch_size and process count, or start over without --resume.")
        check_checkpoint(folder, state)
        load_weights(self.model, folder / "model.safetensors", strict=self.checkpoint_params == "all")
        self.optimizer.load_state_dict(read_optimizer(folder, state))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            from safetensors.torch import load_file

            stored = load_file(str(folder / "ema.safetensors"))
            for name, shadow in self._ema_tensors().items():
                shadow.copy_(stored[name].to(shadow.device))
            self.ema.optimization_step = int(state["ema_optimization_step"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.history, self.best = state["history"], state["best"]
        self._epoch_sums = {name: tuple(value) for name, value in state["epoch_sums"].items()}
        log.info("resumed from %s at step %d of %d (epoch %d, step %d in it)", folder, self.step, self.total_steps,
                 self.epoch, self.step_in_epoch)

    def load_best(self):
        """Load the best checkpoint's weights (else the newest checkpoint's) into the model; return it."""
        best = self.out_dir / "best" / "model.safetensors"
        if best.exists():
            check_checkpoint(best.parent, read_checkpoint_state(best.parent))
            load_weights(self.model, best, strict=self.checkpoint_params == "all")
            return self.model
        folder = latest_checkpoint(self.out_dir / "checkpoints")
        if folder is not None:
            load_weights(self.model, folder / "model.safetensors", strict=self.checkpoint_params == "all")
        if self.ema is not None:  # the averaged weights, as best/ would hold them
            self.ema.copy_to(self._ema_params)
        return self.model
