"""Simulate one subject end to end and write it as BIDS (file layout in :mod:`mindvis.simulate.bids`).

A task subject: voxels are placed in the brain (:mod:`.geometry`), given
tuning (:mod:`.encoding`), shown the experiment's images in jittered
event-related runs (:mod:`.design`), and scanned (:mod:`.timeseries`). A rest
subject gets the same anatomy and tuning but no stimuli: its visual voxels
carry spontaneous slow fluctuations that follow the same functional layout
(retinotopic in V1-V3, category and shape maps in LOC and VOT, shared within
an ROI), so a masked autoencoder pretrained on rest data meets the structure
it will see in the task data.

Runs are generated and written one at a time, so memory stays bounded by one
run. Every random stream derives from ``derive_seed(seed, 'simulate',
subject, part)``: subjects differ, reruns are identical, and changing one part
(say, the noise) leaves the others (anatomy, tuning) unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mindvis.data import bids_layout
from mindvis.errors import MindvisError
from mindvis.simulate import bids, design, encoding, geometry, timeseries
from mindvis.simulate.traits import is_rest_subject, subject_traits
from mindvis.utils.io import derive_seed, sha256_file, software_versions, write_json_atomic

#: Typical sd over images of a voxel's evoked response, relative to its mean (about 0.25 early, 0.4 higher).
TYPICAL_RESPONSE_SPREAD = 0.3
#: Object categories the tuning maps of a rest subject are drawn for (no stimuli to count them from).
REST_CATEGORIES = 10
#: Side of the visual-field grid carrying spontaneous retinotopic activity.
REST_FIELD_GRID = 8
#: AR(1) coefficient per TR of the slow spontaneous latents (time constant ~ 20 s at TR 2 s).
REST_LATENT_AR1 = 0.9
#: Weight of the fluctuation shared by all voxels of an ROI, and of the one shared by all visual voxels.
REST_ROI_SHARE = 0.5
REST_GLOBAL_SHARE = 0.3


def _rng(config, subject, part):
    return np.random.default_rng(derive_seed(config["seed"], "simulate", subject, part))


def _check_subject(subject, rest):
    if not subject.startswith("sub-") or is_rest_subject(subject) != rest:
        kind = "a rest subject label like sub-rest01" if rest else "a task subject label like sub-01"
        raise MindvisError(f"'{subject}' is not {kind}", key="subject",
                           fix="task subjects are sub-01 .., rest subjects sub-rest01 .. (see mindvis.config).")


def _anatomy(config, subject, traits):
    section = config["simulate"]
    layout = geometry.place_rois(section["resolution_mm"], section["field_of_view"], traits["n_early_voxels"],
                                 traits["n_higher_voxels"], _rng(config, subject, "geometry"))
    _, fraction = geometry.brain_fraction(section["resolution_mm"], section["field_of_view"])
    return layout, fraction


def _roi_columns(scanner, layout):
    """Column of each ROI voxel in the scanner's tissue arrays, int [V]."""
    roi_flat = np.ravel_multi_index(tuple(layout.ijk.T), layout.grid.shape)
    positions = np.searchsorted(scanner.tissue, roi_flat)
    assert np.array_equal(scanner.tissue[positions], roi_flat), "ROI voxels must be tissue"
    return positions


def _remove_previous(bids_dir, subject):
    """Delete the files an earlier simulation of this subject wrote (listed in its manifest).

    Without this, a rerun with fewer runs would leave stale runs behind for
    preprocessing to pick up. Only files the simulator itself wrote are removed.
    """
    import json

    manifest = bids_layout.derivative_paths(bids_dir, subject)["manifest"]
    if not manifest.exists():
        return
    try:
        listed = [entry["path"] for entry in json.loads(manifest.read_text())["files"]]
    except (ValueError, KeyError, TypeError):
        return
    manifest.unlink()
    for relative in listed:
        (Path(bids_dir) / relative).unlink(missing_ok=True)


