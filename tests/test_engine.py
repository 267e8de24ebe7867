"""The shared training engine: schedule, optimisation, checkpoints, exact resume, best-checkpoint selection."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mindvis.errors import MindvisError
from mindvis.train.checkpoint import read_checkpoint_state
from mindvis.train.engine import TrainConfig, Trainer, lr_factor, scaled_lr


class Regression:
    """y = x @ w + noise, served through the engine's get_batch fast path."""

    def __init__(self, n_samples=48, n_features=5, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n_samples, n_features, generator=generator)
        self.y = self.x @ torch.linspace(-1, 2, n_features) + 0.1 * torch.randn(n_samples, generator=generator)

    def __len__(self):
        return len(self.y)

    def get_batch(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}


class ItemData:
    """The same data through the map-style path (__getitem__ + collate, no get_batch)."""

    def __init__(self):
        self.data = Regression()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return {"x": self.data.x[index], "y": self.data.y[index]}


class NoisyNet(nn.Module):
    """A small MLP with dropout, so that training draws random numbers every step."""

    def __init__(self, n_features=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def mse_loss(model, batch):
    error = model(batch["x"]) - batch["y"]
    return (error ** 2).mean(), {"abs_error": error.abs().mean()}


def make_trainer(out_dir, seed=0, eval_fn=None, run_config=None, inputs=None, **overrides):
    torch.manual_seed(seed)
    settings = dict(epochs=4, batch_size=8, lr=0.02, warmup_epochs=1, progress=False, seed=3)
    settings.update(overrides)
    return Trainer(NoisyNet(), Regression(), mse_loss, TrainConfig(**settings), out_dir, eval_fn=eval_fn,
                   run_config=run_config or {"experiment": "engine-test"}, inputs=inputs)


def test_lr_schedule_warms_up_then_decays_to_min():
    assert scaled_lr(1e-3, 512) == pytest.approx(2e-3)
    factors = [lr_factor(step, warmup_steps=4, total_steps=20, min_ratio=0.1) for step in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))  # monotone decay after warmup
    assert factors[20] == pytest.approx(0.1)
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_constant_schedule_keeps_the_peak_rate(tmp_path):
    """MinD-Vis's fine-tuning (configs/god_mindvis.yaml): after the warmup the rate stays at its peak."""
    factors = [lr_factor(step, warmup_steps=2, total_steps=10, schedule="constant") for step in range(11)]
    assert factors == pytest.approx([0.5, 1.0] + [1.0] * 9)
    trainer = make_trainer(tmp_path, lr=0.02, warmup_epochs=0, lr_schedule="constant")
    trainer.fit()
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([0.02] * len(
        trainer.optimizer.param_groups))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_effective_lr_uses_batch_rule(tmp_path):
    trainer = make_trainer(tmp_path, lr=None, base_lr=0.064, batch_size=4, grad_accum_steps=2)
    assert trainer.effective_batch == 8
    assert trainer.peak_lr == pytest.approx(0.064 * 8 / 256)
    assert trainer.steps_per_epoch == 48 // 8


def test_training_reduces_loss_and_logs_every_epoch(tmp_path):
    trainer = make_trainer(tmp_path, epochs=6, clip_grad_norm=5.0)
    result = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(6))
    assert lines[-1]["train/loss"] < 0.5 * lines[0]["train/loss"]
    assert {"lr", "train/grad_norm", "train/abs_error", "samples_per_s"} <= set(lines[0])
    assert result["step"] == 6 * 6 and not result["stopped_early"]


def test_checkpoint_is_pickle_free_and_complete(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.fit()
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    folder = tmp_path / "checkpoints" / latest["path"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    state = read_checkpoint_state(folder)
    assert state["step"] == 12 and state["config"] == {"experiment": "engine-test"}
    assert "torch" in state["versions"] and state["train_config"]["batch_size"] == 8
    weights = load_file(str(folder / "model.safetensors"))
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
    moments = load_file(str(folder / "optimizer.safetensors"))
    assert any(key.endswith("exp_avg_sq") for key in moments)


def _final_state(trainer):
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer = trainer.optimizer.state_dict()["state"]
    return weights, optimizer


@pytest.mark.parametrize("stop_at", [12, 9])  # at an epoch boundary and in the middle of an epoch
def test_resume_is_exact(tmp_path, stop_at):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()
    first = make_trainer(tmp_path / "split", stop_at_step=stop_at)
    partial = first.fit()
    assert partial["stopped_early"] and partial["step"] == stop_at
    # A fresh process would rebuild everything from scratch: use another init seed to prove
    # the weights come from the checkpoint.
    second = make_trainer(tmp_path / "split", seed=123)
    result = second.fit(resume=True)
    assert result["step"] == straight.step == 24
    weights_a, optim_a = _final_state(straight)
    weights_b, optim_b = _final_state(second)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-6, atol=1e-7)
    for index in optim_a:
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optim_b[index][slot], optim_a[index][slot], rtol=1e-6, atol=1e-9)
    lines_a = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda line: {k: v for k, v in line.items() if k not in ("time_s", "samples_per_s")}  # noqa: E731
    assert len(lines_b) == len(lines_a)
    for line_b, line_a in zip(lines_b, lines_a):
        assert strip(line_b) == pytest.approx(strip(line_a))


