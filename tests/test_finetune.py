"""pretrain_ldm -> finetune -> generate on synthetic stimuli and responses, at tiny sizes."""

import json

import h5py
import numpy as np
import pytest
import torch
from ldm_fixtures import (
    save_tiny_mbm,
    tiny_config,
    write_synthetic_responses,
    write_synthetic_stimuli,
)
from safetensors.torch import load_file

from mindvis.errors import MindvisError
from mindvis.models.conditioning import ReadoutConditioner
from mindvis.models.dcldm import build_decoder, load_dcldm
from mindvis.models.ldm import load_generator
from mindvis.train.finetune import finetune, freeze_for_finetuning, trainable_parameter_names


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Stimuli, one subject's responses, a tiny SC-MBM, a classifier and a pretrained tiny base generator."""
    from mindvis.train.classifier import train_classifier
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root = tmp_path_factory.mktemp("dcldm")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5")
    write_synthetic_responses(root / "responses.h5", stimuli)
    save_tiny_mbm(root / "mbm")
    config = tiny_config()
    train_classifier({**config, "classifier": {"epochs": 3, "widths": [4, 8]}}, root / "stimuli.h5",
                     root / "classifier")
    metrics = pretrain_ldm(config, root / "stimuli.h5", root / "ldm", classifier_dir=root / "classifier")
    return {"root": root, "config": config, "stimuli": stimuli, "ldm_metrics": metrics}


def test_pretrain_ldm_writes_a_loadable_base_from_pool_and_train_images_only(workspace):
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.train.pretrain_ldm import image_corpus

    root, metrics = workspace["root"], workspace["ldm_metrics"]
    generator = load_generator(root / "ldm")
    assert generator.latent_shape(1) == (1, 4, 8, 8) and generator.class_conditioner is not None
    assert generator.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert np.isfinite(metrics["val_recon_mse"]) and 0 <= metrics["class_samples"]["classifier_top1"] <= 1
    assert metrics["config"]["ldm"]["context_tokens"] == 5 and "torch" in metrics["versions"]
    assert (root / "ldm" / "class_samples.png").exists()
    stimuli = load_stimulus_set(root / "stimuli.h5")
    images, labels, val, _ = image_corpus(stimuli, 4, seed=0)
    assert len(images) == len(stimuli["pool"]) - 4 + len(stimuli["train"]) and len(val) == 4
    test_images = {image.tobytes() for image in stimuli["test"].images}
    assert not any(image.tobytes() in test_images for image in np.concatenate([images, val]))
    # Pool labels are kept where the source has them (-1 where it has not); training labels always.
    assert set(np.unique(labels[: len(stimuli["pool"]) - 4])) <= {-1, 0, 1, 2}
    assert (labels[len(stimuli["pool"]) - 4:] == stimuli["train"].label).all()


def test_trainable_groups_select_the_intended_parameters(workspace):
    root, config = workspace["root"], workspace["config"]
    decoder = build_decoder(config, load_generator(root / "ldm"), 37, mbm_dir=root / "mbm")
    attn2 = trainable_parameter_names(decoder, ["attn2"])
    assert attn2 and all(".attn2." in name for name in attn2)
    norms = trainable_parameter_names(decoder, ["norms"])
    assert norms and all("norm" in name.split(".")[-2] or "norm" in name for name in norms)
    encoder = trainable_parameter_names(decoder, ["encoder"])
    assert not any(name.startswith("encoder.decoder") for name in encoder)  # the MAE decoder is unused
    trained = freeze_for_finetuning(decoder, ["conditioner", "attn2"])
    assert {n for n, p in decoder.named_parameters() if p.requires_grad} == set(trained)
    with pytest.raises(MindvisError, match="unknown trainable groups"):
        trainable_parameter_names(decoder, ["everything"])


#: The MAE's reconstruction half: unused by ``encode``, never trained, not stored with the decoder.
UNUSED_ENCODER_PARTS = ("encoder.decoder", "encoder.mask_token")


@pytest.fixture(scope="module")
def finetuned(workspace):
    root, config = workspace["root"], workspace["config"]
    meta = finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "ldm", root / "dcldm",
                    mbm_dir=root / "mbm")
    return meta


def test_finetune_changes_trained_parameters_and_keeps_frozen_ones_bit_identical(workspace, finetuned):
    root, config = workspace["root"], workspace["config"]
    base = load_generator(root / "ldm")
    initial = build_decoder(config, base, 37, mbm_dir=root / "mbm")
    _, decoder, meta = load_dcldm(root / "dcldm")
    before = dict(initial.named_parameters())
    trained = set(meta["trained_parameter_names"])
    # The default mapper is the read-out: ridge-started, then trained whole with the rest (at ridge_lr_scale x lr);
    # there is no voxel path.
    readout = {"conditioner.readout.weight", "conditioner.readout.bias"}
    assert isinstance(initial.conditioner, ReadoutConditioner) and initial.conditioner.voxel_map is None
    assert meta["voxel_path_ridge"] is not None and meta["voxel_path"] is None
    assert config["finetune"]["mapper"] == "readout" and config["finetune"]["ridge_lr_scale"] > 0
    assert readout <= trained == trainable_parameter_names(initial, config["finetune"]["train"])
    stored = load_file(str(root / "dcldm" / "dcldm.safetensors"))
    assert trained <= set(stored) and not any(k.startswith("unet.") and k not in trained for k in stored)
    assert not any("voxel_map" in k or "voxel_down" in k for k in stored)
    # readout_inputs both (the default): the read-out's voxel standardisation is stored with it
    assert {"conditioner.voxel_mean", "conditioner.voxel_scale"} <= set(stored)
    assert meta["voxel_path_ridge"]["voxel_weight"] in (0.0, 1.0, 4.0, 16.0, 64.0)
    # The loaded decoder is a read-out decoder holding the stored tensors.
    assert isinstance(decoder.conditioner, ReadoutConditioner) and decoder.conditioner.voxel_map is None
    loaded = dict(decoder.named_parameters())
    assert all(torch.equal(loaded[name], stored[name]) for name in readout)
    for name, param in decoder.named_parameters():
        if name not in trained and name.startswith(("unet.", "encoder.")) and not name.startswith(UNUSED_ENCODER_PARTS):
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    # The decoder kept is the one val chose, maybe its untrained start (epoch -1); the last checkpoint holds
    # what training did to the trained parts.
    last = sorted((root / "dcldm" / "train" / "checkpoints").glob("step-*"))[-1]
    after = load_file(str(last / "model.safetensors"))
    changed = {prefix: sum(not torch.equal(after[name], before[name]) for name in trained
                           if name.startswith(prefix) and not name.startswith("conditioner.null"))
               for prefix in ("unet.", "encoder.")}
    assert changed["unet."] > 0 and changed["encoder."] > 0
    # The read-out trains on from its ridge start (the 0-step decoder in start/).
    _, start, _ = load_dcldm(root / "dcldm" / "start")
    ridge = dict(start.named_parameters())
    assert all(not torch.equal(after[name], ridge[name]) for name in readout)
    assert trained <= set(after)
    assert meta["n_trained_parameters"] < meta["n_parameters"]


