"""Per-subject traits: demographics for participants.tsv and the subject's own scale factors.

Traits come from their own seeded stream, so ``participants.tsv`` (written by
one job) and the simulation (written by another) agree without reading each
other's files.
"""

from __future__ import annotations

import numpy as np

from mindvis.utils.io import derive_seed


def is_rest_subject(subject):
    """Resting-state subjects are labelled ``sub-restNN``."""
    return subject.startswith("sub-rest")


def subject_traits(config, subject):
    """The simulated traits of one subject.

    Parameters
    ----------
    config : dict
        A validated experiment config.
    subject : str
        BIDS label with prefix, e.g. ``sub-01``.

    Returns
    -------
    dict
        ``group`` (task or rest), ``age`` (years), ``sex`` (F or M),
        ``handedness`` (R or L), ``n_early_voxels``, ``n_higher_voxels`` and
        ``snr_factor`` (this subject's signal-to-noise relative to the config's).
    """
    section = config["simulate"]
    rng = np.random.default_rng(derive_seed(config["seed"], "simulate", subject, "traits"))
    spread = section["subject_variability"]
    return {
        "group": "rest" if is_rest_subject(subject) else "task",
        "age": int(rng.integers(19, 41)),
        "sex": str(rng.choice(["F", "M"])),
        "handedness": "L" if rng.random() < 0.1 else "R",
        "n_early_voxels": max(10, int(round(section["n_early_voxels"] * np.exp(rng.normal(0, spread))))),
        "n_higher_voxels": max(10, int(round(section["n_higher_voxels"] * np.exp(rng.normal(0, spread))))),
        "snr_factor": round(float(np.exp(rng.normal(0, spread))), 4),
    }
