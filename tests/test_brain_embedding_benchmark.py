"""The brain -> embedding benchmark's pieces on tiny synthetic data (benchmarks/brain_embedding.py).

No results folder: the arms' fit and predict where the target depends linearly on the input, the metrics, the
losses, one synthetic subject through every arm, the aggregation and the Markdown.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindvis.models.linear import identification

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "brain_embedding.py"
_SPEC = importlib.util.spec_from_file_location("brain_embedding", _PATH)
be = importlib.util.module_from_spec(_SPEC)
sys.modules["brain_embedding"] = be  # dataclasses resolve the module's annotations through sys.modules
_SPEC.loader.exec_module(be)

N_CLASSES = 5
TINY = be.MLPSettings(width=32, n_blocks=2, epochs=8, batch_size=16, lr=3e-3)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _linear_subject(rng, n_train=150, n_val=40, n_test=30, n_voxels=23, n_tokens=17, dim=12, noise=0.3):
    """A subject whose targets are a linear map of its voxels (tokens: another noisy linear view of them)."""
    sizes = {"train": n_train, "val": n_val, "test_avg": n_test}
    weight = rng.normal(size=(n_voxels, dim))
    mixing = rng.normal(size=(n_voxels, n_tokens))
    voxels = {split: rng.normal(size=(n, n_voxels)) for split, n in sizes.items()}
    targets = {split: x @ weight + noise * rng.normal(size=(len(x), dim)) for split, x in voxels.items()}
    tokens = {split: x @ mixing + noise * rng.normal(size=(len(x), n_tokens)) for split, x in voxels.items()}
    labels = np.arange(n_test) % N_CLASSES
    return {"voxels": voxels, "tokens": tokens, "targets": targets, "labels": labels.tolist(),
            "category": ["novel" if label >= 3 else "seen" for label in labels],
            "stimulus_ids": [f"test-{i:04d}" for i in range(n_test)],
            "sizes": {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_voxels": n_voxels,
                      "n_token_features": n_tokens, "embedding_dim": dim}}


def test_identification_per_stimulus_is_the_projects_identification_row_by_row(rng):
    decoded, truth = rng.normal(size=(19, 3, 4)), rng.normal(size=(19, 3, 4))
    per_stimulus = be.identification_per_stimulus(decoded, truth)
    assert per_stimulus.shape == (19,) and ((per_stimulus >= 0) & (per_stimulus <= 1)).all()
    assert per_stimulus.mean() == pytest.approx(identification(decoded, truth))
    np.testing.assert_allclose(be.identification_per_stimulus(truth, truth), 1.0)


def test_test_metrics_are_per_stimulus_and_perfect_on_the_truth(rng):
    truth = rng.normal(size=(11, 6))
    metrics = be.test_metrics(truth * 2 + 1, truth)  # an offset and scale common to the set change nothing
    assert set(metrics) == set(be.METRICS)
    for values in metrics.values():
        assert values.shape == (11,)
        np.testing.assert_allclose(values, 1.0)


def test_ridge_arms_recover_a_linear_map_and_the_shuffled_floor_does_not(rng):
    subject = _linear_subject(rng)
    blocks = be.standardised_inputs(subject)
    for name, (train, val, test) in blocks.items():
        assert train.shape[0] == 150 and val.shape[0] == 40 and test.shape[0] == 30, name
        np.testing.assert_allclose(train.mean(0), 0, atol=1e-9)
    truth = subject["targets"]["test_avg"]
    scores = {}
    for arm in ("ridge-voxels", "ridge-tokens", "ridge-both", "ridge-voxels-shuffled"):
        predicted, record = be.run_arm(arm, blocks, subject["targets"], 0, TINY)
        assert predicted.shape == truth.shape
        assert record["alpha"] in be.RIDGE_ALPHAS
        scores[arm] = identification(predicted, truth)
    assert scores["ridge-voxels"] > 0.95 and scores["ridge-both"] > 0.95 and scores["ridge-tokens"] > 0.8
    assert abs(scores["ridge-voxels-shuffled"] - 0.5) < 0.2
    _, record = be.run_arm("ridge-both", blocks, subject["targets"], 0, TINY)
    assert record["voxel_weight"] in be.VOXEL_BLOCK_WEIGHTS
    assert set(record["val_identification_per_weight"]) == {str(w) for w in be.VOXEL_BLOCK_WEIGHTS}


@pytest.mark.parametrize("loss", ["mse", "nce", "mixco"])
def test_mlp_learns_above_chance_keeps_its_best_val_epoch_and_is_seeded(rng, loss):
    torch.set_num_threads(1)
    subject = _linear_subject(rng)
    blocks = be.standardised_inputs(subject)
    (x_train, x_val, x_test), targets = blocks["voxels"], subject["targets"]
    predict, record = be.train_mlp(x_train, targets["train"], x_val, targets["val"], loss, TINY, seed=3)
    assert identification(predict(x_test), targets["test_avg"]) > 0.7
    history = [h["val_identification"] for h in record["history"]]
    assert len(history) == TINY.epochs and record["val_identification"] == max(history)
    assert record["best_epoch"] == 1 + int(np.argmax(history))
    np.testing.assert_allclose(identification(predict(x_val), targets["val"]), record["val_identification"])
    again, _ = be.train_mlp(x_train, targets["train"], x_val, targets["val"], loss, TINY, seed=3)
    np.testing.assert_array_equal(predict(x_test), again(x_test))


def test_mlp_patience_stops_early(rng):
    subject = _linear_subject(rng, noise=50.0)  # nothing to learn: val identification wanders
    blocks = be.standardised_inputs(subject)
    settings = be.MLPSettings(width=16, epochs=40, batch_size=32, patience=2, lr=1e-2)
    _, record = be.train_mlp(blocks["voxels"][0], subject["targets"]["train"], blocks["voxels"][1],
                             subject["targets"]["val"], "mse", settings, seed=0)
    assert record["epochs_run"] < 40 and record["epochs_run"] - record["best_epoch"] == 2


def test_contrastive_losses_reduce_to_each_other_without_mixing():
    generator = torch.Generator().manual_seed(0)
    predicted, target = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    unmixed = torch.ones(8)
    assert be.mixco_nce(predicted, target, torch.randperm(8, generator=generator), unmixed, 0.1).item() == \
        pytest.approx(be.symmetric_infonce(predicted, target, 0.1).item(), rel=1e-6)
    # SoftCLIP's soft targets are one-hot when the true embeddings are orthogonal and the temperature small: InfoNCE.
    orthogonal = torch.eye(8)
    predicted = torch.randn(8, 8, generator=generator)
    assert be.soft_clip(predicted, orthogonal, 0.01).item() == pytest.approx(
        be.symmetric_infonce(predicted, orthogonal, 0.01).item(), rel=1e-5)
    features = torch.randn(6, 4, generator=generator)
    torch.manual_seed(1)
    mixed, perm, betas, chosen = be.mixco(features, 0.15, 0.0)
    assert not chosen.any() and torch.equal(betas, torch.ones(6)) and torch.allclose(mixed, features)
    torch.manual_seed(1)
    mixed, perm, betas, chosen = be.mixco(features, 0.15, 1.0)
    assert chosen.all() and not torch.allclose(mixed, features)
    np.testing.assert_allclose(mixed.numpy(), (betas[:, None] * features + (1 - betas[:, None]) * features[perm]).numpy(),
                               rtol=1e-6)


def test_one_subject_through_every_arm_aggregates_and_reports(rng):
    torch.set_num_threads(1)
    arms = list(be.ARMS)
    results = {"sub-a": be.run_subject(_linear_subject(rng), arms, [0, 1], TINY),
               "sub-b": be.run_subject(_linear_subject(rng, n_test=25), arms, [0, 1], TINY)}
    cell = results["sub-a"]["arms"]
    for arm in arms:
        n_rows = 2 if be.ARMS[arm][0] == "mlp" else 1
        for metric in be.METRICS:
            assert np.asarray(cell[arm]["per_stimulus"][metric]).shape == (n_rows, 30)
    tables = be.aggregate(results, arms, n_boot=30)
    assert set(tables) == {"sub-a", "sub-b", "mean"}
    mean = tables["mean"]
    summary = mean["rows"]["identification"]["all"]["ridge-voxels"]
    assert summary["value"] > 0.9 and summary["n_stimuli"] == [30, 25] and summary["n_seeds"] == [1, 1]
    assert mean["rows"]["identification"]["novel"]["mlp-nce-voxels"]["n_stimuli"] == [12, 10]
    assert mean["rows"]["brain_to_image"]["seen"]["mlp-mse-voxels"]["n_seeds"] == [2, 2]
    low, high = mean["rows"]["identification"]["all"][be.FLOOR]["ci"]
    assert low <= mean["rows"]["identification"]["all"][be.FLOOR]["value"] <= high
    assert be.REFERENCE not in mean["differences"]["identification"]["all"]
    assert mean["differences"]["identification"]["all"][be.FLOOR]["below_zero"]
    report = {"meta": {"command": "python benchmarks/brain_embedding.py", "machine": {"cpu": "test", "cores": 1},
                       "wall_time_s": 1.0, "load_s": 0.0, "decoder": "dcldm/start", "prior": "prior", "arms": arms,
                       "seeds": [0, 1]},
              "aggregate": tables, "results": results}
    text = be.markdown(report)
    assert "## mean of 2 subjects" in text and "mlp-mixco-voxels" in text and "wins" in text