def test_finetune_selects_on_validation_and_records_its_provenance(workspace, finetuned):
    root = workspace["root"]
    meta = json.loads((root / "dcldm" / "dcldm.json").read_text())
    # A class-conditioned base has no image encoder: auto selects on the validation diffusion loss (no label, no
    # classifier; the image-prior case is test_fine_tuning_and_its_selection_read_no_label_and_no_classifier).
    assert meta["select_metric"] == "val/loss" and meta["baseline"] is False
    history = [json.loads(line) for line in (root / "dcldm" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all("val/loss" in line for line in history)
    assert not any(key.startswith("test") or "accuracy" in key or "identification" in key
                   for line in history for key in line)
    best = min(history, key=lambda line: line["val/loss"])  # first of ties, as the engine keeps
    assert meta["best"]["epoch"] == best["epoch"]
    assert meta["config"]["finetune"]["epochs"] == 2 and meta["inputs"]["responses_sha256"]
    assert meta["n_val"] == 6 and meta["n_train"] == 18


def test_baseline_mode_trains_from_a_random_encoder(workspace, finetuned):
    root, config = workspace["root"], workspace["config"]
    config = {**config, "finetune": {**config["finetune"], "epochs": 1, "select_metric": "val/loss"}}
    meta = finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "ldm",
                    root / "dcldm-baseline", baseline=True)
    assert meta["baseline"] is True and meta["inputs"]["mbm"] is None and meta["select_metric"] == "val/loss"
    _, decoder, _ = load_dcldm(root / "dcldm-baseline")
    _, pretrained, _ = load_dcldm(root / "dcldm")
    # The baseline encoder is the configured preset, not the pretrained one.
    assert decoder.encoder.config.embed_dim != pretrained.encoder.config.embed_dim


def test_generate_writes_seeded_samples_attention_and_scores(workspace, finetuned):
    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import read_samples_h5

    root, config = workspace["root"], workspace["config"]
    summary = generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5",
                               root / "samples", classifier_dir=root / "classifier")
    data = read_samples_h5(root / "samples" / "samples.h5")
    assert data["samples"].shape == (3, 2, 16, 16, 1) and data["true_images"].shape == (3, 16, 16, 1)
    assert list(data["stimulus_id"]) == ["test-0000", "test-0001", "test-0002"]
    assert len(set(data["seeds"].ravel())) == 6
    assert data["attention"]["maps"].shape == (3, 2, 8, 8, 5)  # steps, stimuli, h, w, tokens
    assert data["attention"]["token_weights"].shape == (5, 1 + 10)  # class token + ceil(37 / 4) patches
    assert 0 <= summary["classifier_top1_mean"] <= summary["classifier_top1_best_of_k"] <= 1
    assert len(list((root / "samples" / "png").glob("*.png"))) == 6 and (root / "samples" / "grid.png").exists()
    # A rerun with another batch size gives the same images.
    again = generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5",
                             root / "samples-again", batch_size=3)
    rerun = read_samples_h5(root / "samples-again" / "samples.h5")
    difference = np.abs(rerun["samples"].astype(int) - data["samples"].astype(int))
    assert difference.max() <= 1 and again["n_stimuli"] == 3
    with h5py.File(root / "samples" / "samples.h5") as handle:
        assert json.loads(handle.attrs["config"])["generate"]["steps"] == 3


def test_a_decoder_with_the_weights_of_one_already_drawn_reuses_its_images(workspace, finetuned, tmp_path):
    import shutil

    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import read_samples_h5

    root, config = workspace["root"], workspace["config"]
    inputs = (root / "responses.h5", root / "stimuli.h5")
    generate_subject(config, "sub-01", root / "dcldm", *inputs, tmp_path / "drawn")
    drawn = tmp_path / "drawn" / "samples.h5"
    # Another folder with the same weights (only the files' metadata may differ): copied, not drawn.
    shutil.copytree(root / "dcldm", tmp_path / "copy")
    copied = generate_subject(config, "sub-01", tmp_path / "copy", *inputs, tmp_path / "copied", same_as=[drawn])
    assert copied["same_decoder_as"] == str(drawn) and copied["sampling_s"] == 0.0
    fresh = generate_subject(config, "sub-01", tmp_path / "copy", *inputs, tmp_path / "fresh")
    assert fresh["same_decoder_as"] is None and fresh["sampling_key"] == copied["sampling_key"]
    first, second, third = (read_samples_h5(tmp_path / name / "samples.h5") for name in ("drawn", "copied", "fresh"))
    for key in ("samples", "seeds", "predicted_label", "embedding"):
        assert (key in first) == (key in second) == (key in third)
        if key not in first:
            continue
        np.testing.assert_array_equal(second[key], third[key])
        np.testing.assert_array_equal(second[key], first[key])
    np.testing.assert_array_equal(second["attention"]["maps"], third["attention"]["maps"])
    assert second["attrs"]["same_decoder_as"] == str(drawn) and third["attrs"]["same_decoder_as"] == ""
    # The start (other weights after fine-tuning) and other sampling settings are drawn anew.
    start = generate_subject(config, "sub-01", root / "dcldm" / "start", *inputs, tmp_path / "start", same_as=[drawn])
    assert start["same_decoder_as"] is None and start["sampling_key"] != copied["sampling_key"]
    steps = {**config, "generate": {**config["generate"], "steps": config["generate"]["steps"] + 1}}
    other = generate_subject(steps, "sub-01", tmp_path / "copy", *inputs, tmp_path / "steps", same_as=[drawn])
    assert other["same_decoder_as"] is None


def test_alignment_loss_is_relative_and_ignores_unknown_classes():
    from mindvis.models.conditioning import Condition
    from mindvis.train.losses import alignment_loss

    generator = torch.Generator().manual_seed(0)
    target = Condition(torch.randn(4, 3, 5, generator=generator), torch.randn(4, 7, generator=generator))
    known = torch.tensor([True, True, False, True])
    assert alignment_loss(target, target, known).item() == 0.0
    # Only known rows count: changing an unknown row changes nothing.
    moved = Condition(target.context.clone(), target.pooled.clone())
    moved.context[2] += 100.0
    assert alignment_loss(moved, target, known).item() == 0.0
    # Relative: the null prediction scores 1 at any scale of the target.
    zero = Condition(torch.zeros_like(target.context), torch.zeros_like(target.pooled))
    scaled = Condition(target.context * 10, target.pooled * 10)
    assert alignment_loss(zero, target, known).item() == pytest.approx(1.0)
    assert alignment_loss(zero, scaled, known).item() == pytest.approx(1.0)
    assert alignment_loss(zero, target, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_alignment_needs_a_base_with_its_own_conditions(workspace, tmp_path):
    from ldm_fixtures import save_tiny_sd

    root, config = workspace["root"], workspace["config"]
    sd = save_tiny_sd(tmp_path / "sd")
    with pytest.raises(MindvisError, match="own conditions") as info:
        finetune({**config, "finetune": {**config["finetune"], "align_weight": 1.0}}, "sub-01",
                 root / "responses.h5", root / "stimuli.h5", sd, tmp_path / "out", mbm_dir=root / "mbm")
    assert info.value.key == "finetune.align_weight" and not (tmp_path / "out" / "dcldm.json").exists()


def test_ridge_voxel_map_picks_alpha_on_val_and_refits_on_train_only():
    """The validation split goes on to select fine-tuning's checkpoint: the ridge start must not have seen it."""
    from sklearn.linear_model import Ridge

    from mindvis.models.conditioning import ClassConditioner
    from mindvis.train.ridge_start import class_condition_targets, fit_ridge_voxel_map

    torch.manual_seed(0)
    classes = ClassConditioner(n_classes=3, context_tokens=2, cross_attention_dim=4, pooled_dim=5)
    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(3, 20))

    def trials(n):
        labels = rng.integers(0, 3, n)
        return patterns[labels] + rng.normal(scale=2.0, size=(n, 20)), labels

    (x_train, y_train), (x_val, y_val) = trials(60), trials(30)
    y_val[0] = -1  # unknown classes are left out (by condition_targets' mask, before the fit)
    alphas = [0.1, 10.0, 1000.0]
    known = y_val >= 0
    weight, bias, report = fit_ridge_voxel_map(x_train, class_condition_targets(classes, y_train), x_val[known],
                                               class_condition_targets(classes, y_val[known]), alphas)
    targets_val = class_condition_targets(classes, y_val[known])

    def val_error(alpha):
        prediction = Ridge(alpha=alpha).fit(x_train, class_condition_targets(classes, y_train)).predict(x_val[known])
        return np.mean(((prediction - targets_val) ** 2).sum(1) / (targets_val ** 2).sum(1))

    brute = {alpha: val_error(alpha) for alpha in alphas}
    assert report["alpha"] == min(brute, key=brute.get) and report["n_val"] == known.sum()
    for alpha in alphas:
        assert report["val_relative_error"][alpha] == pytest.approx(brute[alpha], rel=1e-6)
    refit = Ridge(alpha=report["alpha"]).fit(x_train, class_condition_targets(classes, y_train))
    np.testing.assert_allclose(weight, refit.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, refit.intercept_, rtol=1e-4, atol=1e-5)


