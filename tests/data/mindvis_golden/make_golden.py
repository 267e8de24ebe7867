"""Recreate golden.safetensors from MinD-Vis's own code (not part of the test suite; no code of theirs is
committed). Its SC-MBM encoder needs timm 0.5.4 (MinD-Vis's env.yaml pin), which needs torchvision, so it runs
in a scratch environment of its own:

    git -C <mind-vis clone> archive 08d5386 code | tar x -C /tmp/golden
    python -m venv /tmp/goldenvenv
    /tmp/goldenvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.5.4 einops==0.3.0 omegaconf==2.1.1 \
        numpy scipy safetensors
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/golden/code /tmp/goldenvenv/bin/python tests/data/mindvis_golden/make_golden.py

It records, with MinD-Vis's classes and functions:

* ``mae.*``: a tiny randomly initialised ``MAEforFMRI`` (``sc_mbm/mae_for_fmri.py``), the state dict that
  ``fmri_encoder.pth`` holds under ``model`` (``sc_mbm/utils.py`` ``save_model``); the sizes its pickled
  ``Config_MBM_fMRI`` records are in the file's metadata (``mae_config``). Its outputs: ``forward`` at mask
  ratio 0.75 after ``torch.manual_seed(MASK_SEED)`` (``outputs.mae_loss``, ``mae_pred``, ``mae_mask``), and the
  tokens of the ``fmri_encoder`` that ``cond_stage_model`` builds from that checkpoint
  (``outputs.encoder_tokens``: ``load_checkpoint``, then ``forward`` of the padded vectors).
* ``cond_stage_model.*``: that ``cond_stage_model`` (``dc_ldm/ldm_for_fmri.py``, ``global_pool=False``, fine-
  tuned here by a random perturbation of every trained tensor) and ``model.diffusion_model.time_embed_condtion.*``:
  the time conditioning of an openaimodel ``UNetModel`` with ``use_time_cond=True`` whose other tensors are
  tests/data/compvis_golden's ``model.diffusion_model.*``; together with those they are a ``finetuned.pth``
  state dict (``model_state_dict``). Outputs: the fine-tuned encoder's tokens (``outputs.release_tokens``), the
  condition (``outputs.context``, what ``get_learned_conditioning`` gives the UNet), the time condition added to
  the timestep embedding (``outputs.pooled``) and the conditioned UNet's output (``outputs.eps``) for
  ``inputs.latent`` at ``inputs.timesteps``.
* ``god.*``: a tiny GOD subject in MinD-Vis's ``sbj_1.npz`` layout, and the train and test matrices that
  ``create_Kamitani_dataset`` (``dataset.py``: ``pad_to_patch_size``, ``normalize``) makes of it
  (``outputs.god_train``, ``outputs.god_test``: ``Kamitani_dataset.fmri``).

``inputs.fmri`` holds the raw (unpadded) voxel vectors; MinD-Vis's ``pad_to_patch_size`` pads them.
"""

import ast
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from config import Config_MBM_fMRI
from dataset import create_Kamitani_dataset, pad_to_patch_size
from dc_ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import load_file, save_file
from sc_mbm.mae_for_fmri import MAEforFMRI, fmri_encoder

HERE = Path(__file__).resolve().parent
COMPVIS_GOLDEN = HERE.parent / "compvis_golden" / "golden.safetensors"
N_RAW_VOXELS, PATCH = 60, 8  # pad_to_patch_size: 60 -> 64 voxels, 8 tokens
MAE_SIZES = {"patch_size": PATCH, "embed_dim": 32, "depth": 2, "num_heads": 4, "decoder_embed_dim": 16,
             "decoder_num_heads": 2, "mlp_ratio": 1.0, "mask_ratio": 0.75}
DECODER_DEPTH = 2  # not in Config_MBM_fMRI: MAEforFMRI's own argument (stageA1 leaves it at its default, 8)
UNET_PARAMS = {"image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32,
               "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
               "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}
MASK_SEED = 11
GOD_TRAIN_CATEGORIES, GOD_TEST_CATEGORIES = [1518878, 1639765, 1645776], [1443537, 1943899]
GOD_VOXELS, GOD_REPEATS = 40, 3  # VC: voxels 4 .. 35 (32 of them: pad_to_patch_size adds a whole patch of 16)


def perturb(module, scale, generator):
    """Move every trained tensor (MinD-Vis zero-initialises biases and sets norms to identity): each one matters."""
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def mae_config():
    config = Config_MBM_fMRI()
    for key, value in MAE_SIZES.items():
        setattr(config, key, value)
    return config


def mindvis_definitions(module, names, namespace):
    """Run the named top-level definitions of one of MinD-Vis's files, unchanged, without the rest of it
    (``dc_ldm/ldm_for_fmri.py`` imports wandb and omegaconf at the top, which its ``cond_stage_model`` never uses)."""
    path = Path(importlib.util.find_spec(module).origin)
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if getattr(node, "name", None) in names]
    assert {node.name for node in tree.body} == set(names), names
    exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - MinD-Vis's own definitions, by design
    return [namespace[name] for name in names]


