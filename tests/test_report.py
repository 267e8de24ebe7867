"""Per-subject HTML reports, the summary table, the brain map, and the report in a real headless browser."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindvis.data.responses import ResponseSplit, write_responses
from mindvis.errors import MindvisError
from mindvis.generate.writing import write_samples_h5
from mindvis.report import brainmap, figures, html, summary, tables

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLASS_NAMES = ["shirt", "shoe", "bag"]
VOLUME_SHAPE = (5, 6, 7)
N_VOXELS, PATCH_SIZE = 13, 4
ROWS = [("chance", "Chance (guessing)", "floor"),
        ("shuffled-pairs", "Shuffled pairs (DC-LDM samples vs. another stimulus's truth)", "floor"),
        ("mean-train-image", "Mean training image as every decoding", "floor"),
        ("dcldm", "DC-LDM (SC-MBM pretrained)", "model"),
        ("dcldm-baseline", "DC-LDM without SC-MBM pretraining", "baseline"),
        ("ridge", "Ridge fMRI -> VAE latent", "baseline"), ("ridge-pixels", "Ridge fMRI -> pixels", "baseline"),
        ("fmri-linear", "Linear classifier on test fMRI", "ceiling"),
        ("base-ceiling", "Prior given the true image's embedding", "ceiling"),
        ("true-images", "Classifier on the true images", "ceiling")]
PIXEL_FLOORS = "no exact chance level (it depends on the images); see the measured floors"
CLASSIFIER_METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "fid")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _entry(rng, metric):
    value = float(rng.uniform(20, 80)) if metric == "fid" else float(rng.uniform(0.1, 0.9))
    return {"value": value, "ci": [value * 0.9, value * 1.1]}


def contract_metrics(rng, subject="sub-01", n_stimuli=6, n_samples=2, classifier_reason=None):
    """A ``metrics.json`` in the evaluate stage's contract format, with random numbers (``classifier_reason``:
    the classifier's figures withheld for it)."""
    image_metrics = ["n_way_top1_mean", "n_way_top1_best_of_k", "label_top1_mean", "two_way_id", "two_way_id_pixels",
                     "pixcorr", "ssim", "fid"]
    rows = []
    for row_id, label, kind in ROWS:
        row = {"id": row_id, "label": label, "kind": kind, "available": True}
        if row_id == "base-ceiling":
            row.update(available=False, reason="no image- or class-conditioned base generator (ldm.base is an SD "
                                               "folder)", metrics=None)
        elif row_id == "chance":
            row["metrics"] = {m: ({"value": 1 / 3, "ci": None} if m.startswith("n_way") else None)
                              for m in image_metrics}
            row["metrics"].update(pixcorr={"value": None, "ci": None, "reason": PIXEL_FLOORS},
                                  ssim={"value": None, "ci": None, "reason": PIXEL_FLOORS})
        elif row_id == "fmri-linear":
            row["metrics"] = {m: (_entry(rng, m) if m == "label_top1_mean" else None) for m in image_metrics}
        else:
            row["metrics"] = {m: _entry(rng, m) for m in image_metrics}
        if classifier_reason and row["available"] and row_id != "fmri-linear":
            for metric in CLASSIFIER_METRICS:
                if row["metrics"][metric] is not None:
                    row["metrics"][metric] = {"value": None, "ci": None, "reason": classifier_reason}
        rows.append(row)
    counts = rng.integers(0, 4, (3, 3)).tolist()
    return {"subject": subject, "n_way": 3, "trials": 1000, "n_samples": n_samples, "n_stimuli": n_stimuli,
            "chance": 1 / 3, "ci_level": 0.95, "n_bootstrap": 200, "image_size": 16,
            "classifier": {"name": "domain", "n_classes": 3, "held_out_accuracy": 0.9, "test_label_accuracy": 0.8,
                           "usable": classifier_reason is None, "reason": classifier_reason,
                           "check": {"held_out_lower_bound": 0.85, "n_val": 200}},
            "class_names": CLASS_NAMES, "rows": rows,
            "per_class": {"dcldm": [0.5, 1.0, 0.0], "ridge": [0.25, 0.5, 0.75]},
            "confusion": {"dcldm": counts},
            "per_stimulus": {"dcldm": {"n_way_top1_mean": rng.uniform(size=n_stimuli).tolist()}},
            "inputs": {"results/sub-01/samples/samples.h5": "0" * 64}, "config": {"experiment": "fixture"},
            "versions": {"numpy": np.__version__}, "wall_time_s": 1.5}


def with_subsets(metrics, rng, n_seen=4, n_novel=2):
    """Add the seen / novel subsets (random figures; a subset of fewer than 2 stimuli omitted) and comparisons."""
    metrics["category"] = ["seen"] * n_seen + ["novel"] * n_novel
    metrics["subsets"] = {}
    for name, n in (("seen", n_seen), ("novel", n_novel)):
        if n < 2:
            metrics["subsets"][name] = {"n_stimuli": n, "available": False, "reason": f"{n} {name} test stimuli"}
            continue
        rows = {}
        for row in metrics["rows"]:
            entries = row["metrics"] or {}
            exact = row["id"] == "chance"  # exact figures keep their value in every subset
            rows[row["id"]] = {m: (None if e is None or m == "fid" else e if exact or e.get("value") is None
                                   else _entry(rng, m)) for m, e in entries.items()}
        metrics["subsets"][name] = {"n_stimuli": n, "available": True, "rows": rows}
    metrics["comparisons"] = [
        {"a": "dcldm", "b": "dcldm-baseline", "subset": "all", "metric": "pixcorr", "difference": 0.25,
         "ci": [0.125, 0.375], "n_stimuli": n_seen + n_novel},
        {"a": "dcldm", "b": "ridge", "subset": "novel", "metric": "n_way_top1_mean", "difference": -0.0625,
         "ci": [-0.25, 0.125], "n_stimuli": n_novel}]
    return metrics


