"""The learning-curve benchmark's pieces on tiny synthetic inputs (benchmarks/learning_curve.py).

No fine-tuning or decoding: the subset, the scoring, the probes, the encoder features, the
aggregation, the reading, the Markdown and the figure.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mindvis.config import validate
from mindvis.data.pairs import PairedTrials
from mindvis.models.mbm import MBMAutoencoder

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curve.py"
_SPEC = importlib.util.spec_from_file_location("learning_curve", _PATH)
lc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lc)

N_CLASSES = 4


@pytest.fixture
def rng():
    return np.random.default_rng(3)


@pytest.fixture
def config():
    config = validate({"evaluate": {"n_bootstrap": 40, "trials": 20}})
    return config


class FakeClassifier:
    """An image classifier whose class is the image's mean brightness bin (deterministic, no weights)."""

    class_names = [f"c{i}" for i in range(N_CLASSES)]
    n_classes = N_CLASSES
    info = {}

    def predict_proba_and_features(self, images):
        images = np.asarray(images, np.float64)
        mean = images.reshape(len(images), -1).mean(1) / 256.0
        logits = -((mean[:, None] * N_CLASSES - 0.5 - np.arange(N_CLASSES)) ** 2) * 8
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        features = np.stack([mean, images.reshape(len(images), -1).std(1)], 1) + 1e-3 * np.arange(len(images))[:, None]
        return probs, features

    def predict_proba(self, images):
        return self.predict_proba_and_features(images)[0]


def _images_of(labels, rng, size=12):
    base = (np.asarray(labels)[:, None, None, None] + 0.5) * 256 / N_CLASSES
    return np.clip(base + rng.normal(0, 6, (len(labels), size, size, 1)), 0, 255).astype(np.uint8)


def test_training_rows_are_the_subset_finetuning_draws(rng):
    n_train, seed = 37, 11
    trials = PairedTrials(rng.normal(size=(n_train, 3)), torch.arange(n_train).float(), np.arange(n_train))
    for fraction in (0.1, 0.5, 1.0):
        rows = lc.training_rows(n_train, fraction, seed)
        assert len(rows) == max(1, round(fraction * n_train))
        np.testing.assert_array_equal(rows, trials.subset(fraction, seed).labels.numpy())
    assert not np.array_equal(lc.training_rows(n_train, 0.5, 1), lc.training_rows(n_train, 0.5, 2))


def test_subset_summaries_split_seen_novel_and_refuse_a_tiny_subset():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.5, np.nan])
    categories = ["seen", "seen", "seen", "novel", None, "seen"]
    summary = lc.subset_summaries(values, categories, n_boot=50, level=0.95, seed=0)
    assert summary["all"]["value"] == pytest.approx(0.7) and summary["all"]["n"] == 5  # NaN skipped
    assert summary["seen"]["value"] == pytest.approx(2 / 3)
    low, high = summary["seen"]["ci"]
    assert 0 <= low <= 2 / 3 <= high <= 1
    assert summary["novel"]["value"] is None and "1 stimuli" in summary["novel"]["reason"]


def test_score_samples_matches_the_truth_and_chance(rng, config):
    labels = np.repeat(np.arange(N_CLASSES), 3)
    truth = _images_of(labels, rng)
    good = np.stack([_images_of(labels, rng) for _ in range(2)], axis=1)
    shuffled = good[rng.permutation(len(labels))]
    categories = ["seen"] * 9 + ["novel"] * 3
    base = {"true_images": truth, "label": labels, "attrs": {"class_names": FakeClassifier.class_names}}
    score = lc.score_samples({**base, "samples": good}, FakeClassifier(), config, "sub-01", categories)
    assert score["n_way"] == N_CLASSES and score["chance"] == 1 / N_CLASSES and score["n_samples"] == 2
    top1 = score["metrics"]["n_way_top1_mean"]
    assert top1["all"]["value"] == 1.0 and top1["seen"]["n"] == 9 and top1["novel"]["n"] == 3
    assert len(score["per_stimulus"]["n_way_top1_mean"]) == len(labels)
    worse = lc.score_samples({**base, "samples": shuffled}, FakeClassifier(), config, "sub-01", categories)
    assert worse["metrics"]["n_way_top1_mean"]["all"]["value"] < 0.6


