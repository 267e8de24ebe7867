"""The preprocessing stage: one subject's BIDS runs to ``responses.h5`` (or a rest HDF5).

:func:`preprocess_subject` does what a careful analyst would, run by run:

1. check every input (BOLD 4-D and on the ROI grid, sidecar TR, events,
   confounds) before anything is written;
2. mask the run (:func:`mindvis.preprocess.bids.mask_bold`), note voxels that
   are non-finite or constant (they are dropped from all runs at the end,
   with a warning that counts them) and the run's tSNR;
3. clean it with :func:`nilearn.signal.clean` (detrend, cosine high-pass,
   confounds, z-score; :mod:`mindvis.preprocess.clean`);
4. estimate one response per trial (``glm_lss``, ``glm_lsa`` or
   ``lag_average``; :mod:`mindvis.preprocess.estimate`) and normalise each
   voxel over the run's trials (``run_normalise``: z-score by default).

Then trials are split: ``train`` trials of the validation runs (whole runs,
chosen with the config seed) go to ``val``, the other ``train`` trials to
``train``, ``test`` trials to ``test`` (repeats kept) and, averaged per
stimulus, to ``test_avg``. Every voxel is z-scored with the mean and standard
deviation of the ``train`` trials only.

Voxels are the subject's own ROI (``preprocess.space: native``) or the group
template (``template``: :func:`mindvis.preprocess.bids.load_voxels`), the same
voxels in the same order for every subject. In the template space no voxel is
ever dropped (that would shift every later voxel's meaning): a voxel that is
bad in this subject is kept as 0 (the training mean) and flagged in
``quality/valid_voxel``. Quality measures
(:mod:`mindvis.preprocess.quality`) go in the file's ``quality/`` group and in
``preprocess_report.json`` beside it; when the simulator's ground truth is
present, the report also compares the estimates with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindvis.data.reliability import noise_ceiling
from mindvis.data.responses import ResponseSplit, write_responses, write_rest
from mindvis.data.voxel_space import space_spec
from mindvis.errors import MindvisError
from mindvis.preprocess import bids, clean, estimate, quality
from mindvis.utils.io import derive_seed, sha256_file, software_versions, write_json_atomic

logger = logging.getLogger(__name__)

REPORT_NAME = "preprocess_report.json"


@dataclass
class RunEstimates:
    """What one run contributes: per-trial responses and per-voxel run statistics."""

    run: int
    trial_type: np.ndarray      # object [n]
    stimulus_id: np.ndarray     # object [n]
    class_name: np.ndarray      # object [n] ('' when the events have no class column)
    onset: np.ndarray           # float64 [n]
    betas: np.ndarray           # float32 [n, V]
    tsnr: np.ndarray            # float64 [V]
    non_finite: np.ndarray      # bool [V]
    constant: np.ndarray        # bool [V]


def _relative(path, root):
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _voxel_space(section, roi, voxel_ijk, voxel_roi):
    """The written voxels' spec (:mod:`mindvis.data.voxel_space`), with the template mask's SHA-256 when shared."""
    extra = {"mask": str(roi.files[0]), "mask_sha256": sha256_file(roi.files[0])} \
        if section["space"] == "template" else {}
    return space_spec(voxel_ijk, roi.affine, roi.mask.shape, voxel_roi, space=section["space"], **extra)


def _hash_inputs(paths, root):
    return {_relative(path, root): sha256_file(path) for path in paths if path is not None and Path(path).exists()}


def _read_run(files, roi, section, need_class):
    """Validate and mask one task run. Returns (tr, raw [T, V] float32, events, confounds)."""
    tr = bids.read_tr(files.sidecar)
    image = bids.open_bold(files.bold, roi)
    bids.check_tr_header(image, tr, files.sidecar, files.bold)
    n_volumes = image.shape[3]
    events = bids.read_events(files.events, n_volumes, tr, need_class=need_class)
    confounds = bids.read_confounds(files.confounds, section["confounds"], n_volumes, files.bold)
    raw = bids.mask_bold(image, roi.mask, files.bold)
    return tr, raw, events, confounds


def _check_some_voxels_usable(non_finite, constant, path):
    if (non_finite | constant).all():
        raise MindvisError(f"every ROI voxel of this run is non-finite ({int(non_finite.sum())}) or constant "
                           f"({int(constant.sum())})", path=path,
                           fix="check the file (NaN volumes, an empty acquisition) and that the ROI lies in the brain.")


def _estimate_run(files, raw, tr, events, confounds, section):
    """Clean one masked run and estimate its trials' responses."""
    non_finite, constant = clean.bad_voxels(raw)
    _check_some_voxels_usable(non_finite, constant, files.bold)
    # Bad voxels are dropped later from every run; zero them here so cleaning and fitting stay finite.
    raw[:, non_finite | constant] = 0.0
    tsnr = quality.detrended_tsnr(raw)
    cleaned = clean.clean_run(raw, tr, confounds, section["high_pass"], path=files.bold)
    is_trial = events["trial_type"].isin(bids.STIMULUS_TRIAL_TYPES).to_numpy()
    trials = events[is_trial].reset_index(drop=True)
    others = events[~is_trial].reset_index(drop=True)
    method = section["method"]
    if len(trials) == 0:
        betas = np.zeros((0, raw.shape[1]))
    elif method == "lag_average":
        betas, counts = estimate.lag_average(cleaned, tr, trials["onset"].to_numpy(), section["lag_window"])
        if (counts == 0).any():
            onset = trials["onset"][counts == 0].iloc[0]
            raise MindvisError(f"the lag window {section['lag_window']} s after onset {onset:g} s holds no volume "
                               f"of the run ({raw.shape[0]} volumes of TR {tr:g} s)", path=files.events,
                               key="preprocess.lag_window",
                               fix="widen preprocess.lag_window to at least one TR, or check the onsets.")
    else:
        design, trial_columns, nuisance_columns = estimate.trial_design(
            raw.shape[0], tr, trials, others, hrf_model=section["hrf_model"], high_pass=section["high_pass"],
            confounds=confounds)
        if method == "glm_lsa":
            if len(design.columns) >= raw.shape[0]:
                raise MindvisError(f"least-squares-all needs fewer regressors ({len(design.columns)}) than volumes "
                                   f"({raw.shape[0]})", path=files.events, key="preprocess.method",
                                   fix="use glm_lss for runs with many trials.")
            betas = estimate.estimate_lsa(cleaned, design, trial_columns, section["noise_model"])
        else:
            betas = estimate.estimate_lss(cleaned, design, trial_columns, nuisance_columns, section["noise_model"])
    betas = normalise_per_run(betas, section["run_normalise"])
    class_name = trials["class"].astype(str).to_numpy(dtype=object) if "class" in trials.columns \
        else np.full(len(trials), "", dtype=object)
    return RunEstimates(run=files.run, trial_type=trials["trial_type"].to_numpy(dtype=object),
                        stimulus_id=trials["stimulus_id"].astype(str).to_numpy(dtype=object),
                        class_name=class_name, onset=trials["onset"].to_numpy(dtype=np.float64),
                        betas=betas.astype(np.float32), tsnr=tsnr, non_finite=non_finite, constant=constant)


