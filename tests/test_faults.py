"""Faults as a user meets them: a job killed mid-run and rerun, a full or read-only disk, files that do not
belong together, and two runs of one seed.

Each kill is a real SIGKILL of a child process running the stage (tests/fault_harness.py), at a point inside
the engine or a writer; the rerun is the stage called again as the workflow does (``resume=True``). On the
CPU the rerun must end bit-identical to a run never stopped: the same step count, optimiser state and final
weights.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ldm_fixtures import (one_thread, save_tiny_mbm, tiny_config,  # noqa: F401 (one_thread: autouse)
                          write_synthetic_responses, write_synthetic_stimuli)
from safetensors.torch import load_file

from mindvis.errors import MindvisError

HARNESS = Path(__file__).with_name("fault_harness.py")


def config_for_faults():
    """The test config with every training stage taking 3 optimiser steps per epoch over 2 epochs."""
    return tiny_config(mbm={"epochs": 2, "batch_size": 6, "warmup_epochs": 1})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Stimuli, responses, a tiny SC-MBM and a classifier (nothing trained here is killed)."""
    from mindvis.train.classifier import train_classifier

    root = tmp_path_factory.mktemp("faults")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5")
    write_synthetic_responses(root / "responses.h5", stimuli)
    save_tiny_mbm(root / "mbm")
    config = config_for_faults()
    train_classifier({**config, "classifier": {"epochs": 2, "widths": [4, 8]}}, root / "stimuli.h5",
                     root / "classifier")
    return {"root": root, "config": config}


