"""Simulate one subject end to end and write it as BIDS (file layout in :mod:`mindvis.simulate.bids`).

A task subject: voxels are placed in the brain (:mod:`.geometry`), given
tuning (:mod:`.encoding`), shown the experiment's images in jittered
event-related runs (:mod:`.design`), and scanned (:mod:`.timeseries`). A rest
subject gets the same anatomy and tuning but no stimuli: its visual voxels
carry spontaneous slow fluctuations that follow the same functional layout
(retinotopic in V1-V3, category and shape maps in LOC and VOT, shared within
an ROI), so a masked autoencoder pretrained on rest data meets the structure
it will see in the task data.

Anatomy is shared, imperfectly: with ``simulate.shared_tuning`` above 0 the
higher areas' tuning maps and the resting-state networks are part template
space (the same in every subject, displaced by ``simulate.misalignment_mm``
per subject) and part individual (:class:`mindvis.simulate.encoding.SharedMaps`),
so what one subject's (or a rest corpus's) responses teach transfers to another.

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
#: Weight of the resting-state networks (``simulate.rest_networks`` smooth spatial modes, each with its own
#: slow time course), and their spatial smoothness: networks span centimetres of cortex (Yeo et al. 2011,
#: J. Neurophysiol. 106:1125), coarser than the tuning maps.
REST_NETWORK_SHARE = 0.5
REST_NETWORK_SMOOTHNESS_MM = 12.0


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


def _alignment_offset(config, subject):
    """This subject's displacement of the shared template maps (grid voxels), float [3]."""
    section = config["simulate"]
    rng = _rng(config, subject, "alignment")
    return rng.normal(0.0, section["misalignment_mm"], 3) / section["resolution_mm"]


def _shared_maps(config, subject, layout, n_maps):
    """The shared part of the subject's tuning maps (:class:`encoding.SharedMaps`), or None when not shared."""
    section = config["simulate"]
    if section["shared_tuning"] == 0:
        return None
    # Drawn from the population seed alone: every subject of every experiment reads the same template maps.
    fields = encoding.draw_shared_maps(layout.grid.shape, n_maps, section["resolution_mm"], np.random.default_rng(
        derive_seed(section["population_seed"], "simulate", "shared_tuning")))
    return encoding.SharedMaps(fields, float(section["shared_tuning"]), _alignment_offset(config, subject))


def rest_network_maps(config, subject, layout):
    """Loadings of the subject's visual voxels on the resting-state networks, float32 [V, N] (or None).

    Each network is a smooth spatial mode, ``shared_tuning`` of it common to all
    subjects in template space (displaced as the tuning maps are) and the rest
    the subject's own, z-scored over the subject's voxels.
    """
    section = config["simulate"]
    n_networks = section["rest_networks"]
    if n_networks == 0:
        return None
    smoothness_vox = REST_NETWORK_SMOOTHNESS_MM / section["resolution_mm"]
    own = encoding.smooth_fields(layout.grid.shape, n_networks, smoothness_vox, _rng(config, subject, "networks"))
    loadings = own[:, layout.ijk[:, 0], layout.ijk[:, 1], layout.ijk[:, 2]].T.astype(np.float64)
    weight = float(section["shared_tuning"])
    if weight > 0:
        fields = encoding.smooth_fields(layout.grid.shape, n_networks, smoothness_vox, np.random.default_rng(
            derive_seed(section["population_seed"], "simulate", "rest_networks")))
        shared = encoding.SharedMaps(fields, weight, _alignment_offset(config, subject))
        loadings = np.sqrt(1 - weight) * loadings + np.sqrt(weight) * shared.sample(layout.ijk)
    return encoding.zscore_columns(loadings).astype(np.float32)


def _subject_model(config, subject, layout, n_classes, c2_prototypes=None):
    """The subject's encoding model, its tuning maps part shared when ``simulate.shared_tuning`` > 0."""
    section = config["simulate"]
    shared = _shared_maps(config, subject, layout, encoding.n_tuning_maps(
        section["category_model"], n_classes,
        encoding.C2_PROTOTYPES if c2_prototypes is None else len(c2_prototypes)))
    return encoding.make_encoding_model(layout, n_classes, section, _rng(config, subject, "tuning"),
                                        c2_prototypes=c2_prototypes, shared=shared)


def make_subject_model(config, subject, layout, n_classes, train_images):
    """A task subject's (uncalibrated) encoding model, as :func:`simulate_subject` draws it.

    Parameters
    ----------
    config : dict
    subject : str
    layout : mindvis.simulate.geometry.VoxelLayout
    n_classes : int
    train_images : uint8 [S, H, W, C]
        The stimulus set's training images (the ``features`` model samples its C2 prototypes from them).

    Returns
    -------
    mindvis.simulate.encoding.EncodingModel
    """
    section = config["simulate"]
    prototypes = None
    if section["category_model"] == "features":
        # Drawn from the config seed alone: every subject's C2 features are the same features.
        prototypes = encoding.draw_c2_prototypes(train_images, section["n_orientations"], section["gabor_wavelengths"],
                                                 np.random.default_rng(derive_seed(config["seed"], "simulate",
                                                                                   "c2_prototypes")))
    return _subject_model(config, subject, layout, n_classes, c2_prototypes=prototypes)