def normalise_per_run(betas, mode):
    """Centre (``center``) or z-score (``zscore``) each voxel over one run's trials.

    Parameters
    ----------
    betas : float [n_trials, V]
    mode : {'zscore', 'center', 'none'}

    Returns
    -------
    float64 [n_trials, V]; unchanged for a run with fewer than two trials, and
    voxels constant over the run are only centred.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if mode == "none" or len(betas) < 2:
        return betas
    centred = betas - betas.mean(axis=0)
    if mode == "center":
        return centred
    std = centred.std(axis=0)
    return centred / np.where(std > 0, std, 1.0)


def _resolve_labels(estimates, stimuli_path, runs):
    """Class names and per-run labels, from the stimulus set or the events' ``class`` column."""
    if stimuli_path is not None:
        from mindvis.data.stimuli import load_stimulus_set

        stimuli = load_stimulus_set(stimuli_path, splits=("train", "test"))
        lookup = {}
        for split in stimuli.splits.values():
            lookup.update(zip(split.stimulus_id, split.label))
        labels = []
        for run_estimates, files in zip(estimates, runs):
            unknown = [sid for sid in run_estimates.stimulus_id if sid not in lookup]
            if unknown:
                raise MindvisError(f"{len(unknown)} stimulus ids are not in the stimulus set {stimuli_path}, "
                                   f"e.g. {unknown[:3]}", path=files.events, key="stimulus_id",
                                   fix="pass the stimulus HDF5 the experiment was run with.")
            run_labels = np.array([lookup[sid] for sid in run_estimates.stimulus_id], dtype=np.int64)
            for name, label in zip(run_estimates.class_name, run_labels):
                if name and stimuli.class_names[label] != name:
                    raise MindvisError(f"class '{name}' disagrees with the stimulus set's class "
                                       f"'{stimuli.class_names[label]}' for the same stimulus", path=files.events,
                                       key="class", fix="check that the events and the stimulus set belong together.")
            labels.append(run_labels)
        return list(stimuli.class_names), labels
    class_names = sorted({name for run_estimates in estimates for name in run_estimates.class_name})
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [np.array([index[name] for name in e.class_name], dtype=np.int64) for e in estimates]


