"""File names of the BIDS dataset that the simulator writes and the preprocessing reads.

The layout itself is documented in :mod:`mindvis.simulate.bids` (its writer);
the names live here, below both the writer and the reader, so that neither
imports the other. Imports nothing of mindvis.
"""

from __future__ import annotations

from pathlib import Path

#: The BIDS space label of the simulator's grid: nilearn's MNI152 template is ICBM152 2009a asymmetric.
SPACE = "MNI152NLin2009aAsym"


def func_path(bids_dir, subject, task, run, suffix):
    """Path of a functional file, e.g. ``suffix='bold.nii.gz'`` or ``'events.tsv'``."""
    return Path(bids_dir) / subject / "func" / f"{subject}_task-{task}_run-{run:02d}_{suffix}"


def derivatives_dir(bids_dir, subject):
    """The simulator's derivatives folder of one subject."""
    return Path(bids_dir) / "derivatives" / "simulation" / subject


def derivative_paths(bids_dir, subject):
    """Paths of the simulator's per-subject derivatives (keys: mask, dseg, dseg_tsv, groundtruth, manifest)."""
    folder = derivatives_dir(bids_dir, subject)
    return {
        "mask": folder / f"{subject}_space-{SPACE}_desc-visual_mask.nii.gz",
        "dseg": folder / f"{subject}_space-{SPACE}_desc-visual_dseg.nii.gz",
        "dseg_tsv": folder / f"{subject}_desc-visual_dseg.tsv",
        "groundtruth": folder / f"{subject}_desc-groundtruth.h5",
        "manifest": folder / f"{subject}_desc-simulation_manifest.json",
    }


def template_dir(bids_dir):
    """The simulator's group-template folder (one for the data set, not per subject)."""
    return Path(bids_dir) / "derivatives" / "simulation" / "template"


def template_paths(bids_dir):
    """Paths of the simulated group template (keys: mask, dseg, dseg_tsv, spec).

    The template is the visual ROIs at the un-jittered anchors with the nominal
    voxel counts, on the acquisition grid: the shared voxel space of
    ``preprocess.space: template``. ``spec`` is a JSON sidecar with its
    resolution, field of view, grid, voxel counts and voxel order.
    """
    folder = template_dir(bids_dir)
    stem = f"tpl-{SPACE}_desc-visual"
    return {
        "mask": folder / f"{stem}_mask.nii.gz",
        "dseg": folder / f"{stem}_dseg.nii.gz",
        "dseg_tsv": folder / f"{stem}_dseg.tsv",
        "spec": folder / f"{stem}_mask.json",
    }
