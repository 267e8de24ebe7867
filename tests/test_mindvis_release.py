"""MinD-Vis's released finetuned.pth as a mindvis decoder: every tensor placed, MinD-Vis's forward reproduced,
and generate + evaluate running on it unchanged."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compvis_fixtures import TINY_LDM_PARAMS, save_mindvis_release, tiny_ldm_checkpoint
from ldm_fixtures import tiny_config, write_synthetic_responses, write_synthetic_stimuli

from mindvis.errors import MindvisError
from mindvis.models.compvis import import_compvis_checkpoint
from mindvis.models.dcldm import load_dcldm
from mindvis.models.mindvis_release import import_mindvis_finetuned

N_PATCHES, EMBED, DEPTH, PATCH, HEADS = 6, 32, 2, 4, 16  # 16 heads: MinD-Vis's, not recorded in the file
N_VOXELS = 22  # < 6 x 4 = 24: padded by wrapping, as MinD-Vis pads


def save_release(path, base_state, monkeypatch, extra=None):
    return save_mindvis_release(path, base_state, monkeypatch, N_PATCHES, EMBED, DEPTH, PATCH, extra=extra)


def mindvis_condition(state, fmri):
    """MinD-Vis's forward, written out from its state dict: pad_to_length (wrap), fmri_encoder.forward_encoder
    (no class token), channel_mapper, dim_mapper; time_embed_condtion of the context."""
    s = {k[len("cond_stage_model."):]: v for k, v in state.items() if k.startswith("cond_stage_model.")}
    padded = torch.from_numpy(np.pad(fmri.numpy(), ((0, 0), (0, N_PATCHES * PATCH - fmri.shape[1])), "wrap"))
    x = F.conv1d(padded[:, None], s["mae.patch_embed.proj.weight"], s["mae.patch_embed.proj.bias"],
                 stride=PATCH).transpose(1, 2) + s["mae.pos_embed"][:, 1:]
    for i in range(DEPTH):
        p = f"mae.blocks.{i}."
        h = F.layer_norm(x, (EMBED,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        batch, length, _ = h.shape
        q, k, v = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).reshape(
            batch, length, 3, HEADS, EMBED // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (EMBED // HEADS) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(batch, length, EMBED), s[p + "attn.proj.weight"],
                         s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (EMBED,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    latent = F.layer_norm(x, (EMBED,), s["mae.norm.weight"], s["mae.norm.bias"])
    for i in (0, 1):
        latent = F.conv1d(latent, s[f"channel_mapper.{i}.weight"], s[f"channel_mapper.{i}.bias"])
    context = F.linear(latent, s["dim_mapper.weight"], s["dim_mapper.bias"])
    u = {k[len("model.diffusion_model.time_embed_condtion."):]: v for k, v in state.items()
         if k.startswith("model.diffusion_model.time_embed_condtion.")}
    c = F.conv1d(F.conv1d(context, u["0.weight"], u["0.bias"]), u["1.weight"], u["1.bias"])
    return context, F.linear(c, u["2.weight"], u["2.bias"])[:, 0]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    base_state = tiny_ldm_checkpoint(root / "model.ckpt")
    import_compvis_checkpoint(root / "model.ckpt", root / "base", config=TINY_LDM_PARAMS)
    return root, base_state


def test_release_imports_every_tensor_and_stores_only_what_fine_tuning_changed(release, tmp_path, monkeypatch):
    root, base_state = release
    state = save_release(tmp_path / "finetuned.pth", base_state, monkeypatch)
    meta = import_mindvis_finetuned(tmp_path / "finetuned.pth", tmp_path / "dcldm", base=root / "base",
                                    ldm_config=TINY_LDM_PARAMS, subject="sub-03", n_voxels=N_VOXELS)
    attn2 = sorted(k[len("model.diffusion_model."):] for k in state if ".attn2." in k)
    report = json.loads((tmp_path / "dcldm" / "import_report.json").read_text())
    assert meta["unet_tensors_stored"] == len(attn2) == len(report["unet_tensors_changed_from_base"])
    assert all(".attn2." in name for name in report["unet_tensors_changed_from_base"])
    assert report["not_mapped"] == {} and set(report["ignored"]) == {"betas", "alphas_cumprod",
                                                                     "cond_stage_model.mae.mask_token"}
    assert report["pickled_classes_replaced"] == ["config.Config_Generative_Model"]
    assert meta["mindvis_settings"]["subjects"] == ["sbj_3"] and meta["encoder_capacity"] == N_PATCHES * PATCH

    generator, decoder, _ = load_dcldm(tmp_path / "dcldm")
    fmri = torch.randn(3, N_VOXELS)
    with torch.no_grad():
        condition = decoder.condition(fmri)
    context, pooled = mindvis_condition(state, fmri)
    torch.testing.assert_close(condition.context, context, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(condition.pooled, pooled, rtol=1e-4, atol=1e-5)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    torch.testing.assert_close(generator.unet.state_dict()[key],
                               state["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_q.weight"])


def test_generate_and_evaluate_run_on_the_imported_decoder(release, tmp_path, monkeypatch):
    from mindvis.evaluate.run import evaluate_subject
    from mindvis.generate.run import generate_subject
    from mindvis.train.classifier import train_classifier
    from mindvis.train.finetune import finetune

    root, base_state = release
    save_release(tmp_path / "finetuned.pth", base_state, monkeypatch)
    stimuli = write_synthetic_stimuli(tmp_path / "stimuli.h5")
    write_synthetic_responses(tmp_path / "responses.h5", stimuli, n_voxels=N_VOXELS)
    with h5py.File(tmp_path / "responses.h5", "a") as handle:  # sub-03's, the subject the decoder is imported for
        handle.attrs["subject"] = "sub-03"
    config = tiny_config(generate={"sampler": "plms", "steps": 3, "guidance_scale": 1.0, "n_samples": 2,
                                   "start_row": False, "lowlevel": False, "attention_stimuli": 1},
                         finetune={"released": {"sub-03": str(tmp_path / "finetuned.pth")}, "baseline": False})
    import yaml

    (tmp_path / "ldm.yaml").write_text(yaml.safe_dump({"model": {"params": TINY_LDM_PARAMS}}))
    config["ldm"]["compvis_config"] = str(tmp_path / "ldm.yaml")
    # The finetune stage imports instead of training (finetune.released), against the converted base.
    meta = finetune(config, "sub-03", tmp_path / "responses.h5", tmp_path / "stimuli.h5", root / "base",
                    tmp_path / "dcldm", released=tmp_path / "finetuned.pth")
    assert meta["imported_from"] == "mindvis-release" and not (tmp_path / "dcldm" / "train").exists()
    train_classifier({**config, "classifier": {"epochs": 1, "widths": [4, 8]}}, tmp_path / "stimuli.h5",
                     tmp_path / "classifier")
    summary = generate_subject(config, "sub-03", tmp_path / "dcldm", tmp_path / "responses.h5",
                               tmp_path / "stimuli.h5", tmp_path / "samples", classifier_dir=tmp_path / "classifier")
    assert summary["n_samples"] == 2 and summary["images_per_s"] > 0 and summary["sampler"] == "plms"
    metrics = evaluate_subject(config, "sub-03", tmp_path / "responses.h5", tmp_path / "stimuli.h5",
                               tmp_path / "samples" / "samples.h5", root / "base", tmp_path / "evaluation",
                               classifier_dir=tmp_path / "classifier")
    row = next(row for row in metrics["rows"] if row["id"] == "dcldm")
    assert row["available"] and metrics["throughput"]["classifier_images"] > 0


def test_bad_releases_are_refused_naming_the_tensor(release, tmp_path, monkeypatch):
    root, base_state = release
    save_release(tmp_path / "extra.pth", base_state, monkeypatch,
                 extra={"cond_stage_model.fmri_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(MindvisError, match="not mapped") as info:
        import_mindvis_finetuned(tmp_path / "extra.pth", tmp_path / "out", ldm_config=TINY_LDM_PARAMS)
    assert info.value.key == "cond_stage_model.fmri_proj.weight" and not (tmp_path / "out").exists()
    meta = import_mindvis_finetuned(tmp_path / "extra.pth", tmp_path / "out", ldm_config=TINY_LDM_PARAMS, strict=False)
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["not_mapped"]
    assert meta["base"] == str(tmp_path / "out" / "generator")  # no base given: its own UNet and first stage
    with pytest.raises(MindvisError, match="voxels") as info:
        import_mindvis_finetuned(tmp_path / "extra.pth", tmp_path / "out2", ldm_config=TINY_LDM_PARAMS,
                                 n_voxels=100, strict=False)
    state = save_release(tmp_path / "pooled.pth", base_state, monkeypatch)
    torch.save({"model_state_dict": {k: v for k, v in state.items() if "channel_mapper" not in k}},
               tmp_path / "pooled.pth")
    with pytest.raises(MindvisError, match="global_pool") as info:
        import_mindvis_finetuned(tmp_path / "pooled.pth", tmp_path / "out3", ldm_config=TINY_LDM_PARAMS)
    assert info.value.key == "cond_stage_model.channel_mapper.0.weight"
    torch.save({"model": {}}, tmp_path / "encoder.pth")
    with pytest.raises(MindvisError, match="import-checkpoint"):
        import_mindvis_finetuned(tmp_path / "encoder.pth", tmp_path / "out4")
