"""SC-MBM: model steps and shapes, padding, positions, augmentation, pretraining stage, linear probe."""

import json
import logging

import numpy as np
import pytest
import torch

from mindvis.models.augment import FmriAugment, gaussian_noise, voxel_dropout
from mindvis.models.mbm import MBMAutoencoder, interpolate_positions, sincos_positions

# A tiny model built from a config dict (diffusers-style): 100 voxels -> 13 tokens of 8 (the last one partial).
TINY = dict(n_voxels=100, patch_size=8, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MBMAutoencoder(**{**TINY, **overrides})


def ragged_batch(seed=0):
    """3 vectors of 100, 70 and 41 voxels (zero-padded to 100) and their voxel mask."""
    generator = torch.Generator().manual_seed(seed)
    fmri = torch.randn(3, 100, generator=generator)
    voxel_mask = torch.arange(100)[None, :] < torch.tensor([100, 70, 41])[:, None]
    return fmri * voxel_mask, voxel_mask


# -- synthetic data: class-structured, spatially smooth voxel patterns ------------------

def smooth_sources(rng, n_voxels, n_sources=8, width=25.0):
    """Spatially smooth maps [n_sources, n_voxels]: Gaussian bumps of random sign along the voxel axis."""
    centres = rng.uniform(0, n_voxels, n_sources)
    bumps = np.exp(-0.5 * ((np.arange(n_voxels)[None] - centres[:, None]) / width) ** 2)
    return bumps * rng.choice([-1.0, 1.0], size=(n_sources, 1))


def simulate_vectors(rng, sources, n_samples, class_means=None, noise=1.0):
    """Vectors = source amplitudes @ maps + voxel noise; with class_means, amplitudes centre on a class mean.

    Returns fmri float32 [n_samples, V] and labels int [n_samples] (-1 without classes).
    """
    n_sources, n_voxels = sources.shape
    amplitudes = rng.normal(size=(n_samples, n_sources))
    labels = np.full(n_samples, -1)
    if class_means is not None:
        labels = rng.integers(0, len(class_means), n_samples)
        amplitudes += class_means[labels]
    fmri = amplitudes @ sources + noise * rng.normal(size=(n_samples, n_voxels))
    return fmri.astype(np.float32), labels


def write_fixture_files(tmp_path, rng, voxel_counts=(90, 75), n_rest=60):
    """responses.h5 for subjects with unequal voxel counts plus one rest file, via the package's writers."""
    from mindvis.data.responses import ResponseSplit, write_responses, write_rest

    class_names = ["a", "b", "c"]
    paths = []
    for number, n_voxels in enumerate(voxel_counts, start=1):
        sources = smooth_sources(rng, n_voxels, n_sources=4, width=10.0)
        means = rng.normal(size=(3, 4))
        splits = {}
        for name, size, run in (("train", 40, 1), ("val", 12, 2), ("test", 9, 3), ("test_avg", 3, -1)):
            fmri, labels = simulate_vectors(rng, sources, size, means, noise=0.5)
            if name.startswith("test"):
                fmri += 1000.0  # a test trial in the corpus would be unmistakable
            splits[name] = ResponseSplit(fmri=fmri, stimulus_id=[f"img{i}" for i in range(size)], label=labels,
                                         run=np.full(size, run), onset=np.arange(size) * 4.0,
                                         n_repeats=np.full(size, 3) if name == "test_avg" else None)
        path = tmp_path / f"sub-0{number}" / "responses.h5"
        write_responses(path, splits=splits, voxel_ijk=np.stack([np.arange(n_voxels)] + [np.zeros(n_voxels)] * 2, 1),
                        affine=np.eye(4), volume_shape=(n_voxels, 1, 1), voxel_roi=["V1"] * n_voxels,
                        class_names=class_names, tr=2.0, subject=f"sub-0{number}", method="glm_lss",
                        preprocess_config={}, config={}, input_hashes={})
        paths.append(path)
    n_voxels = 110
    fmri, _ = simulate_vectors(rng, smooth_sources(rng, n_voxels, 4, 10.0), n_rest, noise=0.5)
    rest_path = tmp_path / "rest" / "sub-rest01.h5"
    write_rest(rest_path, fmri=fmri, run=np.repeat([1, 2], n_rest // 2),
               voxel_ijk=np.stack([np.arange(n_voxels)] + [np.zeros(n_voxels)] * 2, 1), affine=np.eye(4),
               volume_shape=(n_voxels, 1, 1), voxel_roi=["V1"] * n_voxels, tr=2.0, subject="sub-rest01",
               preprocess_config={}, config={}, input_hashes={})
    return paths, [rest_path]


# -- shapes and the named steps -------------------------------------------------------------

def test_shapes_of_every_step():
    model = tiny_model()
    fmri, voxel_mask = ragged_batch()
    assert model.n_tokens == 13 and model.capacity == 104
    padded, full_mask = model.pad(fmri, voxel_mask)
    assert padded.shape == full_mask.shape == (3, 104)
    patches = model.patchify(padded)
    assert patches.shape == (3, 13, 8)
    torch.testing.assert_close(model.unpatchify(patches), padded)
    assert model.token_padding_mask(full_mask).sum(1).tolist() == [13, 9, 6]
    latent, latent_valid, mask, ids_restore, n_keep = model.forward_encoder(padded, full_mask, 0.75)
    assert n_keep.tolist() == [3, 2, 1]  # floor(real tokens x 0.25), at least one
    assert latent.shape == (3, 1 + 3, 32) and latent_valid.sum(1).tolist() == [4, 3, 2]
    pred = model.forward_decoder(latent, ids_restore, n_keep, model.token_padding_mask(full_mask))
    assert pred.shape == (3, 13, 8)
    loss, pred, mask = model(fmri, voxel_mask)
    assert loss.ndim == 0 and torch.isfinite(loss) and mask.shape == (3, 13)
    tokens = model.encode(fmri, voxel_mask)
    assert tokens.shape == (3, 14, 32)


def test_random_masking_hides_the_right_share_of_real_tokens_only():
    tokens = torch.randn(2, 10, 4)
    token_real = torch.arange(10)[None, :] < torch.tensor([10, 6])[:, None]
    kept, kept_valid, mask, ids_restore, n_keep = MBMAutoencoder.random_masking(
        tokens, token_real, 0.5, generator=torch.Generator().manual_seed(1))
    assert n_keep.tolist() == [5, 3]
    assert mask.sum(1).tolist() == [5, 3]
    assert mask[1, 6:].sum() == 0  # padding is never "hidden", hence never scored
    # The kept tokens are exactly the real tokens that are not hidden.
    for row in range(2):
        kept_rows = kept[row][kept_valid[row]]
        expected = tokens[row][(mask[row] == 0) & token_real[row]]
        assert sorted(map(tuple, kept_rows.tolist())) == sorted(map(tuple, expected.tolist()))
    shuffled = torch.arange(10).expand(2, -1).gather(1, ids_restore.argsort(1))
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(10).expand(2, -1))


def test_padded_voxels_get_no_gradient_and_no_loss():
    model = tiny_model()
    fmri, voxel_mask = ragged_batch()
    fmri = fmri.clone().requires_grad_(True)
    loss, _, _ = model(fmri, voxel_mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert fmri.grad[~voxel_mask].abs().max() == 0
    assert fmri.grad[voxel_mask].abs().max() > 0
    # Whatever sits in the padding (garbage, huge values) changes nothing: not the loss, not the features.
    garbage = fmri.detach() + (~voxel_mask) * 1e3
    again, _, _ = model(garbage, voxel_mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss.detach())
    torch.testing.assert_close(model.encode(garbage, voxel_mask), model.encode(fmri.detach(), voxel_mask))


def test_padding_tokens_do_not_change_a_subjects_features():
    model = tiny_model()
    model.eval()
    fmri = torch.randn(1, 41)
    short = model.encode(fmri)  # padded to 13 tokens inside
    model_small = MBMAutoencoder(**{**TINY, "n_voxels": 48})
    model_small.load_state_dict({k: v for k, v in model.state_dict().items() if "pos_embed" not in k},
                                strict=False)
    model_small.pos_embed.copy_(model.pos_embed[:, :7])
    # The same 6 real tokens with 0 or 7 padding tokens beside them give the same features.
    torch.testing.assert_close(model_small.encode(fmri)[:, :7], short[:, :7], rtol=1e-5, atol=1e-5)
    assert short[:, 7:].abs().max() == 0


def test_sdpa_and_plain_attention_agree():
    fmri, voxel_mask = ragged_batch()
    sdpa, plain = tiny_model(attention="sdpa"), tiny_model(attention="plain")
    plain.load_state_dict(sdpa.state_dict())
    for model in (sdpa, plain):
        model.eval()
    torch.testing.assert_close(sdpa.encode(fmri, voxel_mask), plain.encode(fmri, voxel_mask), rtol=1e-5, atol=1e-5)
    loss_a = sdpa(fmri, voxel_mask, generator=torch.Generator().manual_seed(2))[0]
    loss_b = plain(fmri, voxel_mask, generator=torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)


def test_norm_pix_loss_standardises_real_voxels_per_patch():
    model = tiny_model(norm_pix_loss=True)
    fmri, voxel_mask = ragged_batch()
    padded, full_mask = model.pad(3 * fmri + 5, voxel_mask)
    target = model.loss_target(padded, full_mask)
    real = model.patchify(full_mask)
    full_patches = real.all(-1)
    assert target[full_patches].mean(-1).abs().max() < 1e-5
    assert torch.allclose(target[full_patches].std(-1, unbiased=False), torch.ones(1), atol=1e-3)
    assert target[~real].abs().max() == 0


def test_loss_falls_on_a_tiny_problem(rng):
    sources = smooth_sources(rng, 100, n_sources=4, width=20.0)
    data = torch.from_numpy(simulate_vectors(rng, sources, 256, noise=0.2)[0])
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        batch = data[(step * 32) % 256:(step * 32) % 256 + 32]
        loss, _, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


# -- saving, loading, positions ----------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(mask_ratio=0.6)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = MBMAutoencoder.from_pretrained(tmp_path)
    assert loaded.config.mask_ratio == 0.6 and loaded.config.embed_dim == 32
    fmri, voxel_mask = ragged_batch()
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded.encode(fmri, voxel_mask), model.encode(fmri, voxel_mask))


def test_sincos_table_and_interpolation():
    table = sincos_positions(12, 8)
    assert table.shape == (12, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    full = torch.cat([torch.zeros(1, 8), table])[None]
    assert torch.equal(interpolate_positions(full, 12), full)
    longer = interpolate_positions(full, 23)  # each new position lands on or midway between old ones
    assert longer.shape == (1, 24, 8)
    torch.testing.assert_close(longer[:, 0], full[:, 0])
    torch.testing.assert_close(longer[:, 1::2], full[:, 1:])
    torch.testing.assert_close(longer[:, 2::2], 0.5 * (full[:, 1:-1] + full[:, 2:]))
    shorter = interpolate_positions(full, 4)
    torch.testing.assert_close(shorter[:, [1, 4]], full[:, [1, 12]])


def test_resize_positions_logs_and_round_trips(tmp_path, caplog):
    model = tiny_model()
    model.eval()
    with caplog.at_level(logging.INFO, logger="mindvis.models.mbm"):
        assert model.resize_positions(200)
    assert "interpolating the SC-MBM position table from 13 to 25 tokens" in caplog.text
    assert model.pos_embed.shape == (1, 26, 32) and model.decoder_pos_embed.shape == (1, 26, 16)
    fmri = torch.randn(2, 200)
    model.save_pretrained(tmp_path)
    reloaded = MBMAutoencoder.from_pretrained(tmp_path)
    reloaded.eval()
    assert reloaded.config.n_voxels == 200
    torch.testing.assert_close(reloaded.encode(fmri), model.encode(fmri))
    assert not model.resize_positions(195)  # same token count: nothing to do
    with pytest.raises(ValueError, match="exceed the model's capacity"):
        model.encode(torch.randn(1, 300))


# -- augmentation ----------------------------------------------------------------------------

def test_augmentations_change_real_voxels_only():
    fmri, voxel_mask = ragged_batch()
    fmri = fmri + 3.0 * voxel_mask  # no real voxel is 0 already
    dropped = voxel_dropout(fmri, 0.3, voxel_mask, generator=torch.Generator().manual_seed(0))
    zeroed = (dropped == 0) & voxel_mask
    share = zeroed.sum() / voxel_mask.sum()
    assert 0.2 < share < 0.4
    assert torch.equal(dropped[~zeroed], fmri[~zeroed])
    # Sparse per voxel and per sample, not whole columns: rows drop different voxels.
    assert not torch.equal(zeroed[0, :41], zeroed[1, :41])
    noisy = gaussian_noise(fmri, 0.5, voxel_mask, generator=torch.Generator().manual_seed(0))
    change = noisy - fmri
    assert change[~voxel_mask].abs().max() == 0
    assert 0.4 < change[voxel_mask].std() < 0.6
    augment = FmriAugment(dropout_rate=0.3, noise_std=0.5)
    assert not torch.equal(augment(fmri, voxel_mask), fmri)
    augment.eval()
    assert torch.equal(augment(fmri, voxel_mask), fmri)


# -- the pretraining stage ----------------------------------------------------------------------

def test_masked_correlation_matches_numpy(rng):
    from mindvis.train.pretrain_mbm import masked_correlation

    pred, target = rng.normal(size=(2, 30)), rng.normal(size=(2, 30))
    weight = (rng.uniform(size=(2, 30)) < 0.5).astype(float)
    weight[1] = 0
    weight[1, :1] = 1
    got = masked_correlation(torch.tensor(pred), torch.tensor(target), torch.tensor(weight))
    keep = weight[0] == 1
    assert got[0].item() == pytest.approx(np.corrcoef(pred[0, keep], target[0, keep])[0, 1], abs=1e-5)
    assert torch.isnan(got[1])


def test_corpus_uses_training_trials_and_rest_only(tmp_path, rng):
    from mindvis.train.pretrain_mbm import build_corpus

    responses, rest = write_fixture_files(tmp_path, rng)
    train, heldout, sources, space = build_corpus(responses, rest, rest_holdout_fraction=0.1)
    assert len(train) == 40 + 40 + 54 and len(heldout) == 12 + 12 + 6
    assert train.width == 110 and sorted(train.n_voxels.unique().tolist()) == [75, 90, 110]
    assert train.fmri.abs().max() < 100 and heldout.fmri.abs().max() < 100  # no test trial anywhere
    batch = train.get_batch([0, 45, 100])
    assert batch["voxel_mask"].sum(1).tolist() == [90, 75, 110]
    assert [s["kind"] for s in sources] == ["responses", "responses", "rest"]


def test_pretrain_mbm_command_writes_a_loadable_encoder(tmp_path, rng):
    import yaml

    from mindvis.cli import main

    responses, rest = write_fixture_files(tmp_path, rng)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"experiment": "mbm-test", "seed": 1, "mbm": {
        "preset": "tiny", "patch_size": 8, "epochs": 2, "batch_size": 16, "base_lr": 0.02, "warmup_epochs": 1,
        "mixed_precision": "no"}}))
    out_dir = tmp_path / "mbm"
    argv = ["pretrain-mbm", "--config", str(config_path), "--threads", "1", "--responses", *map(str, responses),
            "--rest", *map(str, rest), "--out-dir", str(out_dir)]
    assert main(argv) == 0
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl", "summary.json"):
        assert (out_dir / name).exists(), name
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(-1 <= line["val/recon_corr"] <= 1 for line in lines)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["experiment"] == "mbm-test" and "torch" in summary["versions"]
    assert summary["corpus"]["n_train"] == 134 and summary["best"]["metric"] == "val/recon_corr"
    encoder = MBMAutoencoder.from_pretrained(out_dir)
    assert encoder.config.n_voxels == 110 and encoder.config.patch_size == 8
    assert encoder.encode(torch.randn(2, 75)).shape == (2, 1 + 14, 128)
    # --resume on a finished run trains nothing more and republishes the same weights.
    before = (out_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(argv + ["--resume"]) == 0
    assert (out_dir / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_pretrain_mbm_names_the_missing_input(tmp_path):
    from mindvis.config import validate
    from mindvis.errors import MindvisError
    from mindvis.train.pretrain_mbm import pretrain_mbm

    with pytest.raises(MindvisError, match="responses file not found"):
        pretrain_mbm(validate({}), responses=[tmp_path / "nope.h5"], rest=[], out_dir=tmp_path / "out")
    with pytest.raises(MindvisError, match="no pretraining data"):
        pretrain_mbm(validate({}), responses=[], rest=[], out_dir=tmp_path / "out")


# -- does pretraining help? -----------------------------------------------------------------------

def probe_accuracy(model, train_x, train_y, test_x, test_y):
    """Logistic regression on mean-pooled encoder tokens (standardised), scored on held-out trials."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model.eval()
    with torch.no_grad():
        features = [model.encode(torch.from_numpy(x))[:, 1:].mean(1).numpy() for x in (train_x, test_x)]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(features[0], train_y)
    return probe.score(features[1], test_y)


def test_pretraining_helps_a_linear_probe(tmp_path):
    """Pretraining on unlabelled 'rest' vectors makes mean-pooled features decode the class better than the
    same probe on an untrained encoder of the same size (few labelled trials, noisy voxels)."""
    from mindvis.models.augment import FmriAugment
    from mindvis.train.engine import TrainConfig, Trainer
    from mindvis.train.pretrain_mbm import VoxelCorpus, make_loss_fn

    rng = np.random.default_rng(0)
    n_voxels = 192
    sources = smooth_sources(rng, n_voxels, n_sources=8, width=25.0)
    rest, _ = simulate_vectors(rng, sources, 1500, noise=1.0)
    class_means = 1.5 * rng.normal(size=(4, 8))
    trials, labels = simulate_vectors(rng, sources, 600, class_means, noise=1.0)
    scale = rest.std(0)
    rest, trials = rest / scale, trials / scale
    settings = dict(n_voxels=n_voxels, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=16,
                    decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    untrained = MBMAutoencoder(**settings)
    torch.manual_seed(0)
    pretrained = MBMAutoencoder(**settings)
    config = TrainConfig(epochs=8, batch_size=32, base_lr=0.016, warmup_epochs=1, progress=False, seed=1)
    Trainer(pretrained, VoxelCorpus([rest]), make_loss_fn(FmriAugment(0.1, 0.1)), config, tmp_path).fit()

    split = (trials[:80], labels[:80], trials[80:], labels[80:])
    accuracy_untrained = probe_accuracy(untrained, *split)
    accuracy_pretrained = probe_accuracy(pretrained, *split)
    from sklearn.linear_model import LogisticRegression

    accuracy_voxels = LogisticRegression(max_iter=2000).fit(split[0], split[1]).score(split[2], split[3])
    print(f"linear probe: untrained {accuracy_untrained:.3f}, pretrained {accuracy_pretrained:.3f}, "
          f"gain {accuracy_pretrained - accuracy_untrained:+.3f} (chance 0.25; on the raw voxels {accuracy_voxels:.3f})")
    assert accuracy_pretrained > accuracy_untrained + 0.03