def test_resume_refuses_a_changed_schedule(tmp_path):
    make_trainer(tmp_path, stop_at_step=6).fit()
    with pytest.raises(MindvisError, match="resume with the same"):
        make_trainer(tmp_path, epochs=5).fit(resume=True)


@pytest.mark.parametrize("change", ["config", "inputs"])
def test_resume_starts_afresh_from_another_runs_checkpoint(tmp_path, change, caplog):
    """The workflow always passes --resume: a checkpoint of another config or of other input files
    (a rerun after a change) must not be continued."""
    data = tmp_path / "responses.h5"
    data.write_bytes(b"first")
    make_trainer(tmp_path / "run", stop_at_step=6, inputs=[data]).fit()
    if change == "config":
        again = make_trainer(tmp_path / "run", run_config={"experiment": "engine-test", "seed": 2}, inputs=[data])
    else:
        data.write_bytes(b"other")
        again = make_trainer(tmp_path / "run", inputs=[data])
    with caplog.at_level("WARNING", logger="mindvis.train.engine"):
        result = again.fit(resume=True)
    assert "another config or other inputs; starting afresh" in caplog.text
    assert result["step"] == 24 and len(again.history) == 4  # all four epochs trained, none inherited
    # The same config and inputs: continued.
    make_trainer(tmp_path / "same", stop_at_step=6, inputs=[data]).fit()
    resumed = make_trainer(tmp_path / "same", inputs=[data])
    caplog.clear()
    with caplog.at_level("INFO", logger="mindvis.train.engine"):
        resumed.fit(resume=True)
    assert "resumed from" in caplog.text and "at step 6 of 24" in caplog.text


def test_checkpoint_every_minutes_writes_checkpoints_between_epoch_ends(tmp_path):
    """A time limit can kill a job mid-epoch: a checkpoint by the clock leaves less to redo."""
    trainer = make_trainer(tmp_path, epochs=1, checkpoint_every_minutes=1e-9, keep_checkpoints=10)
    trainer.fit()
    steps = sorted(int(folder.name.split("-")[1]) for folder in (tmp_path / "checkpoints").glob("step-*"))
    assert steps == [1, 2, 3, 4, 5, 6]
    untimed = make_trainer(tmp_path / "untimed", epochs=1, keep_checkpoints=10)
    untimed.fit()
    assert [folder.name for folder in (tmp_path / "untimed" / "checkpoints").glob("step-*")] == ["step-00000006"]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 1)

        def forward(self, x):
            return self.layer(x).squeeze(-1)

    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        config = TrainConfig(epochs=2, batch_size=batch_size, grad_accum_steps=accum, lr=0.05, progress=False,
                             clip_grad_norm=None)
        trainer = Trainer(Linear(), Regression(), mse_loss, config, tmp_path / f"b{batch_size}")
        trainer.fit()
        results.append(trainer.model.layer.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_best_checkpoint_follows_the_validation_metric(tmp_path):
    scores = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.1}
    snapshots = {}

    def eval_fn(model, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val/score": scores[epoch]}

    trainer = make_trainer(tmp_path, eval_fn=eval_fn, select_metric="val/score", select_mode="max")
    result = trainer.fit()
    assert result["best"]["epoch"] == 1 and result["best"]["value"] == pytest.approx(0.9)
    assert read_checkpoint_state(tmp_path / "best")["best"]["epoch"] == 1
    model = trainer.load_best()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, snapshots[1][name])


