"""The pretrained artefacts shipped with mindvis: the Fashion-MNIST image prior and domain classifier, and
the SC-MBM fMRI encoder.

The first two were trained by the project's own commands (``make prior``: ``mindvis
stimuli``, ``mindvis train-classifier`` and ``mindvis pretrain-ldm`` on
``configs/prior-fashion-mnist.yaml``, then ``mindvis bundle``) on the 60,000
images of Fashion-MNIST's training file, never its test file. Each folder holds
a ``PROVENANCE.json``: the command, the config, the git commit, the corpus's
SHA-256, the training steps, its quality figures, and the SHA-256 of every
file in the folder, which :func:`verify_bundle` checks before a stage reads it.

* ``ldm.base: bundled`` -> :data:`BUNDLED_PRIOR` (a diffusers-format folder
  that :func:`mindvis.models.ldm.load_generator` reads like any other);
* ``classifier.weights: bundled`` -> :data:`BUNDLED_CLASSIFIER` (a
  :class:`~mindvis.models.classifiers.domain.DomainClassifier` folder);
* ``mbm.base: bundled`` -> :data:`BUNDLED_MBM`: the SC-MBM encoder pretrained
  once (``make sc-mbm``: ``configs/sc-mbm-corpus.yaml``) on a large simulated
  resting-state corpus (40 subjects, 56,000 vectors) in the group-template
  voxel space; an :class:`~mindvis.models.mbm.MBMAutoencoder` folder with its
  ``space.json`` (the template space it needs: grid, resolution, field of view,
  voxel counts and order) and the template as ``template_dseg.nii.gz``. Its
  PROVENANCE.json also records the corpus (SHA-256, vectors, subjects) and the
  held-out reconstruction metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mindvis.errors import MindvisError
from mindvis.utils.io import sha256_file, write_json_atomic

ASSETS = Path(__file__).with_name("assets")
#: The image prior: VAE, label-free image encoder and UNet at 32 px grey.
BUNDLED_PRIOR = ASSETS / "prior-fashion-mnist"
#: The domain classifier that scores decoded Fashion-MNIST images.
BUNDLED_CLASSIFIER = ASSETS / "classifier-fashion-mnist"
#: The SC-MBM encoder pretrained on the simulated resting-state corpus in the template space.
BUNDLED_MBM = ASSETS / "sc-mbm-sim"
PROVENANCE_FILE = "PROVENANCE.json"
#: The keyword that names a bundled artefact in a config.
BUNDLED = "bundled"
#: What a bundle copies from a training folder: configs, weights, the per-epoch metrics of a single-stage
#: run and a template space's label image; never checkpoints (the engine's checkpoints/, best/, train*/).
_COPIED = ("*.json", "*.jsonl", "*.safetensors", "*.nii.gz", "*.tsv")
_SKIPPED_FOLDERS = ("checkpoints", "best")
#: The Makefile target that retrains each shipped artefact (named in errors).
_REMAKE = {BUNDLED_MBM.name: "make sc-mbm"}


def bundle_files(folder):
    """Relative paths of the files a bundle holds (every file but PROVENANCE.json), sorted."""
    folder = Path(folder)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.is_file() and path.name != PROVENANCE_FILE)


def verify_bundle(folder, what="bundled artefact"):
    """Check every file of a bundle against the SHA-256 its PROVENANCE.json records; return the provenance.

    Raises
    ------
    MindvisError
        When the provenance is missing, a file is missing or extra, or a hash differs.
    """
    folder = Path(folder)
    remake = _REMAKE.get(folder.name, "make prior")
    path = folder / PROVENANCE_FILE
    if not path.exists():
        raise MindvisError(f"the {what} has no {PROVENANCE_FILE}", path=folder,
                           fix=f"reinstall mindvis (git checkout the folder), or retrain it with `{remake}`.")
    provenance = json.loads(path.read_text())
    recorded = provenance.get("files", {})
    present = bundle_files(folder)
    if sorted(recorded) != present:
        raise MindvisError(f"the {what}'s files {present} differ from those its provenance lists {sorted(recorded)}",
                           path=folder, key="files", fix=f"restore the folder with git checkout, or rerun `{remake}`.")
    for name, digest in recorded.items():
        if sha256_file(folder / name) != digest:
            raise MindvisError(f"the {what}'s {name} does not match the SHA-256 its provenance records",
                               path=folder / name, key=f"files.{name}",
                               fix=f"restore the folder with git checkout, or rerun `{remake}`.")
    return provenance


def resolve_bundled(value, bundled_dir, key):
    """``value`` as a folder: :data:`BUNDLED` -> ``bundled_dir`` (verified), else the path itself."""
    if value != BUNDLED:
        return Path(value)
    verify_bundle(bundled_dir, what=f"{key} ({bundled_dir.name})")
    return bundled_dir


def write_bundle(source, destination, provenance):
    """Copy a trained folder's configs and weights (no checkpoints) to ``destination`` with a PROVENANCE.json.

    ``provenance`` is stored with ``files`` (relative path -> SHA-256) and
    ``bundle_sha256`` (over the sorted files' hashes) added. The folder is
    assembled beside ``destination`` and renamed into place, so a failed copy
    leaves the old bundle as it was.
    """
    source, destination = Path(source), Path(destination)
    tmp = destination.parent / f".{destination.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for pattern in _COPIED:
        for path in source.rglob(pattern):
            relative = path.relative_to(source)
            if (relative.parts[0].startswith("train") or relative.parts[0] in _SKIPPED_FOLDERS
                    or relative.name == PROVENANCE_FILE):
                continue  # the engine's checkpoints, best/ and the stages' train*/ logs
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, tmp / relative)
    files = {name: sha256_file(tmp / name) for name in bundle_files(tmp)}
    combined = hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in files.items()).encode()).hexdigest()
    write_json_atomic(tmp / PROVENANCE_FILE, {**provenance, "files": files, "bundle_sha256": combined})
    old = destination.parent / f".{destination.name}.old"
    if destination.exists():
        destination.rename(old)
    tmp.rename(destination)
    if old.exists():
        shutil.rmtree(old)
    return destination
