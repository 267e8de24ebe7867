"""The experimental design: which image is shown when, run by run.

Like Kamitani's Generic Object Decoding, training runs show distinct training
images once each, and test runs show the few test images many times. Test
presentations are built as ``test_repeats`` shuffled passes over the test set,
laid end to end and cut into runs, so every image recurs evenly through the
session. Each trial shows one image for ``stimulus_duration`` seconds; trials
are separated by an inter-stimulus interval drawn uniformly from
``[isi_min, isi_max]`` (jitter decorrelates neighbouring trials' responses).
A run opens with ``run_lead_in`` seconds of fixation and closes with
``run_lead_out`` so the last response can return to baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

EVENT_COLUMNS = ("onset", "duration", "trial_type", "stimulus_id", "class")


@dataclass
class RunDesign:
    """One fMRI run.

    Attributes
    ----------
    task : str
        BIDS task label (``objects`` or ``rest``).
    run : int
        1-based run number within the task.
    n_volumes : int
    events : pandas.DataFrame or None
        Columns ``EVENT_COLUMNS`` (seconds from the first volume); None for rest.
    """

    task: str
    run: int
    n_volumes: int
    events: pd.DataFrame | None = None


def trial_onsets(n_trials, section, rng):
    """Jittered onsets of ``n_trials`` trials and the run length.

    Returns
    -------
    onsets : float64 [n_trials]
        Seconds from the first volume, rounded to milliseconds.
    n_volumes : int
    """
    isi = rng.uniform(section["isi_min"], section["isi_max"], n_trials)
    starts = section["run_lead_in"] + np.concatenate([[0.0], np.cumsum(section["stimulus_duration"] + isi[:-1])])
    onsets = np.round(starts, 3)
    end = onsets[-1] + section["stimulus_duration"] + section["run_lead_out"]
    return onsets, int(math.ceil(end / section["tr"]))


def _split_runs(n_trials, trials_per_run):
    """Trial counts of near-equal runs holding at most ``trials_per_run`` trials each."""
    n_runs = max(1, math.ceil(n_trials / trials_per_run))
    return [len(part) for part in np.array_split(np.arange(n_trials), n_runs)]


def task_runs(train_ids, train_classes, test_ids, test_classes, section, rng, task="objects"):
    """The task runs of one subject: training runs first, then test runs.

    Parameters
    ----------
    train_ids, test_ids : sequence of str
        Stimulus ids (from ``stimuli.h5``).
    train_classes, test_classes : sequence of str
        Class name of each image.
    section : dict
        The ``simulate`` config section.
    rng : numpy.random.Generator
    task : str

    Returns
    -------
    list of RunDesign
        Numbered 1.. in order.
    """
    train_ids, test_ids = np.asarray(train_ids, dtype=object), np.asarray(test_ids, dtype=object)
    train_classes, test_classes = np.asarray(train_classes, dtype=object), np.asarray(test_classes, dtype=object)
    train_order = rng.permutation(len(train_ids))
    test_order = np.concatenate([rng.permutation(len(test_ids)) for _ in range(section["test_repeats"])]) \
        if len(test_ids) else np.zeros(0, dtype=int)

    runs = []
    for trial_type, ids, classes, order in (("train", train_ids, train_classes, train_order),
                                            ("test", test_ids, test_classes, test_order)):
        if not len(order):
            continue
        start = 0
        for count in _split_runs(len(order), section["trials_per_run"]):
            rows = order[start:start + count]
            start += count
            onsets, n_volumes = trial_onsets(count, section, rng)
            events = pd.DataFrame({
                "onset": onsets,
                "duration": np.full(count, float(section["stimulus_duration"])),
                "trial_type": trial_type,
                "stimulus_id": ids[rows],
                "class": classes[rows],
            }, columns=list(EVENT_COLUMNS))
            runs.append(RunDesign(task=task, run=len(runs) + 1, n_volumes=n_volumes, events=events))
    return runs


def rest_runs(section, task="rest"):
    """The resting-state runs of a rest subject (no events)."""
    return [RunDesign(task=task, run=index + 1, n_volumes=int(section["rest_run_volumes"]))
            for index in range(section["n_rest_runs"])]
