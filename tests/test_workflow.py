"""End to end: `snakemake decode` on the tiny test config in a fresh directory.

This guards the main job, so it runs in CI although it is the slowest test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(ROOT / "configs/test.yaml"),
               "--cores", "2", "decode"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    return workdir


@pytest.mark.slow
def test_decode_produces_every_stage_output(finished_run):
    results = finished_run / "results"
    config = yaml.safe_load((results / "config.yaml").read_text())
    assert config["experiment"] == "test"
    assert (results / "bids/stimuli/stimuli.h5").exists()
    description = json.loads((results / "bids/dataset_description.json").read_text())
    assert description["BIDSVersion"]
    for subject in ["sub-01", "sub-02", "sub-rest01"]:
        manifest = results / f"bids/derivatives/simulation/{subject}/{subject}_desc-simulation_manifest.json"
        assert manifest.exists(), manifest
    runs = sorted((results / "bids/sub-01/func").glob("*_bold.nii.gz"))
    assert runs, "no BOLD runs written"
    assert (finished_run / "logs/stimuli.log").exists()

    from mindvis.data.responses import load_responses

    for subject in ["sub-01", "sub-02"]:
        responses = load_responses(results / subject / "responses.h5")
        assert responses.split("train").fmri.shape[0] > 0 and responses.split("test_avg").fmri.shape[0] == 10
        for model, samples in [("dcldm", "samples"), ("dcldm-baseline", "samples-baseline")]:
            assert (results / subject / model / "dcldm.safetensors").exists()
            summary = json.loads((results / subject / samples / "summary.json").read_text())
            assert summary["n_stimuli"] == 10 and summary["n_samples"] == 2
            assert 0.0 <= summary["classifier_top1_mean"] <= 1.0
            assert (results / subject / samples / "grid.png").stat().st_size > 0
    assert (results / "pretrain/rest/sub-rest01.h5").exists()
    mbm = json.loads((results / "pretrain/mbm/summary.json").read_text())
    assert mbm["stage"] and mbm["versions"]["torch"]
    assert (results / "pretrain/ldm/generator.json").exists()


@pytest.mark.slow
def test_rerun_is_a_no_op(finished_run):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(finished_run), "--configfile", str(ROOT / "configs/test.yaml"),
               "--cores", "2", "-n", "decode"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "Nothing to be done" in result.stdout + result.stderr
