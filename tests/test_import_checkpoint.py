"""``mindvis import-checkpoint``: MinD-Vis's fmri_encoder.pth into mindvis's SC-MBM, checked tensor by tensor.

The fixture is a state dict with MinD-Vis's real key names and shape pattern
(timm ViT blocks, Conv1d patch embedding, sine-cosine ``pos_embed`` with a
class slot, decoder), at a small depth and width, saved the way MinD-Vis
saves it: ``torch.save({"model": sd, "config": <config object>, ...})``.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mindvis.models.mindvis_checkpoint import import_mindvis_checkpoint, map_key
from mindvis.errors import MindvisError
from mindvis.models.mbm import MBMAutoencoder, sincos_positions

ROOT = Path(__file__).resolve().parents[1]
EMBED, DEPTH, HEADS, PATCH, TOKENS = 32, 2, 4, 16, 6
DECODER, DECODER_DEPTH = 16, 1


def mindvis_style_state(generator, decoder=True, nature_img=True, encoder_mask_token=False):
    """A MinD-Vis SC-MBM state dict (MAEforFMRI names) with random weights."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    state = {"cls_token": rand(1, 1, EMBED),
             "pos_embed": torch.cat([torch.zeros(1, EMBED), sincos_positions(TOKENS, EMBED)])[None],
             "patch_embed.proj.weight": rand(EMBED, 1, PATCH), "patch_embed.proj.bias": rand(EMBED),
             "norm.weight": 1 + rand(EMBED), "norm.bias": rand(EMBED)}

    def blocks(prefix, width, depth):
        for i in range(depth):
            state.update({f"{prefix}.{i}.norm1.weight": 1 + rand(width), f"{prefix}.{i}.norm1.bias": rand(width),
                          f"{prefix}.{i}.attn.qkv.weight": rand(3 * width, width),
                          f"{prefix}.{i}.attn.qkv.bias": rand(3 * width),
                          f"{prefix}.{i}.attn.proj.weight": rand(width, width),
                          f"{prefix}.{i}.attn.proj.bias": rand(width),
                          f"{prefix}.{i}.norm2.weight": 1 + rand(width), f"{prefix}.{i}.norm2.bias": rand(width),
                          f"{prefix}.{i}.mlp.fc1.weight": rand(width, width), f"{prefix}.{i}.mlp.fc1.bias": rand(width),
                          f"{prefix}.{i}.mlp.fc2.weight": rand(width, width), f"{prefix}.{i}.mlp.fc2.bias": rand(width)})

    blocks("blocks", EMBED, DEPTH)
    if encoder_mask_token:
        state["mask_token"] = rand(1, 1, EMBED)
    if decoder:
        state.update({"decoder_embed.weight": rand(DECODER, EMBED), "decoder_embed.bias": rand(DECODER),
                      "mask_token": rand(1, 1, DECODER),
                      "decoder_pos_embed": torch.cat([torch.zeros(1, DECODER), sincos_positions(TOKENS, DECODER)])[None],
                      "decoder_norm.weight": 1 + rand(DECODER), "decoder_norm.bias": rand(DECODER),
                      "decoder_pred.weight": rand(PATCH, DECODER), "decoder_pred.bias": rand(PATCH)})
        blocks("decoder_blocks", DECODER, DECODER_DEPTH)
    if nature_img:
        state["nature_img_decoder_embed.weight"] = rand(DECODER, EMBED)
    return state


def save_like_mindvis(path, state, monkeypatch, heads=HEADS):
    """torch.save with MinD-Vis's own config class in the pickle (a class mindvis cannot import)."""
    module = types.ModuleType("config")

    class Config_MBM_fMRI:  # noqa: N801 - MinD-Vis's name
        def __init__(self):
            self.num_heads, self.decoder_num_heads, self.patch_size, self.mask_ratio = heads, 2, PATCH, 0.75

    Config_MBM_fMRI.__module__, Config_MBM_fMRI.__qualname__ = "config", "Config_MBM_fMRI"
    module.Config_MBM_fMRI = Config_MBM_fMRI
    monkeypatch.setitem(sys.modules, "config", module)
    torch.save({"model": state, "config": Config_MBM_fMRI(), "epoch": 499}, path)
    monkeypatch.delitem(sys.modules, "config")


