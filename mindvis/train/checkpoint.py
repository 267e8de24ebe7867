"""Checkpoint folders of the training engine: weights, optimiser and state, written atomically, never pickled.

A checkpoint folder (``checkpoints/step-XXXXXXXX/`` or ``best/``) holds
``model.safetensors``, ``optimizer.safetensors`` (every optimiser state
tensor, keyed ``state.<param index>.<name>``; not in ``best/``) and
``state.json`` (the engine's counters and settings, the optimiser's param
groups and scalar state). It is written to a temporary folder and renamed, so
a crash never leaves half a checkpoint; ``state.json`` records the SHA-256 of
the folder's other files (``sha256``), which resume checks
(:func:`check_checkpoint`). ``checkpoints/latest.json`` points at the newest. The loop that writes them is :mod:`mindvis.train.engine`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mindvis.errors import MindvisError
from mindvis.models.weights import module_tensors
from mindvis.utils.io import check_digests, file_digests, fsync_path, fsync_tree, write_json_atomic

CHECKPOINT_FORMAT = "mindvis-train-checkpoint/1"
LATEST_FILE = "latest.json"


def optimizer_to_files(optimizer):
    """Split an optimiser state dict into tensors (safetensors) and JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors, meta):
    """Inverse of :func:`optimizer_to_files`: a dict ``optimizer.load_state_dict`` accepts."""
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def read_checkpoint_state(path):
    """The ``state.json`` of a checkpoint folder (or of ``best/``) as a dict."""
    path = Path(path)
    state_path = path / "state.json" if path.is_dir() else path
    try:
        return json.loads(state_path.read_text())
    except (OSError, ValueError) as err:
        raise MindvisError(f"cannot read checkpoint state ({err})", path=state_path,
                           fix="delete the broken checkpoint folder and resume from an older one, or start over.") from None


def write_checkpoint(final, model, which, state, optimizer=None, extra_tensors=None):
    """Write ``model``'s weights (``which``: 'all' or 'trainable'), ``state`` and, if given, the optimiser
    and ``extra_tensors`` (``{file stem: {name: tensor}}``, e.g. EMA weights) into a temporary folder
    beside ``final``, then rename it to ``final``. Returns ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = dict(state)
        save_file(module_tensors(model, which), str(tmp / "model.safetensors"),
                  metadata={"format": CHECKPOINT_FORMAT, "step": str(state.get("step"))})
        if optimizer is not None:
            tensors, meta = optimizer_to_files(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = meta
        for stem, tensors in (extra_tensors or {}).items():
            save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                      str(tmp / f"{stem}.safetensors"))
        state["sha256"] = file_digests(tmp, sorted(f.name for f in tmp.iterdir()))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
        fsync_tree(tmp)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def check_checkpoint(folder, state):
    """Raise a clear error unless the files of a checkpoint ``folder`` are those its ``state.json`` recorded."""
    check_digests(folder, state.get("sha256"), "state.json",
                  fix="delete this checkpoint folder (resume then starts from an older one or afresh).")


def read_optimizer(folder, state):
    """The optimiser state dict stored in a checkpoint ``folder`` whose ``state.json`` is ``state``."""
    return optimizer_from_files(load_file(str(Path(folder) / "optimizer.safetensors")), state["optimizer"])


def point_latest(folder, **fields):
    """Make ``folder``'s parent's ``latest.json`` point at it."""
    folder = Path(folder)
    write_json_atomic(folder.parent / LATEST_FILE, {"path": folder.name, **fields})


def latest_checkpoint(checkpoints_dir):
    """The folder ``latest.json`` points at, or None when there is none."""
    pointer = Path(checkpoints_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    return Path(checkpoints_dir) / json.loads(pointer.read_text())["path"]


def prune_checkpoints(checkpoints_dir, keep):
    """Remove all but the newest ``keep`` (at least one) ``step-*`` folders."""
    kept = sorted(path for path in Path(checkpoints_dir).glob("step-*") if path.is_dir())
    for stale in kept[:-max(1, int(keep))]:
        shutil.rmtree(stale)
    # What a killed writer left behind: its temporary folder (never pointed at, never read).
    for stale in Path(checkpoints_dir).glob(".step-*.tmp-*"):
        if stale.is_dir() and not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
