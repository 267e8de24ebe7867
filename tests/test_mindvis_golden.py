"""mindvis's MinD-Vis importers and GOD normalisation against MinD-Vis's own code: tests/data/mindvis_golden/
golden.safetensors (make_golden.py beside it, run once with MinD-Vis's code and its pinned timm 0.5.4) holds

* a tiny randomly initialised SC-MBM ``MAEforFMRI`` (``mae.*``, the ``model`` of an ``fmri_encoder.pth``) with its
  masked reconstruction and the tokens of the ``fmri_encoder`` that ``cond_stage_model`` builds from it;
* a fine-tuned ``cond_stage_model`` and ``time_embed_condtion`` (``finetuned.pth`` tensors; the rest of its UNet
  is tests/data/compvis_golden's) with the encoder's tokens, the condition, the time condition and the
  conditioned UNet's output;
* a tiny GOD subject and the train and test matrices ``create_Kamitani_dataset`` makes of it.

Each checkpoint is written in MinD-Vis's own ``torch.save`` layout (its config class pickled), converted with
the importers ``mindvis import-checkpoint`` and the release import use, and must reproduce MinD-Vis's outputs to
float tolerance; the last tests show that a swapped tensor name or the wrong normalisation misses them.
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from compvis_fixtures import TINY_LDM_PARAMS, ldm_schedule_buffers, ldm_vq_state
from safetensors import safe_open
from safetensors.torch import load_file
from test_sources import convert, god_names, make_config, write_god_npz

from mindvis.data.sources.common import wrap_pad_to_patches
from mindvis.models.dcldm import load_dcldm
from mindvis.models.mbm import MBMAutoencoder
from mindvis.models.mindvis_checkpoint import import_mindvis_checkpoint
from mindvis.models.mindvis_release import import_mindvis_finetuned

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "mindvis_golden" / "golden.safetensors"
COMPVIS_GOLDEN = DATA / "compvis_golden" / "golden.safetensors"
TOKENS = {"rtol": 1e-4, "atol": 1e-5}
NORMALISED = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


@pytest.fixture(scope="module")
def metadata():
    with safe_open(GOLDEN, "pt") as handle:
        return handle.metadata()


def prefixed(tensors, prefix):
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def save_with_mindvis_config(path, payload, class_name, attributes, monkeypatch):
    """torch.save of ``payload(config)`` with MinD-Vis's config class (``config.<class_name>``) pickled in it."""
    module = types.ModuleType("config")
    cls = type(class_name, (), {"__module__": "config", "__qualname__": class_name})
    setattr(module, class_name, cls)
    config = cls()
    config.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, "config", module)
    torch.save(payload(config), path)
    monkeypatch.delitem(sys.modules, "config")


def padded_fmri(golden):
    """MinD-Vis's pad_to_patch_size of the raw vectors, by mindvis's own function."""
    patch = int(golden["mae.patch_embed.proj.weight"].shape[-1])
    return torch.from_numpy(wrap_pad_to_patches(golden["inputs.fmri"].numpy(), patch))


def imported_mae(golden, metadata, tmp_path, monkeypatch, mae_state=None):
    """``fmri_encoder.pth`` as sc_mbm/utils.py's save_model writes it, through ``mindvis import-checkpoint``."""
    mae_state = prefixed(golden, "mae.") if mae_state is None else mae_state
    path = tmp_path / "fmri_encoder.pth"
    save_with_mindvis_config(path, lambda config: {"model": mae_state, "optimizer": {}, "epoch": 499, "scaler": {},
                                                   "config": config},
                             "Config_MBM_fMRI", json.loads(metadata["mae_config"]), monkeypatch)
    report = import_mindvis_checkpoint(path, tmp_path / "mbm", strict=True)
    assert report["not_mapped"] == {} and report["not_in_checkpoint"] == []
    assert report["architecture"]["num_heads"] == json.loads(metadata["mae_config"])["num_heads"]
    return MBMAutoencoder.from_pretrained(tmp_path / "mbm").eval()


def test_imported_mae_reproduces_mindvis_encoder_tokens(golden, metadata, tmp_path, monkeypatch):
    """cond_stage_model's fmri_encoder (no class token, every token attending) loaded from the checkpoint."""
    model = imported_mae(golden, metadata, tmp_path, monkeypatch)
    with torch.no_grad():
        tokens = model.encode(padded_fmri(golden), class_token=False)
    torch.testing.assert_close(tokens, golden["outputs.encoder_tokens"], **TOKENS)


