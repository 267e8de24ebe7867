"""One decoder shared by several subjects, and few-shot adaptation of it to a new subject, at tiny sizes."""

import json
import re

import numpy as np
import pytest
import torch
from ldm_fixtures import save_tiny_mbm, tiny_config, write_synthetic_responses, write_synthetic_stimuli

from mindvis.data.pairs import MultiSubjectTrials, PairedTrials
from mindvis.data.responses import load_responses
from mindvis.errors import MindvisError
from mindvis.models.dcldm import build_decoder, load_dcldm
from mindvis.models.ldm import load_generator
from mindvis.models.shared import (SharedDecoder, adapter_from_ridge, fit_adapter, rank_candidates, rank_errors,
                                   select_rank, shared_ridge_start)
from mindvis.train.shared import adapt_subject, finetune_shared

#: Voxel counts differ between subjects, as they do in real data (native ROIs).
VOXELS = {"sub-01": 37, "sub-02": 40, "sub-03": 34}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root = tmp_path_factory.mktemp("shared")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5")
    for index, (subject, n_voxels) in enumerate(VOXELS.items()):
        write_synthetic_responses(root / f"{subject}.h5", stimuli, n_voxels=n_voxels, seed=index)
    save_tiny_mbm(root / "mbm")
    config = tiny_config(finetune={"shared_rank": 6, "adapt_epochs": 2, "ridge_lr_scale": 0.0})
    pretrain_ldm(config, root / "stimuli.h5", root / "ldm")
    return {"root": root, "config": config}


def _rng_decoder(workspace, n_voxels=37):
    config = {**workspace["config"]}
    # The shared decoder's core is mindvis-ext's (finetune_shared pins it): its subjects meet in the voxel path.
    config["finetune"] = {**config["finetune"], "mapper": "mindvis-ext", "voxel_path_rank": 6}
    return build_decoder(config, load_generator(workspace["root"] / "ldm"), n_voxels, mbm_dir=workspace["root"] / "mbm")


def test_views_share_every_part_but_the_adapter(workspace):
    shared = SharedDecoder.from_core(_rng_decoder(workspace), VOXELS)
    one, two = shared.view("sub-01"), shared.view("sub-02")
    assert one.encoder is two.encoder and one.unet is two.unet
    assert one.conditioner.voxel_map is two.conditioner.voxel_map and one.conditioner.token_map is two.conditioner.token_map
    assert one.conditioner.null_context is two.conditioner.null_context
    assert one.conditioner.voxel_down is not two.conditioner.voxel_down
    assert two.conditioner.voxel_down.weight.shape == (6, 40)
    # Each tensor is one parameter of the shared model: the shared parts once, an adapter per subject.
    names = [name for name, _ in shared.named_parameters()]
    assert sum(".voxel_down." in name for name in names) == 3
    assert sum(name.endswith("conditioner.voxel_map.weight") for name in names) == 1


def test_a_mixed_batch_is_routed_through_each_subjects_adapter(workspace):
    torch.manual_seed(0)
    shared = SharedDecoder.from_core(_rng_decoder(workspace), VOXELS).eval()
    for view in shared.views.values():
        torch.nn.init.normal_(view.conditioner.voxel_map.weight)
    fmri = {s: torch.randn(3, n) for s, n in VOXELS.items()}
    trials = MultiSubjectTrials({s: PairedTrials(x, torch.zeros(3, 1, 16, 16), np.zeros(3, np.int64))
                                 for s, x in fmri.items()})
    batch = trials.get_batch([4, 0, 7, 2])  # sub-02, sub-01, sub-03, sub-01
    assert batch["fmri"].shape == (4, 40) and batch["subject"].tolist() == [1, 0, 2, 0]
    with torch.no_grad():
        mixed = shared.condition(batch["fmri"], batch["subject"])
        alone = shared.view("sub-02").condition(fmri["sub-02"][1:2])
    torch.testing.assert_close(mixed.context[0], alone.context[0])
    torch.testing.assert_close(mixed.pooled[0], alone.pooled[0])


def test_the_shared_ridge_start_keeps_the_pooled_predictions_in_k_directions():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(20, 3)))[0]  # every subject's map lives in the same 3 directions
    weights = [basis @ rng.normal(size=(3, n)) for n in (15, 18)]
    fmri = [rng.normal(size=(50, n)) for n in (15, 18)]
    up, bias, adapters, info = shared_ridge_start(weights, [np.ones(20), np.zeros(20)], fmri, rank=3)
    assert up.shape == (20, 3) and [a.shape for a in adapters] == [(3, 15), (3, 18)]
    assert info["variance_kept"] == pytest.approx(1.0)
    for weight, adapter in zip(weights, adapters):
        np.testing.assert_allclose(up @ adapter, weight, atol=1e-4)
    np.testing.assert_allclose(bias, 0.5)
    np.testing.assert_allclose(adapter_from_ridge(up, weights[0]), adapters[0], atol=1e-4)


