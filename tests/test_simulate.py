"""The simulated subjects: encoding model, time series, BIDS output, and scientific checks that can fail.

Two simulated data sets are made once per module: a tiny one (configs/test.yaml
sizes, for file-format and reproducibility checks) and a small "science" one
(300 training images, 30 test images x 6 repeats, ~500 voxels) on which
decoding and noise-ceiling checks are reliable.
"""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mindvis.config import validate
from mindvis.data import bids_layout
from mindvis.data.reliability import noise_ceiling
from mindvis.data.stimuli import build_stimulus_set, load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.simulate import bids, design, encoding, geometry, timeseries
from mindvis.simulate.run import simulate_rest_subject, simulate_subject
from mindvis.simulate.validate import average_repeats, lag_average_trials

TINY = {
    "seed": 7,
    "stimuli": {"n_train_per_class": 8, "n_test_per_class": 1, "n_pool": 0},
    "simulate": {"n_subjects": 2, "n_rest_subjects": 1, "n_rest_runs": 1, "rest_run_volumes": 40,
                 "n_early_voxels": 120, "n_higher_voxels": 80, "test_repeats": 3, "trials_per_run": 20},
}
FOV = validate({})["simulate"]["field_of_view"]
SCIENCE = {
    "seed": 3,
    "stimuli": {"n_train_per_class": 30, "n_test_per_class": 3, "n_pool": 0},
    # Twice the default single-trial SNR: this subject has a fifth of the default's training trials
    # and a third of its voxels. Default-size accuracies are in benchmarks/results/simulate.md.
    "simulate": {"n_early_voxels": 300, "n_higher_voxels": 200, "test_repeats": 6, "trials_per_run": 60,
                 "single_trial_snr": 1.0},
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny_config():
    return validate(TINY)


@pytest.fixture(scope="module")
def tiny_dataset(tiny_config, tmp_path_factory):
    """sub-01 (twice, for reproducibility), sub-02 and sub-rest01 on the tiny config."""
    root = tmp_path_factory.mktemp("tiny")
    stimuli = root / "bids" / "stimuli" / "stimuli.h5"
    build_stimulus_set(tiny_config, stimuli)
    simulate_subject(tiny_config, stimuli, root / "bids", "sub-01")
    simulate_subject(tiny_config, stimuli, root / "again", "sub-01")
    simulate_subject(tiny_config, stimuli, root / "bids", "sub-02")
    simulate_rest_subject(tiny_config, root / "bids", "sub-rest01")
    bids.write_dataset_metadata(tiny_config, root / "bids")
    return root


@pytest.fixture(scope="module")
def science(tmp_path_factory):
    """One subject at a size where decoding checks are reliable, with its lag-average trial estimates."""
    config = validate(SCIENCE)
    root = tmp_path_factory.mktemp("science")
    stimuli = root / "stimuli.h5"
    build_stimulus_set(config, stimuli)
    simulate_subject(config, stimuli, root / "bids", "sub-01")
    responses, events = lag_average_trials(root / "bids", "sub-01", window=(4.0, 8.0))
    truth = bids.read_ground_truth(bids_layout.derivative_paths(root / "bids", "sub-01")["groundtruth"])
    return {"config": config, "stimuli": stimuli, "bids": root / "bids", "responses": responses,
            "events": events, "truth": truth}


def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=500))


# -- encoding model ---------------------------------------------------------------

def _grating_patch(size, centre, radius, contrast, wavelength_px=4.0, orientation=0.0):
    """A grey image with a circular grating patch; centre in image half-widths (x right, y up)."""
    px, py = encoding.pixel_coordinates(size, size)
    px, py = px.reshape(size, size), py.reshape(size, size)
    phase = 2 * np.pi * (np.cos(orientation) * px + np.sin(orientation) * py) * size / 2 / wavelength_px
    inside = (px - centre[0]) ** 2 + (py - centre[1]) ** 2 < radius ** 2
    image = 0.5 + 0.5 * contrast * np.sin(phase) * inside
    return np.round(255 * image).astype(np.uint8)[:, :, None]


def _one_prf_model(x, y, sigma):
    return encoding.EncodingModel(
        is_early=np.array([True]), prf_x=np.array([x], np.float32), prf_y=np.array([y], np.float32),
        prf_sigma=np.array([sigma], np.float32), exponent=np.array([0.5], np.float32),
        # A small receptive field pools the finest band (wavelength 4 px), as make_encoding_model prefers.
        feature_weights=np.r_[np.full(4, 0.25), np.zeros(8)].astype(np.float32)[None],
        category_tuning=np.full((1, 2), np.nan, np.float32), shape_weights=np.full((1, 28), np.nan, np.float32),
        category_weight=np.array([np.nan], np.float32), shape_weight=np.array([np.nan], np.float32),
        gain=np.ones(1, np.float32), n_orientations=4, wavelengths=(0.125, 0.25, 0.5), percent_signal_change=1.0)


def test_gabor_energy_is_tuned_to_orientation_and_matches_grating_amplitude():
    size = 32
    grating = _grating_patch(size, (0, 0), 10.0, 1.0, wavelength_px=8.0, orientation=0.0)  # full-field
    energy = encoding.gabor_energy(encoding.luminance(grating[None]), 4, (0.25,))[0]  # wavelength 8 px
    centre = energy[:, 12:20, 12:20].mean(axis=(1, 2))
    # A full-contrast grating has amplitude 0.5 in luminance; the matched filter reports it.
    assert centre[0] == pytest.approx(0.5, rel=0.15)
    assert centre[2] < 0.1 * centre[0]  # orthogonal orientation barely responds
    blank = encoding.gabor_energy(np.full((1, size, size), 0.7, np.float32), 4, (0.25,))
    assert np.abs(blank).max() < 1e-4  # mean luminance alone drives nothing