def test_the_block_ridge_path_is_scikit_learns_ridge_for_every_weight_and_alpha():
    from sklearn.linear_model import Ridge

    from mindvis.models.linear import BlockRidgePath

    rng = np.random.default_rng(0)
    # More features than rows (the dual form scikit-learn also takes) and fewer, with offsets to centre away.
    for n_a, n_b in ((30, 70), (4, 6)):
        a, b = rng.normal(size=(60, n_a)) + 3, rng.normal(size=(60, n_b)) - 1
        y = a[:, :3] @ rng.normal(size=(3, 5)) + b[:, :2] @ rng.normal(size=(2, 5)) + 2
        path = BlockRidgePath(a[:40], b[:40], y[:40], a[40:], b[40:])
        for weight in (0.0, 1.0, 16.0):
            for alpha in (0.1, 10.0, 1e4):
                x = np.concatenate([a, weight * b], axis=1)
                reference = Ridge(alpha=alpha).fit(x[:40], y[:40])
                coef, intercept = path.solution(weight, alpha)
                np.testing.assert_allclose(coef, reference.coef_, rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(intercept, reference.intercept_, rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(path.val_predictions(weight, alpha), reference.predict(x[40:]),
                                           rtol=1e-7, atol=1e-9)


def test_a_frozen_encoder_is_stored_with_the_decoder(workspace):
    """Parts left out of finetune.train are still the decoder's: the loader must get the pretrained encoder back."""
    root, config = workspace["root"], workspace["config"]
    config = {**config, "finetune": {**config["finetune"], "epochs": 1, "train": ["conditioner", "attn2"],
                                     "select_metric": "val/loss"}}
    finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "ldm", root / "dcldm-frozen",
             mbm_dir=root / "mbm")
    _, decoder, meta = load_dcldm(root / "dcldm-frozen")
    pretrained = build_decoder(config, load_generator(root / "ldm"), 37, mbm_dir=root / "mbm").encoder
    assert not any(name.startswith("encoder.") for name in meta["trained_parameter_names"])
    for name, param in decoder.encoder.named_parameters():
        if not name.startswith(("decoder", "mask_token")):
            assert torch.equal(param, dict(pretrained.named_parameters())[name]), name


def test_an_image_prior_gives_every_trial_a_label_free_target():
    """With an image-conditioned prior the ridge target is the seen image's own condition: labels are not read."""
    from mindvis.models.ldm import build_embedded_generator
    from mindvis.train.ridge_start import condition_targets

    ldm = {"vae_block_out_channels": [8, 8], "vae_layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
           "unet_block_out_channels": [8, 16], "unet_layers_per_block": 1, "cross_attention_dim": 8,
           "attention_heads": 2, "num_train_timesteps": 10, "beta_schedule": "linear", "prediction_type": "epsilon",
           "conditioning": "image", "token_grid": 2, "token_dim": 3, "encoder_widths": [4, 8], "embedding_noise": 0.5,
           "context_tokens": 99}
    generator = build_embedded_generator(16, 1, 3, ldm).to(dtype=torch.float32)
    generator.image_conditioner.eval()
    assert generator.class_conditioner is None and generator.context_tokens == 4
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    targets, known = condition_targets(generator, images, torch.full((5,), -1))
    assert known.all() and targets.shape == (5, 4 * 8 + generator.pooled_dim)
    again, _ = condition_targets(generator, images, torch.arange(5))  # labels change nothing
    np.testing.assert_array_equal(targets, again)
    assert not np.allclose(targets[0], targets[1])  # the image, not a constant, sets the target


IMAGE_PRIOR = {"vae_block_out_channels": [8, 8], "vae_layers_per_block": 1, "latent_channels": 4,
               "norm_num_groups": 4, "unet_block_out_channels": [8, 16], "unet_layers_per_block": 1,
               "cross_attention_dim": 8, "attention_heads": 2, "num_train_timesteps": 10, "beta_schedule": "linear",
               "prediction_type": "epsilon", "conditioning": "image", "token_grid": 2, "token_dim": 3,
               "encoder_widths": [4, 8], "embedding_noise": 0.0, "context_tokens": 99}


def test_an_embedding_space_decoder_conditions_through_the_frozen_prior():
    """auto -> embedding space: the fMRI is mapped onto unit-scale prior tokens, which the prior's own mapping
    turns into context and pooled vector; the null condition is the prior's; no pooled output of its own."""
    from mindvis.models.ldm import build_embedded_generator

    torch.manual_seed(0)
    generator = build_embedded_generator(16, 1, 3, IMAGE_PRIOR).to(dtype=torch.float32)
    generator.image_conditioner.eval()
    config = tiny_config(finetune={"mapper": "mindvis-ext"})  # the voxel path's start (the read-out's: below)
    model = build_decoder(config, generator, 37, baseline=True).eval()
    assert model.conditioner.config.embedding and model.prior is generator.image_conditioner
    assert (model.conditioner.config.context_tokens, model.conditioner.config.cross_attention_dim) == (4, 3)
    weight = torch.randn(4 * 3, 37)
    model.conditioner.set_voxel_map(weight, torch.zeros(12))
    fmri = torch.randn(5, 37)
    with torch.no_grad():
        embedding = model.embedding(fmri)
        condition = model.condition(fmri)
        expected = torch.nn.functional.layer_norm((fmri @ weight.T).reshape(5, 4, 3), (3,))
    # The encoder path starts at zero beside the voxel path, so the start is the normalised linear map.
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embedding.pow(2).mean(-1), torch.ones(5, 4), rtol=1e-3, atol=1e-3)
    prior_condition = generator.image_conditioner.condition(embedding)
    torch.testing.assert_close(condition.context, prior_condition.context)
    torch.testing.assert_close(condition.pooled, prior_condition.pooled)
    torch.testing.assert_close(model.null(2).context, generator.image_conditioner.null(2).context)
    with pytest.raises(MindvisError, match="condition_space"):
        build_decoder(tiny_config(finetune={"condition_space": "embedding"}), tiny_generator_class(), 37,
                      baseline=True)
    other = build_decoder(tiny_config(finetune={"condition_space": "condition"}), generator, 37, baseline=True)
    assert other.prior is None and other.condition(fmri).context.shape[1:] == (generator.context_tokens, 8)


