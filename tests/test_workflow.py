"""End to end: `snakemake decode` on the tiny test config in a fresh directory.

This guards the main job, so it runs in CI although it is the slowest test.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _decode(workdir):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(ROOT / "configs/test.yaml"),
               "--cores", "2", "decode"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    return workdir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return _decode(tmp_path_factory.mktemp("workflow"))


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
    for subject in ["sub-01", "sub-02"]:
        page = (results / subject / "report.html").read_text()
        assert "<script" not in page and 'src="http' not in page and "DC-LDM (SC-MBM pretrained)" in page
        for figure in ["grid", "per_class", "confusion", "curves", "attention", "brain_map"]:
            assert (results / subject / "report" / f"{figure}.png").stat().st_size > 0
    table = pd.read_csv(results / "summary.csv", index_col="subject")
    assert list(table.index) == ["sub-01", "sub-02", "mean"]
    assert table.loc["mean", "dcldm/n_way_top1_mean"] == pytest.approx(
        table.loc[["sub-01", "sub-02"], "dcldm/n_way_top1_mean"].mean(), abs=1e-5)
    assert "summary" in (results / "summary.html").read_text()


@pytest.mark.slow
def test_report_opens_in_a_browser_with_the_metrics_numbers(finished_run):
    from test_report import check_report_in_browser

    subject = finished_run / "results/sub-01"
    metrics = json.loads((subject / "evaluation/metrics.json").read_text())
    n_images, n_cells = check_report_in_browser(subject / "report.html", metrics)
    assert n_images >= 6 and n_cells >= 10


@pytest.mark.slow
def test_snakemake_report_collects_the_figures(finished_run):
    command = [sys.executable, "-m", "snakemake", "decode", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(finished_run), "--configfile", str(ROOT / "configs/test.yaml"),
               "--report", "report.zip"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(finished_run / "report.zip") as archive:
        files = [Path(name).name for name in archive.namelist() if "/data/raw/" in name]
        index = archive.read("report/report.html").decode()
    # Snakemake stores each file under a hashed folder by its name: 8 per subject, and the two summary files.
    figures = ["report.html", "grid.png", "per_class.png", "confusion.png", "curves.png", "attention.png",
               "brain_map.png", "brain_map_voxel_path.png"]
    assert sorted(files) == sorted(figures * 2 + ["summary.csv", "summary.html"])
    assert '"sub-01"' in index and '"sub-02"' in index and "brain map (attention-based)" in index


@pytest.mark.slow
def test_quickstart_notebook_runs_on_the_finished_run(finished_run):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks/quickstart.ipynb", as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    parameters.source = f"RESULTS = {str(finished_run / 'results')!r}\nSUBJECT = 'sub-02'"
    NotebookClient(notebook, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": str(finished_run)}}).execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "decoded 2 images" in outputs and "sub-02: n = 10 stimuli" in outputs
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= 3


@pytest.mark.slow
def test_rerun_is_a_no_op(finished_run):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(finished_run), "--configfile", str(ROOT / "configs/test.yaml"),
               "--cores", "2", "-n", "decode"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "Nothing to be done" in result.stdout + result.stderr


#: The parts of metrics.json that are results (the rest records paths, timings and versions).
RESULT_KEYS = ("rows", "per_stimulus", "per_class", "confusion", "stimulus_ids", "labels", "n_way", "classifier")


@pytest.mark.slow
def test_a_second_fresh_run_gives_identical_metrics(finished_run, tmp_path):
    """Same seed, same machine, another fresh directory: every metric, interval and per-stimulus value equal."""
    again = _decode(tmp_path / "again")
    for subject in ["sub-01", "sub-02"]:
        first, second = (json.loads((run / "results" / subject / "evaluation/metrics.json").read_text())
                         for run in (finished_run, again))
        for key in RESULT_KEYS:
            assert first[key] == second[key], f"{subject}: metrics.json '{key}' differs between two fresh runs"
    for weights in ["pretrain/ldm/vae/diffusion_pytorch_model.safetensors",
                    "pretrain/ldm/unet/diffusion_pytorch_model.safetensors", "sub-01/dcldm/dcldm.safetensors"]:
        assert (finished_run / "results" / weights).read_bytes() == (again / "results" / weights).read_bytes(), weights


def test_the_default_config_uses_the_shipped_prior_and_classifier(tmp_path):
    """configs/default.yaml trains neither: its DAG has no pretrain_ldm or train_classifier job."""
    command = [sys.executable, "-m", "snakemake", "decode", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(tmp_path), "--cores", "2", "-n", "--quiet", "rules",
               "--configfile", str(ROOT / "configs/default.yaml")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = result.stdout + result.stderr
    assert "finetune" in jobs and "generate" in jobs and "evaluate" in jobs
    assert "pretrain_ldm" not in jobs and "train_classifier" not in jobs