def test_imported_mae_reproduces_mindvis_masked_reconstruction(golden, metadata, tmp_path, monkeypatch):
    """MAEforFMRI.forward at mask ratio 0.75 after torch.manual_seed: a CPU generator of that seed draws the same
    masking noise, so the mask is the same, and then the reconstruction and loss (decoder names included)."""
    model = imported_mae(golden, metadata, tmp_path, monkeypatch)
    generator = torch.Generator().manual_seed(int(metadata["mask_seed"]))
    with torch.no_grad():
        loss, pred, mask = model(padded_fmri(golden), mask_ratio=0.75, generator=generator)
    torch.testing.assert_close(mask, golden["outputs.mae_mask"], rtol=0, atol=0)
    torch.testing.assert_close(pred, golden["outputs.mae_pred"], **TOKENS)
    torch.testing.assert_close(loss, golden["outputs.mae_loss"], **TOKENS)


@pytest.fixture(scope="module")
def release_decoder(golden, tmp_path_factory):
    """MinD-Vis's ``finetuned.pth`` (``{"model_state_dict", "config", "state"}``, its fine-tuning's torch.save):
    the golden cond_stage_model and time conditioning, the CompVis golden UNet and a tiny first stage, imported by
    the release importer (no base: the file's own UNet and first stage); the loaded decoder."""
    root = tmp_path_factory.mktemp("mindvis_golden_release")
    state = {**load_file(COMPVIS_GOLDEN), **ldm_vq_state(TINY_LDM_PARAMS), **ldm_schedule_buffers(TINY_LDM_PARAMS)}
    state = {key: value for key, value in state.items()
             if key.startswith(("model.diffusion_model.", "first_stage_model.", "betas", "alphas_cumprod"))}
    state.update({key: value for key, value in golden.items()
                  if key.startswith(("cond_stage_model.", "model.diffusion_model."))})
    patch = int(golden["cond_stage_model.mae.patch_embed.proj.weight"].shape[-1])
    monkeypatch = pytest.MonkeyPatch()
    save_with_mindvis_config(root / "finetuned.pth",
                             lambda config: {"model_state_dict": state, "config": config,
                                             "state": torch.random.get_rng_state()},
                             "Config_Generative_Model", {"patch_size": patch, "img_size": 16, "global_pool": False,
                                                         "use_time_cond": True, "dataset": "GOD",
                                                         "kam_subs": ["sbj_3"]}, monkeypatch)
    monkeypatch.undo()
    # MinD-Vis records no head count in finetuned.pth: the release import takes it as an argument
    import_mindvis_finetuned(root / "finetuned.pth", root / "dcldm", ldm_config=TINY_LDM_PARAMS, num_heads=4,
                             n_voxels=golden["inputs.fmri"].shape[1])
    report = json.loads((root / "dcldm" / "import_report.json").read_text())
    assert report["not_mapped"] == {}
    return load_dcldm(root / "dcldm")[1]


def test_imported_release_reproduces_mindvis_condition_and_conditioned_unet(golden, release_decoder):
    decoder = release_decoder
    fmri = golden["inputs.fmri"]  # raw: the decoder wrap-pads to the encoder's width as MinD-Vis's loader does
    with torch.no_grad():
        tokens = decoder.encoder.encode(decoder.conditioner.pad_fmri(fmri), class_token=False)
        condition = decoder.condition(fmri)
        eps = decoder(golden["inputs.latent"], golden["inputs.timesteps"], fmri)
    torch.testing.assert_close(tokens, golden["outputs.release_tokens"], **TOKENS)
    torch.testing.assert_close(condition.context, golden["outputs.context"], **TOKENS)
    torch.testing.assert_close(condition.pooled, golden["outputs.pooled"], **TOKENS)
    torch.testing.assert_close(eps, golden["outputs.eps"], **TOKENS)