def _write_samples(path, rng, n_stimuli=6, n_samples=2, attention=True, model_dir=None):
    images = rng.integers(0, 256, (n_stimuli, 16, 16, 1), dtype=np.uint8)
    samples = rng.integers(0, 256, (n_stimuli, n_samples, 16, 16, 1), dtype=np.uint8)
    n_tokens, n_patches = 5, int(np.ceil(N_VOXELS / PATCH_SIZE))
    maps = rng.uniform(size=(3, 2, 4, 4, n_tokens))
    recorded = None
    if attention:
        weights = rng.uniform(size=(n_tokens, 1 + n_patches))
        recorded = {"maps": maps / maps.sum(-1, keepdims=True), "stimulus_id": ["img-001", "img-004"],
                    "timesteps": [900, 500, 100], "token_weights": weights / weights.sum(1, keepdims=True)}
    write_samples_h5(path, samples=samples, true_images=images, stimulus_id=[f"img-{i:03d}" for i in range(n_stimuli)],
                     label=np.arange(n_stimuli) % 3, seeds=np.zeros((n_stimuli, n_samples)),
                     attrs={"subject": "sub-01", "patch_size": PATCH_SIZE, "n_voxels": N_VOXELS,
                            **({"model_dir": str(model_dir)} if model_dir else {})},
                     attention=recorded)


def _write_responses(path, rng):
    flat = np.sort(rng.choice(np.prod(VOLUME_SHAPE), N_VOXELS, replace=False))
    voxel_ijk = np.stack(np.unravel_index(flat, VOLUME_SHAPE), axis=1)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-10, -60, 0]

    def split(n):
        return ResponseSplit(fmri=rng.normal(size=(n, N_VOXELS)).astype(np.float32),
                             stimulus_id=[f"img-{i:03d}" for i in range(n)], label=np.arange(n) % 3,
                             run=np.ones(n, int), onset=np.arange(n, dtype=float))

    write_responses(path, splits={"train": split(6), "val": split(3), "test": split(3),
                                  "test_avg": ResponseSplit.empty(N_VOXELS, averaged=True)},
                    voxel_ijk=voxel_ijk, affine=affine, volume_shape=VOLUME_SHAPE,
                    voxel_roi=["V1"] * N_VOXELS, class_names=CLASS_NAMES, tr=2.0, subject="sub-01",
                    method="glm_lss", preprocess_config={}, config={}, input_hashes={})


