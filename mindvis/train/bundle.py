"""Ship a trained prior or classifier with mindvis: copy it into the package with its provenance.

``mindvis bundle`` (run by ``make prior``) copies a ``pretrain-ldm`` or
``train-classifier`` output folder into :data:`mindvis.models.bundled.BUNDLED_PRIOR`
or :data:`~mindvis.models.bundled.BUNDLED_CLASSIFIER` with a ``PROVENANCE.json``
(:func:`mindvis.models.bundled.write_bundle`): the commands, the resolved
config, the git commit and whether the tree had uncommitted changes, the
corpus (the stimulus file's source and the SHA-256 of the files it was built
from), the training steps, the quality figures of ``benchmarks/prior_quality.py``
and the versions.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

from mindvis.data.stimuli import FASHION_MNIST_FILES
from mindvis.errors import MindvisError
from mindvis.models.bundled import BUNDLED_CLASSIFIER, BUNDLED_PRIOR, write_bundle
from mindvis.utils.io import sha256_file, software_versions

log = logging.getLogger(__name__)

KINDS = {"prior": BUNDLED_PRIOR, "classifier": BUNDLED_CLASSIFIER}


def git_state(folder="."):
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding ``folder``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def corpus_record(config, stimuli):
    """Where the training images came from: the Fashion-MNIST files' SHA-256 (training file; test file held out)."""
    folder = Path(config["stimuli"]["fashion_mnist_dir"])
    record = {"stimuli_file": str(stimuli), "fashion_mnist_dir": str(folder), "files": {}}
    for names in FASHION_MNIST_FILES.values():
        for name in names:
            if (folder / name).exists():
                record["files"][name] = sha256_file(folder / name)
    record["trained_on"] = "train file: all 60,000 images (prior: labels unused); test file: never"
    return record


def bundle(config, kind, source, stimuli, quality=None, commands=None, commit=None, out_dir=None):
    """Copy ``source`` (a prior or classifier folder) into the package with its provenance; return the folder.

    Parameters
    ----------
    config : dict
        The resolved config it was trained with.
    kind : {'prior', 'classifier'}
    source : path
        The ``pretrain-ldm`` / ``train-classifier`` output folder.
    stimuli : path
        The stimulus file it was trained on.
    quality : path, optional
        ``benchmarks/prior_quality.py``'s JSON, stored as ``quality``.
    commands : list of str, optional
        The commands that made it.
    commit : str, optional
        The commit that trained it (default: this checkout's HEAD).
    out_dir : path, optional
        Default: the bundled location of ``kind``.
    """
    if kind not in KINDS:
        raise MindvisError(f"unknown bundle kind {kind!r}", key="--kind", fix=f"use one of {', '.join(KINDS)}.")
    source = Path(source)
    metrics_path = source / "metrics.json"
    if not metrics_path.exists():
        raise MindvisError("not a finished training folder: metrics.json is missing", path=source,
                           fix="let pretrain-ldm / train-classifier finish, then bundle.")
    metrics = json.loads(metrics_path.read_text())
    state = git_state(Path(__file__).parent)
    if commit:
        state = {**state, "commit": commit, "dirty_at_bundle": state["dirty"]}
    summary = {"prior": lambda m: {"vae_steps": m["vae"]["steps"], "unet_steps": m["unet"]["steps"],
                                   "n_train_images": m["n_train_images"], "n_val_images": m["n_val_images"],
                                   "val_recon_mse": m.get("val_recon_mse"), "unet_best": m["unet"]["best"],
                                   "wall_time_s": m.get("wall_time_s"), "n_parameters": m.get("n_parameters")},
               "classifier": lambda m: {"val_accuracy": m["val_accuracy"], "n_train": m["n_train"],
                                        "n_val": m["n_val"], "test_accuracy": m["test_accuracy"],
                                        "n_test": m["n_test"], "best": m["best"]}}[kind](metrics)
    provenance = {"kind": kind, "commands": list(commands or []), "git": state, "corpus": corpus_record(config, stimuli),
                  "training": summary, "quality": json.loads(Path(quality).read_text()) if quality else None,
                  "config": config, "versions": software_versions()}
    destination = write_bundle(source, Path(out_dir) if out_dir else KINDS[kind], provenance)
    log.info("bundled %s into %s", source, destination)
    return destination