def _write_run(bids_dir, subject, run, volumes, motion, section, affine):
    bold = bids_layout.func_path(bids_dir, subject, run.task, run.run, "bold.nii.gz")
    sidecar = bids_layout.func_path(bids_dir, subject, run.task, run.run, "bold.json")
    confounds = bids_layout.func_path(bids_dir, subject, run.task, run.run, "desc-confounds_timeseries.tsv")
    bids.write_nifti(bold, volumes, affine, tr=section["tr"])
    bids.write_bold_sidecar(sidecar, section, run.task)
    bids.write_confounds(confounds, motion, timeseries.framewise_displacement(motion))
    written = [bold, sidecar, confounds]
    if run.events is not None:
        events = bids_layout.func_path(bids_dir, subject, run.task, run.run, "events.tsv")
        bids.write_tsv(events, run.events)
        written.append(events)
    return written


def _manifest(config, bids_dir, subject, written, seed_parts, started, extra):
    bids_dir = Path(bids_dir)
    files = [{"path": str(Path(path).relative_to(bids_dir)), "bytes": Path(path).stat().st_size,
              "sha256": sha256_file(path)} for path in written]
    write_json_atomic(bids_layout.derivative_paths(bids_dir, subject)["manifest"], {
        "subject": subject,
        "seed": config["seed"],
        "subject_seeds": {part: derive_seed(config["seed"], "simulate", subject, part) for part in seed_parts},
        "config": {"experiment": config["experiment"], "simulate": config["simulate"]},
        "versions": software_versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        **extra,
        "files": files,
    })


def simulate_subject(config, stimuli_path, bids_dir, subject):
    """Simulate one task subject and write its runs, events, confounds, ROIs and ground truth.

    Parameters
    ----------
    config : dict
        A validated experiment config (``simulate`` and ``seed`` are used).
    stimuli_path : str or Path
        The stimulus HDF5 (:mod:`mindvis.data.stimuli`).
    bids_dir : str or Path
        The BIDS root to write into.
    subject : str
        BIDS label with prefix, e.g. ``sub-01``.

    Returns
    -------
    pathlib.Path
        The manifest, written last.
    """
    from mindvis.data.stimuli import load_stimulus_set

    started = time.perf_counter()
    _check_subject(subject, rest=False)
    section = config["simulate"]
    traits = subject_traits(config, subject)
    stimuli = load_stimulus_set(stimuli_path, splits=("train", "test"))
    train, test = stimuli["train"], stimuli["test"]
    stimulus_ids = np.concatenate([train.stimulus_id, test.stimulus_id])
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.label, test.label])
    class_names = np.asarray(stimuli.class_names, dtype=object)

    _remove_previous(bids_dir, subject)
    layout, fraction = _anatomy(config, subject, traits)
    prototypes = None
    if section["category_model"] == "features":
        # Drawn from the config seed alone: every subject's C2 features are the same features.
        prototypes = encoding.draw_c2_prototypes(train.images, section["n_orientations"], section["gabor_wavelengths"],
                                                 np.random.default_rng(derive_seed(config["seed"], "simulate",
                                                                                   "c2_prototypes")))
    model = encoding.make_encoding_model(layout, len(class_names), section, _rng(config, subject, "tuning"),
                                         c2_prototypes=prototypes)
    response = model.calibrate_predict(images, labels)  # [S, V], percent signal change

    # Noise level: mean stimulus-driven sd over ROI voxels / mean noise sd = this subject's SNR.
    noise_level = float(response.std(axis=0).mean()) / (section["single_trial_snr"] * traits["snr_factor"])
    scanner = timeseries.make_scanner(layout.grid, fraction, noise_level, section, _rng(config, subject, "scanner"))
    roi_columns = _roi_columns(scanner, layout)

    runs = design.task_runs(train.stimulus_id, class_names[train.label], test.stimulus_id, class_names[test.label],
                            section, _rng(config, subject, "design"))
    row_of = {sid: row for row, sid in enumerate(stimulus_ids)}
    noise_rng = _rng(config, subject, "noise")
    spontaneous_rng = _rng(config, subject, "spontaneous")
    spontaneous_sd = section["spontaneous_to_noise"] * scanner.noise_sd[roi_columns] * model.gain
    written = []
    for run in runs:
        events = run.events
        regressors = timeseries.event_regressors(events["onset"].to_numpy(), events["duration"].to_numpy(),
                                                 run.n_volumes, section["tr"], section["stimulus_duration"])
        amplitudes = response[[row_of[sid] for sid in events["stimulus_id"]]]  # [K, V]
        # Spontaneous fluctuations look like evoked patterns: noise a decoder cannot simply average away.
        signal = regressors @ amplitudes + spontaneous_sd * spontaneous_signal(
            model, layout, run.n_volumes, section["tr"], spontaneous_rng)
        volumes, motion = timeseries.acquire_run(scanner, run.n_volumes, signal, section, noise_rng,
                                                 columns=roi_columns)
        written += _write_run(bids_dir, subject, run, volumes, motion, section, layout.grid.affine)
        del signal, volumes

    paths = bids_layout.derivative_paths(bids_dir, subject)
    written += bids.write_roi_files(bids_dir, subject, layout)
    seed = derive_seed(config["seed"], "simulate", subject)
    attrs = {"subject": subject, "seed": seed, "config": section, "versions": software_versions()}
    bids.write_ground_truth(paths["groundtruth"], layout, model, scanner.noise_sd[roi_columns],
                            scanner.baseline[roi_columns], attrs, list(class_names),
                            stimulus_ids=stimulus_ids, labels=labels, response=response)
    written.append(paths["groundtruth"])
    extra = {"n_voxels": int(layout.n_voxels), "n_runs": len(runs),
             "n_volumes": int(sum(run.n_volumes for run in runs)), "grid_shape": list(layout.grid.shape),
             "traits": traits}
    _manifest(config, bids_dir, subject, written,
              ("geometry", "tuning", "scanner", "design", "noise", "spontaneous"), started, extra)
    return paths["manifest"]