def _write_curve(path, n_epochs, keys):
    lines = [{"epoch": e, "step": 10 * (e + 1), **{key: 1.0 / (e + 1) for key in keys}} for e in range(n_epochs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def make_report_inputs(folder, rng):
    """A subject's evaluation outputs in the contract formats (metrics.json, samples.h5, responses.h5, curves)."""
    metrics = contract_metrics(rng)
    metrics_path = folder / "evaluation/metrics.json"
    metrics_path.parent.mkdir(parents=True)
    metrics_path.write_text(json.dumps(metrics))
    samples = {"dcldm": folder / "samples/samples.h5", "ridge": folder / "evaluation/ridge/samples.h5",
               "base-ceiling": folder / "evaluation/base-ceiling/samples.h5"}  # the last one is not written
    _write_samples(samples["dcldm"], rng)
    _write_samples(samples["ridge"], rng, attention=False)
    _write_responses(folder / "responses.h5", rng)
    _write_curve(folder / "mbm/metrics.jsonl", 3, ["train/loss", "val/loss", "val/recon_corr"])
    _write_curve(folder / "dcldm/train/metrics.jsonl", 2, ["train/loss", "val/loss", "val/embedding_identification",
                                                           "val/identification"])
    return {"metrics_path": metrics_path, "metrics": metrics, "samples": samples,
            "responses": folder / "responses.h5",
            "curves": {"SC-MBM: pretraining": folder / "mbm/metrics.jsonl",
                       "DC-LDM: SC-MBM pretrained": folder / "dcldm/train/metrics.jsonl",
                       "DC-LDM: no SC-MBM pretraining": folder / "missing/metrics.jsonl"}}


@pytest.fixture
def report_inputs(tmp_path, rng):
    return make_report_inputs(tmp_path, rng)


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    """One report built from the contract fixtures, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("report")
    inputs = make_report_inputs(folder, np.random.default_rng(0))
    out = folder / "report.html"
    info = html.build_report(inputs["metrics_path"], out,
                             config={"experiment": "fixture", "generate": {"attention_stimuli": 2}},
                             samples=inputs["samples"], responses=inputs["responses"], curves=inputs["curves"],
                             figures_dir=folder / "figures")
    return {**inputs, "html_path": out, "info": info, "figures_dir": folder / "figures"}


def test_a_row_drawn_by_the_same_decoder_as_another_is_named_once_with_its_twin(tmp_path):
    inputs = make_report_inputs(tmp_path, np.random.default_rng(1))
    metrics = json.loads(inputs["metrics_path"].read_text())
    rows = {row["id"]: row for row in metrics["rows"]}
    rows["dcldm-baseline"]["same_decoder_as"] = "dcldm"  # evaluate names the row whose drawing was copied
    assert tables.same_decoder_rows(metrics) == [{"id": "dcldm-baseline", "label": rows["dcldm-baseline"]["label"],
                                                  "same_as": rows["dcldm"]["label"]}]
    inputs["metrics_path"].write_text(json.dumps(metrics))
    html.build_report(inputs["metrics_path"], tmp_path / "report.html",
                      config={"experiment": "fixture", "generate": {"attention_stimuli": 2}},
                      samples=inputs["samples"], figures_dir=tmp_path / "figures")
    page = (tmp_path / "report.html").read_text()
    line = page.split('class="missing same-decoder" data-row="dcldm-baseline">')[1].split("</p>")[0]
    assert "is the same decoder as DC-LDM (SC-MBM pretrained)" in line
    # Without the record there is no such line.
    del rows["dcldm-baseline"]["same_decoder_as"]
    assert tables.same_decoder_rows(metrics) == []


# -- the brain map's voxel importance -------------------------------------------

def test_voxel_importance_matches_a_brute_force_sum(rng):
    maps = rng.uniform(size=(3, 2, 4, 5, 6))
    maps /= maps.sum(-1, keepdims=True)
    token_weights = rng.uniform(size=(6, 1 + 4))
    token_weights /= token_weights.sum(1, keepdims=True)
    importance = brainmap.voxel_importance(maps, token_weights, patch_size=3, n_voxels=11)
    expected = np.zeros(11)
    for voxel in range(11):
        for token in range(6):
            mass = np.mean([maps[s, a, y, x, token] for s in range(3) for a in range(2)
                            for y in range(4) for x in range(5)])
            expected[voxel] += mass * token_weights[token, 1 + voxel // 3]
    np.testing.assert_allclose(importance, expected, rtol=1e-10)
    # A token nobody attends to contributes nothing: move all attention off token 0.
    maps[..., 0] = 0.0
    token_weights[1:, 1:] = 0.0
    assert np.allclose(brainmap.voxel_importance(maps, token_weights, 3, 11), 0.0)


def test_voxel_importance_refuses_too_few_patches(rng):
    maps = rng.uniform(size=(1, 1, 2, 2, 3))
    with pytest.raises(MindvisError, match="cannot cover"):
        brainmap.voxel_importance(maps, rng.uniform(size=(3, 1 + 2)), patch_size=4, n_voxels=9)
    with pytest.raises(MindvisError, match="token_weights"):
        brainmap.voxel_importance(maps, rng.uniform(size=(4, 1 + 3)), patch_size=4, n_voxels=9)


def test_voxel_path_importance_is_the_normalised_weight_norm_per_voxel(tmp_path, rng):
    import torch
    from safetensors.torch import save_file

    weight = rng.normal(size=(7, 5))
    save_file({"conditioner.voxel_map.weight": torch.tensor(weight, dtype=torch.float32),
               "conditioner.width_map.weight": torch.zeros(2, 2)}, str(tmp_path / "dcldm.safetensors"))
    importance = brainmap.voxel_path_importance(tmp_path)
    expected = np.linalg.norm(weight, axis=0)
    np.testing.assert_allclose(importance, expected / expected.sum(), rtol=1e-5)
    # A decoder without a voxel path (MinD-Vis's mapper alone), or no decoder: no map.
    save_file({"conditioner.width_map.weight": torch.zeros(2, 2)}, str(tmp_path / "dcldm.safetensors"))
    assert brainmap.voxel_path_importance(tmp_path) is None
    assert brainmap.voxel_path_importance(tmp_path / "missing") is None


def _write_decoder(folder, rng, voxel_path=False, trained=("conditioner.width_map.weight",
                                                            "conditioner.token_map.weight"), ridge_errors=None):
    """A decoder folder as the brain map reads it: dcldm.json (what was trained, the voxel path's ridge) and weights."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"conditioner.width_map.weight": torch.tensor(rng.normal(size=(8, 4)), dtype=torch.float32)}
    if voxel_path:
        tensors["conditioner.voxel_map.weight"] = torch.tensor(rng.normal(size=(7, N_VOXELS)), dtype=torch.float32)
    save_file(tensors, str(folder / "dcldm.safetensors"))
    ridge = None if ridge_errors is None else {"alpha": min(ridge_errors, key=ridge_errors.get),
                                               "val_relative_error": ridge_errors}
    (folder / "dcldm.json").write_text(json.dumps({"trained_parameter_names": list(trained),
                                                   "voxel_path_ridge": ridge}))
    return folder


def _with_signal(metrics, two_way_low):
    row = next(row for row in metrics["rows"] if row["id"] == "dcldm")
    row["metrics"]["two_way_id"] = {"value": two_way_low + 0.05, "ci": [two_way_low, two_way_low + 0.1]}
    row["metrics"]["pixcorr"] = {"value": 0.0, "ci": [-0.1, 0.1]}
    return metrics


def test_brain_maps_use_only_a_trained_path_that_carries_signal(tmp_path, rng):
    signal = _with_signal(contract_metrics(rng), 0.6)
    # No voxel path: the encoder path is the only route; trained, and the decoder beats 1/2 on 2-way.
    paths = brainmap.attribution_paths(_write_decoder(tmp_path / "encoder", rng), signal)
    assert paths["attention"]["show"] and "SC-MBM encoder path" in paths["attention"]["text"]
    assert not paths["voxel"]["show"] and "no voxel path" in paths["voxel"]["text"]
    # ... but not when the decoder shows no signal, or the mapper was frozen.
    none = _with_signal(contract_metrics(rng), 0.4)
    assert not brainmap.attribution_paths(tmp_path / "encoder", none)["attention"]["show"]
    frozen = brainmap.attribution_paths(_write_decoder(tmp_path / "frozen", rng, trained=()), signal)
    assert not frozen["attention"]["show"] and "not among the trained" in frozen["attention"]["text"]
    # A voxel path fitted by ridge that beats its strongest regularisation on validation: its map, not attention.
    fitted = _write_decoder(tmp_path / "voxel", rng, voxel_path=True, ridge_errors={"10.0": 0.5, "1000.0": 0.9})
    paths = brainmap.attribution_paths(fitted, signal)
    assert paths["voxel"]["show"] and "ridge on training trials" in paths["voxel"]["text"]
    assert "kept fixed" in paths["voxel"]["text"]
    assert not paths["attention"]["show"] and "sums both paths" in paths["attention"]["text"]
    # A ridge that predicts held-out conditions no better than the mean carries no signal: no map.
    flat = _write_decoder(tmp_path / "flat", rng, voxel_path=True, ridge_errors={"10.0": 0.9, "1000.0": 0.9})
    assert "no measurable signal" in brainmap.attribution_paths(flat, signal)["voxel"]["text"]
    unfitted = _write_decoder(tmp_path / "unfitted", rng, voxel_path=True)
    assert not brainmap.attribution_paths(unfitted, signal)["voxel"]["show"]
    missing = brainmap.attribution_paths(None, signal)
    assert not missing["attention"]["show"] and "cannot be checked" in missing["voxel"]["text"]


def test_report_draws_the_brain_map_through_the_path_it_names(tmp_path, report_inputs, rng):
    decoder = _write_decoder(tmp_path / "dcldm", rng)
    _write_samples(report_inputs["samples"]["dcldm"], rng, model_dir=decoder)
    report_inputs["metrics_path"].write_text(json.dumps(_with_signal(report_inputs["metrics"], 0.6)))
    out = tmp_path / "brain.html"
    info = html.build_report(report_inputs["metrics_path"], out, config={"experiment": "x", "generate": {
        "attention_stimuli": 2}}, samples=report_inputs["samples"], responses=report_inputs["responses"])
    page = out.read_text()
    assert "brain" in info["figures"] and "brain_voxel" not in info["figures"]
    assert "through the SC-MBM encoder path" in page
    assert "Voxel-path map left out: the decoder has no voxel path" in page


def test_report_and_summary_show_withheld_classifier_figures_with_the_reason(tmp_path, rng):
    reason = "the image classifier cannot ground these figures: its top-1 on the true test images falls in 1 class"
    metrics = contract_metrics(rng, classifier_reason=reason)
    path = tmp_path / "sub-01" / "evaluation" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    html.build_report(path, tmp_path / "report.html", config={"experiment": "x", "generate": {"attention_stimuli": 2}})
    page = (tmp_path / "report.html").read_text()
    assert 'id="classifier-warning"' in page and reason in page
    rows = {row["id"]: row for row in tables.table_rows(metrics)}
    cells = {cell["metric"]: cell for cell in rows["dcldm"]["cells"]}
    assert cells["n_way_top1_mean"]["value"] == tables.WITHHELD and cells["fid"]["value"] == tables.WITHHELD
    assert cells["pixcorr"]["value"] != tables.WITHHELD  # pixel metrics need no classifier
    notes = tables.withheld_notes(metrics)
    numbers = {note["reason"]: note["number"] for note in notes}
    assert set(numbers) == {PIXEL_FLOORS, reason}
    assert cells["n_way_top1_mean"]["note"] == numbers[reason] and f"{tables.WITHHELD}: {reason}" in page
    frame = summary.write_summary([path], tmp_path / "summary.csv", tmp_path / "summary.html")
    assert np.isnan(frame.loc["sub-01", "dcldm/n_way_top1_mean"])
    text = summary.summary_text(frame, frame.attrs["notes"])
    assert reason in text and "sub-01" in text.split("Empty cells")[1]
    assert reason in (tmp_path / "summary.html").read_text()
    # Printing from the CSV alone finds each subject's metrics.json beside it (results/{subject}/evaluation/).
    assert summary.read_summary(tmp_path / "summary.csv").attrs["notes"] == frame.attrs["notes"]


# -- formatting, metrics.json checks, summary ---------------------------------

def test_formatting_rules():
    assert tables.format_value("ssim", 0.12345) == "0.123"
    assert tables.format_value("fid", 12.345) == "12.35"
    assert tables.format_value("pixcorr", None) == "n/a"
    assert tables.format_ci("two_way_id", [0.5, 0.75]) == "[0.500, 0.750]"
    assert tables.format_ci("two_way_id", None) == ""


def test_load_metrics_names_the_missing_key(tmp_path, rng):
    metrics = contract_metrics(rng)
    del metrics["rows"][2]["kind"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    with pytest.raises(MindvisError, match=r"rows\[2\]\.kind") as error:
        tables.load_metrics(path)
    assert str(path) in str(error.value)
    with pytest.raises(MindvisError, match="not found"):
        tables.load_metrics(tmp_path / "absent.json")


def test_summary_has_a_row_per_subject_and_the_mean(tmp_path, rng):
    paths = []
    for subject in ("sub-01", "sub-02"):
        path = tmp_path / subject / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(contract_metrics(rng, subject=subject)))
        paths.append(path)
    frame = summary.write_summary(paths, tmp_path / "summary.csv", tmp_path / "summary.html")
    assert list(frame.index) == ["sub-01", "sub-02", "mean"]
    first, second = (json.loads(p.read_text()) for p in paths)
    for column, (row_id, metric) in {"dcldm/ssim": ("dcldm", "ssim"),
                                     "ridge/n_way_top1_mean": ("ridge", "n_way_top1_mean")}.items():
        values = [tables.metric_value(m, row_id, metric) for m in (first, second)]
        assert frame.loc["sub-02", column] == pytest.approx(values[1])
        assert frame.loc["mean", column] == pytest.approx(np.mean(values))
    assert np.isnan(frame.loc["mean", "base-ceiling/n_way_top1_mean"])  # unavailable row
    # The fMRI probe sits under the label column only; the floors beside the model.
    assert "fmri-linear/label_top1_mean" in frame.columns and "fmri-linear/n_way_top1_mean" not in frame.columns
    assert "shuffled-pairs/n_way_top1_mean" in frame.columns and "dcldm/fid" in frame.columns
    assert any("sub-02" in note and "row not available" in note for note in frame.attrs["notes"])
    back = summary.read_summary(tmp_path / "summary.csv")
    assert back.attrs["notes"] == []  # no metrics.json at results/{subject}/evaluation/ beside this CSV
    numbers = [column for column in frame.columns if column != "classifier"]
    np.testing.assert_allclose(back[numbers].to_numpy(float), frame[numbers].to_numpy(float), rtol=1e-5)
    page = (tmp_path / "summary.html").read_text()
    assert tables.format_value("ssim", frame.loc["mean", "dcldm/ssim"]) in page and "http" not in page
    assert tables.format_value("fid", frame.loc["sub-01", "dcldm/fid"]) in summary.summary_text(back)
    # Every table names the classifier that scored it: the CSV's first column, the page, the printed text.
    name = first["classifier"]["name"]
    assert list(back["classifier"]) == [name] * 3 and frame.columns[0] == "classifier"
    assert f"scored by the classifier '{name}'" in page
    assert summary.summary_text(back).startswith(f"Classifier metrics (n-way, 2-way, FID) scored by the classifier "
                                                 f"'{name}'")


# -- the HTML report ---------------------------------------------------------------

def test_report_is_self_contained_and_complete(built_report):
    page = built_report["html_path"].read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<script" not in page
    # Every figure: 2 grids (model, ridge; base-ceiling has no file) + per-class, confusion, curves, attention.
    assert len(sources) == 6
    # The fixture's samples name no decoder folder: which path was trained cannot be checked, so no brain map
    # (drawn from a decoder folder below).
    assert set(built_report["info"]["figures"]) == set(html.FIGURE_FILES) - {"brain", "brain_voxel", "fewshot", "edits"}
    assert 'id="fewshot"' not in page  # not a few-shot subject
    assert "Attention-based map left out: the samples name no fine-tuned decoder folder" in page
    for row in built_report["metrics"]["rows"]:
        assert row["label"].replace(">", "&gt;").replace("'", "&#39;") in page
    # The pictures and the headline come first, then the full tables; an unavailable row is left out of every
    # table and named once, with why (issue 36).
    order = [page.index(f'<section id="{name}">') for name in ("images", "headline", "metrics", "comparisons")]
    assert order == sorted(order)
    left_out = page.split('id="left-out"')[1].split("</p>")[0]
    assert 'data-row="base-ceiling"' in left_out and "no image- or class-conditioned base generator" in left_out
    assert "unavailable:" not in page and 'data-row="base-ceiling"' not in page.split('id="left-out"')[0]
    assert 'data-row="base-ceiling"' not in page.split('<section id="metrics">')[1].split("</section>")[0]
    headline = page.split('id="headline-table"')[1].split("</table>")[0]
    kinds = re.findall(r'<tr class="kind-(\w+)" data-row', headline)
    assert kinds == sorted(kinds, key=tables.HEADLINE_KINDS.index) and kinds[0] == "model"
    dcldm = next(row for row in built_report["metrics"]["rows"] if row["id"] == "dcldm")["metrics"]
    assert tables.format_ci("n_way_top1_mean", dcldm["n_way_top1_mean"]["ci"]) in headline
    assert "top-1 vs. data label" in headline  # the fMRI probe's key metric
    assert "n-way top-1 vs. classifier on true image" in page and "top-1 vs. data label" in page
    assert "<details>" in page and "sub-01" in page and 'id="classifier-warning"' not in page
    # The chance row has no PixCorr: a dash and a note pointing to the floors, never "0.000".
    assert f"{tables.WITHHELD}: {PIXEL_FLOORS}" in page
    for filename in html.FIGURE_FILES.values():
        assert (built_report["figures_dir"] / filename).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_opens_with_a_preview_of_the_first_stimuli_and_draws_every_one_below(tmp_path, report_inputs,
                                                                                     monkeypatch):
    monkeypatch.setattr(html, "PREVIEW_STIMULI", 4)  # the fixture has 6 test stimuli
    out = tmp_path / "preview.html"
    html.build_report(report_inputs["metrics_path"], out, config={"experiment": "x", "generate": {
        "attention_stimuli": 2}}, samples=report_inputs["samples"])
    page = out.read_text()
    order = [page.index(f'<section id="{name}">') for name in ("images", "headline", "metrics", "all-images")]
    assert order == sorted(order)
    top = page.split('<section id="images">')[1].split("</section>")[0]
    below = page.split('<section id="all-images">')[1].split("</section>")[0]
    assert top.count("data-preview=") == below.count("data-grid=") == 2 and "The first\n    4 of 6" in top
    heights = {Image.open(io.BytesIO(base64.b64decode(uri))).size[1]
               for uri in re.findall(r'src="data:image/png;base64,([^"]*)"', top)}
    full = {Image.open(io.BytesIO(base64.b64decode(uri))).size[1]
            for uri in re.findall(r'src="data:image/png;base64,([^"]*)"', below)}
    assert max(heights) < min(full)  # 4 rows of images above, 6 below


def test_report_without_attention_or_logs_says_what_is_missing(tmp_path, report_inputs, rng):
    _write_samples(report_inputs["samples"]["dcldm"], rng, attention=False)
    out = tmp_path / "bare.html"
    info = html.build_report(report_inputs["metrics_path"], out, config={"experiment": "x", "generate": {
        "attention_stimuli": 2}}, samples=report_inputs["samples"], figures_dir=tmp_path / "bare")
    page = out.read_text()
    assert "no recorded attention maps" in page and "No training logs" in page
    assert "attention" not in info["figures"] and (tmp_path / "bare/attention.png").exists()


def test_report_and_summary_show_retrieval_and_the_ridge_embedding_row(tmp_path, rng):
    from mindvis.evaluate.table import RETRIEVAL_METRICS

    metrics = contract_metrics(rng)
    ridge = next(row for row in metrics["rows"] if row["id"] == "ridge-pixels")
    index = metrics["rows"].index(ridge) + 1
    label = "Ridge fMRI -> prior embedding, frozen prior"
    metrics["rows"].insert(index, {**ridge, "id": "ridge-embedding", "label": label,
                                   "metrics": {**ridge["metrics"]}})
    for row in metrics["rows"]:
        for metric in RETRIEVAL_METRICS:
            if row["id"] in ("dcldm", "ridge-embedding"):
                row["metrics"][metric] = _entry(rng, metric)
            elif row["id"] == "chance":
                row["metrics"][metric] = {"value": 1 / 6, "ci": [1 / 6, 1 / 6]}
    path = tmp_path / "sub-01" / "evaluation" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    grid = tmp_path / "sub-01" / "evaluation" / "ridge-embedding" / "samples.h5"
    grid.parent.mkdir()
    _write_samples(grid, rng, attention=False)
    html.build_report(path, tmp_path / "report.html", config={"experiment": "x", "generate": {"attention_stimuli": 2}},
                      samples={"ridge-embedding": grid})
    page = (tmp_path / "report.html").read_text()
    for metric in RETRIEVAL_METRICS:
        assert tables.METRIC_TITLES[metric].replace(">", "&gt;") in page
    assert tables.METRIC_TITLES["retrieval_brain_to_image_top1"].startswith("retrieval brain -> image top-1")
    rows = {row["id"]: row for row in tables.table_rows(metrics)}
    cells = {cell["metric"]: cell for cell in rows["ridge-embedding"]["cells"]}
    entry = next(row for row in metrics["rows"] if row["id"] == "ridge-embedding")["metrics"]
    assert cells["retrieval_image_to_brain_top1"]["value"] == tables.format_value(
        "retrieval_image_to_brain_top1", entry["retrieval_image_to_brain_top1"]["value"])
    assert {cell["metric"]: cell for cell in rows["ridge"]["cells"]}["retrieval_brain_to_image_top1"]["value"] == "n/a"
    assert label.replace(">", "&gt;") in page  # the table's row
    assert html.GRID_TITLES["ridge-embedding"].replace(">", "&gt;") in page  # its images
    # The summary: the row's key metric, and the model's retrieval where scored.
    frame = summary.write_summary([path], tmp_path / "summary.csv", tmp_path / "summary.html")
    assert frame.loc["sub-01", "ridge-embedding/n_way_top1_mean"] == pytest.approx(
        entry["n_way_top1_mean"]["value"])
    for metric in RETRIEVAL_METRICS:
        assert f"dcldm/{metric}" in frame.columns
    plain = summary.summary_table([contract_metrics(rng)])
    assert not any("retrieval" in column for column in plain.columns)  # not scored: no column


# -- in a real browser ---------------------------------------------------------------

def check_report_in_browser(html_path, metrics):
    """Open a report in headless Chromium: no console errors, every image decodes, the table holds metrics.json.

    Returns the number of images and of metric cells checked.
    """
    from playwright import sync_api  # in the test extra; only the browser itself may be missing locally

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (CI installs Debian's chromium; locally: apt-get install chromium)")
    errors = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"failed request {request.url}"))
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
            cells = page.eval_on_selector_all(
                "#metrics-table td[data-metric]",
                "cells => cells.map(c => [c.dataset.row, c.dataset.metric, c.querySelector('.value').textContent,"
                " (c.querySelector('.ci') || {textContent: ''}).textContent])")
            reasons = page.eval_on_selector_all("#left-out .left-out",
                                                "rows => rows.map(r => [r.dataset.row, r.textContent])")
            in_table = page.eval_on_selector_all("#metrics-table tr[data-row]", "rows => rows.map(r => r.dataset.row)")
        finally:
            browser.close()
    assert not errors, errors
    assert widths and all(width > 0 for width in widths), widths
    shown = {(row, metric): (value, ci) for row, metric, value, ci in cells}
    checked = 0
    for row in metrics["rows"]:
        if not row["available"]:  # left out of the table, named with its reason in one line
            assert any(row_id == row["id"] and row.get("reason", "") in text for row_id, text in reasons)
            assert row["id"] not in in_table
            continue
        assert row["id"] in in_table
        for metric, entry in (row.get("metrics") or {}).items():
            if (row["id"], metric) not in shown:
                assert all((r.get("metrics") or {}).get(metric) is None for r in metrics["rows"] if r["available"])
                continue
            value, ci = shown[(row["id"], metric)]
            if entry is None:
                assert value == "n/a"
                continue
            if entry["value"] is None:  # withheld: a dash, its reason in the notes below the table
                assert value == tables.WITHHELD and ci == ""
                continue
            assert value == tables.format_value(metric, entry["value"])
            assert float(value) == pytest.approx(entry["value"], abs=0.006)
            assert ci == tables.format_ci(metric, entry.get("ci"))
            checked += 1
    assert checked > 0
    return len(widths), checked


def test_report_in_headless_chromium(built_report):
    n_images, n_cells = check_report_in_browser(built_report["html_path"], built_report["metrics"])
    assert n_images == 6 and n_cells >= 30


def test_class_figures_stay_small_with_many_classes(rng):
    names = [f"class {i}" for i in range(150)]
    confusion = figures.confusion_png(rng.integers(0, 3, (150, 150)), names, "many classes")
    bars = figures.per_class_png({"dcldm": rng.uniform(size=150).tolist()}, names, {"dcldm": "model"})
    for png in (confusion, bars):
        width, height = Image.open(io.BytesIO(png)).size
        assert width <= figures.MAX_FIGURE_INCHES * 90 * 1.3 and height <= figures.MAX_FIGURE_INCHES * 90 * 1.3


# -- seen and novel categories, paired comparisons ------------------------------

def test_report_shows_seen_and_novel_tables_and_the_comparisons(tmp_path, rng):
    metrics = with_subsets(contract_metrics(rng), rng)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    html.build_report(path, tmp_path / "report.html", config={"experiment": "x", "generate": {"attention_stimuli": 2}})
    page = (tmp_path / "report.html").read_text()
    assert 'id="metrics-table"' in page and 'id="metrics-table-seen"' in page and 'id="metrics-table-novel"' in page
    assert "Seen categories (in the training trials): 4 test stimuli" in page
    assert "Novel categories (absent from the training trials): 2 test stimuli" in page
    assert "(4 seen, 2 novel)" in page
    # The subset tables show the subset's own figures, without FID (a set figure).
    novel_rows = {row["id"]: row for row in tables.table_rows(metrics, "novel")}
    cells = {cell["metric"]: cell for cell in novel_rows["dcldm"]["cells"]}
    entry = metrics["subsets"]["novel"]["rows"]["dcldm"]["ssim"]
    assert cells["ssim"]["value"] == tables.format_value("ssim", entry["value"]) and "fid" not in cells
    assert cells["ssim"]["value"] in page.split('id="metrics-table-novel"')[1].split("</table>")[0]
    assert not novel_rows["base-ceiling"]["available"]  # unavailability follows the row
    comparisons = tables.comparison_rows(metrics)
    assert [row["verdict"] for row in comparisons] == ["above 0", "includes 0"]
    assert comparisons[0]["difference"] == "+0.250" and comparisons[0]["ci"] == "[0.125, 0.375]"
    assert comparisons[0]["pair"] == "DC-LDM (SC-MBM pretrained) - DC-LDM without SC-MBM pretraining"
    table = page.split('id="comparisons-table"')[1].split("</table>")[0]
    assert table.count('class="above-zero"') == 1 and "-0.062" in table and "includes 0" in table


def test_report_says_why_a_subset_is_omitted_and_reads_old_metrics(tmp_path, rng):
    metrics = with_subsets(contract_metrics(rng), rng, n_seen=6, n_novel=0)
    assert [s["name"] for s in tables.subsets(metrics)] == ["all", "seen", "novel"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    html.build_report(path, tmp_path / "report.html", config={"experiment": "x", "generate": {"attention_stimuli": 2}})
    page = (tmp_path / "report.html").read_text()
    assert 'id="subset-novel-omitted"' in page and "0 novel test stimuli" in page
    assert 'id="metrics-table-novel"' not in page
    # A metrics.json from before the subsets: the table of all stimuli only, and no comparisons.
    old = contract_metrics(rng)
    assert [s["name"] for s in tables.subsets(old)] == ["all"] and tables.comparison_rows(old) == []
    path.write_text(json.dumps(old))
    html.build_report(path, tmp_path / "old.html", config={"experiment": "x", "generate": {"attention_stimuli": 2}})
    page = (tmp_path / "old.html").read_text()
    assert 'id="metrics-table-seen"' not in page and "No paired comparisons" in page


def test_summary_shows_every_subset_and_the_comparisons(tmp_path, rng):
    paths = []
    for subject, n_novel in (("sub-01", 2), ("sub-02", 0)):
        path = tmp_path / subject / "evaluation" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(with_subsets(contract_metrics(rng, subject=subject), rng, n_seen=4,
                                                n_novel=n_novel)))
        paths.append(path)
    frame = summary.write_summary(paths, tmp_path / "summary.csv", tmp_path / "summary.html")
    first = json.loads(paths[0].read_text())
    assert frame.loc["sub-01", "seen:dcldm/ssim"] == pytest.approx(first["subsets"]["seen"]["rows"]["dcldm"]["ssim"]
                                                                   ["value"])
    assert frame.loc["sub-01", "novel:n_stimuli"] == 2 and frame.loc["sub-02", "seen:n_stimuli"] == 4
    assert np.isnan(frame.loc["sub-02", "novel:dcldm/ssim"]) and np.isnan(frame.loc["mean", "novel:dcldm/ssim"])
    assert "seen:dcldm/fid" not in frame.columns and "dcldm/fid" in frame.columns
    assert frame.loc["mean", "seen:dcldm/pixcorr"] == pytest.approx(frame.loc[["sub-01", "sub-02"],
                                                                              "seen:dcldm/pixcorr"].mean())
    assert any(note.startswith("sub-02: novel:*: novel subset omitted") for note in frame.attrs["notes"])
    back = summary.read_summary(tmp_path / "summary.csv")
    text = summary.summary_text(back, back.attrs["notes"], back.attrs["comparisons"])
    for title in tables.SUBSET_TITLES.values():
        assert title in text
    assert "Paired comparisons" in text and "dcldm - dcldm-baseline" in text and "above 0" in text
    page = (tmp_path / "summary.html").read_text()
    assert page.count("<table data-subset=") == 3 and 'id="comparisons"' in page and "above-zero" in page


def test_the_terminal_headline_is_short_and_says_where_the_rest_is(tmp_path, rng, capsys):
    from mindvis import cli

    paths = []
    for subject in ("sub-01", "sub-02", "sub-03"):
        path = tmp_path / subject / "evaluation" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(with_subsets(contract_metrics(rng, subject=subject), rng, n_seen=4, n_novel=2)))
        paths.append(path)
    frame = summary.write_summary(paths, tmp_path / "summary.csv", tmp_path / "summary.html")
    config = tmp_path / "config.yaml"
    config.write_text("experiment: fixture\n")
    cli.main(["summary", "--config", str(config), "--csv", str(tmp_path / "summary.csv")])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 40
    # One line per available row: decoders first, then baselines, floors and ceilings, each named by its kind.
    kinds = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in
             summary.KIND_TITLES.values()]
    # The true images' n-way (1 by definition) is no headline figure: without their label top-1, no line.
    assert kinds == ["decoder"] + ["baseline"] * 3 + ["floor"] * 3 + ["ceiling"]
    assert summary.SHORT_LABELS["true-images"] not in text
    dcldm = next(line for line in lines if summary.SHORT_LABELS["dcldm"] in line)
    for subset in ("all", "seen", "novel"):  # the mean over subjects, then the lowest and highest subject
        column = summary.column_name(subset, "dcldm", "n_way_top1_mean")
        values = frame.loc[["sub-01", "sub-02", "sub-03"], column]
        assert (f"{tables.format_value('n_way_top1_mean', frame.loc['mean', column])} "
                f"({tables.format_value('n_way_top1_mean', values.min())}-"
                f"{tables.format_value('n_way_top1_mean', values.max())})") in dcldm
    assert "all (6)" in text and "seen (4)" in text and "novel (2)" in text
    # The row no subject has is left out of the table, with its reason.
    assert "prior given the true image" not in text.split("Left out")[0]
    assert "no image- or class-conditioned base generator" in text.split("Left out")[1]
    for place in ("summary.html", "summary.csv", "<subject>/report.html", "mindvis summary --full"):
        assert place in text.split("The rest:")[1]
    assert "Paired comparisons" not in text
    # From the CSV alone (no metrics.json beside it): the same table, the empty row left out all the same.
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "summary.csv").write_bytes((tmp_path / "summary.csv").read_bytes())
    back = summary.read_summary(tmp_path / "alone" / "summary.csv")
    alone = summary.headline_text(back, back.attrs["rows"], back.attrs["warnings"], tmp_path / "alone" / "summary.csv")
    assert [line for line in alone.splitlines() if summary.SHORT_LABELS["dcldm"] in line] == [dcldm]
    assert "prior given the true image" in alone.split("Left out")[1]
    cli.main(["summary", "--config", str(config), "--csv", str(tmp_path / "summary.csv"), "--full"])
    full = capsys.readouterr().out
    assert "Paired comparisons" in full and len(full.splitlines()) > len(lines)