def run_killed(tmp_path, call, config, kill, **kwargs):
    """Run ``call(config, **kwargs)`` in a child process that SIGKILLs itself at ``kill``; assert it was killed."""
    job = tmp_path / f"job-{kill['at']}.json"
    job.write_text(json.dumps({"call": call, "config": config, "kwargs": {k: str(v) if isinstance(v, Path) else v
                                                                         for k, v in kwargs.items()},
                               "kill": kill, "threads": 1}, default=str))
    result = subprocess.run([sys.executable, str(HARNESS), str(job)], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    assert result.returncode == -9, f"not killed (rc {result.returncode}): {result.stderr[-3000:]}"


def tensors_of(path):
    return load_file(str(path))


def assert_same_tensors(a, b, what):
    a, b = tensors_of(a), tensors_of(b)
    assert sorted(a) == sorted(b), what
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_training(reference, rerun):
    """The same final checkpoint (step count, optimiser state, weights) in two engine output folders."""
    from mindvis.train.checkpoint import latest_checkpoint, read_checkpoint_state

    ours, theirs = latest_checkpoint(rerun / "checkpoints"), latest_checkpoint(reference / "checkpoints")
    state, expected = read_checkpoint_state(ours), read_checkpoint_state(theirs)
    assert (state["step"], state["epoch"]) == (expected["step"], expected["epoch"])
    assert state["total_steps"] == expected["total_steps"]
    assert state["optimizer"]["scalars"] == expected["optimizer"]["scalars"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(ours / name, theirs / name, f"{rerun}: {name}")
    # What the killed writer left behind is never read, and the rerun cleared it.
    assert not list((rerun / "checkpoints").glob(".step-*"))


def epoch_losses(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(line["epoch"], line["step"], line["train/loss"]) for line in lines if line["epoch"] >= 0]


# -- training stages killed mid-epoch and mid-checkpoint ------------------------------------------------------

MID_EPOCH = {"at": "step", "epoch": 1, "step_in_epoch": 1}
MID_CHECKPOINT = {"at": "checkpoint", "nth": 2, "file": "optimizer.safetensors"}


@pytest.fixture(scope="module")
def mbm_reference(inputs):
    from mindvis.train.pretrain_mbm import pretrain_mbm

    root = inputs["root"]
    pretrain_mbm(inputs["config"], [root / "responses.h5"], [], root / "mbm-reference")
    return root / "mbm-reference"


@pytest.mark.parametrize("kill", [MID_EPOCH, MID_CHECKPOINT], ids=["mid-epoch", "mid-checkpoint"])
def test_sc_mbm_killed_and_rerun_equals_an_uninterrupted_run(inputs, mbm_reference, tmp_path, kill):
    from mindvis.train.pretrain_mbm import pretrain_mbm

    root, out = inputs["root"], tmp_path / "mbm"
    run_killed(tmp_path, "mindvis.train.pretrain_mbm:pretrain_mbm", inputs["config"], {**kill, "trainer": "mbm"},
               responses=[str(root / "responses.h5")], rest=[], out_dir=str(out), resume=True)
    assert not (out / "summary.json").exists()  # the next stage's input is not there yet
    pretrain_mbm(inputs["config"], [root / "responses.h5"], [], out, resume=True)
    assert_same_training(mbm_reference, out)
    assert_same_tensors(out / "diffusion_pytorch_model.safetensors",
                        mbm_reference / "diffusion_pytorch_model.safetensors", "SC-MBM weights")
    assert epoch_losses(out) == epoch_losses(mbm_reference)


@pytest.fixture(scope="module")
def prior_reference(inputs):
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root = inputs["root"]
    pretrain_ldm(inputs["config"], root / "stimuli.h5", root / "ldm", classifier_dir=root / "classifier")
    return root / "ldm"


@pytest.mark.parametrize("kill", [{**MID_EPOCH, "trainer": "train_unet"}, {**MID_CHECKPOINT, "trainer": "train_vae"}],
                         ids=["unet-mid-epoch", "vae-mid-checkpoint"])
def test_prior_killed_and_rerun_equals_an_uninterrupted_run(inputs, prior_reference, tmp_path, kill):
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root, out = inputs["root"], tmp_path / "ldm"
    run_killed(tmp_path, "mindvis.train.pretrain_ldm:pretrain_ldm", inputs["config"], kill,
               stimuli=str(root / "stimuli.h5"), out_dir=str(out), classifier_dir=str(root / "classifier"),
               resume=True)
    assert not (out / "metrics.json").exists()
    pretrain_ldm(inputs["config"], root / "stimuli.h5", out, classifier_dir=root / "classifier", resume=True)
    for phase in ("train_vae", "train_unet"):
        assert_same_training(prior_reference / phase, out / phase)
    for part in ("vae", "unet"):
        assert_same_tensors(out / part / "diffusion_pytorch_model.safetensors",
                            prior_reference / part / "diffusion_pytorch_model.safetensors", part)


@pytest.fixture(scope="module")
def decoder_reference(inputs, prior_reference):
    from mindvis.train.finetune import finetune

    root = inputs["root"]
    finetune(inputs["config"], "sub-01", root / "responses.h5", root / "stimuli.h5", prior_reference,
             root / "dcldm", mbm_dir=root / "mbm")
    return root / "dcldm"


@pytest.mark.parametrize("kill", [MID_EPOCH, MID_CHECKPOINT], ids=["mid-epoch", "mid-checkpoint"])
def test_finetune_killed_and_rerun_equals_an_uninterrupted_run(inputs, prior_reference, decoder_reference, tmp_path,
                                                               kill):
    from mindvis.train.finetune import finetune

    root, out = inputs["root"], tmp_path / "dcldm"
    run_killed(tmp_path, "mindvis.train.finetune:finetune", inputs["config"], {**kill, "trainer": "train"},
               subject="sub-01", responses=str(root / "responses.h5"), stimuli=str(root / "stimuli.h5"),
               base=str(prior_reference), out_dir=str(out), mbm_dir=str(root / "mbm"), resume=True)
    assert not (out / "dcldm.json").exists()
    finetune(inputs["config"], "sub-01", root / "responses.h5", root / "stimuli.h5", prior_reference, out,
             mbm_dir=root / "mbm", resume=True)
    assert_same_training(decoder_reference / "train", out / "train")
    assert_same_tensors(out / "dcldm.safetensors", decoder_reference / "dcldm.safetensors", "decoder weights")
    rerun, reference = (json.loads((f / "dcldm.json").read_text()) for f in (out, decoder_reference))
    untimed = [{k: v for k, v in meta["final_metrics"].items() if k not in ("time_s", "samples_per_s")}
               for meta in (rerun, reference)]
    assert rerun["best"] == reference["best"] and untimed[0] == untimed[1]


# -- writers killed mid-write: nothing half-written where the next stage reads ---------------------------------

def test_preprocess_killed_mid_write_leaves_the_old_responses_and_reruns(tmp_path):
    from mindvis.config import validate
    from mindvis.preprocess.run import preprocess_subject
    from mindvis.preprocess.synthetic import make_synthetic_bids

    data = make_synthetic_bids(tmp_path / "bids", shape=(5, 6, 4), n_classes=2, n_train_per_class=4, n_test=2,
                               n_repeats=2, trials_per_run=4, seed=2)
    config = validate({"seed": 3})
    out = tmp_path / "sub-01" / "responses.h5"
    preprocess_subject(config, data.bids_dir, "sub-01", out)
    before = out.read_bytes()
    run_killed(tmp_path, "mindvis.preprocess.run:preprocess_subject", config, {"at": "dataset", "nth": 4,
                                                                               "file": "responses.h5"},
               bids_dir=str(data.bids_dir), subject="sub-01", out_path=str(out))
    assert out.read_bytes() == before  # the older file, whole; the half-written one is a hidden temporary
    leftovers = list(out.parent.glob(".responses.h5.*"))
    assert leftovers, "the kill came before the write it was meant to interrupt"
    preprocess_subject(config, data.bids_dir, "sub-01", out)
    assert not list(out.parent.glob(".responses.h5.*"))  # the rerun cleared what the killed one left
    from mindvis.data.responses import load_responses

    again, first = load_responses(out), None
    with h5py.File(out) as handle:
        first = {name: handle[f"{name}/fmri"][:] for name in ("train", "val", "test")}
    assert all(np.array_equal(again[name].fmri, first[name]) for name in first)


@pytest.fixture(scope="module")
def samples_reference(inputs, decoder_reference):
    from mindvis.generate.run import generate_subject

    root = inputs["root"]
    generate_subject(inputs["config"], "sub-01", decoder_reference, root / "responses.h5", root / "stimuli.h5",
                     root / "samples", classifier_dir=root / "classifier")
    return root / "samples"


def test_generate_killed_mid_write_leaves_no_samples_and_reruns(inputs, decoder_reference, samples_reference,
                                                                tmp_path):
    from mindvis.generate.run import generate_subject

    root, out = inputs["root"], tmp_path / "samples"
    run_killed(tmp_path, "mindvis.generate.run:generate_subject", inputs["config"],
               {"at": "dataset", "nth": 3, "file": "samples.h5"}, subject="sub-01", model_dir=str(decoder_reference),
               responses=str(root / "responses.h5"), stimuli=str(root / "stimuli.h5"), out_dir=str(out),
               classifier_dir=str(root / "classifier"))
    assert not (out / "samples.h5").exists() and not (out / "summary.json").exists()
    generate_subject(inputs["config"], "sub-01", decoder_reference, root / "responses.h5", root / "stimuli.h5", out,
                     classifier_dir=root / "classifier")
    with h5py.File(out / "samples.h5") as ours, h5py.File(samples_reference / "samples.h5") as theirs:
        assert np.array_equal(ours["samples"][:], theirs["samples"][:])
    assert not list(out.glob(".samples.h5.*"))


def _evaluate(config, root, samples, out_dir):
    from mindvis.evaluate.run import evaluate_subject

    return evaluate_subject(config, "sub-01", root / "responses.h5", root / "stimuli.h5", samples, root / "ldm",
                            out_dir, classifier_dir=root / "classifier")


def test_evaluate_killed_before_its_rename_leaves_the_old_metrics_and_reruns(inputs, samples_reference, tmp_path):
    root, out = inputs["root"], tmp_path / "evaluation"
    _evaluate(inputs["config"], root, samples_reference / "samples.h5", out)
    before = (out / "metrics.json").read_bytes()
    run_killed(tmp_path, "mindvis.evaluate.run:evaluate_subject", inputs["config"],
               {"at": "rename", "file": "metrics.json"}, subject="sub-01", responses=str(root / "responses.h5"),
               stimuli=str(root / "stimuli.h5"), samples=str(samples_reference / "samples.h5"), base=str(root / "ldm"),
               out_dir=str(out), classifier_dir=str(root / "classifier"))
    assert (out / "metrics.json").read_bytes() == before
    # The folder is replaced as a unit: the kill left this run's complete folder unswapped beside the old one.
    assert list(tmp_path.glob(".evaluation-new-*/.metrics.json.*"))
    _evaluate(inputs["config"], root, samples_reference / "samples.h5", out)
    assert untimed(out / "metrics.json") == untimed_text(before)
    assert not list(tmp_path.glob(".evaluation-*")) and not list(out.glob(".metrics.json.*"))


def test_evaluate_on_a_real_full_disk_keeps_the_previous_folder_whole(inputs, samples_reference, tmp_path):
    """A small tmpfs (real ENOSPC): evaluate's folder (metrics.json, the ridge and base-ceiling rows' samples.h5 and
    grids) is replaced as a unit, so a full disk leaves the previous evaluation whole and no temporary beside it."""
    from ldm_fixtures import fill_filesystem, small_filesystem

    root = inputs["root"]
    _evaluate(inputs["config"], root, samples_reference / "samples.h5", tmp_path / "previous")
    config = _config_file(inputs["config"], tmp_path)
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        out = disk / "evaluation"
        shutil.copytree(tmp_path / "previous", out)
        before = {str(p.relative_to(disk)): p.read_bytes() for p in sorted(disk.rglob("*")) if p.is_file()}
        assert {"metrics.json", "ridge/samples.h5", "base-ceiling/grid.png"} <= {k[len("evaluation/"):] for k in before}
        fill_filesystem(disk, 16 << 10)
        result = _cli("evaluate", "--config", config, "--subject", "sub-01", "--responses", root / "responses.h5",
                      "--stimuli", root / "stimuli.h5", "--samples", samples_reference / "samples.h5", "--base",
                      root / "ldm", "--classifier", root / "classifier", "--out-dir", out)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("mindvis: error: ")]
        assert len(lines) == 1 and "disk is full" in lines[0] and f"{out}/" in lines[0], result.stderr[-3000:]
        (disk / "filler").unlink()
        after = {str(p.relative_to(disk)): p.read_bytes() for p in sorted(disk.rglob("*")) if p.is_file()}
        assert after == before, "a failed evaluate changed the previous evaluation"
        assert not list(disk.rglob(".*")), "temporaries left on the full disk"


TIMINGS = ("timings_s", "wall_time_s", "time_s", "samples_per_s", "sampling_s", "images_per_s", "throughput")


def untimed_text(text, root=None):
    """A results JSON without its timings (and with ``root`` written as <root>), for comparing two runs."""
    text = text.decode() if isinstance(text, bytes) else text
    if root is not None:
        text = text.replace(str(Path(root).resolve()), "<root>").replace(str(root), "<root>")

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(json.loads(text))


def untimed(path, root=None):
    return untimed_text(Path(path).read_text(), root)


# -- one seed, two runs ----------------------------------------------------------------------------------------

def test_two_runs_from_scratch_with_one_seed_give_identical_metrics(inputs, mbm_reference, samples_reference,
                                                                    tmp_path):
    """Stimuli, responses, classifier, SC-MBM, prior, decoder, samples and evaluation, twice, on the CPU."""
    from mindvis.generate.run import generate_subject
    from mindvis.train.classifier import train_classifier
    from mindvis.train.finetune import finetune
    from mindvis.train.pretrain_ldm import pretrain_ldm
    from mindvis.train.pretrain_mbm import pretrain_mbm

    first, config = inputs["root"], inputs["config"]
    _evaluate(config, first, samples_reference / "samples.h5", first / "evaluation-first")
    second = tmp_path / "second"
    stimuli = write_synthetic_stimuli(second / "stimuli.h5")
    write_synthetic_responses(second / "responses.h5", stimuli)
    train_classifier({**config, "classifier": {"epochs": 2, "widths": [4, 8]}}, second / "stimuli.h5",
                     second / "classifier")
    pretrain_mbm(config, [second / "responses.h5"], [], second / "mbm-reference")
    save_tiny_mbm(second / "mbm")
    pretrain_ldm(config, second / "stimuli.h5", second / "ldm", classifier_dir=second / "classifier")
    finetune(config, "sub-01", second / "responses.h5", second / "stimuli.h5", second / "ldm", second / "dcldm",
             mbm_dir=second / "mbm")
    generate_subject(config, "sub-01", second / "dcldm", second / "responses.h5", second / "stimuli.h5",
                     second / "samples", classifier_dir=second / "classifier")
    _evaluate(config, second, second / "samples" / "samples.h5", second / "evaluation-first")
    # Every number, and the SHA-256 of every input and model file the evaluation recorded, is the same (of the
    # files that record their own paths or timings, the arrays are compared instead).
    ours, theirs = (untimed(root / "evaluation-first/metrics.json", root) for root in (second, first))
    recorded = [{name: digest for name, digest in metrics.pop("inputs").items()
                 if not name.endswith(("metrics.json", "samples.h5"))} for metrics in (ours, theirs)]
    assert ours == theirs and recorded[0] == recorded[1] and len(recorded[0]) >= 10
    with h5py.File(second / "samples/samples.h5") as a, h5py.File(first / "samples/samples.h5") as b:
        assert np.array_equal(a["samples"][:], b["samples"][:])
    assert untimed(second / "mbm-reference/summary.json", second) == untimed(first / "mbm-reference/summary.json",
                                                                             first)


# -- a decoder and responses that do not belong together -------------------------------------------------------

def _responses_like(path, source, permute=False, drop=0):
    """A copy of ``source``'s responses with its voxels reordered or some dropped."""
    from mindvis.data.responses import load_responses, write_responses

    data = load_responses(source)
    order = np.arange(data.n_voxels)
    if permute:
        order = np.random.default_rng(0).permutation(order)
    order = order[: data.n_voxels - drop]
    splits = {name: dataclasses.replace(split, fmri=split.fmri[:, order]) for name, split in data.splits.items()}
    write_responses(path, splits=splits, voxel_ijk=data.voxel_ijk[order], affine=data.affine,
                    volume_shape=data.volume_shape, voxel_roi=data.voxel_roi[order], class_names=data.class_names,
                    tr=data.tr, subject="sub-01", method="synthetic", preprocess_config={}, config={},
                    input_hashes={})
    return path


@pytest.mark.parametrize("change, message", [({"drop": 3}, "34 voxels, but the decoder"),
                                             ({"permute": True}, "another voxels")],
                         ids=["voxel-count", "voxel-order"])
def test_generate_refuses_responses_the_decoder_was_not_fitted_on(inputs, decoder_reference, tmp_path, change,
                                                                  message):
    from mindvis.generate.run import generate_subject

    root = inputs["root"]
    other = _responses_like(tmp_path / "responses.h5", root / "responses.h5", **change)
    with pytest.raises(MindvisError, match=message) as caught:
        generate_subject(inputs["config"], "sub-01", decoder_reference, other, root / "stimuli.h5",
                         tmp_path / "samples")
    assert caught.value.path == other and caught.value.key == "voxel_ijk" and "fine-tune" in caught.value.fix
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "samples").exists()


