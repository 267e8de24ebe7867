"""End to end: `snakemake decode` on the tiny test config in a fresh directory.

This guards the main job, so it runs in CI although it is the slowest test.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


SLURM_CLUSTER = ROOT / "workflow/profiles/slurm-ci/local-slurm.sh"
SLURM_PROFILE = ROOT / "workflow/profiles/slurm-ci"


def _start_decode(workdir, slurm=False):
    """Start `snakemake decode` on the test config in workdir: locally on 2 cores, or through the SLURM executor.
    Its output goes to workdir/snakemake.log; :func:`_finish_decode` waits for it."""
    where = ["--workflow-profile", str(SLURM_PROFILE)] if slurm else ["--cores", "2"]
    command = [sys.executable, "-m", "snakemake", "decode", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(ROOT / "configs/test.yaml"), *where]
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "snakemake.log", "w")
    # SIGTERM does not stop a hung SLURM run: timeout -k kills it.
    return subprocess.Popen(["timeout", "-k", "10", "1200", *command], stdout=log, stderr=subprocess.STDOUT,
                            text=True), log


def _finish_decode(workdir, started):
    job, log = started
    returncode = job.wait()
    log.close()
    if returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{(workdir / 'snakemake.log').read_text()[-6000:]}\n{logs}")
    return workdir


def _decode(workdir, slurm=False):
    """`snakemake decode` on the test config in workdir (:func:`_start_decode`), waited for."""
    return _finish_decode(workdir, _start_decode(workdir, slurm))


def slurm_missing():
    """Why the SLURM test cannot run here (None when it can)."""
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return "SLURM is not installed (make slurm: Debian's slurmctld, slurmd, slurm-client, munge)"
    if os.geteuid() != 0 and not shutil.which("sudo"):
        return "starting the test cluster needs root or sudo"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (the test extra)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """The one-node SLURM of local-slurm.sh, started for this module (and stopped after) unless it is up."""
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    if subprocess.run([str(SLURM_CLUSTER), "status"], capture_output=True).returncode == 0:
        yield "already up"
        return
    # 8 job slots on any machine: the test jobs mostly wait on Python start-up and status polls.
    started = subprocess.run([str(SLURM_CLUSTER), "start"], capture_output=True, text=True,
                             env=dict(os.environ, MINDVIS_SLURM_CPUS="8"))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SLURM_CLUSTER), "stop"], capture_output=True)


#: The second run, when finished_run started it beside itself: (workdir, where, started job).
_SECOND = {}


def _start_second_run(tmp_path_factory, request):
    """Start the second fresh run of the test config: through SLURM where it can run (the SLURM test), else
    locally. Returns (workdir, where, started job)."""
    workdir = tmp_path_factory.mktemp("again")
    if slurm_missing() is None:
        print(request.getfixturevalue("slurm_cluster"))
        return workdir, "slurm", _start_decode(workdir, slurm=True)
    return workdir, "local", _start_decode(workdir)


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, request):
    """A second fresh run of the test config (:func:`_start_second_run`), started beside the first where this
    session also runs that one (its SLURM jobs mostly wait on the scheduler's polls)."""
    workdir, where, started = _SECOND.pop("run", None) or _start_second_run(tmp_path_factory, request)
    return _finish_decode(workdir, started), where


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, request):
    if any("second_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        _SECOND["run"] = _start_second_run(tmp_path_factory, request)

        def stop_unused():  # a second run no test waited for (the session stopped early) is not left running
            leftover = _SECOND.pop("run", None)
            if leftover is not None:
                job, log = leftover[2]
                job.terminate()  # timeout passes SIGTERM on to snakemake
                try:
                    job.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    job.kill()
                    job.wait()
                log.close()

        request.addfinalizer(stop_unused)
    return _decode(tmp_path_factory.mktemp("workflow"))


@pytest.mark.slow
def test_the_decoder_clears_its_shuffled_pair_floor(finished_run):
    """A regression guard: the test config's fine-tuned decoders must identify their test stimuli.

    The tiny prior trained for two epochs draws nothing recognisable (its images sit at every floor), so the guard
    reads what the decoder itself outputs: each test fMRI's decoded embedding, identified among the prior's
    embeddings of all the test images (two-way identification, as selection does on val). The mean over subjects
    must clear the 95th percentile of the same figure with the pairs shuffled (200 permutations): a decoder at
    chance, or one whose encoder path carries nothing, fails.
    """
    from mindvis.data.pairs import paired_trials
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.models.dcldm import load_dcldm
    from mindvis.train.selection import identification

    results = finished_run / "results"
    stimuli = load_stimulus_set(results / "bids/stimuli/stimuli.h5")
    rng = np.random.default_rng(0)
    scores, floors = [], []
    for subject in ["sub-01", "sub-02"]:
        generator, decoder, _ = load_dcldm(results / subject / "dcldm")
        trials = paired_trials(load_responses(results / subject / "responses.h5", splits=("test_avg",))["test_avg"],
                               stimuli, generator.image_size, generator.image_channels)
        with torch.no_grad():
            decoded, truth = decoder.embedding(trials.fmri), generator.embed_all(trials.images)
        scores.append(identification(decoded, truth))
        floors.append([identification(decoded[rng.permutation(len(decoded))], truth) for _ in range(200)])
    floor = np.percentile(np.mean(floors, axis=0), 95)
    assert np.mean(scores) > floor, f"decoded embeddings identify the test stimuli at {scores}, floor {floor:.3f}"


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
        assert responses.split("train").fmri.shape[0] > 0 and responses.split("test_avg").fmri.shape[0] == 20
        for model, samples in [("dcldm", "samples"), ("dcldm-baseline", "samples-baseline")]:
            assert (results / subject / model / "dcldm.safetensors").exists()
            summary = json.loads((results / subject / samples / "summary.json").read_text())
            assert summary["n_stimuli"] == 20 and summary["n_samples"] == 2
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
    # Snakemake stores each file under a hashed folder by its name: 10 per subject, and the two summary files.
    figures = ["report.html", "grid.png", "per_class.png", "confusion.png", "curves.png", "attention.png",
               "brain_map.png", "brain_map_voxel_path.png", "fewshot_curve.png", "brain_edits.png"]
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
    assert "decoded 2 images" in outputs and "sub-02: n = 20 stimuli" in outputs
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
def test_a_second_fresh_run_gives_identical_metrics(finished_run, second_run):
    """Same seed, same machine, another fresh directory (and, where SLURM runs, every job through sbatch): every
    metric, interval and per-stimulus value equal, and the trained weights byte for byte."""
    again, _ = second_run
    for subject in ["sub-01", "sub-02"]:
        first, second = (json.loads((run / "results" / subject / "evaluation/metrics.json").read_text())
                         for run in (finished_run, again))
        for key in RESULT_KEYS:
            assert first[key] == second[key], f"{subject}: metrics.json '{key}' differs between two fresh runs"
    for weights in ["pretrain/ldm/vae/diffusion_pytorch_model.safetensors",
                    "pretrain/ldm/unet/diffusion_pytorch_model.safetensors", "sub-01/dcldm/dcldm.safetensors"]:
        assert (finished_run / "results" / weights).read_bytes() == (again / "results" / weights).read_bytes(), weights


def _slurm_jobs():
    """{job id: state} of every finished job in the cluster's job-completion log (`sacct -c`)."""
    listing = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True,
                             check=True).stdout
    return dict(line.split("|")[:2] for line in listing.splitlines() if line.strip())