def tiny_generator_class():
    from ldm_fixtures import tiny_generator

    return tiny_generator()


def test_contrastive_loss_prefers_matched_pairs():
    from mindvis.train.losses import contrastive_loss, embedding_alignment_loss

    torch.manual_seed(0)
    target = torch.randn(8, 4, 3)
    near = target + 0.1 * torch.randn_like(target)
    shuffled = near[torch.randperm(8)]
    assert contrastive_loss(near, target, 0.1) < 0.1 < contrastive_loss(shuffled, target, 0.1)
    assert contrastive_loss(near[:1], target[:1], 0.1) == 0
    assert embedding_alignment_loss(target, target) == 0
    assert embedding_alignment_loss(torch.zeros_like(target), target) == pytest.approx(1.0)


def test_paired_trials_subset_is_seeded_and_ordered():
    from mindvis.data.pairs import PairedTrials

    trials = PairedTrials(np.arange(20, dtype=np.float32)[:, None], torch.zeros(20, 1, 2, 2), np.arange(20))
    half = trials.subset(0.5, seed=4)
    assert len(half) == 10 and np.all(np.diff(half.labels.numpy()) > 0)
    np.testing.assert_array_equal(half.labels.numpy(), trials.subset(0.5, seed=4).labels.numpy())
    assert not np.array_equal(half.labels.numpy(), trials.subset(0.5, seed=5).labels.numpy())
    assert trials.subset(1.0, seed=0) is trials and len(trials.subset(0.01, seed=0)) == 1
    np.testing.assert_array_equal(half.fmri[:, 0].numpy(), half.labels.numpy())


def test_training_share_by_runs_keeps_whole_first_runs():
    """finetune.train_runs: the trials of the lowest-numbered runs, whole and in order; a fraction draws over all."""
    from mindvis.data.pairs import PairedTrials, training_share

    runs = np.repeat([7, 2, 5, 9], 5)  # run numbers need not be sorted or contiguous in the file
    trials = PairedTrials(np.arange(20, dtype=np.float32)[:, None], torch.zeros(20, 1, 2, 2), np.arange(20), runs)
    one = training_share(trials, runs=1)
    assert set(one.runs) == {2} and one.labels.tolist() == [5, 6, 7, 8, 9]
    two = training_share(trials, runs=2, fraction=0.1, seed=0)  # runs win over the fraction
    assert set(two.runs) == {2, 5} and len(two) == 10 and np.all(np.diff(two.labels.numpy()) > 0)
    assert len(training_share(trials, runs=99)) == 20
    drawn = training_share(trials, fraction=0.5, seed=3)
    assert len(drawn) == 10 and len(set(drawn.runs)) > 2 and drawn.runs.shape == (10,)
    with pytest.raises(ValueError, match="no run numbers"):
        PairedTrials(np.zeros((3, 1)), torch.zeros(3, 1, 2, 2), np.arange(3)).first_runs(1)


def test_finetune_keeps_its_start_and_a_lowlevel_start_chosen_on_val(workspace, finetuned):
    """The 0-step decoder is written beside the trained one (and loads), the low-level start's strength comes
    from the candidates with its val scores, and the start competed for best/ (history line epoch -1)."""
    from mindvis.models.dcldm import load_lowlevel

    root, config = workspace["root"], workspace["config"]
    folder = root / "dcldm"
    _, start, start_meta = load_dcldm(folder / "start")
    assert start_meta["step"] == 0
    lowlevel = load_lowlevel(folder)
    assert lowlevel is not None
    candidates = sorted(set(config["finetune"]["lowlevel_strengths"]) | {1.0})
    assert [s["strength"] for s in lowlevel.info["val_scores"]] == candidates
    assert lowlevel.strength in candidates and lowlevel.info["ridge"]["refit"] == "train"
    history = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == -1 and history[0]["step"] == 0 and "val/loss" in history[0]


# -- the decoder is bound to what made it: subject, responses, stimuli and prior (issue 37) ------------------

def _other_subject_responses(path, source, subject="sub-02"):
    """``source``'s responses relabelled as another subject's (the default's subjects share template voxels)."""
    import shutil

    shutil.copy(source, path)
    with h5py.File(path, "a") as handle:
        handle.attrs["subject"] = subject
    return path


def _other_stimuli(path, source):
    """The same images under another attribution: another file, as another experiment's stimuli would be."""
    import shutil

    shutil.copy(source, path)
    with h5py.File(path, "a") as handle:
        handle.attrs["source"] = "another experiment"
    return path


def _changed_prior(path, source):
    """A copy of the prior with one UNet weight changed and its own hash record rewritten to match (a prior
    retrained in place: it loads cleanly on its own)."""
    import shutil

    from safetensors.torch import save_file

    from mindvis.utils.io import sha256_file

    shutil.copytree(source, path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights))
    record = json.loads((path / "generator.json").read_text())
    record["sha256"]["unet/diffusion_pytorch_model.safetensors"] = sha256_file(weights)
    (path / "generator.json").write_text(json.dumps(record))
    return path


def _consumers(workspace, tmp_path):
    """Each consumer of a decoder, as a call taking (responses, stimuli, base, overrides)."""
    from mindvis.evaluate.run import evaluate_subject
    from mindvis.generate.edit import edit_subject
    from mindvis.generate.run import generate_subject

    root, config = workspace["root"], workspace["config"]

    def generate(responses, stimuli, base=None, overrides=()):
        return generate_subject(config, "sub-01", root / "dcldm", responses, stimuli, tmp_path / "samples", base=base,
                                overrides=overrides)

    def edit(responses, stimuli, base=None, overrides=()):
        return edit_subject(config, "sub-01", root / "dcldm", responses, stimuli, tmp_path / "edits",
                            stimulus_ids=["test-0000"], operation="zero", rois=["V1"], base=base, overrides=overrides)

    def evaluate(responses, stimuli, base=None, overrides=()):
        return evaluate_subject(config, "sub-01", responses, stimuli, root / "samples" / "samples.h5",
                                base or root / "ldm", tmp_path / "evaluation", classifier_dir=root / "classifier",
                                overrides=overrides)

    return {"generate": generate, "edit": edit, "evaluate": evaluate}


def test_the_decoder_records_its_subject_inputs_and_prior(workspace, finetuned):
    from mindvis.models.dcldm import prior_digests
    from mindvis.utils.io import sha256_file

    root = workspace["root"]
    meta = json.loads((root / "dcldm" / "dcldm.json").read_text())
    assert meta["subject"] == "sub-01"
    assert meta["inputs"]["stimuli_sha256"] == sha256_file(root / "stimuli.h5")
    assert meta["inputs"]["responses_sha256"] == sha256_file(root / "responses.h5")
    assert meta["prior"]["relative"] == "../ldm" and meta["prior"]["bundled"] is None
    assert meta["prior"]["sha256"] == prior_digests(root / "ldm") and "unet/config.json" in meta["prior"]["sha256"]
    start = json.loads((root / "dcldm" / "start" / "dcldm.json").read_text())
    assert start["inputs"]["stimuli_sha256"] == meta["inputs"]["stimuli_sha256"] and start["prior"]["sha256"]