def test_rank_candidates_double_up_to_the_largest():
    assert rank_candidates(1) == [1] and rank_candidates(6) == [1, 2, 4, 6] and rank_candidates(8) == [1, 2, 4, 8]


def test_few_trials_choose_fewer_shared_directions_than_many():
    """The adapter's rank follows its data: what a subject's trials can estimate, in the order the others set."""
    rng = np.random.default_rng(1)
    n_voxels, width = 60, 8
    up = np.linalg.qr(rng.normal(size=(24, width)))[0] * np.linspace(3, 1, width)
    strength = np.array([1.0, 0.7, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08])  # later directions carry less
    mixing = rng.normal(size=(width, n_voxels))  # the subject: its voxels mix the shared directions
    chosen = {}
    for n in (12, 2000):
        latent = rng.normal(size=(n + 200, width)) * strength
        x, y = latent @ mixing + 3 * rng.normal(size=(n + 200, n_voxels)), latent @ up.T
        adapter, rank, report = fit_adapter(up, np.zeros(24), x[:n], y[:n], x[n:], y[n:], [0.1, 1.0, 10.0, 100.0])
        assert adapter.shape == (width, n_voxels) and not adapter[rank:].any() and adapter[:rank].any()
        assert report["rank"] == rank and set(report["val_relative_error"]) == {"1", "2", "4", "8"}
        errors = report["val_relative_error"]
        assert errors[str(rank)] == min(errors.values())
        chosen[n] = rank
    assert chosen[12] < chosen[2000]


def test_rank_errors_measure_the_decoders_own_prediction():
    rng = np.random.default_rng(2)
    up = np.linalg.qr(rng.normal(size=(10, 4)))[0] * 2.0
    weight = up @ rng.normal(size=(4, 7))  # a map inside the shared directions: rank 4 predicts exactly
    x = rng.normal(size=(30, 7))
    y = x @ weight.T + 0.5
    errors = rank_errors(up, np.full(10, 0.5), [weight], [x], [y], [1, 2, 4])
    assert errors[4] == pytest.approx(0.0, abs=1e-12) and errors[1] > errors[2] > errors[4]
    assert select_rank(errors) == 4 and select_rank({1: 0.5, 2: 0.5}) == 1


@pytest.fixture(scope="module")
def shared_run(workspace):
    root, config = workspace["root"], workspace["config"]
    old = ["sub-01", "sub-02"]
    summary = finetune_shared(config, old, [root / f"{s}.h5" for s in old], root / "stimuli.h5", root / "ldm",
                              root / "shared", [root / s / "dcldm-shared" for s in old], mbm_dir=root / "mbm")
    return summary


def test_finetune_shared_writes_one_ordinary_decoder_folder_per_subject(workspace, shared_run):
    root = workspace["root"]
    assert shared_run["subjects"] == ["sub-01", "sub-02"] and shared_run["step"] > 0
    rank = json.loads((root / "shared/shared.json").read_text())["rank"]
    # The width is chosen on the subjects' val trials among 1, 2, 4 and the most allowed (6).
    assert set(rank["val_relative_error"]) == {"1", "2", "4", "6"} and rank["max_rank"] == 6
    assert rank["rank"] == select_rank({int(r): e for r, e in rank["val_relative_error"].items()})
    width = int(rank["rank"])
    loaded = {}
    for subject in ("sub-01", "sub-02"):
        _, decoder, meta = load_dcldm(root / subject / "dcldm-shared")
        assert meta["stage"] == "finetune_shared" and meta["n_voxels"] == VOXELS[subject]
        assert meta["shared_rank"] == width
        loaded[subject] = decoder
    # The views are of one model: their shared tensors are equal (from_views checks it) and the UNet's trained
    # tensors were stored with each.
    shared = SharedDecoder.from_views(loaded)
    assert shared.view("sub-02").conditioner.voxel_down.weight.shape == (width, 40)
    other = {k: v for k, v in loaded["sub-02"].state_dict().items() if ".attn2." in k}
    assert other and all(torch.equal(v, shared.view("sub-01").state_dict()[k]) for k, v in other.items())