def test_prf_response_grows_with_contrast_inside_and_ignores_contrast_outside():
    size = 32
    model = _one_prf_model(0.4, 0.4, 0.12)
    contrasts = [0.1, 0.3, 0.6, 1.0]
    inside = np.stack([_grating_patch(size, (0.4, 0.4), 0.3, c) for c in contrasts])
    outside = np.stack([_grating_patch(size, (-0.55, -0.55), 0.3, c) for c in (0.0, 1.0)])
    model.calibrate(inside, np.zeros(len(inside), int))
    response_inside = model.predict(inside, np.zeros(len(inside), int))[:, 0]
    response_outside = model.predict(outside, np.zeros(2, int))[:, 0]
    assert np.all(np.diff(response_inside) > 0)
    assert abs(response_outside[1] - response_outside[0]) < 0.02 * response_inside[-1]


def test_retinotopy_and_receptive_field_sizes(rng):
    layout = geometry.place_rois(3.0, FOV, 600, 300, rng)
    model = encoding.make_encoding_model(layout, 10, validate({})["simulate"], rng)
    early = layout.is_early
    # Each hemisphere sees the opposite half of the visual field.
    assert np.mean(model.prf_x[early & (layout.hemisphere < 0)] > 0) > 0.9
    assert np.mean(model.prf_x[early & (layout.hemisphere > 0)] < 0) > 0.9
    # Eccentricity grows from the occipital pole forward; receptive fields grow with it.
    ecc = np.hypot(model.prf_x[early], model.prf_y[early])
    assert np.corrcoef(layout.mni[early, 1], layout.eccentricity[early])[0, 1] > 0.7
    assert np.corrcoef(ecc, model.prf_sigma[early])[0, 1] > 0.6
    names = layout.roi_names
    ratio = model.prf_sigma / np.maximum(layout.eccentricity + 0.3, 1e-6)
    assert np.median(ratio[names == "V1"]) < np.median(ratio[names == "V3"])
    # ROIs: every name present, early voxels at the back, higher ones further forward.
    assert set(names) == set(geometry.ROI_NAMES)
    assert layout.mni[early, 1].mean() < layout.mni[~early, 1].mean()


@pytest.mark.parametrize("category_model", ["labels", "deepnet"])
def test_category_tuning_is_spatially_clustered(rng, category_model):
    layout = geometry.place_rois(3.0, FOV, 200, 600, rng)
    model = encoding.make_encoding_model(layout, 10, validate({"simulate": {"category_model": category_model}})[
        "simulate"], rng)
    higher = np.flatnonzero(~layout.is_early)
    tuning = model.category_maps[higher]
    distance = np.linalg.norm(layout.mni[higher, None] - layout.mni[None, higher], axis=2)
    similarity = np.corrcoef(tuning)
    near = similarity[(distance > 0) & (distance <= 3.1)].mean()
    far = similarity[distance > 30].mean()
    assert near > 0.5 and far < 0.2


# -- the category model (labels vs HMAX-like C2 features) --------------------------

def _small_layout(rng):
    """80 voxels (40 early, 40 higher) on a 12 x 10 x 8 grid of 3 mm, independent of place_rois."""
    grid = geometry.Grid(affine=np.diag([3.0, 3.0, 3.0, 1.0]), shape=(12, 10, 8))
    flat = rng.choice(12 * 10 * 8, 80, replace=False)
    flat.sort()
    ijk = np.stack(np.unravel_index(flat, grid.shape), axis=1).astype(np.int32)
    roi = np.r_[rng.integers(1, 4, 40), rng.integers(4, 6, 40)][rng.permutation(80)].astype(np.int16)
    early = roi <= 3
    eccentricity = np.where(early, rng.uniform(0.05, 0.9, 80), np.nan).astype(np.float32)
    polar_angle = np.where(early, rng.uniform(-np.pi / 2, np.pi / 2, 80), np.nan).astype(np.float32)
    return geometry.VoxelLayout(grid=grid, ijk=ijk, mni=(ijk * 3.0).astype(np.float32), roi=roi,
                                hemisphere=np.where(ijk[:, 0] < 6, -1, 1).astype(np.int8),
                                eccentricity=eccentricity, polar_angle=polar_angle)