@pytest.mark.parametrize("consumer", ["generate", "edit", "evaluate"])
@pytest.mark.parametrize("change", ["subject", "stimuli", "prior"])
def test_each_consumer_refuses_another_subject_other_stimuli_and_a_changed_prior(workspace, finetuned, tmp_path,
                                                                                 consumer, change):
    from mindvis.generate.run import generate_subject

    root, config = workspace["root"], workspace["config"]
    if not (root / "samples" / "samples.h5").exists():
        generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5",
                         root / "samples", classifier_dir=root / "classifier")
    responses, stimuli, base = root / "responses.h5", root / "stimuli.h5", None
    if change == "subject":
        responses = _other_subject_responses(tmp_path / "responses.h5", responses)
        named, flag = responses, "--allow-other-subject"
    elif change == "stimuli":
        stimuli = _other_stimuli(tmp_path / "stimuli.h5", stimuli)
        named, flag = stimuli, "--allow-other-stimuli"
    else:
        base = _changed_prior(tmp_path / "ldm", root / "ldm")
        named, flag = base / "unet" / "diffusion_pytorch_model.safetensors", "--allow-other-prior"
    run = _consumers(workspace, tmp_path)[consumer]
    with pytest.raises(MindvisError) as caught:
        run(responses, stimuli, base)
    text = str(caught.value)
    assert "\n" not in text and caught.value.path == named, text
    assert str(root / "dcldm" / "dcldm.json") in text and flag in caught.value.fix, text
    assert not [p for p in tmp_path.iterdir() if p.name in ("samples", "edits", "evaluation")]
    if consumer == "generate":  # the user means it: decoded, and the outputs say so
        summary = run(responses, stimuli, base, overrides=(change,))
        assert summary["overrides"] == [change]
        with h5py.File(tmp_path / "samples" / "samples.h5") as handle:
            assert json.loads(handle.attrs["overrides"]) == [change]


def test_a_moved_prior_is_found_beside_the_decoder_or_every_place_is_named(workspace, finetuned, tmp_path):
    import shutil

    root = workspace["root"]
    moved = tmp_path / "checkout" / "results"
    shutil.copytree(root / "dcldm", moved / "dcldm")
    shutil.copytree(root / "ldm", moved / "ldm")
    meta_path = moved / "dcldm" / "dcldm.json"
    meta = json.loads(meta_path.read_text())
    meta["prior"]["path"] = str(tmp_path / "old-checkout" / "ldm")  # where the checkout was
    meta_path.write_text(json.dumps(meta))
    _, _, loaded = load_dcldm(moved / "dcldm")
    assert loaded["prior_used"] == {"path": str(moved / "dcldm" / "../ldm"), "same_as_recorded": True}
    shutil.rmtree(moved / "ldm")
    with pytest.raises(MindvisError) as caught:
        load_dcldm(moved / "dcldm")
    text = str(caught.value)
    assert caught.value.key == "prior.path" and str(tmp_path / "old-checkout" / "ldm") in text
    assert str(moved / "dcldm" / "../ldm") in text and "--base" in caught.value.fix


@pytest.mark.parametrize("record", ["prior", "subject", "stimuli_sha256"])
def test_a_decoder_without_its_binding_record_is_refused_not_loaded_unchecked(workspace, finetuned, tmp_path, record):
    import shutil

    from mindvis.generate.run import generate_subject

    root, config = workspace["root"], workspace["config"]
    folder = tmp_path / "dcldm"
    shutil.copytree(root / "dcldm", folder)
    meta = json.loads((folder / "dcldm.json").read_text())
    (meta["inputs"] if record == "stimuli_sha256" else meta).pop(record)
    (folder / "dcldm.json").write_text(json.dumps(meta))
    with pytest.raises(MindvisError, match="has no record of") as caught:
        generate_subject(config, "sub-01", folder, root / "responses.h5", root / "stimuli.h5", tmp_path / "samples")
    assert caught.value.path == folder / "dcldm.json" and record in caught.value.key
    assert not (tmp_path / "samples").exists()


# -- generate on a real full disk, and its folder replaced as a unit (issue 37) --------------------------------

def test_generate_on_a_real_full_disk_is_one_line_and_keeps_the_previous_folder(workspace, finetuned, tmp_path):
    import hashlib
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ldm_fixtures import fill_filesystem, small_filesystem

    from mindvis.config import dump_config
    from mindvis.generate.run import generate_subject

    root, config = workspace["root"], workspace["config"]
    previous = tmp_path / "previous"
    generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5", previous)
    dump_config(config, tmp_path / "config.yaml")
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        out = disk / "samples"
        shutil.copytree(previous, out)
        fill_filesystem(disk, 8 << 10)
        before = {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(disk.rglob("*")) if p.is_file()}
        result = subprocess.run(
            [sys.executable, "-m", "mindvis.cli", "generate", "--config", str(tmp_path / "config.yaml"), "--subject",
             "sub-01", "--model-dir", str(root / "dcldm"), "--responses", str(root / "responses.h5"), "--stimuli",
             str(root / "stimuli.h5"), "--out-dir", str(out), "--threads", "1"],
            capture_output=True, text=True, cwd=Path(__file__).parent, check=False)
        assert result.returncode == 2, f"rc {result.returncode}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("mindvis: error: ")]
        assert len(lines) == 1 and "disk is full" in lines[0] and str(out) in lines[0], result.stderr[-2000:]
        after = {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(disk.rglob("*")) if p.is_file()}
        assert after == before, "the previous samples folder changed, or the new run left files"
        assert not list(disk.glob(".*")), "a staging folder or temporary was left on the full disk"