def reference_encoder(state, fmri, heads):
    """MinD-Vis's encoder forward (timm ViT blocks) written out from the state dict: [B, 1 + L, E]."""
    tokens = F.conv1d(fmri[:, None], state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                      stride=PATCH).transpose(1, 2) + state["pos_embed"][:, 1:]
    cls = (state["cls_token"] + state["pos_embed"][:, :1]).expand(len(fmri), -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (EMBED,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        batch, length, _ = h.shape
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, length, 3, heads, EMBED // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (EMBED // heads) ** -0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, length, EMBED)
        x = x + F.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (EMBED,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (EMBED,), state["norm.weight"], state["norm.bias"])


def test_key_names():
    assert map_key("blocks.23.mlp.fc1.weight") == "blocks.23.mlp.0.weight"
    assert map_key("module.decoder_blocks.7.attn.qkv.bias") == "decoder_blocks.7.attn.qkv.bias"
    assert map_key("patch_embed.proj.weight") == "patch_embed.weight"
    assert map_key("blocks.0.ls1.gamma") is None and map_key("nature_img_decoder_pred.0.weight") is None


def test_import_matches_mindvis_forward(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    state = mindvis_style_state(generator)
    save_like_mindvis(tmp_path / "fmri_encoder.pth", state, monkeypatch)
    report = import_mindvis_checkpoint(tmp_path / "fmri_encoder.pth", tmp_path / "mbm")
    assert report["architecture"] == dict(n_voxels=TOKENS * PATCH, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH,
                                          num_heads=HEADS, decoder_embed_dim=DECODER, decoder_depth=DECODER_DEPTH,
                                          decoder_num_heads=2, mlp_ratio=1.0)
    assert report["pickled_classes_replaced"] == ["config.Config_MBM_fMRI"]
    assert report["n_mapped"] == len(state) - 1 and list(report["not_mapped"]) == ["nature_img_decoder_embed.weight"]
    assert report["not_in_checkpoint"] == [] and report["shape_mismatch"] == {}
    assert report["pos_embed_max_difference_from_sincos"] < 1e-6
    assert json.loads((tmp_path / "mbm/import_report.json").read_text())["n_mapped"] == report["n_mapped"]

    model = MBMAutoencoder.from_pretrained(tmp_path / "mbm").eval()
    for key, target in report["mapped"].items():
        torch.testing.assert_close(model.state_dict()[target], state[key])
    fmri = torch.randn(3, TOKENS * PATCH, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(fmri), reference_encoder(state, fmri, HEADS), atol=1e-5, rtol=1e-4)
    # the wrong head count gives a different function: the check above can fail
    with torch.no_grad():
        assert (model.encode(fmri) - reference_encoder(state, fmri, 2)).abs().max() > 1e-3


def test_encoder_only_file_reports_what_it_cannot_map(tmp_path, monkeypatch):
    state = mindvis_style_state(torch.Generator().manual_seed(1), decoder=False, nature_img=False,
                                encoder_mask_token=True)
    torch.save({"model": state}, tmp_path / "enc.pth")  # no config: heads from the command line
    report = import_mindvis_checkpoint(tmp_path / "enc.pth", tmp_path / "out", num_heads=HEADS)
    assert list(report["not_mapped"]) == ["mask_token"]
    assert "decoder_embed.weight" in report["not_in_checkpoint"] and "blocks.0.attn.qkv.weight" not in \
        report["not_in_checkpoint"]
    assert any("no decoder" in note for note in report["notes"])
    with pytest.raises(MindvisError, match=r"enc.pth.*1 tensors not mapped.*mask_token"):
        import_mindvis_checkpoint(tmp_path / "enc.pth", tmp_path / "strict", num_heads=HEADS, strict=True)
    assert not (tmp_path / "strict/diffusion_pytorch_model.safetensors").exists()


def test_bad_checkpoints(tmp_path, monkeypatch):
    state = mindvis_style_state(torch.Generator().manual_seed(2))
    state["blocks.1.attn.qkv.weight"] = torch.zeros(3 * EMBED, EMBED + 1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(MindvisError, match=r"bad.pth.*blocks.1.attn.qkv.weight: \(96, 33\) -> .*\(96, 32\)"):
        import_mindvis_checkpoint(tmp_path / "bad.pth", tmp_path / "out", num_heads=HEADS)
    del state["patch_embed.proj.weight"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(MindvisError, match=r"key 'patch_embed.proj.weight'"):
        import_mindvis_checkpoint(tmp_path / "bad.pth", tmp_path / "out")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(MindvisError, match=r"key 'model'"):
        import_mindvis_checkpoint(tmp_path / "other.pth", tmp_path / "out")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MindvisError, match="junk.pth"):
        import_mindvis_checkpoint(tmp_path / "junk.pth", tmp_path / "out")


def test_cli(tmp_path, monkeypatch):
    from mindvis.cli import main

    save_like_mindvis(tmp_path / "fmri_encoder.pth", mindvis_style_state(torch.Generator().manual_seed(3)),
                      monkeypatch)
    assert main(["import-checkpoint", "--config", str(ROOT / "configs/test.yaml"), "--checkpoint",
                 str(tmp_path / "fmri_encoder.pth"), "--out-dir", str(tmp_path / "mbm")]) == 0
    assert (tmp_path / "mbm/diffusion_pytorch_model.safetensors").exists()
    assert main(["import-checkpoint", "--config", str(ROOT / "configs/test.yaml"), "--checkpoint",
                 str(tmp_path / "absent.pth"), "--out-dir", str(tmp_path / "mbm")]) == 2