def encoder_and_condition(fmri, generator):
    (cond_stage_model,) = mindvis_definitions("dc_ldm.ldm_for_fmri", ["create_model_from_config", "cond_stage_model"],
                                              {"nn": torch.nn, "fmri_encoder": fmri_encoder})[1:]
    config = mae_config()
    padded = torch.from_numpy(pad_to_patch_size(fmri.numpy(), PATCH)).float()[:, None]  # [B, 1, 64]
    mae = MAEforFMRI(num_voxels=padded.shape[-1], patch_size=PATCH, embed_dim=config.embed_dim, depth=config.depth,
                     num_heads=config.num_heads, decoder_embed_dim=config.decoder_embed_dim,
                     decoder_depth=DECODER_DEPTH, decoder_num_heads=config.decoder_num_heads,
                     mlp_ratio=config.mlp_ratio).eval()
    perturb(mae, 0.05, generator)
    out = {}
    with torch.no_grad():
        torch.manual_seed(MASK_SEED)
        out["outputs.mae_loss"], out["outputs.mae_pred"], out["outputs.mae_mask"] = mae(padded, mask_ratio=0.75)
        metafile = {"model": mae.state_dict(), "config": config}
        cond = cond_stage_model(metafile, padded.shape[-1], UNET_PARAMS["context_dim"], global_pool=False).eval()
        out["outputs.encoder_tokens"] = cond.mae(padded)
    perturb(cond, 0.05, generator)  # fine-tuning moves the encoder and the mappers
    unet = UNetModel(**UNET_PARAMS, use_time_cond=True, global_pool=False).eval()
    compvis = load_file(COMPVIS_GOLDEN)
    unet_state = {k[len("model.diffusion_model."):]: v for k, v in compvis.items()
                  if k.startswith("model.diffusion_model.")}
    missing, unexpected = unet.load_state_dict(unet_state, strict=False)
    assert not unexpected and all(k.startswith("time_embed_condtion.") for k in missing) and missing, missing
    perturb(unet.time_embed_condtion, 0.05, generator)
    latent = torch.randn(3, 3, 4, 4, generator=generator)
    timesteps = torch.tensor([1, 420, 999])
    with torch.no_grad():
        out["outputs.release_tokens"] = cond.mae(padded)
        context = out["outputs.context"] = cond(padded)
        out["outputs.pooled"] = unet.time_embed_condtion(context)[:, 0]
        out["outputs.eps"] = unet(latent, timesteps, context=context)
    out.update({"inputs.latent": latent, "inputs.timesteps": timesteps})
    out.update({f"mae.{k}": v for k, v in mae.state_dict().items()})
    out.update({f"cond_stage_model.{k}": v for k, v in cond.state_dict().items()})
    out.update({f"model.diffusion_model.time_embed_condtion.{k}": v
                for k, v in unet.time_embed_condtion.state_dict().items()})
    return out


def god_subject(rng):
    """A GOD subject in MinD-Vis's layout (12 training images, 4 test images x 3 repeats), and what
    create_Kamitani_dataset makes of it."""
    offset, scale = rng.normal(3.0, 2.0, GOD_VOXELS), rng.uniform(0.5, 4.0, GOD_VOXELS)
    patterns = rng.normal(size=(16, GOD_VOXELS))
    arr_3 = rng.permutation(12)
    arr_0 = (patterns[arr_3] + 0.3 * rng.normal(size=(12, GOD_VOXELS))) * scale + offset
    test_rows = np.repeat(np.arange(4), GOD_REPEATS)
    arr_1 = (patterns[12 + test_rows] + 0.5 * rng.normal(size=(len(test_rows), GOD_VOXELS))) * scale + offset
    arr_2 = np.stack([arr_1[test_rows == i].mean(axis=0) for i in range(4)])
    vc = np.zeros(GOD_VOXELS, bool)
    vc[4:36] = True
    arrays = {"arr_0": arr_0, "arr_1": arr_1, "arr_2": arr_2, "arr_3": arr_3, "VC": vc}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "sbj_1.npz", **arrays)
        np.savez(folder / "images_256.npz", train_images=np.zeros((12, 4, 4, 3), np.uint8),
                 test_images=np.zeros((4, 4, 4, 3), np.uint8))
        # get_img_label reads the category number before the first dot of each row's first column
        train = [f"{c}.{100 + i:06d}" for c in GOD_TRAIN_CATEGORIES for i in range(4)]
        test = [f"{c}.{900 + i:06d}" for c in GOD_TEST_CATEGORIES for i in range(2)]
        (folder / "imagenet_training_label.csv").write_text("".join(f"{n},x\n" for n in train))
        (folder / "imagenet_testing_label.csv").write_text("".join(f"{n},x\n" for n in test))
        index = {str(i): [f"n{c:08d}", f"thing{i}"] for i, c in enumerate(GOD_TRAIN_CATEGORIES + GOD_TEST_CATEGORIES)}
        (folder / "imagenet_class_index.json").write_text(json.dumps(index))
        train_set, test_set = create_Kamitani_dataset(str(folder), "VC", 16, subjects=["sbj_1"])
    out = {f"god.{k}": torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    out["outputs.god_train"] = torch.from_numpy(np.asarray(train_set.fmri))
    out["outputs.god_test"] = torch.from_numpy(np.asarray(test_set.fmri))
    return out


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    fmri = torch.randn(3, N_RAW_VOXELS, generator=generator)
    tensors = {"inputs.fmri": fmri, **encoder_and_condition(fmri, generator),
               **god_subject(np.random.default_rng(2))}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, HERE / "golden.safetensors",
              metadata={"source": "zjc062/mind-vis 08d5386 code/sc_mbm, code/dc_ldm, code/dataset.py",
                        "timm": __import__("timm").__version__, "torch": torch.__version__,
                        "mae_config": json.dumps(MAE_SIZES), "decoder_depth": str(DECODER_DEPTH),
                        "mask_seed": str(MASK_SEED), "unet_params": json.dumps(UNET_PARAMS),
                        "god_patch_size": "16"})


if __name__ == "__main__":
    main()
