"""configs/god_mindvis.yaml end to end: `snakemake decode` converts a CompVis .ckpt (import_ldm), imports a
MinD-Vis finetuned.pth as the subject's decoder (finetune.released), samples with PLMS and evaluates, with
no SC-MBM stage and nothing trained. Tiny fixtures in the real layouts (GOD npz, latent-diffusion .ckpt,
MinD-Vis's pickled checkpoint); the ViT-H/14 classifier is replaced by the offline EfficientNet-Lite0. Every other
protocol key of the config (docs/god_protocol.md) runs as the lab runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from compvis_fixtures import TINY_LDM_PARAMS, save_mindvis_release, tiny_ldm_checkpoint

from mindvis.data.responses import load_responses
from test_sources import write_god_npz

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def god_mindvis_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_god_npz(data / "npz", np.random.default_rng(3))  # sbj_1.npz: 24 VC voxels
    base_state = tiny_ldm_checkpoint(data / "model.ckpt")
    with pytest.MonkeyPatch.context() as monkeypatch:
        save_mindvis_release(data / "finetuned.pth", base_state, monkeypatch, n_patches=6, patch_size=4)
    (data / "label2img.yaml").write_text(yaml.safe_dump({"model": {"params": TINY_LDM_PARAMS}}))
    config = yaml.safe_load((ROOT / "configs/god_mindvis.yaml").read_text())
    config["subjects"] = ["sub-01"]
    config["stimuli"]["image_size"] = 16
    config["preprocess"]["val_fraction"] = 0.25
    config["data"].update(trials_per_block=3, god_npz={**config["data"]["god_npz"], "dir": str(data / "npz")})
    config["mbm"]["base"] = "bundled"  # unused: every subject's decoder is released
    config["ldm"].update(base=str(data / "model.ckpt"), compvis_config=str(data / "label2img.yaml"), image_size=16)
    config["finetune"]["released"] = {"sub-01": str(data / "finetuned.pth")}
    config["generate"].update(steps=3, diagnostic_steps=2, n_samples=2, batch_size=8, attention_stimuli=1, edit_stimuli=2,
                              edit_groups={"V1": ["V1"], "VC outside V1": ["VC"]})  # the fixture's two masks
    config["evaluate"] = {"classifier": "efficientnet_lite0", "n_way": 50, "trials": 20, "n_bootstrap": 20,
                          "mindvis_metrics": config["evaluate"]["mindvis_metrics"]}
    configfile = data / "god_mindvis.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path_factory.mktemp("work")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(configfile), "--cores", "2"]
    dry = subprocess.run(command + ["-n", "decode"], capture_output=True, text=True)
    result = subprocess.run(command + ["decode"], capture_output=True, text=True)
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    return workdir, dry.stdout + dry.stderr


def test_released_decoder_is_imported_sampled_and_scored(god_mindvis_run):
    workdir, dry = god_mindvis_run
    jobs = {parts[0]: int(parts[1]) for line in dry.splitlines() if len(parts := line.split()) == 2
            and parts[1].isdigit()}
    assert jobs["import_ldm"] == jobs["finetune"] == jobs["generate"] == jobs["evaluate"] == 1
    assert not {"adapt_mbm", "pretrain_mbm", "pretrain_ldm", "finetune_baseline", "train_classifier"} & set(jobs)
    meta = json.loads((workdir / "results/sub-01/dcldm/dcldm.json").read_text())
    assert meta["imported_from"] == "mindvis-release" and meta["base"] == "results/pretrain/ldm-compvis"
    assert meta["unet_tensors_stored"] > 0 and not (workdir / "results/sub-01/dcldm/train").exists()
    samples = json.loads((workdir / "results/sub-01/samples/summary.json").read_text())
    assert samples["sampler"] == "plms_compvis" and samples["guidance_scale"] == 1.0 and samples["images_per_s"] > 0
    metrics = json.loads((workdir / "results/sub-01/evaluation/metrics.json").read_text())
    assert metrics["n_way"] == 50 and metrics["n_samples"] == 2 and metrics["classifier"]["name"] == "efficientnet_lite0"
    # MinD-Vis's own PCC and SSIM beside MindEye's; its scalar normalisation and the file's test averages
    model_row = next(row for row in metrics["rows"] if row["id"] == "dcldm")
    assert 0 <= model_row["metrics"]["pixcorr_mindvis"]["value"] <= 1 and "ssim_mindvis" in metrics["ground_truth"]
    source = load_responses(workdir / "results/sub-01/responses.h5").attrs["source"]
    assert source["normalisation"].startswith("mindvis_scalar") and source["test_average"] == "file"
    page = (workdir / "results/sub-01/report.html").read_text()
    assert 'data-metric="pixcorr_mindvis"' in page and 'data-metric="ssim_mindvis"' in page
    assert "efficientnet_lite0" in page  # the report names the classifier that scored it
    summary = pd.read_csv(workdir / "results/summary.csv", index_col="subject")
    assert summary.loc["sub-01", "classifier"] == "efficientnet_lite0"
    assert summary.loc["sub-01", "dcldm/pixcorr_mindvis"] == pytest.approx(model_row["metrics"]["pixcorr_mindvis"]["value"],
                                                                      abs=1e-5)
    # The brain-token edits run through MinD-Vis's own layout (no class token, wrapped padding, no voxel path).
    edits = json.loads((workdir / "results/sub-01/edits/edits.json").read_text())
    assert edits["shown_groups"] == ["V1", "VC outside V1"] and len(edits["stimulus_id"]) == 2
    assert edits["steps"] == 2  # generate.diagnostic_steps: the edits need not run the scored rows' 250 steps
    assert all(group["n_tokens"] > 0 for group in edits["groups"].values())
    assert set(edits["check"]["groups"]) == {"V1", "VC outside V1"}
    assert 'id="edits"' in (workdir / "results/sub-01/report.html").read_text()
