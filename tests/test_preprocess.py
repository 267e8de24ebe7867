"""Preprocessing: BIDS runs to responses.h5, checked against ground truth and against bad input."""

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mindvis.config import validate
from mindvis.data.responses import load_responses, load_rest
from mindvis.errors import MindvisError
from mindvis.data import bids_layout, reliability
from mindvis.preprocess import bids, clean, estimate, quality
from mindvis.preprocess.run import choose_val_runs, normalise_per_run, preprocess_rest_subject, preprocess_subject
from mindvis.preprocess.synthetic import make_synthetic_bids

SUBJECT = "sub-01"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _config(**preprocess):
    return validate({"seed": 3, "preprocess": preprocess})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four classes x 12 training images (3 runs), 12 test images x 4 repeats, on a (7, 8, 9) grid."""
    root = tmp_path_factory.mktemp("bids")
    return make_synthetic_bids(root, shape=(7, 8, 9), n_classes=4, n_train_per_class=12, n_test=12,
                               n_repeats=4, trials_per_run=16, snr=0.7, seed=1, dtype="int16")


@pytest.fixture(scope="module")
def lss_output(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / SUBJECT / "responses.h5"
    report = preprocess_subject(_config(method="glm_lss"), dataset.bids_dir, SUBJECT, out)
    return out, report


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """The smallest data set with train, val and test runs: the template bad-input tests copy."""
    root = tmp_path_factory.mktemp("small")
    return make_synthetic_bids(root, shape=(5, 6, 4), n_classes=2, n_train_per_class=4, n_test=2, n_repeats=2,
                               trials_per_run=4, seed=2)


@pytest.fixture
def small_copy(small_dataset, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(small_dataset.bids_dir, root)
    return root


def _func(root, run, suffix):
    return Path(root) / SUBJECT / "func" / f"{SUBJECT}_task-objects_run-{run:02d}_{suffix}"


# -- building blocks --------------------------------------------------------------

def test_chunked_masking_equals_nilearn_apply_mask(small_dataset, rng):
    from nilearn.masking import apply_mask

    roi = bids.load_roi("simulation", small_dataset.bids_dir, SUBJECT)
    path = small_dataset.runs[0]
    image = bids.open_bold(path, roi)
    ours = bids.mask_bold(image, roi.mask, path, chunk_volumes=7)  # chunks that do not divide T
    theirs = apply_mask(nib.load(path), nib.Nifti1Image(roi.mask.astype(np.uint8), roi.affine))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_array_equal(roi.voxel_ijk, small_dataset.voxel_ijk)
    assert set(roi.voxel_roi) == {"V1", "LOC"}


@pytest.mark.parametrize("hrf_model", ["glover", "spm + derivative"])
def test_closed_form_lss_equals_run_glm_per_trial(rng, hrf_model):
    from nilearn.glm.first_level import run_glm

    n_volumes, n_voxels, n_trials, tr = 61, 17, 9, 2.0
    trials = pd.DataFrame({"onset": np.sort(rng.uniform(0, 100, n_trials)), "duration": 2.0})
    others = pd.DataFrame({"onset": [55.0], "duration": [1.0], "trial_type": ["catch"]})
    confounds = rng.normal(size=(n_volumes, 3))
    design, trial_columns, nuisance = estimate.trial_design(n_volumes, tr, trials, others, hrf_model=hrf_model,
                                                             high_pass=0.02, confounds=confounds)
    assert len(trial_columns[0]) == (2 if "derivative" in hrf_model else 1)
    assert "nuisance_catch" in nuisance and "linear_trend" in nuisance and "constant" in nuisance
    signals = clean.clean_run(rng.normal(size=(n_volumes, n_voxels)) + 5, tr, confounds, 0.02)
    betas = estimate.estimate_lss(signals, design, trial_columns, nuisance)
    k = len(trial_columns[0])
    all_trials = design[[c for cols in trial_columns for c in cols]].to_numpy().reshape(n_volumes, n_trials, k)
    for index in range(n_trials):
        own = design[trial_columns[index]].to_numpy()
        model = np.column_stack([own, all_trials.sum(axis=1) - own, design[nuisance].to_numpy()])
        _, results = run_glm(signals.astype(np.float64), model, noise_model="ols")
        np.testing.assert_allclose(betas[index], results[0.0].theta[0], atol=1e-9)


def test_cleaning_then_glm_equals_glm_with_nuisance_on_raw_data(rng):
    """Frisch-Waugh-Lovell: LSA on the cleaned run = LSA on the raw run with nuisance columns, rescaled."""
    from nilearn.glm.first_level import run_glm

    n_volumes, n_voxels, tr = 80, 11, 1.5
    trials = pd.DataFrame({"onset": np.arange(6, 100, 9.0), "duration": 1.0})
    confounds = np.cumsum(rng.normal(size=(n_volumes, 4)), axis=0)
    raw = 800 + 5 * rng.normal(size=(n_volumes, n_voxels)) + np.linspace(0, 30, n_volumes)[:, None]
    design, trial_columns, _ = estimate.trial_design(n_volumes, tr, trials, None, high_pass=0.015,
                                                     confounds=confounds)
    cleaned = clean.clean_run(raw, tr, confounds, 0.015)
    assert np.allclose(cleaned.mean(axis=0), 0, atol=1e-5) and np.allclose(cleaned.std(axis=0, ddof=1), 1, atol=1e-5)
    betas_clean = estimate.estimate_lsa(cleaned, design, trial_columns)
    _, results = run_glm(raw, design.to_numpy(), noise_model="ols")
    betas_raw = results[0.0].theta[: len(trials)]
    residual_sd = (raw - design.to_numpy() @ np.linalg.lstsq(design.to_numpy(), raw, rcond=None)[0]).std(axis=0)
    # The per-voxel ratio is the cleaned run's scale: constant over trials.
    ratio = betas_raw / betas_clean
    np.testing.assert_allclose(ratio, ratio[0:1].repeat(len(trials), axis=0), rtol=1e-4)
    assert np.all(ratio[0] > residual_sd)  # scale = sd of the cleaned run, which still holds the evoked part


def test_lag_average_takes_the_window_after_each_onset():
    tr = 2.0
    signals = np.arange(20, dtype=float)[:, None] * np.array([[1.0, -2.0]])  # value = volume index (x2 column)
    betas, counts = estimate.lag_average(signals, tr, onsets=[0.0, 3.0, 37.0], window=(4.0, 8.0))
    # Onset 0: volumes at 4 and 6 s (indices 2, 3); onset 3: at 8 and 10 s (4, 5); onset 37: none left.
    np.testing.assert_allclose(betas[0], [2.5, -5.0])
    np.testing.assert_allclose(betas[1], [4.5, -9.0])
    assert counts.tolist() == [2, 2, 0] and np.isnan(betas[2]).all()


def test_noise_ceiling_recovers_the_known_signal_to_noise(rng):
    n_stimuli, n_repeats, levels, per_level = 300, 3, np.array([0.5, 1.0, 2.0]), 30
    noise_sd = np.repeat(levels, per_level)  # 30 voxels per noise level; signal sd is 1
    signal = rng.normal(0, 1.0, (n_stimuli, len(noise_sd)))
    ids = np.repeat([f"s{i}" for i in range(n_stimuli)], n_repeats)
    responses = np.repeat(signal, n_repeats, axis=0) + rng.normal(size=(len(ids), len(noise_sd))) * noise_sd
    ncsnr, ceiling = reliability.noise_ceiling(responses, ids)
    expected = 1.0 / levels
    np.testing.assert_allclose(ncsnr.reshape(3, per_level).mean(axis=1), expected, rtol=0.06)
    np.testing.assert_allclose(ceiling.reshape(3, per_level).mean(axis=1),
                               100 * expected**2 / (expected**2 + 1 / n_repeats), atol=4)
    # The ceiling is what it claims: the variance share of the averaged response the signal explains.
    averaged, *_ = quality.average_repeats(responses, ids, np.zeros(len(ids), int))
    explained = np.array([np.corrcoef(averaged[:, v], signal[:, v])[0, 1] ** 2 for v in range(len(noise_sd))])
    np.testing.assert_allclose(explained.reshape(3, per_level).mean(axis=1),
                               ceiling.reshape(3, per_level).mean(axis=1) / 100, atol=0.04)
    _, nan_ceiling = reliability.noise_ceiling(responses[::n_repeats], ids[::n_repeats])
    assert np.isnan(nan_ceiling).all()


def test_validation_runs_are_whole_seeded_and_never_all():
    runs = list(range(1, 11))
    chosen = choose_val_runs(runs, 0.2, seed=5)
    assert len(chosen) == 2 and set(chosen) <= set(runs) and chosen == choose_val_runs(runs, 0.2, seed=5)
    assert choose_val_runs([1, 2], 0.9, seed=0) in ([1], [2])
    assert choose_val_runs([4], 0.5, seed=0) == []


def test_run_normalisation(rng):
    betas = rng.normal(3, 2, (6, 5))
    z = normalise_per_run(betas, "zscore")
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1)
    np.testing.assert_allclose(normalise_per_run(betas, "center").std(axis=0), betas.std(axis=0))
    np.testing.assert_array_equal(normalise_per_run(betas, "none"), betas)
    np.testing.assert_array_equal(normalise_per_run(betas[:1], "zscore"), betas[:1])


# -- the stage on a synthetic subject with known responses ---------------------------

def test_splits_follow_runs_and_normalisation_uses_training_trials_only(lss_output, dataset):
    out, report = lss_output
    responses = load_responses(out)
    train, val, test, test_avg = (responses[name] for name in ("train", "val", "test", "test_avg"))
    assert len(train) + len(val) == 48 and len(test) == 48 and len(test_avg) == 12
    assert not set(train.run) & set(val.run) and len(set(val.run)) == 1
    assert not set(test.run) & (set(train.run) | set(val.run))
    assert all(sid.startswith("train-") for sid in np.r_[train.stimulus_id, val.stimulus_id])
    # z-scored with the training trials' own statistics: exactly 0 and 1 there, not elsewhere.
    np.testing.assert_allclose(train.fmri.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.fmri.std(axis=0), 1, atol=1e-4)
    for row, sid in enumerate(test_avg.stimulus_id):
        np.testing.assert_allclose(test_avg.fmri[row], test.fmri[test.stimulus_id == sid].mean(axis=0), atol=1e-5)
    assert (test_avg.n_repeats == 4).all() and (test_avg.run == -1).all()
    label_of = dict(zip(dataset.stimulus_id, dataset.label))
    assert all(label_of[sid] == label for sid, label in zip(train.stimulus_id, train.label))
    assert responses.class_names == dataset.class_names
    assert responses.attrs["val_runs"] == report["runs"]["val"]


def test_single_trial_betas_match_ground_truth_and_decode_classes(lss_output, dataset):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    out, report = lss_output
    truth = report["ground_truth"]
    assert truth["n_voxels"] == len(dataset.voxel_ijk)
    assert truth["single_trial_r_median"] > 0.35
    # Averaged test betas reach the noise ceiling (fractions of variance explained).
    assert truth["test_avg_r2_median"] == pytest.approx(truth["noise_ceiling_median_fraction"], abs=0.12)
    train = load_responses(out, splits=("train",))["train"]
    accuracy = cross_val_score(LogisticRegression(C=0.1, max_iter=2000), train.fmri, train.label, cv=4).mean()
    assert accuracy > 0.25 + 0.25  # four classes: chance is 0.25


@pytest.mark.parametrize("method", ["glm_lsa", "lag_average"])
def test_other_estimators_also_recover_the_responses(dataset, tmp_path, method):
    report = preprocess_subject(_config(method=method, hrf_model="glover + derivative"), dataset.bids_dir,
                                SUBJECT, tmp_path / "responses.h5")
    assert report["ground_truth"]["single_trial_r_median"] > 0.25
    assert load_responses(tmp_path / "responses.h5").attrs["method"] == method


def test_file_records_config_versions_hashes_and_quality(lss_output, dataset):
    out, report = lss_output
    responses = load_responses(out)
    hashes = responses.attrs["input_hashes"]
    n_runs = len(dataset.runs)
    # BOLD, sidecar, events and confounds per run, plus mask, label image and label table.
    assert len(hashes) == 4 * n_runs + 3 and all(len(value) == 64 for value in hashes.values())
    assert f"{SUBJECT}/func/{SUBJECT}_task-objects_run-01_bold.nii.gz" in hashes
    assert responses.attrs["preprocess_config"]["method"] == "glm_lss"
    assert responses.attrs["config"]["seed"] == 3 and "nilearn" in responses.attrs["versions"]
    assert responses.quality["trials_per_class"].sum() == len(responses["train"])
    assert np.all(responses.quality["tsnr"] > 10)
    assert np.all((responses.quality["noise_ceiling"] >= 0) & (responses.quality["noise_ceiling"] <= 100))
    on_disk = json.loads((out.parent / "preprocess_report.json").read_text())
    assert on_disk["n_trials"] == report["n_trials"] and set(on_disk["quality"]["per_roi"]) == {"V1", "LOC"}
    assert on_disk["trials_per_class"]["test"] == {name: 12 for name in dataset.class_names}


def test_stimulus_set_gives_class_names_and_labels(small_copy, small_dataset, tmp_path):
    from mindvis.data.stimuli import StimulusSet, StimulusSplit, save_stimulus_set

    names = ["zero", "one"]  # deliberately not the events' class names, which are then checked
    ids = small_dataset.stimulus_id
    split = StimulusSplit(images=np.zeros((len(ids), 4, 4, 1), np.uint8), label=1 - small_dataset.label,
                          stimulus_id=ids, source_index=np.arange(len(ids)))
    stimuli = tmp_path / "stimuli.h5"
    save_stimulus_set(StimulusSet({"train": split, "test": split}, names, {}), stimuli)
    with pytest.raises(MindvisError) as info:  # the events' class column contradicts the stimulus set
        preprocess_subject(_config(), small_copy, SUBJECT, tmp_path / "mismatch.h5", stimuli_path=stimuli)
    assert info.value.key == "class" and not (tmp_path / "mismatch.h5").exists()
    for path in sorted((small_copy / SUBJECT / "func").glob("*_events.tsv")):
        events = pd.read_csv(path, sep="\t").drop(columns="class")
        events.to_csv(path, sep="\t", index=False)
    out = tmp_path / "responses.h5"
    preprocess_subject(_config(), small_copy, SUBJECT, out, stimuli_path=stimuli)
    responses = load_responses(out)
    assert responses.class_names == names
    label_of = dict(zip(ids, 1 - small_dataset.label))
    assert all(label_of[s] == lab for s, lab in zip(responses["test"].stimulus_id, responses["test"].label))
    assert str(stimuli.name) in " ".join(responses.attrs["input_hashes"])


def test_rest_runs_are_cleaned_per_run(tmp_path):
    data = make_synthetic_bids(tmp_path / "bids", subject="sub-rest01", shape=(5, 6, 4), n_classes=2,
                               n_train_per_class=3, n_test=1, n_repeats=1, trials_per_run=3, task="rest", seed=4)
    out = tmp_path / "rest" / "sub-rest01.h5"
    summary = preprocess_rest_subject(_config(), data.bids_dir, "sub-rest01", out)
    rest = load_rest(out)
    assert summary["runs"] == [1, 2, 3] and rest.fmri.shape == (summary["n_timepoints"], len(data.voxel_ijk))
    for run in np.unique(rest.run):
        block = rest.fmri[rest.run == run]
        np.testing.assert_allclose(block.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(block.std(axis=0, ddof=1), 1, atol=1e-3)
    assert rest.attrs["subject"] == "sub-rest01" and len(rest.attrs["input_hashes"]) == 3 * 3 + 3


def test_command_line_runs_the_stage(small_dataset, tmp_path):
    from mindvis.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("seed: 1\npreprocess:\n  method: lag_average\n")
    out = tmp_path / "results" / SUBJECT / "responses.h5"
    assert main(["preprocess", "--config", str(config), "--bids-dir", str(small_dataset.bids_dir),
                 "--subject", SUBJECT, "--out", str(out)]) == 0
    assert load_responses(out).attrs["method"] == "lag_average"
    assert main(["preprocess", "--config", str(config), "--bids-dir", str(tmp_path / "nowhere"),
                 "--subject", SUBJECT, "--out", str(tmp_path / "other.h5")]) == 2


def test_simulated_subject_of_the_test_config_matches_its_ground_truth(tmp_path):
    """The embedded simulator (configs/test.yaml, sub-01) through the stage, checked against its truth."""
    pytest.importorskip("mindvis.simulate.run")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from mindvis.config import load_config
    from mindvis.data.stimuli import build_stimulus_set
    from mindvis.simulate.run import simulate_subject

    config = load_config(Path(__file__).parents[1] / "configs" / "test.yaml")
    stimuli = tmp_path / "bids" / "stimuli" / "stimuli.h5"
    build_stimulus_set(config, stimuli)
    simulate_subject(config, stimuli_path=stimuli, bids_dir=tmp_path / "bids", subject=SUBJECT)
    out = tmp_path / "results" / SUBJECT / "responses.h5"
    report = preprocess_subject(config, tmp_path / "bids", SUBJECT, out, stimuli_path=stimuli)
    truth = report["ground_truth"]
    assert truth["single_trial_r_median"] > 0.25  # 0.41-0.60 seen as the simulator evolved; 0 by chance
    assert truth["test_avg_r2_median"] == pytest.approx(truth["noise_ceiling_median_fraction"], abs=0.15)
    responses = load_responses(out, splits=("train", "val"))
    fmri = np.concatenate([responses["train"].fmri, responses["val"].fmri])
    label = np.concatenate([responses["train"].label, responses["val"].label])
    def accuracy(labels):
        return cross_val_score(LogisticRegression(C=0.1, max_iter=2000), fmri, labels, cv=4).mean()

    # 80 trials of 7 classes (chance 0.14): the class must decode better than every one of 20 label shuffles
    # (a permutation test at p < 0.05); 0.24 against shuffles of at most 0.16 here.
    rng = np.random.default_rng(0)
    assert accuracy(label) > max(accuracy(rng.permutation(label)) for _ in range(20))


# -- bad input: a clear error naming the file, and nothing written ------------------------

def _rewrite_bold(path, transform):
    image = nib.load(path)
    data, affine = transform(np.asanyarray(image.dataobj).copy(), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _truncate(path):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))


def _edit_events(path, edit):
    events = pd.read_csv(path, sep="\t")
    edit(events).to_csv(path, sep="\t", index=False)


def _shift_affine(data, affine):
    affine[0, 3] += 3.0
    return data, affine


BAD_INPUTS = {
    "affine differs from the mask": (lambda root: _rewrite_bold(_func(root, 2, "bold.nii.gz"), _shift_affine),
                                     "bold.nii.gz", "affine"),
    "shape differs from the mask": (lambda root: _rewrite_bold(_func(root, 2, "bold.nii.gz"),
                                                               lambda d, a: (d[:-1], a)), "bold.nii.gz", "grid"),
    "truncated NIfTI": (lambda root: _truncate(_func(root, 3, "bold.nii.gz")), "bold.nii.gz", "truncated"),
    "3-D NIfTI": (lambda root: _rewrite_bold(_func(root, 1, "bold.nii.gz"), lambda d, a: (d[..., 0], a)),
                  "bold.nii.gz", "4-D"),
    "not a NIfTI": (lambda root: _func(root, 1, "bold.nii.gz").write_bytes(b"\x00" * 100), "bold.nii.gz",
                    "NIfTI"),
    "events lack a column": (lambda root: _edit_events(_func(root, 2, "events.tsv"),
                                                      lambda e: e.drop(columns="stimulus_id")),
                             "events.tsv", "stimulus_id"),
    "onset past the run's end": (lambda root: _edit_events(_func(root, 1, "events.tsv"),
                                                          lambda e: e.assign(onset=e.onset + 1000)),
                                 "events.tsv", "outside the run"),
    "events lack a class": (lambda root: _edit_events(_func(root, 3, "events.tsv"),
                                                     lambda e: e.assign(**{"class": "n/a"})),
                            "events.tsv", "no class"),
    "TR missing from the sidecar": (lambda root: _func(root, 2, "bold.json").write_text('{"TaskName": "objects"}'),
                                    "bold.json", "RepetitionTime"),
    "confound column missing": (lambda root: pd.read_csv(_func(root, 1, "desc-confounds_timeseries.tsv"), sep="\t")
                                .drop(columns="rot_z").to_csv(_func(root, 1, "desc-confounds_timeseries.tsv"),
                                                              sep="\t", index=False),
                                "confounds_timeseries.tsv", "rot_z"),
    "every voxel NaN somewhere": (lambda root: _rewrite_bold(
        _func(root, 2, "bold.nii.gz"), lambda d, a: (np.where(np.arange(d.shape[3]) == 3, np.nan, d), a)),
        "bold.nii.gz", "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_no_output(small_copy, tmp_path, case):
    damage, file_part, message = BAD_INPUTS[case]
    damage(small_copy)
    out_dir = tmp_path / "results" / SUBJECT
    with pytest.raises(MindvisError) as info:
        preprocess_subject(_config(), small_copy, SUBJECT, out_dir / "responses.h5")
    assert file_part in str(info.value.path), info.value
    assert message in str(info.value)
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_nan_and_constant_voxels_are_dropped_with_a_counting_warning(small_copy, tmp_path, caplog):
    roi = bids.load_roi("simulation", small_copy, SUBJECT)
    ijk = roi.voxel_ijk

    def damage(data, affine):
        data[tuple(ijk[0])] = np.nan                     # NaN in one run only
        data[tuple(ijk[1])][5] = np.inf
        data[tuple(ijk[2])] = 700.0                      # constant
        return data, affine

    _rewrite_bold(_func(small_copy, 2, "bold.nii.gz"), damage)
    out = tmp_path / "responses.h5"
    with caplog.at_level(logging.WARNING, logger="mindvis.preprocess.run"):
        report = preprocess_subject(_config(), small_copy, SUBJECT, out)
    assert "dropped 3 of" in caplog.text and "2 non-finite" in caplog.text and "1 constant" in caplog.text
    responses = load_responses(out)
    assert responses.n_voxels == len(ijk) - 3
    assert not {tuple(v) for v in ijk[:3]} & {tuple(v) for v in responses.voxel_ijk}
    assert report["n_voxels"]["dropped"]["non_finite"] == 2 and report["warnings"]


def test_missing_subject_and_task_are_named(small_dataset, tmp_path):
    with pytest.raises(MindvisError, match="subject folder"):
        preprocess_subject(_config(), small_dataset.bids_dir, "sub-99", tmp_path / "r.h5")
    with pytest.raises(MindvisError) as info:
        preprocess_subject(_config(task="faces"), small_dataset.bids_dir, SUBJECT, tmp_path / "r.h5")
    assert info.value.key == "preprocess.task"


def test_roi_labels_select_regions_and_unknown_labels_are_named(small_dataset, tmp_path):
    out = tmp_path / "responses.h5"
    preprocess_subject(_config(roi_labels=["LOC"]), small_dataset.bids_dir, SUBJECT, out)
    responses = load_responses(out)
    assert set(responses.voxel_roi) == {"LOC"}
    all_roi = bids.load_roi("simulation", small_dataset.bids_dir, SUBJECT)
    assert responses.n_voxels == int((all_roi.voxel_roi == "LOC").sum()) < len(all_roi.voxel_roi)
    with pytest.raises(MindvisError) as info:
        preprocess_subject(_config(roi_labels=["FFA"]), small_dataset.bids_dir, SUBJECT, tmp_path / "x.h5")
    assert info.value.key == "preprocess.roi_labels" and "LOC" in str(info.value)


def test_nifti_label_image_with_table_names_voxels(small_dataset, tmp_path):
    dseg = (small_dataset.bids_dir / "derivatives" / "simulation" / SUBJECT
            / f"{SUBJECT}_space-{bids_layout.SPACE}_desc-visual_dseg.nii.gz")
    atlas = tmp_path / "atlas.nii.gz"
    shutil.copy(dseg, atlas)
    pd.DataFrame({"index": [1, 2], "name": ["early", "late"]}).to_csv(tmp_path / "atlas.tsv", sep="\t", index=False)
    roi = bids.load_roi(str(atlas), small_dataset.bids_dir, SUBJECT, labels=["late"])
    reference = bids.load_roi("simulation", small_dataset.bids_dir, SUBJECT, labels=["LOC"])
    np.testing.assert_array_equal(roi.voxel_ijk, reference.voxel_ijk)
    assert set(roi.voxel_roi) == {"late"} and Path(roi.files[-1]).name == "atlas.tsv"