def _stimulus_features(config, stimuli_path, features_path, stimulus_ids, images):
    """``deepnet``: the stimuli's layer features, from the cache file when given, else computed here."""
    from mindvis.simulate import deepnet

    network = config["simulate"]["feature_network"]
    if features_path is not None:
        return deepnet.read_stimulus_features(features_path, stimulus_ids, network, stimuli_path=stimuli_path)
    return deepnet.layer_features(images, network)


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


def simulate_subject(config, stimuli_path, bids_dir, subject, features_path=None):
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
    features_path : str or Path, optional
        ``deepnet`` category model: the stimuli's deep-network features
        (:func:`mindvis.simulate.deepnet.write_stimulus_features`, computed once
        for all subjects); computed here when not given.

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
    model = make_subject_model(config, subject, layout, len(class_names), train.images)
    features = None
    if section["category_model"] == "deepnet":
        features = _stimulus_features(config, stimuli_path, features_path, stimulus_ids, images)
    response = model.calibrate_predict(images, labels, features)  # [S, V], percent signal change

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
    networks = rest_network_maps(config, subject, layout)
    written = []
    for run in runs:
        events = run.events
        regressors = timeseries.event_regressors(events["onset"].to_numpy(), events["duration"].to_numpy(),
                                                 run.n_volumes, section["tr"], section["stimulus_duration"])
        amplitudes = response[[row_of[sid] for sid in events["stimulus_id"]]]  # [K, V]
        # Spontaneous fluctuations look like evoked patterns: noise a decoder cannot simply average away.
        signal = regressors @ amplitudes + spontaneous_sd * spontaneous_signal(
            model, layout, run.n_volumes, section["tr"], spontaneous_rng, networks=networks)
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
              ("geometry", "tuning", "alignment", "networks", "scanner", "design", "noise", "spontaneous"), started,
              extra)
    return paths["manifest"]


def spontaneous_signal(model, layout, n_volumes, tr, rng, networks=None):
    """Slow spontaneous BOLD fluctuations of the visual voxels, z-scored per voxel.

    Early voxels see a random, slowly changing pattern of activity over the
    visual field through their receptive fields (so retinotopic neighbours
    co-fluctuate); higher voxels follow slowly changing category and shape
    activations through their tuning; every ROI adds a fluctuation of its
    own, and all visual voxels share one more; with ``networks``, each
    resting-state network adds a slow fluctuation through its spatial loadings.
    The neural drive is convolved with the Glover HRF.

    Parameters
    ----------
    networks : float32 [V, N], optional
        Loadings on the resting-state networks (:func:`rest_network_maps`).

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
        if model.category_model == "deepnet":
            # Slow activations of each layer's components, through the voxels' read-out of that layer.
            for index in range(model.layer_weights.shape[1]):
                columns = np.flatnonzero(model.feature_layer == index)
                drive[:, higher] += model.layer_weights[higher, index] * (
                    categories[:, columns] @ model.feature_tuning[np.ix_(higher, columns)].T) / np.sqrt(len(columns))
        else:
            shapes = latent(model.shape_weights.shape[1])
            drive[:, higher] = (model.category_weight[higher] * (categories @ model.category_maps[higher].T)
                                + model.shape_weight[higher] * (shapes @ model.shape_weights[higher].T)
                                / np.sqrt(shapes.shape[1]))
    drive = (drive - drive.mean(axis=0)) / np.maximum(drive.std(axis=0), 1e-9)
    per_roi = latent(len(geometry.ROI_NAMES))[:, layout.roi - 1]
    shared = latent(1)
    drive = drive + np.sqrt(REST_ROI_SHARE) * per_roi + np.sqrt(REST_GLOBAL_SHARE) * shared
    if networks is not None:
        drive = drive + np.sqrt(REST_NETWORK_SHARE) * (latent(networks.shape[1]) @ networks.T) / np.sqrt(
            networks.shape[1])
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
    model = _subject_model(config, subject, layout, REST_CATEGORIES)

    # No stimuli to calibrate on: take the noise level a task subject's typical signal would give.
    typical_signal_sd = section["percent_signal_change"] * TYPICAL_RESPONSE_SPREAD
    noise_level = typical_signal_sd / (section["single_trial_snr"] * traits["snr_factor"])
    scanner = timeseries.make_scanner(layout.grid, fraction, noise_level, section, _rng(config, subject, "scanner"))
    roi_columns = _roi_columns(scanner, layout)

    noise_rng = _rng(config, subject, "noise")
    signal_rng = _rng(config, subject, "spontaneous")
    networks = rest_network_maps(config, subject, layout)
    written = []
    runs = design.rest_runs(section)
    for run in runs:
        spontaneous = spontaneous_signal(model, layout, run.n_volumes, section["tr"], signal_rng, networks=networks)
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
              ("geometry", "tuning", "alignment", "networks", "scanner", "noise", "spontaneous"), started, extra)
    return paths["manifest"]