@pytest.mark.slow
def test_every_job_of_the_slurm_run_went_through_sbatch(second_run):
    workdir, where = second_run
    if where != "slurm":
        pytest.skip(slurm_missing())
    log = (workdir / "snakemake.log").read_text()
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    steps = int(re.findall(r"(\d+) of (\d+) steps \(100%\) done", log)[-1][1])
    # Every job but the `decode` target itself (a local rule: it only collects files).
    assert len(submitted) == steps - 1 == len(set(submitted)), log[-3000:]
    finished = _slurm_jobs()
    assert all(finished.get(job) == "COMPLETED" for job in submitted), {job: finished.get(job) for job in submitted}


@pytest.mark.slow
def test_a_failing_slurm_job_fails_the_run(second_run):
    """A job that exits non-zero under SLURM (a report from a corrupt metrics file) fails the whole run."""
    workdir, where = second_run
    if where != "slurm":
        pytest.skip(slurm_missing())
    (workdir / "results/sub-01/evaluation/metrics.json").write_text("{ not json")
    command = [sys.executable, "-m", "snakemake", "results/sub-01/report.html", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(ROOT / "configs/test.yaml"),
               "--workflow-profile", str(SLURM_PROFILE), "--forcerun", "report"]
    result = subprocess.run(["timeout", "-k", "10", "600", *command], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    job = re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    assert len(job) == 1 and _slurm_jobs().get(job[0]) == "FAILED"
    assert "metrics.json" in (workdir / "logs/report/sub-01.log").read_text()


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


def _snakemake(workdir, config, *targets, extra=()):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), "--cores", "1", *extra, *targets]