def _fewshot_inputs(tmp_path, rng):
    """metrics.json with a dcldm-fewshot row, the few-shot dcldm.json, and a benchmark JSON for the subject."""
    metrics = with_subsets(contract_metrics(rng), rng)
    dcldm = next(row for row in metrics["rows"] if row["id"] == "dcldm")
    metrics["rows"].append({**dcldm, "id": "dcldm-fewshot", "label": "DC-LDM shared, adapted"})
    for subset in metrics["subsets"].values():
        subset["rows"]["dcldm-fewshot"] = subset["rows"]["dcldm"]
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(metrics))
    model = tmp_path / "dcldm-fewshot" / "dcldm.json"
    model.parent.mkdir()
    model.write_text(json.dumps({"n_train": 50, "n_train_all": 1000, "train_runs": 1, "train_fraction": 1.0,
                                 "responses_sha256": "a" * 64, "prior_preservation": {
                                     "weight": 1.0, "old_val_before": {"sub-02": {"val/loss": 0.5}},
                                     "old_val_after": {"sub-02": {"val/loss": 0.625}}}}))

    def scored(value):
        cell = {"value": value, "ci": [value - 0.1, value + 0.1]}
        return {"metrics": {"n_way_top1_mean": {"all": cell, "novel": cell}, "two_way_id": {"all": cell}}}

    benchmark = {"command": "python benchmarks/new_subject.py", "entries": [
        {"left_out": "sub-01", "responses_sha256": "a" * 64, "full": scored(0.75),
         "runs": {"0.1": {"n_train": 100, "fewshot": scored(0.5), "scratch": scored(0.25)},
                  "0.5": {"n_train": 500, "fewshot": scored(0.625), "scratch": scored(0.5)}}}]}
    path = tmp_path / "new_subject.json"
    path.write_text(json.dumps(benchmark))
    return metrics, metrics_path, model, path