def spontaneous_signal(model, layout, n_volumes, tr, rng):
    """Slow spontaneous BOLD fluctuations of the visual voxels, z-scored per voxel.

    Early voxels see a random, slowly changing pattern of activity over the
    visual field through their receptive fields (so retinotopic neighbours
    co-fluctuate); higher voxels follow slowly changing category and shape
    activations through their tuning; every ROI adds a fluctuation of its
    own, and all visual voxels share one more. The neural drive is convolved
    with the Glover HRF.

    Returns
    -------
    float32 [n_volumes, V]
    """
    from scipy import ndimage
    from scipy.signal import fftconvolve, lfilter

    def latent(n_series):
        scale = np.sqrt(1 - REST_LATENT_AR1 ** 2)
        noise = rng.standard_normal((n_volumes, n_series))
        noise[0] /= scale
        return lfilter([scale], [1.0, -REST_LATENT_AR1], noise, axis=0)

    drive = np.zeros((n_volumes, layout.n_voxels))
    early = model.is_early
    if early.any():
        side = REST_FIELD_GRID
        field = latent(side * side).reshape(n_volumes, side, side)
        field = ndimage.gaussian_filter(field, sigma=(0, 1, 1), mode="nearest").reshape(n_volumes, -1)
        fields = encoding.prf_weights(model.prf_x[early], model.prf_y[early], model.prf_sigma[early], side, side)
        drive[:, early] = field @ (fields / np.maximum(fields.sum(axis=1, keepdims=True), 1e-12)).T
    higher = ~early
    if higher.any():
        categories = latent(model.category_maps.shape[1])
        shapes = latent(model.shape_weights.shape[1])
        drive[:, higher] = (model.category_weight[higher] * (categories @ model.category_maps[higher].T)
                            + model.shape_weight[higher] * (shapes @ model.shape_weights[higher].T)
                            / np.sqrt(shapes.shape[1]))
    drive = (drive - drive.mean(axis=0)) / np.maximum(drive.std(axis=0), 1e-9)
    per_roi = latent(len(geometry.ROI_NAMES))[:, layout.roi - 1]
    shared = latent(1)
    drive = drive + np.sqrt(REST_ROI_SHARE) * per_roi + np.sqrt(REST_GLOBAL_SHARE) * shared
    kernel = timeseries.hrf_kernel(tr, oversampling=1)
    bold = fftconvolve(drive, kernel[:, None], axes=0)[:n_volumes]
    return ((bold - bold.mean(axis=0)) / np.maximum(bold.std(axis=0), 1e-9)).astype(np.float32)