def god_responses(golden, metadata, tmp_path, normalisation):
    """The golden GOD subject (its arrays in sbj_1.npz, the labels and images of test_sources' GOD folder)
    converted by mindvis; returns the responses and the rows of MinD-Vis's matrices their trials are."""
    write_god_npz(tmp_path / "npz", np.random.default_rng(0))
    np.savez(tmp_path / "npz" / "sbj_1.npz", **{key: value.numpy() for key, value in prefixed(golden, "god.").items()})
    config = make_config(tmp_path, source="god_npz", trials_per_block=3, normalisation=normalisation,
                         god_npz={"dir": str(tmp_path / "npz"), "test_average": "file"})
    config["mbm"]["patch_size"] = int(metadata["god_patch_size"])
    _, responses, _ = convert(config, tmp_path)
    train_names, test_names = god_names()
    file_train_names = list(np.asarray(train_names)[golden["god.arr_3"].numpy()])
    rows = {split: [file_train_names.index(s) for s in responses[split].stimulus_id] for split in ("train", "val")}
    rows["test_avg"] = [test_names.index(s) for s in responses["test_avg"].stimulus_id]
    return responses, rows


def check_normalisation(golden, metadata, responses, rows):
    """Every split equals MinD-Vis's matrix cut back to the real voxels, and wrap-padded again it is the whole
    matrix (its pad_to_patch_size)."""
    n_voxels = int(golden["god.VC"].sum())
    for split, expected in (("train", "outputs.god_train"), ("val", "outputs.god_train"),
                            ("test_avg", "outputs.god_test")):
        mindvis = responses[split].fmri.astype(np.float64)
        target = golden[expected].numpy()[rows[split]]
        np.testing.assert_allclose(mindvis, target[:, :n_voxels], **NORMALISED, err_msg=split)
        padded = wrap_pad_to_patches(mindvis, int(metadata["god_patch_size"]))
        np.testing.assert_allclose(padded, target, **NORMALISED, err_msg=split)


def test_mindvis_scalar_reproduces_mindvis_kamitani_loader(golden, metadata, tmp_path):
    responses, rows = god_responses(golden, metadata, tmp_path, "mindvis_scalar")
    check_normalisation(golden, metadata, responses, rows)


# -- the goldens catch what a converter or a setting gets wrong --------------------------------------------------

def test_a_swapped_tensor_name_is_caught(golden, metadata, tmp_path, monkeypatch):
    """Two blocks' attention weights under each other's names convert without complaint (same shapes):
    only the comparison with MinD-Vis's tokens catches them."""
    swapped = prefixed(golden, "mae.")
    swapped["blocks.0.attn.qkv.weight"], swapped["blocks.1.attn.qkv.weight"] = (golden["mae.blocks.1.attn.qkv.weight"],
                                                                                golden["mae.blocks.0.attn.qkv.weight"])
    model = imported_mae(golden, metadata, tmp_path, monkeypatch, mae_state=swapped)
    with torch.no_grad():
        tokens = model.encode(padded_fmri(golden), class_token=False)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        torch.testing.assert_close(tokens, golden["outputs.encoder_tokens"], **TOKENS)


def test_release_without_its_time_condition_is_caught(golden, release_decoder):
    """The UNet's time_embed_condtion left out of the pooled condition (a timestep embedding without MinD-Vis's
    second conditioning path) misses the conditioned UNet's output."""
    decoder = release_decoder
    with torch.no_grad():
        condition = decoder.condition(golden["inputs.fmri"])
        eps = decoder.unet(golden["inputs.latent"], golden["inputs.timesteps"],
                           encoder_hidden_states=condition.context,
                           class_labels=torch.zeros_like(condition.pooled)).sample
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        torch.testing.assert_close(eps, golden["outputs.eps"], **TOKENS)


def test_a_changed_timestep_is_caught(golden, release_decoder):
    decoder = release_decoder
    with torch.no_grad():
        eps = decoder(golden["inputs.latent"], golden["inputs.timesteps"] + 1, golden["inputs.fmri"])
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        torch.testing.assert_close(eps, golden["outputs.eps"], **TOKENS)


@pytest.mark.parametrize("normalisation", ["voxel_zscore", "scalar"])
def test_another_normalisation_misses_the_normalisation_golden(golden, metadata, tmp_path, normalisation):
    """Each voxel z-scored (mindvis's default) misses every split; the training scalars applied to the test data
    (what the paper describes, ``scalar``) miss the test averages, which MinD-Vis's code scales by about 0 and 1."""
    responses, rows = god_responses(golden, metadata, tmp_path, normalisation)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_normalisation(golden, metadata, responses, rows)