def test_views_of_different_models_are_refused(workspace, shared_run):
    root = workspace["root"]
    _, one, _ = load_dcldm(root / "sub-01/dcldm-shared")
    _, two, _ = load_dcldm(root / "sub-02/dcldm-shared")
    with torch.no_grad():
        two.conditioner.voxel_map.weight.add_(1.0)
    with pytest.raises(MindvisError, match="not views of one shared model"):
        SharedDecoder.from_views({"sub-01": one, "sub-02": two})


@pytest.mark.parametrize("train, share", [(["adapter"], {"train_fraction": 0.5}),
                                          (["adapter", "attn2"], {"train_runs": 1})])
def test_a_new_subject_is_adapted_from_a_share_of_its_trials(workspace, shared_run, train, share, tmp_path):
    root, config = workspace["root"], workspace["config"]
    config = {**config, "finetune": {**config["finetune"], **share, "new_subject_train": train}}
    views = {s: root / s / "dcldm-shared" for s in ("sub-01", "sub-02")}
    meta = adapt_subject(config, "sub-03", root / "sub-03.h5", root / "stimuli.h5", views, tmp_path / "fewshot",
                         old_responses={s: root / f"{s}.h5" for s in views})
    runs = load_responses(root / "sub-03.h5", splits=("train",))["train"].run
    expected = round(0.5 * len(runs)) if "train_fraction" in share else int(np.sum(runs == runs.min()))
    assert meta["stage"] == "adapt_subject" and meta["n_train"] == expected < meta["n_train_all"] == len(runs)
    _, decoder, _ = load_dcldm(tmp_path / "fewshot")
    width = shared_run["rank"]["rank"]
    adapter = decoder.conditioner.voxel_down.weight
    assert adapter.shape == (width, VOXELS["sub-03"])
    # Only the first adapter_rank shared directions are open, before and after training.
    assert meta["adapter_rank"] == meta["voxel_path_ridge"]["rank"] <= width
    assert torch.count_nonzero(adapter[meta["adapter_rank"]:]) == 0
    _, before, _ = load_dcldm(views["sub-01"])
    unet_before = {k: v for k, v in before.state_dict().items() if ".attn2." in k}
    unet_after = {k: v for k, v in decoder.state_dict().items() if ".attn2." in k}
    changed = any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    preservation = meta["prior_preservation"]
    if train == ["adapter"]:
        # Only the new adapter trained: every shared tensor, so every old subject's decoding, is unchanged.
        assert not changed and preservation["weight"] is None and not (tmp_path / "fewshot/preserved").exists()
    else:
        assert changed and preservation["weight"] == 1.0
        assert set(preservation["old_val_before"]) == set(preservation["old_val_after"]) == set(views)
        _, kept, _ = load_dcldm(tmp_path / "fewshot/preserved/sub-01")
        assert torch.equal(kept.conditioner.voxel_down.weight, before.conditioner.voxel_down.weight)


def test_the_adaptation_must_train_the_adapter(workspace, shared_run, tmp_path):
    root, config = workspace["root"], workspace["config"]
    config = {**config, "finetune": {**config["finetune"], "new_subject_train": ["attn2"]}}
    with pytest.raises(MindvisError, match="must name 'adapter'"):
        adapt_subject(config, "sub-03", root / "sub-03.h5", root / "stimuli.h5",
                      {"sub-01": root / "sub-01/dcldm-shared"}, tmp_path / "x")


def test_the_workflow_adds_the_shared_and_few_shot_jobs(tmp_path):
    from test_cluster import dry_run

    jobs = dry_run(tmp_path, finetune={"new_subject": "sub-02", "train_fraction": 0.25})
    shared = jobs["finetune_shared"][0][2]
    assert "--subjects sub-01 --responses results/sub-01/responses.h5" in shared and "sub-02" not in shared
    assert "--resume" in shared and "--mbm results/pretrain/mbm" in shared
    adapt = jobs["adapt_subject"][0][2]
    assert "--subject sub-02" in adapt and "--shared-views results/sub-01/dcldm-shared" in adapt
    assert [block for _, _, block in jobs["generate_shared"]] and "samples-fewshot" in jobs["generate_fewshot"][0][2]
    evaluate = {re.search(r"--subject (\S+)", block).group(1): block for _, _, block in jobs["evaluate"]}
    assert "--shared-samples results/sub-01/samples-shared/samples.h5" in evaluate["sub-01"]
    assert "--fewshot-samples results/sub-02/samples-fewshot/samples.h5" in evaluate["sub-02"]
    assert "--shared-samples" not in evaluate["sub-02"] and "--fewshot-samples" not in evaluate["sub-01"]


def test_an_unknown_new_subject_is_refused():
    from mindvis.config import validate

    with pytest.raises(MindvisError, match="not a decoded subject"):
        validate({"experiment": "x", "finetune": {"new_subject": "sub-09"}})