def simulate_rest_subject(config, bids_dir, subject):
    """Simulate one resting-state subject (no stimuli) and write its runs, confounds and ROIs.

    The visual voxels' spontaneous fluctuations (:func:`spontaneous_signal`)
    have an sd of ``spontaneous_to_noise`` times the voxel's noise sd (and gain).

    Parameters
    ----------
    config : dict
    bids_dir : str or Path
    subject : str
        e.g. ``sub-rest01``.

    Returns
    -------
    pathlib.Path
        The manifest, written last.
    """
    started = time.perf_counter()
    _check_subject(subject, rest=True)
    section = config["simulate"]
    traits = subject_traits(config, subject)
    _remove_previous(bids_dir, subject)
    layout, fraction = _anatomy(config, subject, traits)
    model = encoding.make_encoding_model(layout, REST_CATEGORIES, section, _rng(config, subject, "tuning"))

    # No stimuli to calibrate on: take the noise level a task subject's typical signal would give.
    typical_signal_sd = section["percent_signal_change"] * TYPICAL_RESPONSE_SPREAD
    noise_level = typical_signal_sd / (section["single_trial_snr"] * traits["snr_factor"])
    scanner = timeseries.make_scanner(layout.grid, fraction, noise_level, section, _rng(config, subject, "scanner"))
    roi_columns = _roi_columns(scanner, layout)

    noise_rng = _rng(config, subject, "noise")
    signal_rng = _rng(config, subject, "spontaneous")
    written = []
    runs = design.rest_runs(section)
    for run in runs:
        spontaneous = spontaneous_signal(model, layout, run.n_volumes, section["tr"], signal_rng)
        signal = spontaneous * section["spontaneous_to_noise"] * scanner.noise_sd[roi_columns] * model.gain
        volumes, motion = timeseries.acquire_run(scanner, run.n_volumes, signal, section, noise_rng,
                                                 columns=roi_columns)
        written += _write_run(bids_dir, subject, run, volumes, motion, section, layout.grid.affine)
        del signal, volumes

    paths = bids_layout.derivative_paths(bids_dir, subject)
    written += bids.write_roi_files(bids_dir, subject, layout)
    seed = derive_seed(config["seed"], "simulate", subject)
    attrs = {"subject": subject, "seed": seed, "config": section, "versions": software_versions()}
    bids.write_ground_truth(paths["groundtruth"], layout, model, scanner.noise_sd[roi_columns],
                            scanner.baseline[roi_columns], attrs, [f"category-{i}" for i in range(REST_CATEGORIES)])
    written.append(paths["groundtruth"])
    extra = {"n_voxels": int(layout.n_voxels), "n_runs": len(runs),
             "n_volumes": int(sum(run.n_volumes for run in runs)), "grid_shape": list(layout.grid.shape),
             "traits": traits}
    _manifest(config, bids_dir, subject, written,
              ("geometry", "tuning", "scanner", "noise", "spontaneous"), started, extra)
    return paths["manifest"]