def test_generate_replaces_its_folder_as_a_unit_and_refuses_a_folder_of_other_files(workspace, finetuned, tmp_path):
    from mindvis.generate.run import generate_subject

    root, config = workspace["root"], workspace["config"]
    out = tmp_path / "samples"
    (out / "png").mkdir(parents=True)
    (out / "png" / "an-earlier-stimulus_0.png").write_bytes(b"an earlier run's image of another stimulus")
    generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5", out)
    assert not (out / "png" / "an-earlier-stimulus_0.png").exists()  # nothing of the earlier run is left beside
    assert len(list((out / "png").glob("*.png"))) == 6 and not list(tmp_path.glob(".*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's notes")
    with pytest.raises(MindvisError, match="holds 1 files generate did not write") as caught:
        generate_subject(config, "sub-01", root / "dcldm", root / "responses.h5", root / "stimuli.h5",
                         tmp_path / "mine")
    assert caught.value.key == "--out-dir" and (tmp_path / "mine" / "notes.txt").read_text() == "a user's notes"


# -- the read-out route and label-free model selection (issue 32) ----------------------------------------------

def test_the_readout_starts_at_the_ridge_solution_of_the_encoder_features(workspace, finetuned):
    """The 0-step decoder's condition is the ridge from the starting encoder's features and the scaled voxels: its
    val identification and relative error are those the fit reports for the alpha it chose (the best val
    identification), as dcldm.json records them."""
    from mindvis.data.pairs import paired_trials
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.models.linear import identification, relative_squared_error
    from mindvis.train.ridge_start import condition_targets

    root = workspace["root"]
    report = json.loads((root / "dcldm" / "dcldm.json").read_text())["voxel_path_ridge"]
    errors = {float(alpha): error for alpha, error in report["val_relative_error"].items()}
    identified = {float(alpha): value for alpha, value in report["val_identification"].items()}
    assert report["alpha"] == max(identified, key=identified.get) and report["target"] == "class condition"
    assert report["criterion"] == "identification" and str(report["voxel_weight"]) in report["voxel_weight_scores"]
    assert report["n_features"] == 11 * 16 + 37 and report["n_train"] == 18 and report["n_val"] == 6
    generator, start, _ = load_dcldm(root / "dcldm" / "start")
    assert isinstance(start.conditioner, ReadoutConditioner) and start.prior is None
    val = paired_trials(load_responses(root / "responses.h5", splits=("val",))["val"],
                        load_stimulus_set(root / "stimuli.h5"), generator.image_size, generator.image_channels)
    targets, known = condition_targets(generator, val.images, val.labels, "condition")
    assert known.all()
    with torch.no_grad():
        condition = start.eval().condition(val.fmri)
    decoded = torch.cat([condition.context.flatten(1), condition.pooled], dim=1).double().numpy()
    assert relative_squared_error(targets, decoded) == pytest.approx(errors[report["alpha"]], rel=1e-4)
    assert identification(decoded, targets) == pytest.approx(identified[report["alpha"]], abs=1e-9)


def test_readout_conditioner_shapes_standardised_embedding_set_readout_and_round_trip(tmp_path):
    from mindvis.models.dcldm import CONDITIONERS

    torch.manual_seed(0)
    conditioner = ReadoutConditioner(input_tokens=6, input_dim=10, context_tokens=3, cross_attention_dim=4,
                                     pooled_dim=7).eval()
    assert conditioner.voxel_map is None and tuple(conditioner.readout.weight.shape) == (3 * 4 + 7, 6 * 10)
    tokens = torch.randn(2, 6, 10)
    out = conditioner(tokens)
    assert out.context.shape == (2, 3, 4) and out.pooled.shape == (2, 7)
    assert conditioner.null(2).context.shape == (2, 3, 4) and conditioner.null(2).pooled.shape == (2, 7)
    assert conditioner.token_weights().shape == (3, 6)
    torch.testing.assert_close(conditioner.token_weights().sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="expected 6 encoder tokens"):
        conditioner(torch.randn(2, 5, 10))
    # Padding tokens (mask False) have no influence.
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    moved = tokens.clone()
    moved[:, 4:] += 5.0
    torch.testing.assert_close(conditioner(tokens, mask).context, conditioner(moved, mask).context)
    # set_readout: condition = weight @ features + bias, the features each token standardised, then flattened.
    weight, bias = torch.randn(19, 60), torch.randn(19)
    conditioner.set_readout(weight, bias)
    features = conditioner.features(tokens)
    torch.testing.assert_close(features, torch.nn.functional.layer_norm(tokens, (10,)).flatten(1))
    out = conditioner(tokens)
    torch.testing.assert_close(torch.cat([out.context.flatten(1), out.pooled], 1), features @ weight.T + bias,
                               rtol=1e-5, atol=1e-5)
    # Embedding mode (an image prior): each output token standardised as the prior's are, no pooled vector.
    embedding = ReadoutConditioner(input_tokens=6, input_dim=10, context_tokens=3, cross_attention_dim=4,
                                   pooled_dim=7, embedding=True).eval()
    assert tuple(embedding.readout.weight.shape) == (12, 60)
    embedding.set_readout(torch.randn(12, 60) * 3, torch.randn(12) + 2)
    context = embedding(tokens * 3 + 1).context
    assert embedding(tokens).pooled.shape == (2, 0)
    torch.testing.assert_close(context.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(context.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    expected = embedding.readout(embedding.features(tokens * 3 + 1)).reshape(2, 3, 4)
    torch.testing.assert_close(context, torch.nn.functional.layer_norm(expected, (4,)))
    # save_pretrained / from_pretrained, and the loader's class table, give it back.
    for name, original in (("plain", conditioner), ("embedding", embedding)):
        original.save_pretrained(tmp_path / name)
        loaded = CONDITIONERS[json.loads((tmp_path / name / "config.json").read_text())["_class_name"]]
        assert loaded is ReadoutConditioner
        loaded = loaded.from_pretrained(tmp_path / name).eval()
        assert loaded.config.embedding == original.config.embedding and loaded.voxel_map is None
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        again, first = loaded(tokens, mask), original(tokens, mask)
        torch.testing.assert_close(again.context, first.context, rtol=0, atol=0)
        torch.testing.assert_close(again.pooled, first.pooled, rtol=0, atol=0)


def test_a_readout_embedding_decoder_conditions_through_the_frozen_prior():
    """The default mapper on an image prior: the read-out of the encoder's features, standardised per token, is the
    embedding the frozen prior turns into the condition; the null condition is the prior's."""
    from mindvis.models.ldm import build_embedded_generator

    torch.manual_seed(0)
    generator = build_embedded_generator(16, 1, 3, IMAGE_PRIOR).to(dtype=torch.float32)
    generator.image_conditioner.eval()
    model = build_decoder(tiny_config(), generator, 37, baseline=True).eval()
    conditioner = model.conditioner
    assert isinstance(conditioner, ReadoutConditioner) and conditioner.config.embedding
    assert model.prior is generator.image_conditioner and conditioner.voxel_map is None
    n_features = conditioner.readout.in_features
    weight, bias = torch.randn(4 * 3, n_features), torch.randn(4 * 3)
    conditioner.set_readout(weight, bias)
    fmri = torch.randn(5, 37)
    with torch.no_grad():
        features = conditioner.features(model.encoder.encode(fmri), model.token_mask(fmri), fmri=fmri)
        expected = torch.nn.functional.layer_norm((features @ weight.T + bias).reshape(5, 4, 3), (3,))
        embedding = model.embedding(fmri)
        condition = model.condition(fmri)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-4)
    prior_condition = generator.image_conditioner.condition(embedding)
    torch.testing.assert_close(condition.context, prior_condition.context)
    torch.testing.assert_close(condition.pooled, prior_condition.pooled)
    torch.testing.assert_close(model.null(2).context, generator.image_conditioner.null(2).context)


def test_identification_is_one_for_a_perfect_match_and_chance_for_a_shuffle():
    from mindvis.train.selection import identification

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 4, 3))
    assert identification(truth, truth) == 1.0
    assert identification(torch.as_tensor(truth) * 3.0 + 1.0, torch.as_tensor(truth)) == 1.0  # centred cosine
    near = truth + 0.3 * rng.normal(size=truth.shape)
    assert identification(near, truth) > 0.95
    assert identification(truth[::-1].copy(), truth) == pytest.approx(0.5, abs=0.06)
    assert identification(truth[rng.permutation(200)], truth) == pytest.approx(0.5, abs=0.06)
    assert identification(rng.normal(size=truth.shape), truth) == pytest.approx(0.5, abs=0.06)
    assert np.isnan(identification(truth[:1], truth[:1])) and np.isnan(identification(truth[:0], truth[:0]))
    assert identification(truth[:2], truth[:2]) == 1.0 and identification(truth[1::-1].copy(), truth[:2]) == 0.0


#: Each fine-tuning command with its required flags.
FINETUNE_COMMANDS = {
    "finetune": ["--subject", "sub-01", "--responses", "r.h5", "--stimuli", "s.h5", "--base", "ldm", "--out-dir", "o"],
    "finetune-shared": ["--subjects", "sub-01", "--responses", "r.h5", "--stimuli", "s.h5", "--base", "ldm",
                        "--out-dir", "o", "--view-dirs", "v"],
    "adapt-subject": ["--subject", "sub-02", "--responses", "r.h5", "--stimuli", "s.h5", "--shared-subjects", "sub-01",
                      "--shared-views", "v", "--out-dir", "o"],
}


