"""Small synthetic BIDS data sets with known responses, for tests and benchmarks.

This is not the simulator (:mod:`mindvis.simulate`): it writes a handful of
tiny runs in the same BIDS layout, with a linear, known ground truth, so the
preprocessing can be tested in seconds and benchmarked at any size. Each
voxel's signal is ``baseline * (1 + (sum_trials response * hrf(t - onset) +
drift + motion effect + AR(1) noise) / 100)``, the HRF (nilearn's Glover
model, peak scaled to one) convolved with the stimulus duration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mindvis.data.bids_layout import derivative_paths
from mindvis.utils.io import atomic_path, hdf5_bytes, hdf5_for_writing

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


@dataclass
class SyntheticDataset:
    """What :func:`make_synthetic_bids` wrote.

    Attributes
    ----------
    bids_dir : Path
    subject : str
    runs : list of Path
        BOLD files.
    class_names : list of str
    stimulus_id : object [S]
    label : int64 [S]
    response : float32 [S, V]
        Noise-free peak responses (percent signal change).
    voxel_ijk : int32 [V, 3]
    """

    bids_dir: Path
    subject: str
    runs: list
    class_names: list
    stimulus_id: np.ndarray
    label: np.ndarray
    response: np.ndarray
    voxel_ijk: np.ndarray


def _save_nifti(path, data, affine, tr=None):
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    if tr is not None:
        image.header.set_zooms(image.header.get_zooms()[:3] + (float(tr),))
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def unit_hrf_regressor(onsets, durations, frame_times, hrf_model="glover"):
    """Sum of HRF responses to events, scaled so one event of the given duration peaks at 1.

    Returns
    -------
    float64 [T, n_events]
        One column per event.
    """
    from nilearn.glm.first_level import compute_regressor

    columns = []
    for onset, duration in zip(onsets, durations):
        condition = np.array([[onset], [duration], [1.0]])
        regressor, _ = compute_regressor(condition, hrf_model, frame_times, oversampling=16)
        columns.append(regressor[:, 0])
    # Peak of an isolated event (the run's own events may be cut by its end).
    long_times = np.arange(0, 40, 0.1)
    reference, _ = compute_regressor(np.array([[0.0], [durations[0] if len(durations) else 2.0], [1.0]]),
                                     hrf_model, long_times, oversampling=16)
    return np.stack(columns, axis=1) / reference.max() if columns else np.zeros((len(frame_times), 0))


def make_synthetic_bids(root, subject="sub-01", shape=(7, 8, 9), n_classes=4, n_train_per_class=6,
                        n_test=4, n_repeats=3, trials_per_run=12, tr=2.0, snr=1.0, seed=0, dtype="float32",
                        roi_fraction=0.6, task="objects", trial_duration=2.0, isi=(2.0, 4.0)):
    """Write a tiny task-fMRI BIDS data set in the simulator's layout.

    Parameters
    ----------
    root : str or Path
        The BIDS root to create.
    shape : 3 ints
        Volume grid (make the sizes differ so axis mix-ups fail).
    n_classes, n_train_per_class : int
        Training images, each shown once, spread over training runs.
    n_test, n_repeats : int
        Test images, each shown ``n_repeats`` times (once per test run).
    trials_per_run : int
    tr : float
    snr : float
        Standard deviation over stimuli of the true response divided by the
        noise standard deviation of one volume, averaged over voxels.
    dtype : {'float32', 'int16'}
    roi_fraction : float
        Fraction of each axis (centred) that the ROI box covers.

    Returns
    -------
    SyntheticDataset
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    func = root / subject / "func"
    derivatives = root / "derivatives" / "simulation" / subject
    func.mkdir(parents=True, exist_ok=True)
    derivatives.mkdir(parents=True, exist_ok=True)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, -100.0, -12.0]

    mask = np.zeros(shape, dtype=bool)
    box = [slice(int(n * (1 - roi_fraction) / 2), int(n * (1 - roi_fraction) / 2) + max(int(n * roi_fraction), 1))
           for n in shape]
    mask[tuple(box)] = True
    voxel_ijk = np.stack(np.nonzero(mask), axis=1).astype(np.int32)
    n_voxels = len(voxel_ijk)
    # Two ROIs: the lower half of the box along z is "V1", the rest "LOC".
    dseg = np.zeros(shape, dtype=np.int16)
    z_split = box[2].start + (box[2].stop - box[2].start) // 2
    dseg[mask] = np.where(voxel_ijk[:, 2] < z_split, 1, 2)
    paths = derivative_paths(root, subject)
    _save_nifti(paths["mask"], mask.astype(np.uint8), affine)
    _save_nifti(paths["dseg"], dseg, affine)
    pd.DataFrame({"index": [1, 2], "name": ["V1", "LOC"]}).to_csv(paths["dseg_tsv"], sep="\t", index=False)

    class_names = [f"class-{chr(ord('a') + i)}" for i in range(n_classes)]
    train_ids = [f"train-{i:04d}" for i in range(n_classes * n_train_per_class)]
    train_labels = np.tile(np.arange(n_classes), n_train_per_class)
    test_ids = [f"test-{i:04d}" for i in range(n_test)]
    test_labels = np.arange(n_test) % n_classes
    stimulus_id = np.array(train_ids + test_ids, dtype=object)
    label = np.concatenate([train_labels, test_labels]).astype(np.int64)
    # True responses: a class pattern plus an image-specific part, in percent signal change.
    class_pattern = rng.normal(0, 1, (n_classes, n_voxels))
    response = (0.8 * class_pattern[label] + 0.6 * rng.normal(0, 1, (len(label), n_voxels))).astype(np.float32)
    noise_sd = float(response.std(axis=0).mean() / snr)
    baseline = rng.uniform(600, 1000, n_voxels)
    row_of = {sid: i for i, sid in enumerate(stimulus_id)}

    order = rng.permutation(len(train_ids))
    schedule = [("train", [train_ids[i] for i in order[start:start + trials_per_run]])
                for start in range(0, len(train_ids), trials_per_run)]
    schedule += [("test", list(rng.permutation(test_ids))) for _ in range(n_repeats)]

    runs = []
    for number, (kind, ids) in enumerate(schedule, start=1):
        onsets = 6.0 + np.concatenate([[0.0], np.cumsum(trial_duration + rng.uniform(*isi, len(ids) - 1))])
        n_volumes = int(np.ceil((onsets[-1] + 16.0) / tr))
        frame_times = np.arange(n_volumes) * tr
        regressors = unit_hrf_regressor(onsets, np.full(len(ids), trial_duration), frame_times)
        evoked = regressors @ response[[row_of[sid] for sid in ids]]
        noise = np.empty((n_volumes, n_voxels))
        noise[0] = rng.normal(0, noise_sd, n_voxels)
        for t in range(1, n_volumes):
            noise[t] = 0.3 * noise[t - 1] + rng.normal(0, noise_sd * np.sqrt(1 - 0.09), n_voxels)
        drift = np.outer(np.linspace(-1, 1, n_volumes), rng.normal(0, 2 * noise_sd, n_voxels))
        motion = np.cumsum(rng.normal(0, 0.02, (n_volumes, 6)), axis=0)
        motion_effect = motion @ rng.normal(0, 2 * noise_sd, (6, n_voxels))
        percent = evoked + noise + drift + motion_effect
        volume = np.zeros(shape + (n_volumes,), dtype=np.float64)
        # Outside the ROI: a flat-ish brain so the image looks like one; never read by the ROI masker.
        volume[...] = 500.0 + rng.normal(0, 5, shape + (n_volumes,))
        volume[mask] = (baseline * (1 + percent / 100)).T
        data = np.round(volume).astype(np.int16) if dtype == "int16" else volume.astype(np.float32)
        stem = func / f"{subject}_task-{task}_run-{number:02d}"
        bold = Path(f"{stem}_bold.nii.gz")
        _save_nifti(bold, data, affine, tr)
        Path(f"{stem}_bold.json").write_text(json.dumps({"RepetitionTime": tr, "TaskName": task}))
        pd.DataFrame({"onset": np.round(onsets, 3), "duration": trial_duration, "trial_type": kind,
                      "stimulus_id": ids, "class": [class_names[label[row_of[sid]]] for sid in ids]}).to_csv(
            f"{stem}_events.tsv", sep="\t", index=False)
        confounds = pd.DataFrame(motion, columns=list(MOTION_COLUMNS))
        confounds["framewise_displacement"] = np.r_[np.nan, np.abs(np.diff(motion, axis=0)).sum(axis=1)]
        confounds.to_csv(f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
        runs.append(bold)

    import h5py

    # Built in memory and replaced atomically like every other HDF5 output (utils.io.hdf5_for_writing).
    ground_truth = derivatives / f"{subject}_desc-groundtruth.h5"
    expected = hdf5_bytes(voxel_ijk, label, response, raw_bytes=64 * len(stimulus_id))
    with atomic_path(ground_truth) as tmp, hdf5_for_writing(tmp, expected_bytes=expected) as handle:
        handle.create_dataset("voxel_ijk", data=voxel_ijk)
        handle.create_dataset("stimulus_id", data=stimulus_id, dtype=h5py.string_dtype("utf-8"))
        handle.create_dataset("label", data=label)
        handle.create_dataset("response", data=response)
    return SyntheticDataset(bids_dir=root, subject=subject, runs=runs, class_names=class_names,
                            stimulus_id=stimulus_id, label=label, response=response, voxel_ijk=voxel_ijk)
