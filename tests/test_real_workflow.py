"""The workflow on real-data sources: `snakemake decode` from a GOD npz fixture (plus HCP rest), and the DAGs
of configs/god.yaml, bold5000.yaml and nsd.yaml.

The fixtures are the real on-disk formats of tests/test_sources.py (file names, keys, dtypes), scaled down.
Select these tests alone with ``pytest -m real_data``.
"""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from compvis_fixtures import TINY_LDM_PARAMS, tiny_ldm_checkpoint
from test_sources import write_bold5000, write_god_npz, write_hcp, write_nsd

ROOT = Path(__file__).resolve().parents[1]
HCP_GLOB = "{root}/{{subject}}/MNINonLinear/Results/rfMRI_REST*/rfMRI_REST*_Atlas_MSMAll.dtseries.nii"

pytestmark = pytest.mark.real_data


def snakemake(workdir, configfile, *args):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(configfile), "--cores", "2", *args]
    return subprocess.run(command, capture_output=True, text=True)


def hcp_section(root):
    return {"subjects": ["100307"], "runs_glob": HCP_GLOB.format(root=root),
            "parcellation": str(root / "HCP-MMP1.dlabel.nii"), "parcels": ["V1", "V2"], "window_seconds": 1.44}


def tiny_god_config(npz_dir, hcp_root):
    """configs/test.yaml's sizes, on GOD npz files (RGB) with one HCP subject in the SC-MBM corpus."""
    test = yaml.safe_load((ROOT / "configs/test.yaml").read_text())
    return {"experiment": "god-tiny", "seed": 7, "subjects": ["sub-01"],
            "stimuli": {"image_size": 16, "channels": 3},
            "preprocess": {"val_fraction": 0.25},
            "data": {"source": "god_npz", "roi": "VC", "trials_per_block": 3,
                     "god_npz": {"dir": str(npz_dir)}, "hcp": hcp_section(hcp_root)},
            "mbm": test["mbm"], "ldm": {**test["ldm"], "val_images": 2},
            "finetune": {**test["finetune"], "baseline": False}, "generate": test["generate"]}


@pytest.fixture(scope="module")
def god_run(tmp_path_factory):
    """`snakemake decode` on one GOD subject (sbj_1.npz) and one HCP subject (one subject keeps it fast;
    tests/test_sources.py checks the merge of several subjects' images)."""
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(11)
    write_god_npz(data / "npz", rng)
    write_hcp(data / "HCP", rng)
    configfile = data / "god-tiny.yaml"
    configfile.write_text(yaml.safe_dump(tiny_god_config(data / "npz", data / "HCP")))
    workdir = tmp_path_factory.mktemp("workflow")
    result = snakemake(workdir, configfile, "decode")
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    return workdir, configfile


@pytest.mark.slow
def test_god_npz_decode_runs_through_generate(god_run):
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set

    workdir, configfile = god_run
    results = workdir / "results"
    assert not (results / "bids").exists() and not (results / "classifier").exists()
    # the base generator learned from the subjects' training images only: 12 shared GOD images, RGB, no test image
    corpus = load_stimulus_set(results / "pretrain/stimuli.h5")
    assert len(corpus["train"]) == 12 and len(corpus["pool"]) == 0 and corpus["train"].images.shape[1:] == (16, 16, 3)
    subject_stimuli = load_stimulus_set(results / "sub-01/stimuli.h5")
    assert not set(corpus["train"].stimulus_id) & set(subject_stimuli["test"].stimulus_id)
    ldm = json.loads((results / "pretrain/ldm/metrics.json").read_text())
    assert ldm["n_train_images"] == 10 and ldm["n_val_images"] == 2
    # the SC-MBM corpus: the subject's training trials and the HCP subject, no simulated rest subject
    mbm = json.loads((results / "pretrain/mbm/summary.json").read_text())
    kinds = sorted((Path(s["path"]).name, s["kind"]) for s in mbm["corpus"]["sources"])
    assert kinds == [("hcp-100307.h5", "rest"), ("responses.h5", "responses")]
    with h5py.File(results / "pretrain/rest/hcp-100307.h5", "r") as handle:
        assert handle.attrs["subject"] == "sub-hcp100307"
    for subject in ["sub-01"]:
        responses = load_responses(results / subject / "responses.h5")
        assert responses.n_voxels == 24 and len(responses["test_avg"]) == 4
        summary = json.loads((results / subject / "samples/summary.json").read_text())
        assert summary["n_stimuli"] == 4 and summary["n_samples"] == 2
        with h5py.File(results / subject / "samples/samples.h5", "r") as handle:
            assert handle["samples"].shape == (4, 2, 16, 16, 3)
        assert not (results / subject / "dcldm-baseline").exists()
    rerun = snakemake(workdir, configfile, "-n", "decode")
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr


