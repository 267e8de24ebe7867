"""Tiny latent-diffusion parts for the DC-LDM tests (built from config dicts, seeded)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

#: Generator sizes at test scale: 16 px images -> 8 x 8 x 4 latents (2 VAE levels = factor 2).
TINY_LDM = {
    "latent_channels": 4,
    "vae_block_out_channels": [8, 16],
    "vae_layers_per_block": 1,
    "unet_block_out_channels": [8, 16],
    "unet_layers_per_block": 1,
    "attention_heads": 2,
    "cross_attention_dim": 8,
    "context_tokens": 5,
    "norm_num_groups": 4,
    "num_train_timesteps": 100,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    # The unit tests of class-conditioned parts build class bases; the image prior (the default) is
    # tested in test_prior.py and end to end by the workflow test (configs/test.yaml).
    "conditioning": "class",
    "token_grid": 2,
    "token_dim": 3,
    "encoder_widths": [4, 8],
    "embedding_noise": 0.1,
}


def tiny_generator(image_size=16, image_channels=1, n_classes=3, seed=0, **overrides):
    """A freshly initialised tiny embedded generator (random weights, fixed seed)."""
    from mindvis.models.ldm import build_embedded_generator

    torch.manual_seed(seed)
    config = {**TINY_LDM, **overrides}
    generator = build_embedded_generator(image_size, image_channels, n_classes, config)
    generator.vae.eval()
    generator.unet.eval()
    return generator


def save_tiny_sd(folder, seed=0, sample_size=8, cross_attention_dim=12, text_encoder=False):
    """Write a tiny Stable-Diffusion-layout folder (vae/, unet/, scheduler/, tokenizer config) and return it.

    Like SD 1.x: RGB VAE with 4 latent channels and scaling 0.18215, a UNet with
    no class embedding, a PNDM scheduler, and a 77-token tokenizer config. With
    ``text_encoder``, also a tiny CLIP text encoder and a CLIP tokenizer (a
    byte-level BPE vocabulary of single characters) as SD ships them.
    """
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    folder = Path(folder)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=4, sample_size=sample_size * 2)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": 2 + i for i, c in
                                                             enumerate("abcdefghijklmnopqrstuvwxyz")}}
        (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
        (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                      model_max_length=77).save_pretrained(folder / "tokenizer")
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=cross_attention_dim,
                                             intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=1))
        model.save_pretrained(folder / "text_encoder")
    return folder


# -- synthetic stimuli and responses ------------------------------------------------

CLASS_NAMES = ["bar", "ring", "cross"]


def class_image(label, size, rng, channels=1):
    """A uint8 [size, size, channels] image of a class: a bar, a ring or a cross, jittered."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2 + rng.normal(0, 0.7, 2)[:, None, None]
    radius = np.hypot(yy, xx)
    if label == 0:
        shape = np.abs(xx) < size / 8
    elif label == 1:
        shape = np.abs(radius - size / 3.5) < size / 10
    else:
        shape = (np.abs(xx) < size / 10) | (np.abs(yy) < size / 10)
    image = np.clip(shape * 220 + rng.normal(20, 8, (size, size)), 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], channels, axis=-1)


def write_synthetic_stimuli(path, size=16, n_train_per_class=8, n_test_per_class=1, n_pool=24, seed=0):
    """A stimuli.h5 with 3 drawn classes (train/test/pool, as the real layout); returns the StimulusSet."""
    from mindvis.data.stimuli import StimulusSet, StimulusSplit, save_stimulus_set

    rng = np.random.default_rng(seed)
    splits = {}
    for name, labels in (("train", np.repeat(np.arange(3), n_train_per_class)),
                         ("test", np.repeat(np.arange(3), n_test_per_class)),
                         ("pool", rng.integers(0, 3, n_pool))):
        images = np.stack([class_image(label, size, rng) for label in labels])
        # Half the pool is unlabelled (-1), as in a source without pool labels: both paths are exercised.
        if name == "pool":
            labels = np.where(np.arange(len(labels)) % 2 == 0, labels, -1)
        splits[name] = StimulusSplit(images=images, label=labels,
                                     stimulus_id=np.array([f"{name}-{i:04d}" for i in range(len(labels))], object),
                                     source_index=np.arange(len(labels)))
    stimulus_set = StimulusSet(splits=splits, class_names=list(CLASS_NAMES),
                               attrs={"image_size": size, "channels": 1, "source": "synthetic"})
    save_stimulus_set(stimulus_set, path)
    return stimulus_set