def test_probe_scores_on_seen_classes_only(rng):
    n_voxels = 6
    means = 3 * rng.normal(size=(N_CLASSES, n_voxels))

    def trials(labels):
        return means[labels] + rng.normal(size=(len(labels), n_voxels)), labels

    train_x, train_y = trials(np.repeat(np.arange(N_CLASSES - 1), 8))  # class 3 never trained on
    val_x, val_y = trials(np.repeat(np.arange(N_CLASSES - 1), 3))
    test_x, test_y = trials(np.arange(N_CLASSES).repeat(2))
    train_y = train_y.copy()
    train_y[0] = -1  # an unlabelled trial is left out
    seen_rows = np.flatnonzero(test_y < N_CLASSES - 1)
    out = lc.probe_scores(train_x, train_y, val_x, val_y, test_x, test_y, seen_rows, N_CLASSES, [0.1, 1.0],
                          n_boot=30, level=0.95, seed=0)
    assert out["classes_fitted"] == [0, 1, 2]
    assert out["accuracy"]["n"] == len(seen_rows) and out["accuracy"]["value"] >= 5 / 6
    assert out["fit"]["n_train"] == len(train_y) - 1


def test_encoder_features_pool_the_real_tokens_only(rng):
    encoder = MBMAutoencoder(n_voxels=21, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                             decoder_depth=1, decoder_num_heads=2)
    fmri = rng.normal(size=(5, 19)).astype(np.float32)  # 3 tokens, the last partly padding; capacity 24
    mean = lc.encoder_features(encoder, fmri, "mean", batch_size=2)
    cls = lc.encoder_features(encoder, fmri, "cls")
    with torch.no_grad():
        latent = encoder.encode(torch.from_numpy(fmri))
    assert mean.shape == cls.shape == (5, 16)
    np.testing.assert_allclose(mean, latent[:, 1:4].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cls, latent[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        lc.encoder_features(encoder, fmri, "max")


def _synthetic_results(rng, fractions, n_stimuli=20, n_subjects=2):
    """Per-stimulus scores where pretraining gains 0.3 at the smallest share and nothing with all trials."""
    results = {}
    categories = ["seen"] * (n_stimuli - 5) + ["novel"] * 5
    for s in range(n_subjects):
        entry = {"runs": {}, "probes": {}, "n_test": {"all": n_stimuli, "seen": n_stimuli - 5, "novel": 5},
                 "problems": []}
        for fraction in fractions:
            key = lc._fraction_key(fraction)
            baseline = rng.uniform(0.2, 0.6, n_stimuli)
            gain = 0.3 * (1 - fraction) / (1 - min(fractions))
            runs = {}
            for variant, values in (("baseline", baseline), ("pretrained", np.clip(baseline + gain, 0, 1))):
                runs[variant] = {"category": categories, "score": {"per_stimulus": {"n_way_top1_mean": values.tolist()},
                                                                   "n_way": 4, "chance": 0.25}}
            entry["runs"][key] = runs
            correct = (rng.random(n_stimuli - 5) < 0.7).astype(float)
            entry["probes"][key] = {"n_train": int(100 * fraction), **{
                probe: {"correct": correct.tolist()} for probe in lc.PROBES}}
        results[f"sub-0{s + 1}"] = entry
    return results


def test_report_reads_a_larger_gain_at_few_labels_and_draws_it(rng, config, tmp_path):
    fractions = [0.1, 0.5, 1.0]
    meta = {"command": "python benchmarks/learning_curve.py", "config": "configs/test.yaml", "config_digest": "x",
            "n_way": 4, "n_samples": 2, "chance": 0.25, "wall_time_s": 60.0,
            "machine": {"cpu": "cpu", "cores": 2, "torch": torch.__version__, "torch_threads": 1, "device": "cpu"},
            "compute_s": {"finetune": 60.0, "generate": 30.0, "probes": 5.0}}
    report = lc.build_report(_synthetic_results(rng, fractions), fractions, config, meta)
    by_line = {entry["line"]: entry for entry in report["contrasts"] if entry}
    assert by_line["gain/all"]["difference"] == pytest.approx(0.3, abs=0.05)
    assert lc.verdict(by_line["gain/all"]).startswith("holds")
    assert by_line["probe-gain"]["difference"] == 0.0  # identical probes: no gain anywhere
    assert lc.verdict(by_line["probe-gain"]).startswith("not resolved")
    mean = report["series"]["mean"]["gain/seen"]["0.1"]
    assert mean["value"] == pytest.approx(0.3, abs=1e-9) and mean["n_subjects"] == 2
    text = lc.markdown(report)
    assert "## sub-01" in text and "## Mean over 2 subjects" in text and "holds" in text
    assert "| 10% | 10 |" in text
    lc.plot(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_run_config_sets_the_share_and_the_cheap_generate_keys(config):
    changed = lc.run_config(config, 0.25, 2)
    assert changed["finetune"]["train_fraction"] == 0.25 and config["finetune"]["train_fraction"] == 1.0
    assert changed["generate"]["n_samples"] == 2 and not changed["generate"]["start_row"]
    assert not changed["generate"]["lowlevel"] and changed["generate"]["attention_stimuli"] == 0
    assert lc.config_digest(changed) != lc.config_digest(config)
    with pytest.raises(Exception):
        lc.run_config(config, 1.5, 2)


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_a_tiny_results_folder(tmp_path, monkeypatch, capsys):
    """Fine-tune, decode, score and probe at two shares on tiny parts, then --resume reuses every run (~15 s)."""
    import json

    from ldm_fixtures import save_tiny_mbm, tiny_config, tiny_generator, write_synthetic_responses, \
        write_synthetic_stimuli

    from mindvis.config import dump_config
    from mindvis.models.ldm import save_generator
    from mindvis.train.classifier import train_classifier

    results = tmp_path / "results"
    (results / "sub-01" / "dcldm").mkdir(parents=True)
    stimuli = write_synthetic_stimuli(results / "stimuli.h5")
    write_synthetic_responses(results / "sub-01" / "responses.h5", stimuli)
    save_tiny_mbm(results / "pretrain" / "mbm")
    config = tiny_config(generate={"attention_stimuli": 0},
                         evaluate={"n_bootstrap": 30, "trials": 20, "fmri_classifier_C": [0.1, 1.0]})
    config["classifier"].update({"epochs": 1, "widths": [4, 8], "weights": None})
    config["ldm"]["base"] = "embedded"
    train_classifier(config, results / "stimuli.h5", results / "classifier")
    save_generator(tiny_generator(image_size=16, n_classes=3), results / "pretrain" / "ldm")
    (results / "sub-01" / "dcldm" / "dcldm.json").write_text(json.dumps({"config": config, "inputs": {
        "responses": "results/sub-01/responses.h5", "stimuli": "results/stimuli.h5", "mbm": "results/pretrain/mbm"}}))
    dump_config(config, tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "config.yaml", "--subjects", "sub-01", "--fractions", "0.5", "1", "--n-samples", "1",
            "--out", "out/lc", "--threads", "1"]
    lc.main(argv)
    report = json.loads((tmp_path / "out" / "lc.json").read_text())
    entry = report["subjects"]["sub-01"]
    assert entry["workflow_config_matches"]
    assert entry["probes"]["0.5"]["n_train"] == 9 and entry["probes"]["1"]["n_train"] == 18
    for key, n_train in (("0.5", 9), ("1", 18)):
        for variant in lc.VARIANTS:
            run = entry["runs"][key][variant]
            assert run["training"]["n_train"] == n_train  # the decoder's subset is the probes'
            assert len(run["score"]["per_stimulus"]["n_way_top1_mean"]) == 3
    assert (tmp_path / "out" / "lc.md").exists() and (tmp_path / "out" / "lc.png").exists()
    capsys.readouterr()
    lc.main(argv + ["--resume"])
    assert capsys.readouterr().out.count("done already") == 4
