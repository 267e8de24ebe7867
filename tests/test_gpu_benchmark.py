"""benchmarks/gpu.py: the skip line without CUDA, and every code path in tiny mode on the CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
_SPEC = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu)

HAS_COMPVIS = importlib.util.find_spec("mindvis.models.compvis") is not None


def _state(path):
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.parametrize("use_out", [False, True], ids=["no-arguments", "tmp-out"])
def test_without_cuda_prints_the_skip_line_and_writes_nothing(monkeypatch, capsys, tmp_path, use_out):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = [gpu.RESULTS / "gpu.json", gpu.RESULTS / "gpu.md"]
    before = [_state(path) for path in results]
    out = tmp_path / "out"
    assert gpu.main(["--out", str(out)] if use_out else []) == 0
    assert capsys.readouterr().out == (f"gpu benchmark skipped: no CUDA device (torch {torch.__version__}, "
                                       "cuda available: False)\n")
    assert not out.exists()
    assert [_state(path) for path in results] == before


def test_cpu_without_tiny_is_refused():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--device", "cpu"])


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    # One thread: the test machine's cores are shared; no CUDA, so a GPU CI machine runs the same CPU path.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), run.stdout


def test_tiny_cpu_run_measures_every_case(tiny_report):
    report, page, stdout = tiny_report
    names = [model["name"] for model in report["models"]]
    assert names == ["sd15", "cin256"]
    assert report["tiny"] and report["precision"] == "no"
    expected = {"sd15"} | ({"cin256"} if HAS_COMPVIS else set())
    for name in expected:
        model = next(m for m in report["models"] if m["name"] == name)
        assert 0 < model["parameters"]["trained_default"] < model["parameters"]["total"]
        cases = [case for case in report["cases"] if case["model"] == name]
        finetune = [case for case in cases if case["work"] == "finetune" and case["optimizer"] == "adamw"]
        assert {case["gradient_checkpointing"] for case in finetune} == {False, True}
        for case in finetune:
            assert case["error"] is None and case["it_per_s"] > 0 and case["images_per_s"] > 0
            assert case["params_without_grad"] == 0 and math.isfinite(case["last_loss"])
            assert case["peak_memory_gib"] is None
            assert case["context_shape"][1:] == [77, model["unet_config"]["cross_attention_dim"]]
            assert case["class_labels_shape"][1] == model["pooled_width"]
        for case in cases:
            if case.get("optimizer") == "adamw8bit":
                assert case["error"] in ("not installed", "needs CUDA")
        sampling = [case for case in cases if case["work"] == "sample"]
        assert sampling and all(case["error"] is None and case["images_per_s"] > 0 for case in sampling)
    sd_sampling = {(case["sampler"], case["decode"]) for case in report["cases"]
                   if case["model"] == "sd15" and case["work"] == "sample"}
    assert sd_sampling == {("ddim", "SD VAE")}
    if HAS_COMPVIS:
        cin_samplers = {case["sampler"] for case in report["cases"]
                        if case["model"] == "cin256" and case["work"] == "sample"}
        assert cin_samplers == {"ddim", "plms"}
    else:
        assert report["models"][1]["error"] == "mindvis.models.compvis not available"
    assert "| UNet | image (latent) | batch | optimizer |" in page and "no VQ decode" in page
    assert "[gpu] done" in stdout


def test_out_of_memory_is_recorded_and_the_run_goes_on(capsys):
    import torch

    def measure():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    module = torch.nn.Linear(3, 2)
    module(torch.ones(1, 3)).sum().backward()
    case = {"model": "sd15", "work": "sample", "image_size": 512, "batch": 4, "sampler": "ddim", "num_steps": 50}
    result = gpu.run_case(case, measure, torch.device("cpu"), [module])
    assert result["error"] == "out of memory" and result["image_size"] == 512
    assert module.weight.grad is None
    assert "sd15 sample 512 px batch 4 ddim-50: out of memory" in capsys.readouterr().out


def test_markdown_names_the_gpu(tiny_report):
    report = json.loads(json.dumps(tiny_report[0]))
    report["machine"].update({"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.1, "compute_capability": "9.0",
                              "cuda": "12.6", "driver": "560.35.03"})
    report["cases"][0].update({"error": "out of memory"})
    page = gpu.markdown(report)
    assert "NVIDIA H100 80GB HBM3, 79.1 GiB (compute capability 9.0); CUDA 12.6, driver 560.35.03" in page
    assert "| out of memory |" in page