def _object_images(rng, n_per_class, size=24):
    """Bright objects on black, four visually distinct classes with jittered position, size and contrast.

    Returns uint8 [4 * n_per_class, size, size, 1] and int labels (0 horizontal bar, 1 vertical bar,
    2 ring, 3 diagonal cross).
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    images, labels = [], []
    for label in range(4):
        for _ in range(n_per_class):
            cy, cx = size / 2 + rng.uniform(-2.5, 2.5, 2)
            half = size * rng.uniform(0.28, 0.36)
            thick = size * rng.uniform(0.08, 0.12)
            dy, dx = yy - cy, xx - cx
            if label == 0:
                mask = (np.abs(dx) < half) & (np.abs(dy) < thick)
            elif label == 1:
                mask = (np.abs(dy) < half) & (np.abs(dx) < thick)
            elif label == 2:
                mask = np.abs(np.hypot(dx, dy) - half * 0.8) < thick * 0.7
            else:
                diagonals = (np.abs(dx - dy) < thick) | (np.abs(dx + dy) < thick)
                mask = diagonals & (np.maximum(np.abs(dx), np.abs(dy)) < half)
            image = mask * rng.uniform(0.6, 1.0) + rng.uniform(0, 0.05, (size, size))
            images.append(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)[:, :, None])
            labels.append(label)
    return np.stack(images), np.array(labels)


def _features_model(rng, layout, train_images):
    section = dict(validate({})["simulate"], category_model="features")
    prototypes = encoding.draw_c2_prototypes(train_images, section["n_orientations"], section["gabor_wavelengths"],
                                             np.random.default_rng(5))
    return encoding.make_encoding_model(layout, 4, section, rng, c2_prototypes=prototypes)


def _reference_block(response, layout):
    """The responses the reference values were taken at: 4 images x the first 2 early and 2 higher voxels."""
    early, higher = np.flatnonzero(layout.is_early), np.flatnonzero(~layout.is_early)
    return response[[0, 7, 13, 19]][:, [early[0], early[1], higher[0], higher[1]]]


def test_labels_category_model_reproduces_the_original_responses():
    # Reference values from the encoding model before category_model existed (same seed, same inputs).
    rng = np.random.default_rng(11)
    layout = _small_layout(rng)
    images, labels = _object_images(rng, 5)
    section = validate({"simulate": {"category_model": "labels"}})["simulate"]
    model = encoding.make_encoding_model(layout, 4, section, rng)
    response = model.calibrate_predict(images, labels)
    block = _reference_block(response, layout)
    expected = [[0.8598504, 0.9062211, 1.1776097, 1.2331371],
                [0.6625425, 0.97558415, 1.2698643, 0.64142585],
                [0.8458362, 0.8958492, 1.7124896, 1.6824579],
                [0.9271643, 0.96421325, 1.50045, 0.79440284]]
    np.testing.assert_allclose(block, expected, rtol=1e-5)
    assert response.sum() == pytest.approx(1596.8806, rel=1e-5)
    assert model.feature_tuning is None and model.c2_prototypes is None
    np.testing.assert_array_equal(model.predict(images, labels), response)


def test_features_category_model_reproduces_the_original_responses():
    # Reference values from the features model before the deepnet model and shared maps existed.
    rng = np.random.default_rng(11)
    layout = _small_layout(rng)
    images, _ = _object_images(rng, 5)
    response = _features_model(rng, layout, images).calibrate_predict(images)
    block = _reference_block(response, layout)
    expected = [[1.4443105, 0.85916656, 0.5853914, 0.6669653],
                [1.112888, 0.92492807, 1.5938345, 0.78104657],
                [1.4207706, 0.84933335, 0.6812734, 0.66970986],
                [1.5573794, 0.91414756, 1.6886501, 0.61211973]]
    np.testing.assert_allclose(block, expected, rtol=1e-5)
    assert response.sum() == pytest.approx(1589.9657, rel=1e-5)


@pytest.mark.parametrize("category_model, totals", [
    # Sums of sub-01's ground-truth responses and of the first BOLD run of sub-01 and sub-rest01, computed by the
    # simulator before shared maps, resting-state networks and the deepnet model existed (commit a5889f9), on
    # the committed Fashion-MNIST subset.
    ("labels", (19513.50334681943, 863864515.0, 590320410.0)),
    ("features", (19579.62874584645, 863886434.0, 590320422.0)),
])
def test_older_category_models_without_shared_maps_reproduce_the_earlier_simulator(tmp_path, category_model, totals):
    from mindvis.data.stimuli import BUNDLED_FASHION_MNIST

    # The committed Fashion-MNIST subset, as the reference was computed, whether or not Debian's full set is here.
    config = validate({**TINY, "stimuli": {**TINY["stimuli"], "fashion_mnist_dir": str(BUNDLED_FASHION_MNIST)},
                       "simulate": {**TINY["simulate"], "category_model": category_model,
                                    "shared_tuning": 0, "rest_networks": 0}})
    stimuli = tmp_path / "stimuli.h5"
    build_stimulus_set(config, stimuli)
    simulate_subject(config, stimuli, tmp_path / "bids", "sub-01")
    simulate_rest_subject(config, tmp_path / "bids", "sub-rest01")
    truth = bids.read_ground_truth(bids_layout.derivative_paths(tmp_path / "bids", "sub-01")["groundtruth"])
    found = [float(truth["response"].astype(np.float64).sum())]
    for subject in ("sub-01", "sub-rest01"):
        bold = sorted((tmp_path / "bids" / subject / "func").glob("*_bold.nii.gz"))[0]
        found.append(float(np.asarray(nib.load(bold).dataobj, dtype=np.float64).sum()))
    assert found == list(totals)


def test_c2_features_peak_at_one_on_the_prototypes_source_images():
    rng = np.random.default_rng(2)
    images, _ = _object_images(rng, 6)
    lum = encoding.luminance(images)
    prototypes = encoding.draw_c2_prototypes(images, 4, (0.125, 0.25, 0.5), np.random.default_rng(3), n_prototypes=12)
    assert prototypes.shape == (12, 4, encoding.S2_PATCH_SIDE, encoding.S2_PATCH_SIDE)
    c2 = encoding.c2_features(lum, prototypes, 4, (0.125, 0.25, 0.5), chunk=7)
    assert np.all((c2 > 0) & (c2 <= 1))
    # Every prototype is a C1 patch of some image: that image matches it exactly.
    np.testing.assert_allclose(c2.max(axis=0), 1.0, atol=1e-4)
    assert np.median(c2) < 0.99  # and the others do not
    # The same seed gives the same prototypes (every subject shares them).
    again = encoding.draw_c2_prototypes(images, 4, (0.125, 0.25, 0.5), np.random.default_rng(3), n_prototypes=12)
    np.testing.assert_array_equal(prototypes, again)


def test_features_category_model_ignores_labels():
    rng = np.random.default_rng(4)
    layout = _small_layout(rng)
    images, labels = _object_images(rng, 5)
    model = _features_model(rng, layout, images)
    assert np.isnan(model.category_tuning).all() and model.feature_tuning.shape == (80, encoding.C2_PROTOTYPES)
    response = model.calibrate_predict(images, labels)
    np.testing.assert_array_equal(model.predict(images, rng.permutation(labels)), response)
    np.testing.assert_array_equal(model.predict(images, np.full(len(images), -1)), response)
    np.testing.assert_array_equal(model.predict(images), response)
    assert np.isfinite(response).all() and response[:, ~layout.is_early].std(axis=0).min() > 0
    # The feature drive is scaled to the label drive's unit mean square over higher voxels.
    assert np.mean(model.category_drive(images) ** 2) == pytest.approx(1.0, rel=1e-4)


def test_feature_category_drive_follows_visual_similarity_and_label_drive_does_not():
    rng = np.random.default_rng(6)
    layout = _small_layout(rng)
    train_images, _ = _object_images(rng, 10)
    images, labels = _object_images(rng, 10)
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    different = labels[:, None] != labels[None]

    features = _features_model(rng, layout, train_images).calibrate(images)
    similarity = np.corrcoef(features.category_drive(images))  # image x image, over higher voxels
    within, between = similarity[same].mean(), similarity[different].mean()
    # Images of a class look alike, so they drive the category tuning alike; other classes less so.
    # (About 1.0 apart here; random prototypes not sampled from images give only about 0.5.)
    assert within > between + 0.7
    assert within < 0.99  # but not identically: the drive is the image's, not the label's
    # The class of an image is its nearest class in drive space, for most images (visual similarity).
    centroids = np.stack([similarity[:, labels == c].mean(axis=1) for c in range(4)], axis=1)
    assert np.mean(centroids.argmax(axis=1) == labels) > 0.8

    labelled = encoding.make_encoding_model(layout, 4, validate({"simulate": {"category_model": "labels"}})["simulate"],
                                            rng).calibrate(images, labels)
    label_similarity = np.corrcoef(labelled.category_drive(images, labels))
    np.testing.assert_allclose(label_similarity[same], 1.0, atol=1e-5)  # one pattern per class, whatever the image


def test_features_category_model_simulates_task_and_rest_subjects(tmp_path):
    config = validate({**TINY, "simulate": {**TINY["simulate"], "category_model": "features"}})
    stimuli = tmp_path / "stimuli.h5"
    build_stimulus_set(config, stimuli)
    simulate_subject(config, stimuli, tmp_path / "bids", "sub-01")
    simulate_rest_subject(config, tmp_path / "bids", "sub-rest01")
    truth = bids.read_ground_truth(bids_layout.derivative_paths(tmp_path / "bids", "sub-01")["groundtruth"])
    assert np.isfinite(truth["response"]).all()
    for subject in ("sub-01", "sub-rest01"):
        for bold in sorted((tmp_path / "bids" / subject / "func").glob("*_bold.nii.gz")):
            assert np.isfinite(np.asarray(nib.load(bold).dataobj)).all()


# -- the deepnet category model and shared anatomy ------------------------------------

def _deepnet_model(rng, layout, shared=None):
    section = validate({})["simulate"]
    assert section["category_model"] == "deepnet"  # the default
    return encoding.make_encoding_model(layout, 4, section, rng, shared=shared)


@pytest.fixture(scope="module")
def object_features():
    """Four classes of objects and their deep-network features (computed once for the module)."""
    from mindvis.simulate.deepnet import layer_features

    images, labels = _object_images(np.random.default_rng(21), 12)
    return images, labels, layer_features(images)


def test_deepnet_features_have_the_documented_layers(object_features):
    from mindvis.simulate import deepnet

    images, _, features = object_features
    assert features["mid"].shape == (len(images), 112 * deepnet.MID_GRID ** 2)
    assert features["late"].shape == (len(images), 1280)
    assert all(np.isfinite(values).all() and values.std(axis=0).max() > 0 for values in features.values())
    # Computed the same in any batch size (the network is in eval mode: no dropout, frozen batch norm).
    again = deepnet.layer_features(images[:5], batch_size=2)
    np.testing.assert_allclose(again["late"], features["late"][:5], rtol=1e-4, atol=1e-5)


def test_deepnet_model_reads_the_network_not_the_label(object_features):
    images, labels, features = object_features
    rng = np.random.default_rng(4)
    layout = _small_layout(rng)
    model = _deepnet_model(rng, layout)
    assert model.feature_tuning.shape == (80, 2 * encoding.DEEPNET_COMPONENTS)
    assert model.shape_weights.shape == (80, 0) and np.isnan(model.category_tuning).all()
    response = model.calibrate_predict(images, labels, features)
    np.testing.assert_array_equal(model.predict(images, rng.permutation(labels), features=features), response)
    # Without the cached features it computes them itself, to the same responses.
    np.testing.assert_allclose(model.predict(images), response, rtol=1e-4, atol=1e-5)
    higher = ~layout.is_early
    assert np.isfinite(response).all() and response[:, higher].std(axis=0).min() > 0
    assert response[:, higher].mean() == pytest.approx(model.percent_signal_change, rel=0.05)
    assert np.mean(model.category_drive(images, features=features) ** 2) == pytest.approx(1.0, rel=1e-3)
    # Images of a class drive the higher voxels alike (the network sees them alike); other classes less so.
    similarity = np.corrcoef(model.category_drive(images, features=features))
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    assert similarity[same].mean() > similarity[labels[:, None] != labels[None]].mean() + 0.3


def test_deepnet_layers_weigh_mid_in_loc_and_late_in_vot(object_features):
    images, labels, features = object_features
    rng = np.random.default_rng(8)
    layout = _small_layout(rng)
    model = _deepnet_model(rng, layout)
    model.calibrate(images, labels, features)
    names = layout.roi_names
    for roi, (mid, late) in encoding.DEEPNET_LAYER_WEIGHTS.items():
        np.testing.assert_allclose(model.layer_weights[names == roi], [[mid, late]] * int((names == roi).sum()), rtol=1e-6)
    # Each layer's drive has unit mean square on the calibration set.
    for drive, scale in zip(model._layer_drives(features), model.layer_scales_):
        assert np.mean((drive / scale) ** 2) == pytest.approx(1.0, rel=1e-6)


def _two_layouts():
    rng = np.random.default_rng(30)
    return _small_layout(rng), rng


def test_shared_maps_at_weight_zero_are_the_independent_maps():
    layout, _ = _two_layouts()
    fields = encoding.draw_shared_maps(layout.grid.shape, 2 * encoding.DEEPNET_COMPONENTS, 3.0,
                                       np.random.default_rng(1))
    alone = _deepnet_model(np.random.default_rng(5), layout)
    zero = _deepnet_model(np.random.default_rng(5), layout, shared=encoding.SharedMaps(fields, 0.0, np.zeros(3)))
    np.testing.assert_array_equal(alone.feature_tuning, zero.feature_tuning)
    np.testing.assert_array_equal(alone.gain, zero.gain)


def test_fully_shared_maps_are_identical_across_subjects_up_to_misalignment():
    layout, _ = _two_layouts()
    higher = ~layout.is_early
    n_maps = 2 * encoding.DEEPNET_COMPONENTS
    fields = encoding.draw_shared_maps(layout.grid.shape, n_maps, 3.0, np.random.default_rng(1))
    # Two subjects (their own random streams) with the same voxels and no misalignment: the same tuning.
    first = _deepnet_model(np.random.default_rng(5), layout, shared=encoding.SharedMaps(fields, 1.0, np.zeros(3)))
    second = _deepnet_model(np.random.default_rng(6), layout, shared=encoding.SharedMaps(fields, 1.0, np.zeros(3)))
    np.testing.assert_allclose(first.feature_tuning[higher], second.feature_tuning[higher], atol=1e-5)
    assert not np.allclose(first.gain, second.gain)  # gains stay individual
    # Misaligned by one voxel along x: the tuning is the shared map read one voxel over.
    offset = np.array([1.0, 0.0, 0.0])
    moved = _deepnet_model(np.random.default_rng(6), layout, shared=encoding.SharedMaps(fields, 1.0, offset))
    shifted = fields[:, (layout.ijk[higher, 0] + 1) % layout.grid.shape[0], layout.ijk[higher, 1],
                     layout.ijk[higher, 2]].T
    expected = (shifted - shifted.mean(axis=0)) / shifted.std(axis=0)
    np.testing.assert_allclose(moved.feature_tuning[higher], expected, atol=1e-4)
    assert not np.allclose(moved.feature_tuning[higher], first.feature_tuning[higher], atol=1e-2)
    # Half shared: correlated with the shared maps, but not identical.
    half = _deepnet_model(np.random.default_rng(6), layout, shared=encoding.SharedMaps(fields, 0.5, np.zeros(3)))
    r = np.mean([np.corrcoef(half.feature_tuning[higher, k], first.feature_tuning[higher, k])[0, 1]
                 for k in range(n_maps)])
    assert 0.5 < r < 0.9


def test_shared_tuning_makes_subjects_alike_in_the_simulation(tmp_path):
    def tuning_correlation(shared):
        config = validate({**TINY, "simulate": {**TINY["simulate"], "shared_tuning": shared, "n_higher_voxels": 400,
                                                "misalignment_mm": 0.0}})
        from mindvis.simulate.run import _anatomy, make_subject_model
        from mindvis.simulate.traits import subject_traits

        maps = {}
        for subject in ("sub-01", "sub-02"):
            layout, _ = _anatomy(config, subject, subject_traits(config, subject))
            model = make_subject_model(config, subject, layout, 10, None)
            maps[subject] = {tuple(ijk): row for ijk, row in zip(layout.ijk[~layout.is_early],
                                                                 model.feature_tuning[~layout.is_early])}
        common = sorted(set(maps["sub-01"]) & set(maps["sub-02"]))
        assert len(common) > 20
        a = np.array([maps["sub-01"][key] for key in common])
        b = np.array([maps["sub-02"][key] for key in common])
        return np.mean([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(a.shape[1])])

    assert abs(tuning_correlation(0.0)) < 0.15
    assert tuning_correlation(1.0) > 0.8


def test_ground_truth_handle_rebuilds_the_simulated_responses(tiny_dataset, tiny_config):
    from mindvis.simulate import ground_truth

    stimuli_path = tiny_dataset / "bids" / "stimuli" / "stimuli.h5"
    truth = ground_truth(tiny_config, stimuli_path, "sub-02")
    stored = bids.read_ground_truth(bids_layout.derivative_paths(tiny_dataset / "bids", "sub-02")["groundtruth"])
    stimuli = load_stimulus_set(stimuli_path, splits=("train", "test"))
    images = np.concatenate([stimuli["train"].images, stimuli["test"].images])
    responses, roi = truth.respond(images)
    np.testing.assert_allclose(responses, stored["response"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(roi, stored["voxel_roi"])
    # Any size and any channels: fitted as the stimuli were.
    other = np.random.default_rng(0).integers(0, 256, (3, 50, 40, 3)).astype(np.uint8)
    responses, _ = truth.respond(other)
    assert responses.shape == (3, len(roi)) and np.isfinite(responses).all()
    with pytest.raises(MindvisError, match="uint8"):
        truth.respond(other.astype(np.float32))


def test_cached_features_are_checked_against_the_network_and_the_stimuli(tiny_dataset, tmp_path):
    from mindvis.simulate import deepnet

    stimuli_path = tiny_dataset / "bids" / "stimuli" / "stimuli.h5"
    cache = deepnet.write_stimulus_features(stimuli_path, tmp_path / "features.h5")
    stimuli = load_stimulus_set(stimuli_path, splits=("test",))
    ids = list(stimuli["test"].stimulus_id[::-1])
    read = deepnet.read_stimulus_features(cache, ids, "efficientnet_lite0", stimuli_path=stimuli_path)
    direct = deepnet.layer_features(stimuli["test"].images[::-1])
    np.testing.assert_allclose(read["late"], direct["late"], rtol=1e-4, atol=1e-5)
    with pytest.raises(MindvisError, match="efficientnet_lite0"):
        deepnet.read_stimulus_features(cache, ids, "efficientnet_lite1")
    with pytest.raises(MindvisError, match="no features"):
        deepnet.read_stimulus_features(cache, ["not-a-stimulus"], "efficientnet_lite0")
    other = tmp_path / "other.h5"
    other.write_bytes(stimuli_path.read_bytes() + b"")
    import h5py

    with h5py.File(other, "a") as handle:
        handle.attrs["touched"] = 1
    with pytest.raises(MindvisError, match="another stimulus file"):
        deepnet.read_stimulus_features(cache, ids, "efficientnet_lite0", stimuli_path=other)


def test_the_evaluation_classifier_is_never_the_simulators_feature_network():
    with pytest.raises(MindvisError, match="evaluate.classifier"):
        validate({"evaluate": {"classifier": "efficientnet_lite0"}})
    # Another feature network, or another category model, is fine.
    validate({"evaluate": {"classifier": "efficientnet_lite0"}, "simulate": {"feature_network": "efficientnet_lite1"}})
    validate({"evaluate": {"classifier": "efficientnet_lite0"}, "simulate": {"category_model": "features"}})


# -- time series ------------------------------------------------------------------

def test_hrf_regressor_peaks_about_five_seconds_after_onset():
    tr, onset = 0.5, 10.0
    regressor = timeseries.event_regressors([onset], [2.0], 80, tr, reference_duration=2.0)[:, 0]
    peak_time = np.argmax(regressor) * tr - onset
    assert 4.0 <= peak_time <= 7.0
    assert regressor.max() == pytest.approx(1.0, abs=0.02)
    assert np.abs(regressor[: int(onset / tr)]).max() < 1e-6  # nothing before the event


def test_ar1_noise_has_the_configured_autocorrelation(rng):
    noise = timeseries.ar1_noise(rng, 3000, 40, 0.4)
    lag1 = np.mean([np.corrcoef(noise[:-1, v], noise[1:, v])[0, 1] for v in range(40)])
    assert lag1 == pytest.approx(0.4, abs=0.03)
    assert noise.var(axis=0).mean() == pytest.approx(1.0, abs=0.05)


def test_smooth_noise_keeps_unit_variance_and_correlates_neighbours(rng):
    shape = (7, 8, 9)
    noise = timeseries.smooth_ar1_noise(rng, 400, shape, 0.3, fwhm_vox=2.0).reshape((400,) + shape)
    assert noise.var() == pytest.approx(1.0, abs=0.1)
    neighbour = np.corrcoef(noise[:, 3, 4, 4], noise[:, 4, 4, 4])[0, 1]
    assert neighbour > 0.3


def test_framewise_displacement_of_known_motion():
    motion = np.zeros((3, 6))
    motion[1, 0] = 0.2            # 0.2 mm along x
    motion[2, 0] = 0.2
    motion[2, 5] = 0.002          # plus 0.002 rad about z = 0.1 mm at 50 mm
    fd = timeseries.framewise_displacement(motion)
    assert np.isnan(fd[0])
    assert fd[1:] == pytest.approx([0.2, 0.1])


def test_design_shows_training_images_once_and_test_images_repeatedly(rng):
    section = validate({})["simulate"] | {"trials_per_run": 7, "test_repeats": 4}
    train_ids = [f"train-{i:04d}" for i in range(30)]
    test_ids = [f"test-{i:04d}" for i in range(5)]
    runs = design.task_runs(train_ids, ["a"] * 30, test_ids, ["b"] * 5, section, rng)
    types = [run.events["trial_type"].unique().tolist() for run in runs]
    assert types == sorted(types, key=lambda t: t != ["train"])  # training runs first
    assert all(len(t) == 1 for t in types)
    train = pd.concat([r.events for r in runs if r.events["trial_type"].iloc[0] == "train"])
    test = pd.concat([r.events for r in runs if r.events["trial_type"].iloc[0] == "test"])
    assert sorted(train["stimulus_id"]) == train_ids
    assert test["stimulus_id"].value_counts().eq(4).all() and set(test["stimulus_id"]) == set(test_ids)
    for run in runs:
        onsets = run.events["onset"].to_numpy()
        gaps = np.diff(onsets) - section["stimulus_duration"]
        assert np.all(gaps >= section["isi_min"] - 1e-3) and np.all(gaps <= section["isi_max"] + 1e-3)
        assert onsets[-1] + section["stimulus_duration"] <= run.n_volumes * section["tr"]
        assert len(run.events) <= 7


# -- BIDS output ------------------------------------------------------------------


def test_bids_files_are_complete_and_consistent(tiny_dataset, tiny_config):
    root = tiny_dataset / "bids"
    section = tiny_config["simulate"]
    stimuli = load_stimulus_set(root / "stimuli" / "stimuli.h5", splits=("train", "test"))
    derivatives = bids_layout.derivative_paths(root, "sub-01")
    mask_img = nib.load(derivatives["mask"])
    mask = np.asarray(mask_img.dataobj)
    dseg = np.asarray(nib.load(derivatives["dseg"]).dataobj)
    assert set(np.unique(dseg)) == {0, 1, 2, 3, 4, 5}
    assert np.array_equal(mask > 0, dseg > 0)
    table = pd.read_csv(derivatives["dseg_tsv"], sep="\t")
    assert list(table.columns) == ["index", "name"] and list(table["name"]) == list(geometry.ROI_NAMES)

    bold_files = sorted((root / "sub-01" / "func").glob("*_bold.nii.gz"))
    assert [f.name.split("_")[2] for f in bold_files] == [f"run-{i:02d}" for i in range(1, 7)]  # 4 train + 2 test
    trial_types = []
    for bold_file in bold_files:
        image = nib.load(bold_file)
        assert image.get_data_dtype() == np.int16
        assert np.allclose(image.affine, mask_img.affine) and image.shape[:3] == mask.shape
        assert image.header.get_zooms()[:3] == pytest.approx((3.0, 3.0, 3.0))
        sidecar = json.loads(bold_file.with_name(bold_file.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["RepetitionTime"] == section["tr"] and sidecar["TaskName"] == "objects"
        events = pd.read_csv(str(bold_file).replace("_bold.nii.gz", "_events.tsv"), sep="\t")
        assert list(events.columns) == ["onset", "duration", "trial_type", "stimulus_id", "class"]
        assert events["onset"].ge(0).all()
        assert (events["onset"] + events["duration"]).le(image.shape[3] * section["tr"]).all()
        _, labels = stimuli.lookup(list(events["stimulus_id"]))
        assert list(events["class"]) == [stimuli.class_names[label] for label in labels]
        trial_types.append(events["trial_type"].iloc[0])
        confounds = pd.read_csv(str(bold_file).replace("_bold.nii.gz", "_desc-confounds_timeseries.tsv"),
                                sep="\t")
        assert list(confounds.columns) == list(bids.CONFOUND_COLUMNS) and len(confounds) == image.shape[3]
        assert confounds["framewise_displacement"].isna().sum() == 1
        assert confounds[["trans_x", "trans_y", "trans_z"]].abs().max().max() < 5.0
    assert trial_types == ["train"] * 4 + ["test"] * 2

    # Raw-looking data: brain voxels at the configured baseline, not z-scores.
    data = np.asarray(nib.load(bold_files[0]).dataobj)
    roi_mean = data[mask > 0].mean()
    assert 0.5 * section["baseline_intensity"] < roi_mean < 1.5 * section["baseline_intensity"]

    truth = bids.read_ground_truth(derivatives["groundtruth"])
    assert np.array_equal(truth["voxel_ijk"], np.argwhere(mask > 0))
    assert truth["response"].shape == (len(stimuli["train"]) + len(stimuli["test"]), len(truth["voxel_ijk"]))
    assert set(truth["stimulus_id"]) == set(stimuli["train"].stimulus_id) | set(stimuli["test"].stimulus_id)
    assert list(truth["voxel_roi"]) == [geometry.ROI_NAMES[i - 1] for i in dseg[mask > 0]]
    early = truth["encoding"]["is_early"]
    assert np.isfinite(truth["encoding"]["prf_sigma"][early]).all()
    assert np.isnan(truth["encoding"]["prf_sigma"][~early]).all()
    assert json.loads(truth["attrs"]["config"])["tr"] == section["tr"]

    manifest = json.loads(derivatives["manifest"].read_text())
    listed = {entry["path"] for entry in manifest["files"]}
    assert "sub-01/func/sub-01_task-objects_run-01_bold.nii.gz" in listed
    assert all((root / path).exists() for path in listed)
    assert manifest["config"]["simulate"] == section and "numpy" in manifest["versions"]

    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants["participant_id"]) == ["sub-01", "sub-02", "sub-rest01"]
    assert list(participants["group"]) == ["task", "task", "rest"]
    assert json.loads((root / "dataset_description.json").read_text())["BIDSVersion"]


def test_same_seed_gives_identical_data_and_subjects_differ(tiny_dataset):
    first, again = tiny_dataset / "bids", tiny_dataset / "again"
    name = "sub-01/func/sub-01_task-objects_run-02_bold.nii.gz"
    assert np.array_equal(np.asarray(nib.load(first / name).dataobj), np.asarray(nib.load(again / name).dataobj))
    truth_1 = bids.read_ground_truth(bids_layout.derivative_paths(first, "sub-01")["groundtruth"])
    truth_1b = bids.read_ground_truth(bids_layout.derivative_paths(again, "sub-01")["groundtruth"])
    truth_2 = bids.read_ground_truth(bids_layout.derivative_paths(first, "sub-02")["groundtruth"])
    assert np.array_equal(truth_1["response"], truth_1b["response"])
    assert not np.array_equal(truth_1["voxel_ijk"], truth_2["voxel_ijk"])
    events_1 = pd.read_csv(first / "sub-01/func/sub-01_task-objects_run-01_events.tsv", sep="\t")
    events_2 = pd.read_csv(first / "sub-02/func/sub-02_task-objects_run-01_events.tsv", sep="\t")
    assert not events_1["stimulus_id"].equals(events_2["stimulus_id"])


def test_rerun_with_fewer_runs_leaves_no_stale_runs(tiny_dataset, tiny_config, tmp_path):
    import copy
    import shutil

    root = tmp_path / "bids"
    shutil.copytree(tiny_dataset / "again", root)
    config = copy.deepcopy(tiny_config)
    config["simulate"]["trials_per_run"] = 40  # 80 training + 30 test trials: 2 + 1 runs instead of 4 + 2
    simulate_subject(config, tiny_dataset / "bids" / "stimuli" / "stimuli.h5", root, "sub-01")
    runs = sorted(p.name.split("_")[2] for p in (root / "sub-01" / "func").glob("*_bold.nii.gz"))
    assert runs == ["run-01", "run-02", "run-03"]
    assert len(list((root / "sub-01" / "func").iterdir())) == 3 * 4  # bold, sidecar, events, confounds


def test_rest_subject_has_runs_without_events_and_roi_structured_fluctuations(tiny_dataset, tiny_config):
    root = tiny_dataset / "bids"
    func = root / "sub-rest01" / "func"
    assert not list(func.glob("*_events.tsv"))
    image = nib.load(func / "sub-rest01_task-rest_run-01_bold.nii.gz")
    assert image.shape[3] == tiny_config["simulate"]["rest_run_volumes"]
    assert (func / "sub-rest01_task-rest_run-01_desc-confounds_timeseries.tsv").exists()
    dseg = np.asarray(nib.load(bids_layout.derivative_paths(root, "sub-rest01")["dseg"]).dataobj)
    data = np.asarray(image.dataobj, dtype=np.float64)
    series = data[(dseg == 1) | (dseg == 5)]
    series = series - series.mean(axis=1, keepdims=True)
    labels = dseg[(dseg == 1) | (dseg == 5)]
    corr = np.corrcoef(series)
    same = corr[np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)].mean()
    different = corr[~np.equal.outer(labels, labels)].mean()
    assert same > different + 0.05


def test_bad_subject_label_and_missing_stimuli_are_clear_errors(tiny_config, tmp_path):
    with pytest.raises(MindvisError, match="subject"):
        simulate_subject(tiny_config, tmp_path / "stimuli.h5", tmp_path, "sub-rest01")
    with pytest.raises(MindvisError, match="stimulus file not found"):
        simulate_subject(tiny_config, tmp_path / "stimuli.h5", tmp_path, "sub-01")
    assert not (tmp_path / "derivatives").exists()
    with pytest.raises(MindvisError, match="n_early_voxels"):
        geometry.place_rois(3.0, FOV, 100_000, 10, np.random.default_rng(0))


# -- scientific checks that can fail ---------------------------------------------

def test_ground_truth_decodes_object_class(science):
    from sklearn.model_selection import cross_val_score

    truth = science["truth"]
    accuracy = cross_val_score(_classifier(), truth["response"], truth["label"], cv=5).mean()
    assert accuracy > 0.6  # chance is 0.1


def test_noisy_bold_decodes_object_class_and_averaging_repeats_helps(science):
    responses, events = science["responses"], science["events"]
    train = (events["trial_type"] == "train").to_numpy()
    classifier = _classifier().fit(responses[train], events["class"][train])
    single = classifier.score(responses[~train], events["class"][~train])
    averaged, _, classes = average_repeats(responses[~train], events[~train])
    accuracy = classifier.score(averaged, classes)
    assert accuracy > 0.3  # 30 test images, chance 0.1
    assert accuracy > single
    assert single < 0.9  # single trials are noisy: far from perfect


def test_early_voxels_follow_local_contrast_in_their_receptive_field(science):
    truth = science["truth"]
    stimuli = load_stimulus_set(science["stimuli"], splits=("train", "test"))
    images, _ = stimuli.lookup(list(truth["stimulus_id"]))
    lum = encoding.luminance(images).reshape(len(images), -1)
    early = truth["encoding"]["is_early"]
    size = images.shape[1]
    fields = encoding.prf_weights(truth["encoding"]["prf_x"][early], truth["encoding"]["prf_y"][early],
                                  truth["encoding"]["prf_sigma"][early], size, size)
    fields /= fields.sum(axis=1, keepdims=True)
    mean = lum @ fields.T
    contrast = np.sqrt(np.maximum((lum ** 2) @ fields.T - mean ** 2, 0))  # RMS contrast under the RF
    response = truth["response"][:, early]
    correlation = [np.corrcoef(contrast[:, v], response[:, v])[0, 1] for v in range(early.sum())]
    assert np.nanmedian(correlation) > 0.5


def test_noise_ceiling_is_in_a_realistic_range(science):
    responses, events = science["responses"], science["events"]
    test = (events["trial_type"] == "test").to_numpy()
    # Percent of the variance of the response averaged over the test repeats; as a fraction here.
    ceiling = noise_ceiling(responses[test], events["stimulus_id"][test].to_numpy())[1] / 100
    snr = science["truth"]["snr"]
    with_signal = snr > np.median(snr)
    assert 0.1 < np.median(ceiling[with_signal]) < 0.8
    # Voxels with more ground-truth signal are more reliable.
    assert np.median(ceiling[with_signal]) > np.median(ceiling[~with_signal])