def test_new_subject_report_draws_its_learning_curve_and_the_old_subjects(tmp_path, rng):
    metrics, metrics_path, model, benchmark = _fewshot_inputs(tmp_path, rng)
    curve = html.new_subject_curve(metrics, model, benchmark)
    this_run = curve["points"][0]
    assert this_run["source"] == "this run" and this_run["n_train"] == 50
    rows = {row["id"]: row for row in metrics["rows"]}
    assert this_run["adapted"]["two_way_id"]["all"] == rows["dcldm-fewshot"]["metrics"]["two_way_id"]
    assert this_run["scratch"]["n_way_top1_mean"]["novel"] == \
        metrics["subsets"]["novel"]["rows"]["dcldm"]["n_way_top1_mean"]
    assert [p["n_train"] for p in curve["points"][1:]] == [100, 500] and curve["full"] is not None
    assert curve["chance"]["n_way_top1_mean"] == pytest.approx(1 / 3) and curve["chance"]["two_way_id"] is None
    assert curve["old"] == [{"subject": "sub-02", "metric": "val/loss", "before": 0.5, "after": 0.625}]
    assert "its first 1 training run(s)" in curve["notes"][0]
    out = tmp_path / "report.html"
    info = html.build_report(metrics_path, out, config={"experiment": "x", "generate": {"attention_stimuli": 2}},
                             fewshot_model=model, fewshot_benchmark=benchmark, figures_dir=tmp_path / "figures")
    page = out.read_text()
    assert "fewshot" in info["figures"] and 'id="fewshot"' in page and "0.625" in page
    assert (tmp_path / "figures/fewshot_curve.png").stat().st_size > 5000


