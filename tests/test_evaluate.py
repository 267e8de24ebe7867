"""The evaluate stage: every row of the table, its baselines' model selection, and metrics.json's layout."""

import json

import numpy as np
import pytest
from ldm_fixtures import tiny_config, tiny_generator, write_synthetic_responses, write_synthetic_stimuli

from mindvis.evaluate.baselines import ridge_images, true_class_unavailable_reason
from mindvis.evaluate.run import evaluate_subject
from mindvis.evaluate.table import METRICS, ROWS
from mindvis.generate.decode import sample_classes
from mindvis.generate.run import sample_seeds
from mindvis.generate.writing import read_samples_h5, write_samples_h5
from mindvis.models.linear import class_probabilities, fit_fmri_classifier, fit_ridge

N_SAMPLES = 2


def _write_samples(path, stimulus_set, samples, seeds, subject="sub-01"):
    test = stimulus_set.splits["test"]
    write_samples_h5(path, samples=samples, true_images=test.images, stimulus_id=list(test.stimulus_id),
                     label=test.label, seeds=seeds,
                     attrs={"subject": subject, "split": "test_avg", "n_samples": samples.shape[1],
                            "class_names": stimulus_set.class_names})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Stimuli (3 classes, 9 test images), responses, a tiny untrained base, a domain classifier and samples:
    the model's are the true images plus noise; the ablation's are another stimulus's images."""
    from mindvis.train.classifier import train_classifier
    from mindvis.models.ldm import save_generator

    root = tmp_path_factory.mktemp("evaluate")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5", n_train_per_class=8, n_test_per_class=3)
    write_synthetic_responses(root / "responses.h5", stimuli, snr=3.0)
    save_generator(tiny_generator(n_classes=3), root / "ldm")
    config = tiny_config(evaluate={"classifier": "domain", "n_bootstrap": 200, "trials": 50},
                         generate={"n_samples": N_SAMPLES, "steps": 3, "batch_size": 8},
                         finetune={"baseline": True})
    classifier = {**config["classifier"], "epochs": 20, "widths": [8, 16], "batch_size": 10, "lr": 0.01}
    train_classifier({**config, "classifier": classifier}, root / "stimuli.h5", root / "classifier")
    test = stimuli.splits["test"]
    rng = np.random.default_rng(0)
    noisy = test.images[:, None].astype(float) + rng.normal(0, 10, (len(test), N_SAMPLES, *test.images.shape[1:]))
    samples = np.clip(noisy, 0, 255).astype(np.uint8)
    seeds = sample_seeds(config["seed"], "sub-01", list(test.stimulus_id), N_SAMPLES)
    _write_samples(root / "samples.h5", stimuli, samples, seeds)
    _write_samples(root / "samples-baseline.h5", stimuli, np.roll(samples, 1, axis=0), seeds)
    metrics = evaluate_subject(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "samples.h5",
                               root / "ldm", root / "evaluation", baseline_samples=root / "samples-baseline.h5",
                               classifier_dir=root / "classifier")
    return {"root": root, "config": config, "stimuli": stimuli, "metrics": metrics, "seeds": seeds}


