"""fMRI trials paired with the image each one showed, as tensors for training and fitting.

Fine-tuning (:mod:`mindvis.train.finetune`) and the ridge baseline
(:mod:`mindvis.evaluate.baselines`) read the same pairs. Imports only
:mod:`mindvis.data.images` of mindvis.
"""

from __future__ import annotations

import numpy as np
import torch

from mindvis.data.images import images_to_tensor


class PairedTrials:
    """fMRI trials with the image each one showed, for the training engine's ``get_batch`` fast path.

    ``fmri`` float32 [N, V]; ``images`` float32 [N, C, S, S] in [-1, 1]; ``labels`` int64 [N] (-1 unknown);
    ``runs`` int64 [N], the run each trial came from (None when unknown).
    """

    def __init__(self, fmri, images, labels, runs=None):
        self.fmri = torch.as_tensor(fmri, dtype=torch.float32)
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.runs = None if runs is None else np.asarray(runs, dtype=np.int64)
        if self.runs is not None and self.runs.shape != (len(self.labels),):
            raise ValueError(f"runs must be [{len(self.labels)}], got {self.runs.shape}")

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices):
        return {"fmri": self.fmri[indices], "images": self.images[indices], "labels": self.labels[indices]}

    def subset(self, fraction, seed):
        """A seeded random ``fraction`` of the trials (at least one), in their original order."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction == 1.0 or len(self) == 0:
            return self
        n_keep = max(1, int(round(fraction * len(self))))
        keep = np.sort(np.random.default_rng(seed).choice(len(self), n_keep, replace=False))
        return self._rows(keep)

    def first_runs(self, n_runs):
        """The trials of the first ``n_runs`` runs (lowest run numbers), in their original order.

        What a lab has of a new subject after one session: whole runs, not trials drawn across all of them.
        """
        if self.runs is None:
            raise ValueError("these trials carry no run numbers")
        if n_runs < 1:
            raise ValueError(f"n_runs must be >= 1, got {n_runs}")
        kept = np.unique(self.runs)[:n_runs]
        return self._rows(np.flatnonzero(np.isin(self.runs, kept)))

    def _rows(self, keep):
        keep = np.asarray(keep, dtype=np.int64)
        return PairedTrials(self.fmri[keep], self.images[keep], self.labels[keep],
                            None if self.runs is None else self.runs[keep])


def training_share(trials, fraction=1.0, runs=None, seed=None):
    """The training trials a decoder sees: the first ``runs`` runs, else a seeded random ``fraction``.

    ``finetune.train_runs`` and ``finetune.train_fraction``; the config forbids setting both.
    """
    if runs:
        return trials.first_runs(int(runs))
    return trials.subset(float(fraction), seed)


def paired_trials(responses_split, stimuli, image_size, image_channels):
    """Pair a responses split with its stimulus images at the given size and channels.

    Parameters
    ----------
    responses_split : mindvis.data.responses.ResponseSplit
    stimuli : mindvis.data.stimuli.StimulusSet
    image_size, image_channels : int
        The generator's (``Generator.image_size``, ``Generator.image_channels``).
    """
    if len(responses_split) == 0:
        return PairedTrials(np.zeros((0, responses_split.fmri.shape[1]), np.float32),
                            torch.zeros(0, image_channels, image_size, image_size), np.zeros(0, np.int64),
                            np.zeros(0, np.int64))
    images, labels = stimuli.lookup(list(responses_split.stimulus_id))
    return PairedTrials(responses_split.fmri, images_to_tensor(images, image_size, image_channels), labels,
                        responses_split.run)


class MultiSubjectTrials:
    """Several subjects' :class:`PairedTrials` as one training set, for a decoder shared by the subjects.

    ``fmri`` is zero-padded to the widest subject (each subject's decoder reads its own first
    ``V_s`` columns); ``subject`` [N] int64 indexes ``subjects``. ``weight`` [N] float32 scales
    each trial's loss (prior preservation weighs the other subjects' trials; default 1).
    ``subjects`` (default: the keys of ``trials``) is the list ``subject`` indexes, which may
    hold subjects without trials here.
    """

    def __init__(self, trials, weights=None, subjects=None):
        self.subjects = list(subjects) if subjects is not None else list(trials)
        names = list(trials)
        parts = [trials[name] for name in names]
        width = max(part.fmri.shape[1] for part in parts)
        self.fmri = torch.cat([torch.nn.functional.pad(part.fmri, (0, width - part.fmri.shape[1])) for part in parts])
        self.images = torch.cat([part.images for part in parts])
        self.labels = torch.cat([part.labels for part in parts])
        self.subject = torch.cat([torch.full((len(part),), self.subjects.index(name), dtype=torch.int64)
                                  for name, part in zip(names, parts)])
        weights = weights or {}
        self.weight = torch.cat([torch.full((len(part),), float(weights.get(name, 1.0)))
                                 for name, part in zip(names, parts)])

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices):
        return {"fmri": self.fmri[indices], "images": self.images[indices], "labels": self.labels[indices],
                "subject": self.subject[indices], "weight": self.weight[indices]}