def test_a_fresh_run_drops_the_previous_runs_checkpoints(tmp_path):
    make_trainer(tmp_path, eval_fn=lambda model, epoch: {"val/score": 1.0}, select_metric="val/score").fit()
    assert (tmp_path / "best").exists()
    make_trainer(tmp_path, epochs=1).fit()  # no eval: must not inherit the old best/
    assert not (tmp_path / "best").exists()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 6


def test_map_style_data_and_bf16_autocast_train(tmp_path):
    config = TrainConfig(epochs=3, batch_size=8, lr=0.02, mixed_precision="bf16", progress=False)
    torch.manual_seed(0)
    trainer = Trainer(NoisyNet(), ItemData(), mse_loss, config, tmp_path)
    result = trainer.fit()
    assert trainer.mixed_precision == "bf16"
    assert math.isfinite(result["last_metrics"]["train/loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay float32


def test_oversized_batch_is_clamped_and_diverging_loss_is_reported(tmp_path):
    trainer = make_trainer(tmp_path / "a", batch_size=1000, epochs=1)
    assert trainer.batch_size == 48 and trainer.steps_per_epoch == 1

    def nan_loss(model, batch):
        return model(batch["x"]).sum() * float("nan"), {}

    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False)
    with pytest.raises(MindvisError, match="base_lr"):
        Trainer(NoisyNet(), Regression(), nan_loss, config, tmp_path / "b").fit()


DDP_WORKER = '''
import sys
import torch
from torch import nn
from mindvis.train.engine import TrainConfig, Trainer

class Data:
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 5, generator=generator)
        self.y = self.x @ torch.linspace(-1, 2, 5)
    def __len__(self):
        return 48
    def get_batch(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}

def loss_fn(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {}

out, batch_size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = TrainConfig(epochs=2, batch_size=batch_size, lr=0.05, progress=False, clip_grad_norm=None)
trainer = Trainer(nn.Linear(5, 1), Data(), loss_fn, config, out)
result = trainer.fit()
if trainer.accelerator.is_main_process:
    torch.save({k: v.cpu() for k, v in trainer.model.state_dict().items()}, out + "/final.pt")
    print("world", trainer.world_size, "steps", result["step"])
'''


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """2 CPU processes (gloo), 4 samples each, take the same steps as 1 process: batch_size 8 is the global batch."""
    import os
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "8"], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path / "two"), "8"], env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-2000:]
    assert "world 2 steps 12" in double.stdout and "world 1 steps 12" in single.stdout
    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_max_steps_sets_the_schedule_and_ends_mid_epoch(tmp_path):
    trainer = make_trainer(tmp_path, epochs=99, max_steps=10)  # 48 samples / batch 8 = 6 steps per epoch
    assert trainer.total_steps == 10 and trainer.n_epochs == 2
    result = trainer.fit()
    assert result["step"] == 10 and result["epochs_done"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [6, 10]


def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path):
    seen = []

    def eval_fn(model, epoch):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val/loss": float(epoch)}

    straight = make_trainer(tmp_path / "straight", ema_decay=0.9, eval_fn=eval_fn, select_metric="val/loss",
                            select_mode="max")
    straight.fit()
    raw = {k: v.clone() for k, v in straight.model.state_dict().items()}
    # What eval saw is the average, not the raw weights; the raw weights are back after it.
    assert not torch.allclose(seen[-1]["net.0.weight"], raw["net.0.weight"])
    with straight.averaged_weights():
        averaged = {k: v.clone() for k, v in straight.model.state_dict().items()}
    torch.testing.assert_close(straight.model.state_dict()["net.0.weight"], raw["net.0.weight"])
    torch.testing.assert_close(averaged["net.0.weight"], seen[-1]["net.0.weight"])
    best = load_file(str(tmp_path / "straight" / "best" / "model.safetensors"))
    torch.testing.assert_close(best["net.0.weight"], averaged["net.0.weight"])  # best/ holds the average

    first = make_trainer(tmp_path / "split", ema_decay=0.9, stop_at_step=9)
    first.fit()
    assert (tmp_path / "split" / "checkpoints" / "step-00000009" / "ema.safetensors").exists()
    second = make_trainer(tmp_path / "split", ema_decay=0.9, seed=5)
    second.fit(resume=True)
    with second.averaged_weights():
        resumed = {k: v.clone() for k, v in second.model.state_dict().items()}
    for name in averaged:
        torch.testing.assert_close(resumed[name], averaged[name], rtol=1e-6, atol=1e-7)