@pytest.mark.slow
def test_a_killed_training_job_retried_by_snakemake_resumes_from_its_checkpoint(finished_run, tmp_path):
    """SIGKILL the SC-MBM pretraining job mid-run (as a scheduler's time limit or the OOM killer would); Snakemake's
    retry continues from the last checkpoint, and the encoder equals an uninterrupted run's."""
    import signal
    import time

    import psutil
    from safetensors.torch import load_file

    config = yaml.safe_load((ROOT / "configs/test.yaml").read_text())
    config["mbm"]["epochs"] = 12
    config["compute"] = {"checkpoint_minutes": 1e-6}  # a checkpoint after every step: the kill lands between two
    config_path = tmp_path / "long.yaml"
    config_path.write_text(yaml.safe_dump(config))
    target = "results/pretrain/mbm/summary.json"
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(finished_run / "results", runs[name] / "results", symlinks=True)
        shutil.rmtree(runs[name] / "results/pretrain/mbm")  # the copies carry no .snakemake metadata to see the change

    straight = subprocess.run(_snakemake(runs["straight"], config_path, target), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    latest = runs["killed"] / "results/pretrain/mbm/checkpoints/latest.json"
    job = subprocess.Popen(_snakemake(runs["killed"], config_path, target, extra=("--retries", "1")),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at, deadline = None, time.monotonic() + 240
    while killed_at is None and time.monotonic() < deadline and job.poll() is None:
        if latest.exists():
            try:
                step = json.loads(latest.read_text())["step"]
            except (ValueError, KeyError):
                step = 0
            if step >= 10:
                for child in psutil.Process(job.pid).children(recursive=True):
                    if "pretrain-mbm" in " ".join(child.cmdline()):
                        child.send_signal(signal.SIGKILL)
                        killed_at = step
        time.sleep(0.02)
    output, _ = job.communicate(timeout=300)
    assert killed_at is not None, f"the job was not caught mid-run:\n{output[-3000:]}"
    assert job.returncode == 0, output[-3000:]
    log = (runs["killed"] / "logs/pretrain_mbm.log").read_text()  # the retry's log
    resumed = re.search(r"resumed from .*step-(\d+) at step (\d+) of (\d+)", log)
    assert resumed, log[-3000:]
    resumed_step, total = int(resumed.group(2)), int(resumed.group(3))
    assert killed_at <= resumed_step < total
    summaries = {name: json.loads((run / target).read_text()) for name, run in runs.items()}
    assert summaries["killed"]["step"] == summaries["straight"]["step"] == total
    weights = {name: load_file(str(run / "results/pretrain/mbm/diffusion_pytorch_model.safetensors"))
               for name, run in runs.items()}
    for key, tensor in weights["straight"].items():
        torch.testing.assert_close(weights["killed"][key], tensor, rtol=1e-6, atol=1e-7)
    print(f"killed at step >= {killed_at}, resumed at step {resumed_step} of {total}")


@pytest.mark.slow
def test_fine_tuning_on_two_processes_follows_the_one_process_run(finished_run, tmp_path):
    """sub-01's DC-LDM fine-tuning again under `accelerate launch` with 2 CPU processes (gloo) at the same global
    batch: every trained parameter gets a gradient on every rank (else DDP stops), the schedule is the one-process
    run's, and the validation loss agrees within 5 % (one process over other training seeds: 1.4 %)."""
    results = finished_run / "results"
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mindvis.cli",
               "finetune", "--config", str(results / "config.yaml"), "--subject", "sub-01",
               "--responses", str(results / "sub-01/responses.h5"),
               "--stimuli", str(results / "bids/stimuli/stimuli.h5"), "--base", str(results / "pretrain/ldm"),
               "--mbm", str(results / "pretrain/mbm"), "--out-dir", str(tmp_path / "dcldm"), "--threads", "1"]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((path / "dcldm.json").read_text()) for path in (results / "sub-01/dcldm", tmp_path / "dcldm"))
    assert two["step"] == one["step"] > 0
    assert two["training"]["effective_batch"] == one["training"]["effective_batch"]
    assert two["training"]["peak_lr"] == one["training"]["peak_lr"]
    assert two["trained_parameter_names"] == one["trained_parameter_names"]
    last = {name: json.loads((path / "train/metrics.jsonl").read_text().splitlines()[-1])
            for name, path in (("one", results / "sub-01/dcldm"), ("two", tmp_path / "dcldm"))}
    assert last["two"]["val/loss"] == pytest.approx(last["one"]["val/loss"], rel=0.05)