def shipped_config_on(name, data):
    """configs/{name}.yaml with every data path moved to fixtures under ``data`` (real layouts, tiny sizes)."""
    config = yaml.safe_load((ROOT / f"configs/{name}.yaml").read_text())
    rng = np.random.default_rng(5)
    section = config["data"]
    if name == "god":
        write_god_npz(data / "npz", rng)
        section["god_npz"]["dir"] = str(data / "npz")
        section["god_bdata"] = {"dir": str(data / "bdata"), "image_dir": str(data / "bdata/images")}
        # MinD-Vis's base, a CompVis checkpoint, in its own layout at test size
        tiny_ldm_checkpoint(data / "model.ckpt")
        (data / "label2img.yaml").write_text(yaml.safe_dump({"model": {"params": TINY_LDM_PARAMS}}))
        config["ldm"].update(base=str(data / "model.ckpt"), compvis_config=str(data / "label2img.yaml"))
    elif name == "bold5000":
        write_bold5000(data / "bold5000", rng)
        section["bold5000"].update(betas_dir=str(data / "bold5000/BOLD5000_GLMsingle_ROI_betas/py"),
                                   stimuli_dir=str(data / "bold5000/BOLD5000_Stimuli"))
    else:
        write_nsd(data / "nsd", rng, n_sessions=1)
        section["nsd"]["root"] = str(data / "nsd")
    write_hcp(data / "HCP", rng)
    section["hcp"] = hcp_section(data / "HCP")
    return config


@pytest.mark.parametrize("name", ["god", "bold5000", "nsd"])
def test_shipped_real_data_configs_build_a_dag(tmp_path, name):
    config = shipped_config_on(name, tmp_path / "data")
    configfile = tmp_path / f"{name}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path / "work", configfile, "-n", "decode")
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = {}
    for line in (result.stdout + result.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    n_subjects = len(config["subjects"])
    assert jobs["convert"] == jobs["finetune"] == jobs["generate"] == n_subjects
    assert jobs["pretrain_mbm"] == jobs["convert_rest"] == 1
    if name == "god":  # MinD-Vis's base converted, never a prior trained from scratch on GOD's images
        assert jobs["import_ldm"] == 1 and not {"pretrain_ldm", "merge_stimuli"} & set(jobs)
        assert config["evaluate"]["classifier"] == "vit_h_14"
    else:
        assert jobs["merge_stimuli"] == jobs["pretrain_ldm"] == 1
    # natural images: an ImageNet classifier scores, so no domain classifier is trained; nothing simulated
    assert not {"train_classifier", "stimuli", "simulate", "simulate_rest", "preprocess"} & set(jobs)


def test_hcp_subject_without_runs_is_named_at_dag_build(tmp_path):
    config = shipped_config_on("god", tmp_path / "data")
    config["data"]["hcp"]["subjects"] = ["999999"]
    configfile = tmp_path / "god.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path / "work", configfile, "-n", "decode")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "HCP subject 999999: no runs match" in output and "data.hcp.runs_glob" in output


@pytest.mark.slow
def test_nsd_decode_runs_without_classes(tmp_path):
    """NSD has no object classes: the base generator trains unconditionally, the voxel path starts at zero
    (no ridge target), and evaluation scores with the ImageNet classifier and no label-based rows."""
    config = yaml.safe_load((ROOT / "configs/nsd.yaml").read_text())
    write_nsd(tmp_path / "data/nsd", np.random.default_rng(3), n_sessions=2)  # one session for val
    config["data"]["nsd"]["root"] = str(tmp_path / "data/nsd")
    test = yaml.safe_load((ROOT / "configs/test.yaml").read_text())
    config.update({"subjects": ["sub-01"], "preprocess": {"val_fraction": 0.5},
                   "stimuli": {"image_size": 16, "channels": 3}, "mbm": test["mbm"],
                   "ldm": {**test["ldm"], "val_images": 2}, "finetune": {**test["finetune"], "baseline": False},
                   "generate": test["generate"], "evaluate": {"trials": 50, "n_bootstrap": 50}})
    configfile = tmp_path / "nsd-tiny.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    result = snakemake(workdir, configfile, "decode")
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    results = workdir / "results"
    ldm = json.loads((results / "pretrain/ldm/metrics.json").read_text())
    assert ldm["n_labelled"] == 0 and not (results / "pretrain/ldm/class_samples.png").exists()
    subject = config["subjects"][0]
    meta = json.loads((results / subject / "dcldm/dcldm.json").read_text())
    # The image prior gives every trial a target (the seen image's embedding): a ridge start without labels.
    assert meta["voxel_path_ridge"]["target"] == "prior image embedding"
    metrics = json.loads((results / subject / "evaluation/metrics.json").read_text())
    rows = {row["id"]: row for row in metrics["rows"]}
    assert metrics["classifier"]["n_classes"] == 1000 and rows["dcldm"]["available"]
    assert rows["base-ceiling"]["available"] and rows["base-ceiling"]["conditioning"] == "image"
    assert (results / subject / "report.html").exists() and (results / "summary.csv").exists()