@pytest.mark.parametrize("command", sorted(FINETUNE_COMMANDS))
def test_fine_tuning_commands_take_no_classifier(command, capsys, monkeypatch):
    """finetune, finetune-shared and adapt-subject refuse --classifier (argparse, exit 2) and hand their stage no
    classifier; pretrain-ldm still passes its --classifier on (its class samples are scored with it)."""
    from mindvis import cli

    parser = cli.build_parser()
    argv = [command, "--config", "c.yaml", *FINETUNE_COMMANDS[command]]
    with pytest.raises(SystemExit) as info:
        parser.parse_args([*argv, "--classifier", "clf"])
    assert info.value.code == 2 and "unrecognized arguments: --classifier" in capsys.readouterr().err
    called = {}
    monkeypatch.setattr(cli, "_call", lambda target, *args, **kwargs: called.update(target=target, **kwargs))
    monkeypatch.setattr(cli, "_config", lambda args: {})
    args = parser.parse_args(argv)
    args.handler(args)
    assert called["target"].split(":")[1] in ("finetune", "finetune_shared", "adapt_subject")
    assert not any("classifier" in key for key in called)
    args = parser.parse_args(["pretrain-ldm", "--config", "c.yaml", "--stimuli", "s.h5", "--out-dir", "o",
                              "--classifier", "clf"])
    args.handler(args)
    assert called["target"].endswith(":pretrain_ldm") and called["classifier_dir"] == "clf"


#: A tiny image prior (its label-free image encoder gives the ridge targets and val/identification).
IMAGE_BASE = {"conditioning": "image", "vae_steps": 3, "unet_steps": 5, "val_images": 4, "eval_samples_per_class": 1}


@pytest.fixture(scope="module")
def image_prior(workspace):
    from mindvis.train.pretrain_ldm import pretrain_ldm

    root = workspace["root"]
    config = tiny_config(ldm=IMAGE_BASE, finetune={"epochs": 1, "val_max_trials": None})  # every val trial
    pretrain_ldm(config, root / "stimuli.h5", root / "ldm-image")
    return {"base": root / "ldm-image", "config": config}


def _refuse_classifiers(monkeypatch):
    """Every way to the evaluation classifier raises (its loaders, wherever imported by name, and its predictions)."""
    import sys

    from mindvis.models.classifiers import base, domain, imagenet, load

    def refuse(*args, **kwargs):
        raise AssertionError("fine-tuning read the evaluation classifier")

    loaders = {id(getattr(module, name)): name for module, name in (
        (domain, "load_classifier"), (domain, "domain_image_classifier"), (load, "load_image_classifier"),
        (imagenet, "load_efficientnet_lite0"), (imagenet, "load_vit_h_14"))}
    for module in [m for name, m in sys.modules.items() if name.startswith("mindvis") and m is not None]:
        for attribute, value in list(vars(module).items()):
            if id(value) in loaders and attribute == loaders[id(value)]:
                monkeypatch.setattr(module, attribute, refuse)
    for kind, methods in ((domain.DomainClassifier, ("forward", "predict_proba")),
                          (base.ImageClassifier, ("predict_proba", "predict_proba_and_features"))):
        for method in methods:
            monkeypatch.setattr(kind, method, refuse)


def _scramble_labels(monkeypatch, n_classes):
    """Fine-tuning reads stimuli and responses whose labels are all changed: every other trial's class moved on
    by one, the rest unknown (-1). Returns the labels its trials were paired with."""
    import mindvis.train.finetune as stage

    def scrambled(labels):
        labels = np.asarray(labels)
        return np.where(np.arange(len(labels)) % 2 == 0, (labels + 1) % n_classes, -1).astype(labels.dtype)

    original = {name: getattr(stage, name) for name in ("load_responses", "load_stimulus_set", "paired_trials")}
    seen = []

    def responses(*args, **kwargs):
        data = original["load_responses"](*args, **kwargs)
        for split in data.splits.values():
            split.label = scrambled(split.label)
        return data

    def stimuli(*args, **kwargs):
        stimulus_set = original["load_stimulus_set"](*args, **kwargs)
        for split in stimulus_set.splits.values():
            split.label = scrambled(split.label)
        return stimulus_set

    def paired(*args, **kwargs):
        trials = original["paired_trials"](*args, **kwargs)
        seen.append(trials.labels.clone())
        return trials

    monkeypatch.setattr(stage, "load_responses", responses)
    monkeypatch.setattr(stage, "load_stimulus_set", stimuli)
    monkeypatch.setattr(stage, "paired_trials", paired)
    return seen


def test_fine_tuning_and_its_selection_read_no_label_and_no_classifier(workspace, image_prior, tmp_path, monkeypatch):
    """With an image prior, fine-tuning on trials whose labels are scrambled gives the very decoder (every stored
    tensor, the low-level start, the checkpoint chosen, every val metric) that the true labels give, and no step
    reaches the evaluation classifier: the ridge start, the losses, val/identification and the low-level strength
    read neither."""
    from mindvis.data.responses import load_responses

    root, config = workspace["root"], image_prior["config"]
    assert load_generator(image_prior["base"]).image_conditioner is not None
    _refuse_classifiers(monkeypatch)
    runs = {}
    for name in ("labels", "scrambled"):
        with monkeypatch.context() as patch:
            seen = _scramble_labels(patch, 3) if name == "scrambled" else None
            runs[name] = finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", image_prior["base"],
                                  tmp_path / name, mbm_dir=root / "mbm")
    # The scrambled run's trials carried other labels than the true ones, every one of them.
    data = load_responses(root / "responses.h5", splits=("train", "val"))
    assert [len(labels) for labels in seen] == [18, 6]
    for labels, split in zip(seen, ("train", "val")):
        assert (labels.numpy() != data[split].label).all()
    meta = runs["labels"]
    assert meta["select_metric"] == "val/identification" and meta["condition_space"] == "embedding"
    assert meta["voxel_path_ridge"]["target"] == "prior image embedding" and meta["lowlevel"] is not None
    history = {name: [json.loads(line) for line in (tmp_path / name / "train/metrics.jsonl").read_text().splitlines()]
               for name in runs}
    assert all({"val/loss", "val/identification", "val/embedding_identification"} <= set(line)
               for line in history["labels"])
    assert not any("accuracy" in key for line in history["labels"] for key in line)
    best = max(history["labels"], key=lambda line: line["val/identification"])  # first of ties, as the engine keeps
    assert meta["best"]["epoch"] == best["epoch"]
    untimed = [{k: v for k, v in line.items() if k not in ("time_s", "samples_per_s")} for line in history["labels"]]
    assert untimed == [{k: v for k, v in line.items() if k not in ("time_s", "samples_per_s")}
                       for line in history["scrambled"]]
    recorded = [json.loads((tmp_path / name / "dcldm.json").read_text()) for name in runs]
    for key in ("best", "select_metric", "voxel_path_ridge", "lowlevel", "embedding_prior"):
        assert recorded[0][key] == recorded[1][key], key
    # The decoder kept (maybe the start), the start, the low-level start, and what training made (last checkpoint).
    last = max((tmp_path / "labels" / "train" / "checkpoints").glob("step-*")).relative_to(tmp_path / "labels")
    for file_name in ("dcldm.safetensors", "start/dcldm.safetensors", "lowlevel.safetensors",
                      "embedding_prior.safetensors", last / "model.safetensors"):
        tensors = [load_file(str(tmp_path / name / file_name)) for name in runs]
        assert tensors[0].keys() == tensors[1].keys()
        for key, value in tensors[0].items():
            assert torch.equal(value, tensors[1][key]), f"{file_name}: {key} depends on the labels"