def choose_val_runs(train_runs, val_fraction, seed):
    """Whole training runs held out for validation: ``round(fraction * n)``, at least 1 and at most n - 1.

    Parameters
    ----------
    train_runs : list of int
    val_fraction : float
    seed : int

    Returns
    -------
    sorted list of int (empty when there is a single training run)
    """
    n_runs = len(train_runs)
    if n_runs < 2:
        return []
    n_val = int(min(max(round(val_fraction * n_runs), 1), n_runs - 1))
    rng = np.random.default_rng(seed)
    return sorted(int(run) for run in rng.choice(np.asarray(train_runs), n_val, replace=False))


def _split(estimates, labels, keep_runs, trial_type, n_voxels):
    """Rows of ``trial_type`` from runs in ``keep_runs``, as arrays (betas not yet z-scored)."""
    fmri, sid, label, run, onset = [], [], [], [], []
    for run_estimates, run_labels in zip(estimates, labels):
        if run_estimates.run not in keep_runs:
            continue
        rows = run_estimates.trial_type == trial_type
        fmri.append(run_estimates.betas[rows])
        sid.append(run_estimates.stimulus_id[rows])
        label.append(run_labels[rows])
        run.append(np.full(int(rows.sum()), run_estimates.run, dtype=np.int64))
        onset.append(run_estimates.onset[rows])
    if not fmri:
        return ResponseSplit.empty(n_voxels)
    return ResponseSplit(np.concatenate(fmri), np.concatenate(sid), np.concatenate(label), np.concatenate(run),
                         np.concatenate(onset))


def _ground_truth_report(bids_dir, subject, voxel_ijk, splits, ceiling):
    """Compare the estimates with the simulator's noise-free responses, when they exist."""
    import h5py

    path = Path(bids_dir) / "derivatives" / "simulation" / subject / f"{subject}_desc-groundtruth.h5"
    if not path.exists():
        return None
    with h5py.File(path, "r") as handle:
        if "response" not in handle:
            return None
        truth_ijk = handle["voxel_ijk"][()]
        truth_ids = handle["stimulus_id"].asstr()[()]
        truth = handle["response"][()]
    return quality.truth_agreement(truth, truth_ids, truth_ijk, voxel_ijk, splits, ceiling)


