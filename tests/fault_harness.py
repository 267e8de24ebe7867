"""Run one mindvis stage in this process and SIGKILL it at a chosen point (tests/test_faults.py).

    python tests/fault_harness.py JOB.json

``JOB.json``: ``{"call": "module:function", "kwargs": {...}, "config": {...}, "kill": {...} or null,
"threads": 1}``. ``config`` is passed as the function's first argument. ``kill`` says where the process kills
itself with SIGKILL, as a scheduler's time limit or an out-of-memory killer would (no handler, no cleanup):

``{"at": "step", "trainer": "train_unet", "epoch": 1, "step_in_epoch": 1}``
    When the engine's trainer whose ``out_dir`` ends with ``trainer`` is about to take that optimiser step.
``{"at": "checkpoint", "trainer": "...", "nth": 2, "file": "optimizer.safetensors"}``
    While the ``nth`` step checkpoint of that trainer is being written: as it writes ``file`` into its
    temporary folder (the files before it are written, the rest not).
``{"at": "dataset", "file": "responses.h5", "nth": 3}``
    At the ``nth`` HDF5 dataset created in a temporary file of ``file`` (a half-written HDF5 file).
``{"at": "rename", "file": "metrics.json"}``
    When the complete temporary file of ``file`` is about to be renamed into place.

Nothing here changes what the stage computes: the hooks only wrap the engine's and the writers' calls.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill):
    at = kill["at"]
    if at == "step":
        from mindvis.train import engine

        original = engine.Trainer._train_step

        def train_step(self, batches):
            if (str(self.out_dir).endswith(kill["trainer"]) and self.epoch == kill["epoch"]
                    and self.step_in_epoch == kill["step_in_epoch"]):
                die()
            return original(self, batches)

        engine.Trainer._train_step = train_step
    elif at == "checkpoint":
        from mindvis.train import checkpoint

        original, seen = checkpoint.save_file, []

        def save_file(tensors, filename, metadata=None):
            path = Path(filename)
            if path.parent.name.startswith(".step-") and path.parents[2].name == kill["trainer"]:
                if path.name == "model.safetensors":
                    seen.append(path)
                if len(seen) == kill["nth"] and path.name == kill["file"]:
                    die()
            return original(tensors, filename, metadata=metadata)

        checkpoint.save_file = save_file
    elif at == "dataset":
        import h5py

        original, count = h5py.Group.create_dataset, [0]

        def create_dataset(self, name, *args, **kwargs):
            if Path(self.file.filename).name.startswith(f".{kill['file']}."):
                count[0] += 1
                if count[0] == kill["nth"]:
                    self.file.flush()
                    die()
            return original(self, name, *args, **kwargs)

        h5py.Group.create_dataset = create_dataset
    elif at == "rename":
        from mindvis.utils import io

        original = io.fsync_path

        def fsync_path(path):
            if Path(path).name.startswith(f".{kill['file']}."):
                die()
            return original(path)

        io.fsync_path = fsync_path
    else:
        raise SystemExit(f"unknown kill point {at!r}")


def main(job_path):
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    if job.get("kill"):
        install(job["kill"])
    module, name = job["call"].split(":")
    function = getattr(importlib.import_module(module), name)
    function(job["config"], **job["kwargs"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