def _strict_json(path):
    def reject(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def test_metrics_json_has_every_contract_key_and_rows_in_order(workspace):
    root, metrics = workspace["root"], workspace["metrics"]
    written = _strict_json(root / "evaluation" / "metrics.json")  # no NaN: a browser's JSON.parse must read it
    for key in ("subject", "n_way", "trials", "n_samples", "n_stimuli", "chance", "ci_level", "n_bootstrap",
                "image_size", "classifier", "class_names", "rows", "per_class", "confusion", "per_stimulus",
                "inputs", "config", "versions", "wall_time_s"):
        assert key in written, key
    assert written["n_way"] == 3 and written["chance"] == pytest.approx(1 / 3) and written["n_stimuli"] == 9
    assert written["image_size"] == 16 and written["n_samples"] == N_SAMPLES
    assert set(written["classifier"]) >= {"name", "n_classes", "held_out_accuracy", "test_label_accuracy"}
    assert [row["id"] for row in written["rows"]] == [row_id for row_id, _, _ in ROWS]
    for row in written["rows"]:
        assert {"id", "label", "kind", "available", "metrics"} <= set(row)
        assert set(row["metrics"]) == set(METRICS)
        assert row["available"], (row["id"], row.get("reason"))
        for key, entry in row["metrics"].items():
            if entry is None:
                continue
            low, high = entry["ci"]
            if key == "fid":  # resampled sets repeat stimuli, which inflates FID: the value may lie below
                assert entry["value"] >= -1e-6 and -1e-6 <= low <= high and "ci_note" in entry
            else:
                assert low - 1e-9 <= entry["value"] <= high + 1e-9, (row["id"], key, entry)
    assert len(written["inputs"][str(root / "samples.h5")]) == 64  # sha256 of every input
    assert written["config"]["evaluate"]["n_bootstrap"] == 200 and "torch" in written["versions"]
    assert written == json.loads(json.dumps(metrics))


def test_rows_score_what_they_were_given(workspace):
    rows = {row["id"]: row["metrics"] for row in workspace["metrics"]["rows"]}
    # The model's samples are the true images plus noise; the ablation's are other stimuli's images.
    assert rows["dcldm"]["pixcorr"]["value"] > 0.9
    assert rows["dcldm"]["two_way_id"]["value"] > rows["dcldm-baseline"]["two_way_id"]["value"]
    assert rows["true-images"]["n_way_top1_mean"]["value"] == pytest.approx(1.0)
    assert rows["true-images"]["pixcorr"]["value"] == pytest.approx(1.0)
    assert rows["true-images"]["ssim"]["value"] == pytest.approx(1.0)
    assert rows["chance"]["n_way_top1_mean"]["value"] == pytest.approx(1 / 3)
    assert rows["chance"]["n_way_top1_best_of_k"]["value"] == pytest.approx(1 - (2 / 3) ** N_SAMPLES)
    # The fMRI carries the class (snr 3): the linear classifier on it is far above chance; it has no images.
    assert rows["fmri-linear"]["label_top1_mean"]["value"] >= 0.8
    assert rows["fmri-linear"]["pixcorr"] is None and rows["fmri-linear"]["fid"] is None
    metrics = workspace["metrics"]
    per_stimulus = metrics["per_stimulus"]["dcldm"]
    assert len(per_stimulus["n_way_top1_mean"]) == 9
    assert np.mean(per_stimulus["pixcorr"]) == pytest.approx(rows["dcldm"]["pixcorr"]["value"])
    confusion = np.array(metrics["confusion"]["dcldm"])
    assert confusion.shape == (3, 3) and confusion.sum() == 9 * N_SAMPLES
    accuracy = np.diag(confusion) / confusion.sum(axis=1)
    np.testing.assert_allclose(metrics["per_class"]["dcldm"], accuracy)
    assert metrics["classifier"]["test_label_accuracy"] == rows["true-images"]["label_top1_mean"]["value"]


def test_ridge_and_true_class_images_are_written_like_samples(workspace):
    root, seeds = workspace["root"], workspace["seeds"]
    ridge = read_samples_h5(root / "evaluation" / "ridge" / "samples.h5")
    assert ridge["samples"].shape == (9, 1, 16, 16, 1) and ridge["attrs"]["fit"]["refit"] == "train + val"
    drawn = read_samples_h5(root / "evaluation" / "base-true-class" / "samples.h5")
    assert drawn["samples"].shape == (9, N_SAMPLES, 16, 16, 1)
    np.testing.assert_array_equal(drawn["seeds"], seeds)  # the model's noise
    assert (root / "evaluation" / "ridge" / "grid.png").exists()
    assert (root / "evaluation" / "base-true-class" / "grid.png").exists()


def test_unavailable_rows_say_why(workspace, tmp_path):
    from ldm_fixtures import save_tiny_sd

    root, config = workspace["root"], workspace["config"]
    # A Stable-Diffusion-like base (no class conditioner) and no ablation trained.
    sd = save_tiny_sd(tmp_path / "sd")
    metrics = evaluate_subject({**config, "finetune": {**config["finetune"], "baseline": False},
                                "evaluate": {**config["evaluate"], "n_bootstrap": 20}},
                               "sub-01", root / "responses.h5", root / "stimuli.h5", root / "samples.h5", sd,
                               tmp_path / "evaluation", classifier_dir=root / "classifier")
    rows = {row["id"]: row for row in metrics["rows"]}
    assert [row["id"] for row in metrics["rows"]] == [row_id for row_id, _, _ in ROWS]
    assert not rows["dcldm-baseline"]["available"] and "finetune.baseline" in rows["dcldm-baseline"]["reason"]
    assert not rows["base-true-class"]["available"] and "class conditioner" in rows["base-true-class"]["reason"]
    for row_id in ("dcldm-baseline", "base-true-class"):
        assert all(value is None for value in rows[row_id]["metrics"].values())
        assert row_id not in metrics["per_stimulus"]
    assert rows["ridge"]["available"]  # the SD VAE's latent space (RGB) serves the ridge decoder too
    assert not (tmp_path / "evaluation" / "base-true-class").exists()


def test_true_class_is_unavailable_without_a_class_conditioner():
    generator = tiny_generator(n_classes=3)
    labels = np.array([0, 2, 1])
    assert true_class_unavailable_reason(generator, labels, 3) is None
    assert "classes" in true_class_unavailable_reason(generator, labels, 4)
    settings = {"sampler": "ddim", "steps": 2, "guidance_scale": 2.0, "eta": 0.0, "batch_size": 4}
    drawn = sample_classes(generator, labels, np.arange(6).reshape(3, 2), settings)
    assert drawn.shape == (3, 2, 16, 16, 1) and drawn.dtype == np.uint8
    generator.class_conditioner = None  # as a Stable Diffusion base
    assert "no class conditioner" in true_class_unavailable_reason(generator, labels, 3)


def _ridge_data(rng, n_train=60, n_val=30, n_voxels=25, n_latent=6, noise=3.0):
    weights = rng.normal(size=(n_voxels, n_latent))
    fmri = rng.normal(size=(n_train + n_val, n_voxels)).astype(np.float32)
    latents = (fmri @ weights + noise * rng.normal(size=(n_train + n_val, n_latent))).astype(np.float32)
    return fmri[:n_train], latents[:n_train], fmri[n_train:], latents[n_train:]


def test_ridge_alpha_is_the_val_mse_minimum_and_refits_on_train_plus_val():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    train_x, train_y, val_x, val_y = _ridge_data(rng)
    alphas = [1e-2, 1, 10, 30, 100, 1e3, 1e4]
    model, info = fit_ridge(train_x, train_y, val_x, val_y, alphas)
    brute = [np.mean((Ridge(alpha=a).fit(train_x, train_y).predict(val_x) - val_y) ** 2) for a in alphas]
    np.testing.assert_allclose(info["val_error"], brute, rtol=1e-4)
    assert info["alpha"] == alphas[int(np.argmin(brute))]
    refit = Ridge(alpha=info["alpha"]).fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))
    np.testing.assert_allclose(model.coef_, refit.coef_, rtol=1e-4, atol=1e-6)
    # Validation targets that fMRI cannot predict push the choice to the strongest regularisation.
    _, info_noise = fit_ridge(train_x, train_y, val_x, rng.normal(size=val_y.shape), alphas)
    assert info_noise["alpha"] == max(alphas)