def preprocess_subject(config, bids_dir, subject, out_path, stimuli_path=None):
    """Preprocess one subject's task runs into ``responses.h5`` and ``preprocess_report.json``.

    Parameters
    ----------
    config : dict
        A validated experiment config (its ``preprocess`` section is used).
    bids_dir : str or Path
    subject : str
        With the ``sub-`` prefix.
    out_path : str or Path
        The ``responses.h5`` to write; the report is written beside it.
    stimuli_path : str or Path, optional
        Stimulus HDF5 giving class names and labels by ``stimulus_id``. Without
        it, class names are the sorted values of the events' ``class`` column.

    Returns
    -------
    dict
        The report (also written as JSON).

    Raises
    ------
    MindvisError
        On any bad input, before anything is written.
    """
    started = time.perf_counter()
    section = config["preprocess"]
    bids_dir, out_path = Path(bids_dir), Path(out_path)
    runs = bids.find_runs(bids_dir, subject, section["task"], need_events=True)
    roi = bids.load_voxels(section, bids_dir, subject)
    n_roi_voxels = int(roi.mask.sum())
    logger.info("%s: %d runs, %d %s voxels, method %s", subject, len(runs), n_roi_voxels,
                "template" if section["space"] == "template" else "ROI", section["method"])

    estimates, trs, nuisance = [], [], {}
    for files in runs:
        tr, raw, events, confounds = _read_run(files, roi, section, need_class=stimuli_path is None)
        for name, count in bids.nuisance_counts(events).items():
            nuisance[name] = nuisance.get(name, 0) + count
        if trs and abs(tr - trs[0]) > 1e-6:
            raise MindvisError(f"RepetitionTime {tr:g} s differs from the first run's {trs[0]:g} s",
                               path=files.sidecar, key="RepetitionTime",
                               fix="preprocess runs of different TR as separate data sets.")
        trs.append(tr)
        estimates.append(_estimate_run(files, raw, tr, events, confounds, section))
        del raw
    tr = trs[0]

    non_finite = np.any([e.non_finite for e in estimates], axis=0)
    constant = np.any([e.constant for e in estimates], axis=0) & ~non_finite
    class_names, labels = _resolve_labels(estimates, stimuli_path, runs)

    train_runs = [e.run for e in estimates if (e.trial_type == "train").any()]
    test_runs = [e.run for e in estimates if (e.trial_type == "test").any()]
    if not train_runs:
        raise MindvisError("no run holds trials of trial_type 'train'", path=runs[0].events, key="trial_type",
                           fix="mark training trials with trial_type 'train' (test trials with 'test').")
    val_runs = choose_val_runs(train_runs, section["val_fraction"],
                               derive_seed(config["seed"], "preprocess", subject, "val"))
    if not val_runs:
        raise MindvisError(f"a single run (run {train_runs[0]}) holds trials of trial_type 'train': the "
                           "validation split, carved from whole training runs, would be empty",
                           path=runs[0].events, key="trial_type",
                           fix="give at least two runs with training trials (check that every training trial's "
                               "trial_type is exactly 'train').")
    warnings = []
    if not test_runs:
        # A data set for cross-validation only (Haxby's) has none; said on the console, and decode stages refuse.
        message = ("no run holds trials of trial_type 'test': the test split is empty (0 trials); generate and "
                   "evaluate need test trials")
        logger.warning("%s: %s", subject, message)
        warnings.append(message)
    if nuisance:
        # Not stimulus trials, on purpose or not: said on the console with counts, never dropped silently.
        message = ("events modelled as nuisance conditions, not responses: "
                   + ", ".join(f"{count} '{name}'" for name, count in nuisance.items()))
        logger.warning("%s: %s", subject, message)
        warnings.append(message)
    all_runs = {e.run for e in estimates}
    n_all = n_roi_voxels
    splits = {
        "train": _split(estimates, labels, set(train_runs) - set(val_runs), "train", n_all),
        "val": _split(estimates, labels, set(val_runs), "train", n_all),
        "test": _split(estimates, labels, all_runs, "test", n_all),
    }
    if len(splits["train"]) < 2:
        raise MindvisError(f"only {len(splits['train'])} training trial(s) outside the validation runs",
                           path=runs[0].events, key="trial_type",
                           fix="a subject needs at least two training trials besides its validation runs; give "
                               "more training runs.")

    # Training-trial statistics only: the test set never shapes the normalisation.
    mean = splits["train"].fmri.astype(np.float64).mean(axis=0)
    std = splits["train"].fmri.astype(np.float64).std(axis=0)
    flat = (std == 0) & ~non_finite & ~constant
    keep = ~(non_finite | constant | flat)
    if not keep.any():
        raise MindvisError(f"all {n_roi_voxels} ROI voxels are non-finite or constant in some run",
                           path=runs[0].bold, fix="check the BOLD data and that the ROI mask lies inside the brain.")
    dropped = {"non_finite": int(non_finite.sum()), "constant": int(constant.sum()),
               "no_training_variance": int(flat.sum())}
    template = section["space"] == "template"
    valid = keep.copy()
    if sum(dropped.values()):
        verb = "kept as 0 (template space: no voxel is dropped)" if template else "dropped"
        message = (f"{verb} {sum(dropped.values())} of {n_roi_voxels} voxels: {dropped['non_finite']} non-finite "
                   f"and {dropped['constant']} constant in at least one run, {dropped['no_training_variance']} "
                   "without variance over training trials")
        logger.warning("%s: %s", subject, message)
        warnings.append(message)
    if template:
        mean, std = np.where(valid, mean, 0.0), np.where(valid, std, 1.0)
        keep = np.ones_like(valid)
    for split in splits.values():
        split.fmri = ((split.fmri[:, keep] - mean[keep]) / std[keep]).astype(np.float32)
        split.fmri[:, ~valid[keep]] = 0.0
    averaged, avg_ids, avg_labels, n_repeats = quality.average_repeats(
        splits["test"].fmri, splits["test"].stimulus_id, splits["test"].label)
    splits["test_avg"] = ResponseSplit(averaged, avg_ids, avg_labels, np.full(len(avg_ids), -1, np.int64),
                                       np.full(len(avg_ids), np.nan), n_repeats)

    voxel_ijk = roi.voxel_ijk[keep]
    voxel_roi = roi.voxel_roi[keep]
    tsnr = np.mean([e.tsnr for e in estimates], axis=0)[keep]
    ncsnr, ceiling = noise_ceiling(splits["test"].fmri, splits["test"].stimulus_id)
    per_class = {name: quality.trials_per_class(splits[name].label, len(class_names)) for name in splits}
    quality_arrays = {"tsnr": tsnr.astype(np.float32), "ncsnr": ncsnr.astype(np.float32),
                      "noise_ceiling": ceiling.astype(np.float32), "trials_per_class": per_class["train"],
                      "trials_per_class_val": per_class["val"], "trials_per_class_test": per_class["test"],
                      "train_mean": mean[keep].astype(np.float32), "train_std": std[keep].astype(np.float32),
                      "valid_voxel": valid[keep]}

    inputs = [path for files in runs for path in (files.bold, files.sidecar, files.events, files.confounds)]
    inputs += roi.files + ([Path(stimuli_path)] if stimuli_path is not None else [])
    input_hashes = _hash_inputs(inputs, bids_dir)
    versions = software_versions()
    report = {
        "subject": subject, "method": section["method"], "tr": tr,
        "runs": {"train": sorted(set(train_runs) - set(val_runs)), "val": val_runs, "test": test_runs},
        "n_trials": {name: len(split) for name, split in splits.items()},
        "space": section["space"],
        "n_voxels": {"roi": n_roi_voxels, "kept": int(keep.sum()), "valid": int(valid.sum()),
                     "dropped": {} if template else dropped, "zeroed": dropped if template else {}},
        "trials_per_class": {name: dict(zip(class_names, per_class[name].tolist())) for name in ("train", "val",
                                                                                                   "test")},
        "quality": quality.summarise(tsnr, ncsnr, ceiling, voxel_roi),
        "ground_truth": _ground_truth_report(bids_dir, subject, voxel_ijk, splits, ceiling),
        "warnings": warnings,
        "preprocess_config": section,
        "output": str(out_path),
        "n_inputs": len(input_hashes),
        "versions": versions,
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    extra_attrs = {"val_runs": val_runs, "dropped_voxels": {} if template else dropped,
                   "voxel_space": _voxel_space(section, roi, voxel_ijk, voxel_roi)}
    write_responses(out_path, splits=splits, voxel_ijk=voxel_ijk, affine=roi.affine, volume_shape=roi.mask.shape,
                    voxel_roi=voxel_roi, class_names=class_names, tr=tr, subject=subject, method=section["method"],
                    preprocess_config=section, config=config, input_hashes=input_hashes, quality=quality_arrays,
                    versions=versions, extra_attrs=extra_attrs)
    write_json_atomic(out_path.with_name(REPORT_NAME), report)
    logger.info("%s: wrote %s (%s trials, %d voxels) in %.1f s", subject, out_path, report["n_trials"],
                int(keep.sum()), report["seconds"])
    return report


def preprocess_rest_subject(config, bids_dir, subject, out_path):
    """Clean one subject's resting-state runs into the rest HDF5 (SC-MBM pretraining corpus).

    Each run is masked, cleaned like a task run (detrend, cosine high-pass,
    confounds, z-score per run) and its time points kept; voxels non-finite or
    constant in any run are dropped with a warning.

    Parameters
    ----------
    config : dict
    bids_dir : str or Path
    subject : str
    out_path : str or Path

    Returns
    -------
    dict
        A short summary (runs, time points, voxels, seconds).
    """
    started = time.perf_counter()
    section = config["preprocess"]
    bids_dir = Path(bids_dir)
    runs = bids.find_runs(bids_dir, subject, section["rest_task"], need_events=False)
    roi = bids.load_voxels(section, bids_dir, subject)
    cleaned_runs, run_index, trs, bad = [], [], [], np.zeros(int(roi.mask.sum()), dtype=bool)
    for files in runs:
        tr = bids.read_tr(files.sidecar)
        if trs and abs(tr - trs[0]) > 1e-6:
            raise MindvisError(f"RepetitionTime {tr:g} s differs from the first run's {trs[0]:g} s",
                               path=files.sidecar, key="RepetitionTime")
        trs.append(tr)
        image = bids.open_bold(files.bold, roi)
        confounds = bids.read_confounds(files.confounds, section["confounds"], image.shape[3], files.bold)
        raw = bids.mask_bold(image, roi.mask, files.bold)
        non_finite, constant = clean.bad_voxels(raw)
        _check_some_voxels_usable(non_finite, constant, files.bold)
        bad |= non_finite | constant
        raw[:, non_finite | constant] = 0.0
        cleaned_runs.append(clean.clean_run(raw, tr, confounds, section["high_pass"], path=files.bold))
        run_index.append(np.full(raw.shape[0], files.run, dtype=np.int64))
    if bad.all():
        raise MindvisError("every ROI voxel is non-finite or constant in some run", path=runs[0].bold)
    template = section["space"] == "template"
    if bad.any():
        logger.warning("%s: %s %d of %d voxels non-finite or constant in at least one run", subject,
                       "kept as 0 (template space)" if template else "dropped", int(bad.sum()), len(bad))
    keep = np.ones_like(bad) if template else ~bad
    fmri = np.concatenate([run[:, keep] for run in cleaned_runs])
    fmri[:, bad[keep]] = 0.0
    inputs = [path for files in runs for path in (files.bold, files.sidecar, files.confounds)] + roi.files
    write_rest(out_path, fmri=fmri, run=np.concatenate(run_index), voxel_ijk=roi.voxel_ijk[keep], affine=roi.affine,
               volume_shape=roi.mask.shape, voxel_roi=roi.voxel_roi[keep], tr=trs[0], subject=subject,
               preprocess_config=section, config=config, input_hashes=_hash_inputs(inputs, bids_dir),
               extra_attrs={"dropped_voxels": 0 if template else int(bad.sum()),
                            "zeroed_voxels": int(bad.sum()) if template else 0,
                            "voxel_space": _voxel_space(section, roi, roi.voxel_ijk[keep], roi.voxel_roi[keep])})
    summary = {"subject": subject, "runs": [files.run for files in runs], "n_timepoints": int(fmri.shape[0]),
               "n_voxels": int(keep.sum()), "dropped_voxels": 0 if template else int(bad.sum()),
               "zeroed_voxels": int(bad.sum()) if template else 0, "space": section["space"],
               "seconds": round(time.perf_counter() - started, 2)}
    logger.info("%s: wrote %s %s", subject, out_path, summary)
    return summary