def write_synthetic_responses(path, stimulus_set, n_voxels=37, snr=2.0, test_repeats=2, seed=0):
    """A responses.h5 whose voxels carry each trial's class (a class pattern plus noise).

    Training images are split 3:1 into train trials (runs 2-5, in order) and val trials (run 1); each test image is
    shown ``test_repeats`` times and averaged into ``test_avg``.
    """
    from mindvis.data.responses import ResponseSplit, write_responses

    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(3, n_voxels))

    def trials(split, rows, repeats=1, runs=(1,)):
        labels = np.repeat(split.label[rows], repeats)
        fmri = snr * patterns[labels] + rng.normal(size=(len(labels), n_voxels))
        run = np.asarray(runs, np.int64)[np.arange(len(labels)) * len(runs) // max(len(labels), 1)]
        return ResponseSplit(fmri=fmri.astype(np.float32), stimulus_id=np.repeat(split.stimulus_id[rows], repeats),
                             label=labels, run=run,
                             onset=np.arange(len(labels), dtype=np.float64) * 4)

    train = stimulus_set.splits["train"]
    val_rows = np.arange(len(train)) % 4 == 3
    test = stimulus_set.splits["test"]
    test_trials = trials(test, np.arange(len(test)), test_repeats)
    averaged = test_trials.fmri.reshape(len(test), test_repeats, n_voxels).mean(axis=1)
    test_avg = ResponseSplit(fmri=averaged.astype(np.float32), stimulus_id=test.stimulus_id.copy(),
                             label=test.label.copy(), run=np.full(len(test), -1),
                             onset=np.full(len(test), np.nan), n_repeats=np.full(len(test), test_repeats))
    flat = np.arange(n_voxels)
    write_responses(path, splits={"train": trials(train, np.flatnonzero(~val_rows), runs=(2, 3, 4, 5)),
                                  "val": trials(train, np.flatnonzero(val_rows)),
                                  "test": test_trials, "test_avg": test_avg},
                    voxel_ijk=np.stack([flat % 5, (flat // 5) % 4, flat // 20], axis=1), affine=np.eye(4),
                    volume_shape=(5, 4, 2), voxel_roi=np.where(flat < 20, "V1", "LOC"), class_names=CLASS_NAMES,
                    tr=2.0, subject="sub-01", method="synthetic", preprocess_config={}, config={"seed": seed},
                    input_hashes={})
    return path


def save_tiny_mbm(folder, n_voxels=37, seed=0):
    """A tiny (untrained, seeded) SC-MBM encoder saved as pretrain_mbm would; returns the folder."""
    from mindvis.models.mbm import MBMAutoencoder

    torch.manual_seed(seed)
    model = MBMAutoencoder(n_voxels=n_voxels, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                           decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    model.save_pretrained(folder)
    return folder


def tiny_config(**sections):
    """The test config with generator, fine-tuning and sampling at test scale (sections override)."""
    from mindvis.config import validate

    config = validate({"experiment": "tiny", "seed": 3})
    config["ldm"].update({**TINY_LDM, "vae_block_out_channels": [8, 16], "batch_size": 16, "vae_epochs": 2,
                          "unet_epochs": 2, "val_images": 4, "eval_samples_per_class": 2,
                          "mixed_precision": "no"})
    config["mbm"]["preset"] = "tiny"
    config["finetune"].update({"epochs": 2, "batch_size": 6, "eval_every": 1, "val_sample_steps": 2,
                               "val_max_trials": 4, "mixed_precision": "no"})
    config["generate"].update({"n_samples": 2, "steps": 3, "guidance_scale": 2.0, "batch_size": 4,
                               "attention_stimuli": 2})
    for name, values in sections.items():
        config[name].update(values)
    return config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and float sums then do not depend on the core count (a module
    that imports this fixture runs on one thread, and leaves the other cores to others)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def small_filesystem(folder, size="512k"):
    """A real file system of ``size`` mounted at ``folder`` (tmpfs; writes past it fail with ENOSPC), unmounted
    afterwards. Skips the test, with the reason, where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    import subprocess

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(result.stderr or result.stdout).strip()[:200]}): the "
                    "real-ENOSPC test needs root, as in CI")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def fill_filesystem(folder, leave_bytes):
    """Write a filler file into ``folder``'s file system until only about ``leave_bytes`` stay free."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(Path(folder) / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))
    return Path(folder) / "filler"