def test_new_subject_curve_refuses_a_benchmark_of_other_responses(tmp_path, rng):
    metrics, _, model, benchmark = _fewshot_inputs(tmp_path, rng)
    report = json.loads(benchmark.read_text())
    report["entries"][0]["responses_sha256"] = "b" * 64
    benchmark.write_text(json.dumps(report))
    curve = html.new_subject_curve(metrics, model, benchmark)
    assert len(curve["points"]) == 1 and curve["full"] is None
    assert any("another responses.h5" in note for note in curve["notes"])
    report["entries"][0]["left_out"] = "sub-09"
    benchmark.write_text(json.dumps(report))
    assert any("no entry for sub-01" in note for note in html.new_subject_curve(metrics, model, benchmark)["notes"])


def test_the_report_refuses_samples_rewritten_after_the_evaluation_or_of_another_subject(report_inputs, tmp_path):
    """The report shows the run its tables scored (issue 37): metrics.json's recorded SHA-256, and its subject."""
    import hashlib
    import shutil

    import h5py

    metrics = json.loads(report_inputs["metrics_path"].read_text())
    model = Path(report_inputs["samples"]["dcldm"])
    metrics["inputs"] = {str(model): hashlib.sha256(model.read_bytes()).hexdigest()}
    report_inputs["metrics_path"].write_text(json.dumps(metrics))
    config = {"experiment": "x", "generate": {"attention_stimuli": 2}}
    with h5py.File(model, "a") as handle:  # a rerun of generate after the evaluation
        handle.attrs["rerun"] = 1
    with pytest.raises(MindvisError, match=r"not the file .*metrics.json scored") as caught:
        html.build_report(report_inputs["metrics_path"], tmp_path / "report.html", config=config,
                          samples=report_inputs["samples"], responses=report_inputs["responses"])
    assert caught.value.path == model and "rerun evaluate" in caught.value.fix
    other = tmp_path / "other" / "samples.h5"
    other.parent.mkdir()
    shutil.copy(model, other)
    with h5py.File(other, "a") as handle:
        handle.attrs["subject"] = "sub-09"
    with pytest.raises(MindvisError, match=r"samples of sub-09, but .* is of") as caught:
        html.build_report(report_inputs["metrics_path"], tmp_path / "report.html", config=config,
                          samples={**report_inputs["samples"], "dcldm": other}, responses=report_inputs["responses"])
    assert not (tmp_path / "report.html").exists()
