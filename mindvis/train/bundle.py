"""Ship a trained prior, classifier or SC-MBM encoder with mindvis: copy it into the package with its provenance.

``mindvis bundle`` (run by ``make prior`` and ``make sc-mbm``) copies a ``pretrain-ldm``,
``train-classifier`` or ``pretrain-mbm`` output folder into :data:`mindvis.models.bundled.BUNDLED_PRIOR`,
:data:`~mindvis.models.bundled.BUNDLED_CLASSIFIER` or :data:`~mindvis.models.bundled.BUNDLED_MBM`
with a ``PROVENANCE.json``
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

from mindvis.data.stimuli import FASHION_MNIST_FILES, fashion_mnist_dir
from mindvis.errors import MindvisError
from mindvis.models.bundled import BUNDLED_CLASSIFIER, BUNDLED_MBM, BUNDLED_PRIOR, write_bundle
from mindvis.utils.io import sha256_file, software_versions

log = logging.getLogger(__name__)

KINDS = {"prior": BUNDLED_PRIOR, "classifier": BUNDLED_CLASSIFIER, "sc-mbm": BUNDLED_MBM}


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
    folder = fashion_mnist_dir(config["stimuli"]["fashion_mnist_dir"])  # "bundled": the committed subset
    record = {"stimuli_file": str(stimuli), "fashion_mnist_dir": str(folder), "files": {}}
    for names in FASHION_MNIST_FILES.values():
        for name in names:
            if (folder / name).exists():
                record["files"][name] = sha256_file(folder / name)
    record["trained_on"] = "train file: all 60,000 images (prior: labels unused); test file: never"
    return record


def mbm_corpus_record(summary):
    """The SC-MBM pretraining corpus from ``pretrain-mbm``'s summary: size, digest and every file's SHA-256."""
    corpus = summary["corpus"]
    files = [{"subject": source["subject"], "file": Path(source["path"]).name, "kind": source["kind"],
              "sha256": source["sha256"], "bytes": source.get("bytes"), "n_train": source["n_train"],
              "n_heldout": source["n_heldout"], "n_voxels": source["n_voxels"]} for source in corpus["sources"]]
    kinds = sorted({source["kind"] for source in corpus["sources"]})
    return {"n_vectors": corpus["n_train"] + corpus["n_heldout"], "n_train": corpus["n_train"],
            "n_heldout": corpus["n_heldout"], "n_subjects": len({f["subject"] for f in files}),
            "n_files": len(files), "kinds": kinds, "bytes": sum(f["bytes"] or 0 for f in files),
            "sha256": corpus.get("sha256"),
            "sha256_definition": "SHA-256 of the sorted lines 'subject<TAB>file name<TAB>file SHA-256'",
            "heldout": "the last mbm.rest_holdout_fraction of every run (contiguous), never trained on",
            "files": files}


def _mbm_training(summary):
    best = summary.get("best") or {}
    final = summary.get("final_metrics") or {}
    return {"epochs": summary["epochs"], "steps": summary["step"], "best": best,
            "val_loss": final.get("val/loss"), "val_recon_corr": final.get("val/recon_corr"),
            "metric_definition": "val/loss: mean squared error of the hidden real voxels of the held-out vectors "
                                 "(z-score units); val/recon_corr: per-vector Pearson correlation of predicted and "
                                 "true hidden voxels, averaged (same masks every epoch)",
            "wall_time_s": summary.get("wall_time_s"), "model": summary.get("model"),
            "hardware": summary.get("training")}


def bundle(config, kind, source, stimuli=None, quality=None, commands=None, commit=None, out_dir=None):
    """Copy ``source`` (a prior, classifier or SC-MBM folder) into the package with its provenance; return the folder.

    Parameters
    ----------
    config : dict
        The resolved config it was trained with.
    kind : {'prior', 'classifier', 'sc-mbm'}
    source : path
        The ``pretrain-ldm`` / ``train-classifier`` / ``pretrain-mbm`` output folder.
    stimuli : path, optional
        The stimulus file it was trained on (prior and classifier; the SC-MBM corpus is read from its summary).
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
    if kind == "sc-mbm":
        return _bundle_mbm(config, source, commands, commit, out_dir)
    if stimuli is None:
        raise MindvisError(f"a {kind} bundle records the stimulus file it was trained on", key="--stimuli",
                           fix="pass --stimuli <the stimuli.h5 it was trained on>.")
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


def _bundle_mbm(config, source, commands, commit, out_dir):
    """Bundle a ``pretrain-mbm`` folder: it must be finished and pretrained in one shared template space."""
    import json

    from mindvis.train.pretrain_mbm import SPACE_FILE

    summary_path = source / "summary.json"
    if not summary_path.exists():
        raise MindvisError("not a finished pretrain-mbm folder: summary.json is missing", path=source,
                           fix="let pretrain-mbm finish, then bundle.")
    summary = json.loads(summary_path.read_text())
    if summary.get("stage") != "pretrain_mbm":
        raise MindvisError(f"summary.json is from stage {summary.get('stage')!r}, not pretrain_mbm", path=summary_path,
                           fix="bundle the output folder of `mindvis pretrain-mbm`.")
    if not (source / SPACE_FILE).exists():
        raise MindvisError("this encoder was not pretrained in one shared template space (no space.json): its "
                           "tokens mean different cortex in different subjects", path=source,
                           key="preprocess.space", fix="preprocess the corpus with preprocess.space: template.")
    space = json.loads((source / SPACE_FILE).read_text())
    state = git_state(Path(__file__).parent)
    if commit:
        state = {**state, "commit": commit, "dirty_at_bundle": state["dirty"]}
    provenance = {"kind": "sc-mbm", "commands": list(commands or []), "git": state,
                  "corpus": mbm_corpus_record(summary), "training": _mbm_training(summary),
                  "space": {key: value for key, value in space.items() if key not in ("voxel_ijk", "voxel_roi")},
                  "quality": {"val_loss": summary["final_metrics"].get("val/loss"),
                              "val_recon_corr": summary["final_metrics"].get("val/recon_corr")},
                  "config": config, "versions": software_versions()}
    destination = write_bundle(source, Path(out_dir) if out_dir else BUNDLED_MBM, provenance)
    log.info("bundled %s into %s", source, destination)
    return destination