@pytest.mark.slow
def test_the_shared_decoder_and_a_few_shot_subject_run_through_the_workflow(finished_run, tmp_path):
    """finetune.new_subject on a copy of the finished run: finetune_shared (sub-01), adapt_subject (sub-02 from a
    quarter of its trials), their samples, sub-02's evaluation with the few-shot row and its comparison, and its
    report's learning curve."""
    config = yaml.safe_load((ROOT / "configs/test.yaml").read_text())
    config["finetune"].update(new_subject="sub-02", train_fraction=0.25, shared_rank=3, adapt_epochs=2)
    config_path = tmp_path / "fewshot.yaml"
    config_path.write_text(yaml.safe_dump(config))
    shutil.copytree(finished_run / "results", tmp_path / "run/results", symlinks=True)
    targets = ("results/sub-01/samples-shared/samples.h5", "results/sub-02/report.html")
    # mtime only: the copy has no .snakemake metadata, and the per-subject decoders are not the point here.
    result = subprocess.run(_snakemake(tmp_path / "run", config_path, *targets,
                                       extra=("--rerun-triggers", "mtime", "--cores", "2")),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "run/results"
    view = json.loads((results / "sub-01/dcldm-shared/dcldm.json").read_text())
    summary = json.loads((results / "shared/dcldm/shared.json").read_text())
    assert view["stage"] == "finetune_shared" and view["shared_rank"] == summary["rank"]["rank"] <= 3
    assert set(summary["rank"]["val_relative_error"]) == {"1", "2", "3"}
    fewshot = json.loads((results / "sub-02/dcldm-fewshot/dcldm.json").read_text())
    assert fewshot["adapter_rank"] <= view["shared_rank"]
    assert fewshot["stage"] == "adapt_subject" and fewshot["n_train"] == round(0.25 * fewshot["n_train_all"])
    metrics = json.loads((results / "sub-02/evaluation/metrics.json").read_text())
    rows = {row["id"]: row for row in metrics["rows"]}
    assert rows["dcldm-fewshot"]["available"] and not rows["dcldm-shared"]["available"]
    assert any(c["a"] == "dcldm-fewshot" and c["b"] == "dcldm" for c in metrics["comparisons"])
    # The new subject's report draws its learning curve (this run's share: adapted beside from scratch).
    page = (results / "sub-02/report.html").read_text()
    assert 'id="fewshot"' in page and f"This run: {fewshot['n_train']} of {fewshot['n_train_all']}" in page
    assert (results / "sub-02/report/fewshot_curve.png").stat().st_size > 5000


@pytest.mark.slow
def test_mindvis_edit_swaps_a_roi_of_a_finished_run(finished_run, tmp_path):
    """`mindvis edit` on the finished run's decoder: a higher-visual swap at two taus, its files and its errors."""
    import h5py

    results = finished_run / "results"
    with h5py.File(results / "sub-01/responses.h5") as handle:
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in handle["test_avg/stimulus_id"][:2]]
    base = [sys.executable, "-m", "mindvis.cli", "edit", "--config", str(results / "config.yaml"), "--subject",
            "sub-01", "--model-dir", str(results / "sub-01/dcldm"), "--responses", str(results / "sub-01/responses.h5"),
            "--stimuli", str(results / "bids/stimuli/stimuli.h5"), "--out-dir", str(tmp_path / "edits"), "--ids", *ids]
    result = subprocess.run([*base, "--donors", ids[1], ids[0], "--rois", "LOC", "VOT", "--tau", "0", "2"],
                            capture_output=True, text=True, cwd=finished_run)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "edits/edits.json").read_text())
    assert record["stimulus_id"] == ids and record["donor_id"] == ids[::-1] and record["taus"] == [0, 2]
    assert record["n_group_voxels"] > 0 and record["n_group_tokens"] > 0
    with h5py.File(tmp_path / "edits/edits.h5") as handle:
        assert handle["edited"].shape[:2] == (2, 2) and handle["change"].shape[:2] == (2, 2)
        # The source is the generate stage's first sample of each stimulus (the same seed and settings).
        source = handle["source"][:]
    with h5py.File(results / "sub-01/samples/samples.h5") as handle:
        order = [s.decode() if isinstance(s, bytes) else str(s) for s in handle["stimulus_id"][:]]
        first = handle["samples"][:, 0][[order.index(s) for s in ids]]
    assert np.abs(source.astype(int) - first.astype(int)).max() <= 2
    assert (tmp_path / "edits/grid.png").stat().st_size > 0
    unknown = subprocess.run([*base, "--operation", "zero", "--rois", "V9"], capture_output=True, text=True,
                             cwd=finished_run)
    assert unknown.returncode == 2 and "ROI V9 not in voxel_roi" in unknown.stderr.strip().splitlines()[-1]
    missing = subprocess.run([*base, "--rois", "LOC"], capture_output=True, text=True, cwd=finished_run)
    assert missing.returncode == 2 and "--donors" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_report_shows_the_brain_token_edits_and_their_check(finished_run):
    """The edit rule ran for every subject (generate.edit_stimuli): the report's figure and the check's table."""
    from mindvis.evaluate.edits import read_edits

    results = finished_run / "results"
    config = yaml.safe_load((results / "config.yaml").read_text())
    record, arrays = read_edits(results / "sub-01/edits")
    steps = config["generate"]["steps"]
    assert record["taus"] == sorted({round(share * steps) for share in config["generate"]["edit_taus"]})
    assert record["shown_groups"] == list(config["generate"]["edit_groups"])
    n_shown = min(config["generate"]["edit_stimuli"], len(arrays["true_images"]))
    for name in record["shown_groups"]:
        assert arrays["edited"][name].shape[:2] == (n_shown, len(record["taus"]))
    check = record["check"]
    assert set(check["groups"]) == set(record["shown_groups"]) and check["difference"]["donor_prob"]["ci"]
    page = (results / "sub-01/report.html").read_text()
    assert 'id="edits"' in page and 'id="edit-check"' in page
    assert check["difference"]["label"] in page