def test_a_changed_checkpoint_file_is_refused_where_the_next_stage_loads_it(inputs, decoder_reference, tmp_path):
    import shutil

    from mindvis.models.dcldm import load_dcldm
    from mindvis.models.ldm import load_generator

    decoder = tmp_path / "dcldm"
    shutil.copytree(decoder_reference, decoder)
    weights = decoder / "dcldm.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))  # same size, other content
    with pytest.raises(MindvisError, match="SHA-256") as caught:
        load_dcldm(decoder)
    assert caught.value.path == weights and caught.value.key == "sha256.dcldm.safetensors"
    prior = tmp_path / "ldm"
    shutil.copytree(inputs["root"] / "ldm", prior)
    (prior / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MindvisError, match="missing"):
        load_generator(prior)
    (prior / "generator.json").write_text(json.dumps({"incomplete": True}))
    with pytest.raises(MindvisError, match="did not finish"):
        load_generator(prior)


# -- a full disk and a read-only results folder ----------------------------------------------------------------

def _cli(*args, cwd=None, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "mindvis.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn)


def _file_size_limit(limit):
    """A child's file-size limit: writes past ``limit`` bytes fail (EFBIG), as on a full disk (ENOSPC)."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_clear_error_and_loses_nothing(inputs, decoder_reference, samples_reference, tmp_path):
    root, out = inputs["root"], tmp_path / "samples"
    out.mkdir()
    (out / "samples.h5").write_bytes(b"the previous run's samples")
    result = _cli("generate", "--config", _config_file(inputs["config"], tmp_path), "--subject", "sub-01",
                  "--model-dir", decoder_reference, "--responses", root / "responses.h5", "--stimuli",
                  root / "stimuli.h5", "--out-dir", out, preexec_fn=_file_size_limit(2000))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mindvis: error: ") and "Traceback" not in result.stderr
    assert "disk" in line and "Fix:" in line
    assert (out / "samples.h5").read_bytes() == b"the previous run's samples"
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary left behind


def test_a_read_only_results_folder_is_one_clear_error(inputs, decoder_reference, tmp_path, monkeypatch, capsys):
    from mindvis import cli

    root, out = inputs["root"], tmp_path / "samples"
    config = _config_file(inputs["config"], tmp_path)
    out.mkdir()
    (out / "summary.json").write_text("{}")
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: fail the temporary file as a read-only mount would
        import tempfile

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    try:
        code = cli.main(["generate", "--config", str(config), "--subject", "sub-01", "--model-dir",
                         str(decoder_reference), "--responses", str(root / "responses.h5"), "--stimuli",
                         str(root / "stimuli.h5"), "--out-dir", str(out)])
    finally:
        out.chmod(0o755)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("mindvis: error: ") and "read-only" in line and "Fix:" in line
    assert str(out) in line
    assert (out / "summary.json").read_text() == "{}"
    assert not [p for p in out.rglob(".*") if p.is_file()]


def _config_file(config, tmp_path):
    from mindvis.config import dump_config

    path = tmp_path / "config.yaml"
    dump_config(config, path)
    return path