def test_the_fine_tuning_defaults_select_without_labels():
    """The defaults: the read-out, a label-free criterion over every val trial; val/accuracy is no criterion."""
    from mindvis.config import validate

    settings = validate({"experiment": "x"})["finetune"]
    assert settings["mapper"] == "readout" and settings["select_metric"] == "auto"
    assert settings["val_max_trials"] is None and settings["val_loss_repeats"] == 2 and settings["training_seed"] == 0
    assert validate({"experiment": "x", "finetune": {"val_max_trials": 8}})["finetune"]["val_max_trials"] == 8
    with pytest.raises(MindvisError) as info:
        validate({"experiment": "x", "finetune": {"select_metric": "val/accuracy"}})
    assert info.value.key == "finetune.select_metric"


def test_god_mindvis_optimiser_settings_reach_the_engine():
    """configs/god_mindvis.yaml's MinD-Vis optimiser (constant rate, 2 batches of 5 per step, clip 0.5) is what
    the fine-tuning engine runs with (docs/god_protocol.md)."""
    from pathlib import Path

    from mindvis.config import load_config, section_settings
    from mindvis.train.finetune import finetune_train_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "god_mindvis.yaml")
    settings = section_settings(config, "finetune")
    train = finetune_train_config(settings, seed=0, select="val/loss", config=config)
    assert (train.lr, train.lr_schedule, train.warmup_epochs) == (5.3e-5, "constant", 0)
    assert (train.batch_size, train.grad_accum_steps, train.clip_grad_norm) == (5, 2, 0.5)
    assert (settings["crop_mode"], settings["crop_pixels"], settings["crop_p"]) == ("resized", 51, 0.5)


def _ramp(size):
    """An image whose value is its column index: bilinear resampling of it is linear, so the expected
    output of a crop-and-resize is known in closed form."""
    return torch.arange(size, dtype=torch.float64).expand(1, 3, size, size).clone()


def test_resized_crop_is_mindvis_random_crop_then_resize():
    """MinD-Vis's augmentation: RandomCrop(256 - 51) with p 0.5, then torchvision's Resize back to 256, which
    samples output pixel j at source (j + 0.5) * crop / size - 0.5 (half-pixel centres, clamped at the edge)."""
    from mindvis.models.augment import resized_crop

    size, crop_pixels = 64, 13
    crop = size - crop_pixels
    torch.manual_seed(0)
    images = _ramp(size).expand(200, 3, size, size).clone()
    out = resized_crop(images, crop_pixels, p=0.5)
    assert out.shape == images.shape
    changed = [not torch.equal(o, i) for o, i in zip(out, images)]
    assert 0.4 < np.mean(changed) < 0.6  # about half cropped
    source = ((torch.arange(size, dtype=torch.float64) + 0.5) * crop / size - 0.5).clamp(0, crop - 1)
    for row, was_changed in zip(out, changed):
        if not was_changed:
            continue
        x0 = row[0, 0, 0] - source[0]  # the crop's left edge, an integer in 0 ... crop_pixels
        assert abs(x0 - round(float(x0))) < 1e-9 and 0 <= round(float(x0)) <= crop_pixels
        torch.testing.assert_close(row, (source + x0).expand(3, size, size))
    torch.testing.assert_close(resized_crop(images[:4], crop_pixels, p=0.0), images[:4])


@pytest.mark.parametrize("criterion", ["identification", "relative_error"])
def test_ridge_start_alpha_is_chosen_by_its_criterion_and_both_are_recorded(criterion):
    """finetune.ridge_select: the ridge start's alpha is the best on the val trials by two-way identification
    (default) or by relative squared error; both are recorded per alpha, and the map is refitted on train only."""
    from sklearn.linear_model import Ridge

    from mindvis.train.ridge_start import fit_ridge_voxel_map

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(40, 6))
    x_train, x_val = rng.normal(size=(60, 40)), rng.normal(size=(30, 40))
    y_train = x_train @ weight + 3.0 * rng.normal(size=(60, 6))
    y_val = x_val @ weight + 3.0 * rng.normal(size=(30, 6))
    alphas = [1e-2, 1e1, 1e3, 1e5]
    coef, bias, report = fit_ridge_voxel_map(x_train, y_train, x_val, y_val, alphas, criterion=criterion)
    assert report["criterion"] == criterion and set(report["val_identification"]) == set(alphas)
    if criterion == "identification":
        assert report["alpha"] == max(alphas, key=lambda a: (report["val_identification"][a], -alphas.index(a)))
    else:
        assert report["alpha"] == min(alphas, key=lambda a: report["val_relative_error"][a])
    expected = Ridge(alpha=report["alpha"]).fit(x_train, y_train)
    np.testing.assert_allclose(coef, expected.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, expected.intercept_, rtol=1e-4, atol=1e-5)


def test_the_embedding_prior_is_chosen_on_val_without_the_stimuli_and_drawn_as_its_own_row(workspace, image_prior,
                                                                                          tmp_path):
    """Fine-tuning on an image prior gives the decoder a prior in embedding space: its bank is the prior's corpus
    (the stimulus file's pool and training images) without any val or test stimulus, every candidate setting
    is scored on val, and generate --embedding-prior draws through it (another sampling key, the settings
    recorded); a decoder without one is refused with the key that makes one."""
    from mindvis.data.images import images_to_tensor
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.generate.run import generate_subject
    from mindvis.generate.writing import read_samples_h5
    from mindvis.models.embedding_prior import load_embedding_prior
    from mindvis.train.embedding_prior import candidate_settings

    root, config = workspace["root"], image_prior["config"]
    meta = finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", image_prior["base"],
                    tmp_path / "dcldm", mbm_dir=root / "mbm")
    record = meta["embedding_prior"]
    stimuli = load_stimulus_set(root / "stimuli.h5")
    assert record["bank"]["n_images"] == len(stimuli["pool"]) + len(stimuli["train"])
    assert record["bank"]["n_exact_stimuli_dropped"] >= 1  # the val trials' images are training images
    settings = [(s["k"], s["temperature"], s["weight"]) for s in record["val_scores"]]
    assert settings == candidate_settings(config["finetune"]) and set(record["without"]) == {
        "val_cosine", "val_identification"}
    best = max(record["val_scores"], key=lambda s: s["val_cosine"])
    assert (record["k"], record["weight"]) == (best["k"], best["weight"])
    prior = load_embedding_prior(tmp_path / "dcldm")
    test_embeddings = load_generator(image_prior["base"]).embed_all(
        images_to_tensor(stimuli["test"].images, 16, 1)).flatten(1)
    distance = torch.cdist(test_embeddings.float(), prior.bank.flatten(1).float())
    assert distance.min() > 1e-4  # no test image is in the bank
    inputs = (root / "responses.h5", root / "stimuli.h5")
    plain = generate_subject(config, "sub-01", tmp_path / "dcldm", *inputs, tmp_path / "plain")
    drawn = generate_subject(config, "sub-01", tmp_path / "dcldm", *inputs, tmp_path / "prior", embedding_prior=True,
                             same_as=[tmp_path / "plain" / "samples.h5"])
    assert drawn["same_decoder_as"] is None and drawn["sampling_key"] != plain["sampling_key"]
    assert drawn["embedding_prior"] == prior.settings() and plain["embedding_prior"] is None
    samples = read_samples_h5(tmp_path / "prior" / "samples.h5")
    assert samples["samples"].shape == read_samples_h5(tmp_path / "plain" / "samples.h5")["samples"].shape
    assert "attention" not in samples or samples["attention"] is None
    with pytest.raises(MindvisError) as info:
        generate_subject(config, "sub-01", tmp_path / "dcldm" / "start", *inputs, tmp_path / "none",
                         embedding_prior=True)
    assert info.value.key == "finetune.embedding_prior"