def test_ridge_baseline_never_chooses_on_test_fmri(workspace):
    from mindvis.data.responses import load_responses

    root, config = workspace["root"], workspace["config"]
    generator = tiny_generator(n_classes=3)
    data = load_responses(root / "responses.h5", splits=("train", "val", "test_avg"))
    alphas = config["evaluate"]["ridge_alphas"]
    test = data["test_avg"].fmri
    images, info = ridge_images(generator, data, workspace["stimuli"], test, alphas)
    shuffled, info_shuffled = ridge_images(generator, data, workspace["stimuli"],
                                           np.random.default_rng(1).permutation(test.ravel()).reshape(test.shape),
                                           alphas)
    assert info == info_shuffled  # same alpha, same validation errors
    assert images.shape == (9, 16, 16, 1) and not np.array_equal(images, shuffled)


def _class_fmri(rng, labels, patterns, snr):
    return (snr * patterns[labels] + rng.normal(size=(len(labels), patterns.shape[1]))).astype(np.float32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fmri_linear_classifier_reads_class_information_and_nothing_else(shuffle):
    from mindvis.evaluate.table import Reference, class_scores

    rng = np.random.default_rng(2)
    n_classes, n_voxels = 5, 40
    patterns = rng.normal(size=(n_classes, n_voxels))
    train_y, val_y, test_y = (np.repeat(np.arange(n_classes), n) for n in (20, 8, 60))
    train_x, val_x, test_x = (_class_fmri(rng, y, patterns, 0.8) for y in (train_y, val_y, test_y))
    if shuffle:
        train_y, val_y = rng.permutation(train_y), rng.permutation(val_y)
    model, info = fit_fmri_classifier(train_x, train_y, val_x, val_y, [1e-3, 1e-2, 1e-1, 1])
    assert info["refit"].startswith("train + val") and len(info["val_log_loss"]) == 4
    probs = class_probabilities(model, test_x, n_classes)
    reference = Reference(images=None, features=None, gt_class=test_y, labels=test_y, label_space=True,
                          n_way=n_classes, trials=10, seed=0, image_size=16)
    values, predicted = class_scores(probs[:, None], test_y, reference)
    accuracy = values["label_top1_mean"].mean()
    assert values["n_way_top1_mean"].mean() == pytest.approx(accuracy)  # n = C: n-way is plain top-1
    if shuffle:
        assert abs(accuracy - 1 / n_classes) < 0.12
    else:
        assert accuracy > 0.8


def test_cli_parses_the_evaluate_command():
    from mindvis.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--config", "c.yaml", "--subject", "sub-01", "--responses", "r.h5",
                                      "--stimuli", "s.h5", "--samples", "x.h5", "--base", "ldm", "--out-dir", "o"])
    assert args.handler.__name__ == "cmd_evaluate" and args.baseline_samples is None and args.classifier is None
