"""The Stable Diffusion path at test size: the voxel path's parameter budget, the null condition from the
base's text encoder, gradient checkpointing and 8-bit Adam as options, and device placement in one place."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_fixtures import save_tiny_mbm, save_tiny_sd, tiny_config, write_synthetic_responses, write_synthetic_stimuli
from safetensors import safe_open

from mindvis.errors import MindvisError
from mindvis.models.conditioning import FmriConditioner
from mindvis.models.dcldm import MODEL_FILE, build_decoder, load_dcldm, voxel_path_rank

ROOT = Path(__file__).resolve().parents[1]
SD_CONTEXT = 77 * 768 + 1280  # SD 1.x: 77 x 768 context + the 1,280-wide pooled vector


@pytest.fixture(scope="module")
def sd_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    stimuli = write_synthetic_stimuli(root / "stimuli.h5")
    write_synthetic_responses(root / "responses.h5", stimuli)
    save_tiny_mbm(root / "mbm")
    save_tiny_sd(root / "sd", text_encoder=True)
    return root


def test_voxel_path_budget_keeps_small_maps_full_and_makes_wide_ones_low_rank():
    assert voxel_path_rank(1600, 128, 8_000_000) == 0  # the embedded prior's 4 x 4 x 8 embedding: full
    for n_voxels, expected in ((1_700, 127), (15_000, 105)):
        rank = voxel_path_rank(n_voxels, SD_CONTEXT, 8_000_000)
        assert rank == expected
        assert rank * (n_voxels + SD_CONTEXT) + SD_CONTEXT <= 8_000_000 < \
            (rank + 1) * (n_voxels + SD_CONTEXT) + SD_CONTEXT
    assert voxel_path_rank(1_700, SD_CONTEXT, 8_000_000, rank=32) == 32
    assert voxel_path_rank(20, 30, 10, rank=64) == 0  # a rank above min(V, outputs) is the full map
    with pytest.raises(MindvisError, match="rank-1") as info:
        voxel_path_rank(15_000, SD_CONTEXT, 10_000)
    assert info.value.key == "finetune.voxel_path_max_params"


def test_low_rank_voxel_path_starts_at_zero_and_takes_the_best_rank_r_ridge_map():
    torch.manual_seed(0)
    conditioner = FmriConditioner(input_tokens=5, input_dim=8, context_tokens=3, cross_attention_dim=4,
                                  pooled_dim=6, n_voxels=40, voxel_rank=4)
    assert tuple(conditioner.voxel_down.weight.shape) == (4, 40)
    assert tuple(conditioner.voxel_map.weight.shape) == (3 * 4 + 6, 4)
    tokens, fmri = torch.randn(2, 5, 8), torch.randn(2, 40)
    out = conditioner(tokens, fmri=fmri)
    assert torch.count_nonzero(out.context) == 0 and torch.count_nonzero(out.pooled) == 0  # zero start
    # A map of rank 4 is reproduced exactly; a full-rank one by its truncated SVD.
    exact = torch.randn(18, 4) @ torch.randn(4, 40)
    bias = torch.randn(18)
    conditioner.set_voxel_map(exact, bias)
    direct = conditioner(tokens, fmri=fmri)
    expected = fmri @ exact.T + bias
    torch.testing.assert_close(torch.cat([direct.context.flatten(1), direct.pooled], 1), expected,
                               rtol=1e-4, atol=1e-4)
    full = torch.randn(18, 40)
    conditioner.set_voxel_map(full, bias)
    left, singular, right = torch.linalg.svd(full.double(), full_matrices=False)
    truncated = (left[:, :4] * singular[:4]) @ right[:4]
    product = conditioner.voxel_map.weight.double() @ conditioner.voxel_down.weight.double()
    torch.testing.assert_close(product, truncated, rtol=1e-5, atol=1e-5)


def test_sd_decoder_starts_from_the_empty_prompt_and_stores_a_budgeted_voxel_path(sd_workspace, tmp_path,
                                                                                 monkeypatch):
    from diffusers import UNet2DConditionModel

    from mindvis.models.ldm import load_generator
    from mindvis.report.brainmap import voxel_path_importance
    from mindvis.train.finetune import finetune

    root = sd_workspace
    generator = load_generator(root / "sd")
    null = generator.null_condition
    assert tuple(null.context.shape) == (1, 77, 12) and torch.count_nonzero(null.pooled) == 0
    assert float(null.context.abs().sum()) > 0  # the text encoder's output, not zeros
    n_outputs = 77 * 12 + generator.pooled_dim
    budget = 37 * n_outputs // 2  # half of the full 37-voxel map: a low-rank path
    # The voxel path is mindvis-ext's (configs/sd15.yaml pins it); the default read-out of every encoder token
    # refuses a condition this wide for the budget, naming the mapper.
    config = tiny_config(finetune={"epochs": 1, "align_weight": 0.0, "voxel_path_max_params": budget,
                                   "gradient_checkpointing": True, "select_metric": "val/loss",
                                   "mapper": "mindvis-ext"},
                         generate={"start_row": False, "lowlevel": False, "attention_stimuli": 0})
    config["ldm"]["image_size"] = 16
    readout = {**config, "finetune": {**config["finetune"], "mapper": "readout"}}
    with pytest.raises(MindvisError, match="voxel_path_max_params") as info:
        build_decoder(readout, generator, 37, mbm_dir=root / "mbm")
    assert info.value.key == "finetune.mapper"
    checkpointed = []
    original = UNet2DConditionModel.enable_gradient_checkpointing
    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing",
                        lambda self: (checkpointed.append(True), original(self))[1])
    meta = finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "sd", tmp_path / "dcldm",
                    mbm_dir=root / "mbm")
    assert checkpointed == [True]
    rank = voxel_path_rank(37, n_outputs, budget)
    assert 0 < rank < 37 and meta["voxel_path"]["rank"] == rank
    assert meta["voxel_path"]["n_parameters"] == rank * (37 + n_outputs) + n_outputs <= budget
    with safe_open(str(tmp_path / "dcldm" / MODEL_FILE), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"conditioner.voxel_down.weight", "conditioner.voxel_map.weight"} <= keys
    _, decoder, _ = load_dcldm(tmp_path / "dcldm")
    assert decoder.conditioner.voxel_down is not None
    importance = voxel_path_importance(tmp_path / "dcldm")
    assert importance.shape == (37,) and importance.sum() == pytest.approx(1.0)


def test_build_decoder_copies_the_empty_prompt_into_the_null_condition(sd_workspace):
    from mindvis.models.ldm import load_generator

    generator = load_generator(sd_workspace / "sd")
    decoder = build_decoder(tiny_config(), generator, 37, mbm_dir=sd_workspace / "mbm")
    torch.testing.assert_close(decoder.null(1).context, generator.null_condition.context)
    torch.testing.assert_close(decoder.null(1).pooled, generator.null_condition.pooled)


def test_eight_bit_adam_is_refused_off_cuda_with_the_fix():
    from mindvis.train.engine import make_optimizer

    parameters = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(MindvisError, match="CUDA") as info:
        make_optimizer("adamw8bit", parameters, 1e-3, (0.9, 0.999), 0.0, torch.device("cpu"))
    assert info.value.key == "optimizer" and "adamw" in info.value.fix
    assert isinstance(make_optimizer("adamw", parameters, 1e-3, (0.9, 0.999), 0.0, "cpu"), torch.optim.AdamW)


# -- device placement -------------------------------------------------------------------------------

def _cuda_mentions(path):
    """Lines of a module that name CUDA: .cuda() calls, torch.cuda.*, or a 'cuda' device string."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            found.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cuda"):
            found.append(node.lineno)
    return found


def test_only_the_device_module_names_cuda():
    """One place picks the accelerator (mindvis/utils/device.py); every stage asks it."""
    offenders = {str(path.relative_to(ROOT)): lines for path in sorted((ROOT / "mindvis").rglob("*.py"))
                 if path.name != "device.py" and (lines := _cuda_mentions(path))}
    assert offenders == {}
    assert _cuda_mentions(ROOT / "mindvis" / "utils" / "device.py")  # the scan finds what it looks for


def test_device_choice_and_precision():
    from mindvis.utils.device import autocast_dtype, resolve_precision, select_device

    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MindvisError, match="not available") as info:
            select_device("cuda")
        assert info.value.key == "--device"
    with pytest.raises(MindvisError, match="unknown device"):
        select_device("tpu")
    assert resolve_precision("auto", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("no") is None


def test_generate_places_every_model_on_the_chosen_device_and_never_calls_cuda(sd_workspace, tmp_path,
                                                                               monkeypatch):
    """A fake GPU: the device module hands out a device, and every model of the stage must be moved there,
    with no .cuda() call anywhere (they raise here)."""
    import mindvis.generate.run as run
    from mindvis.train.finetune import finetune

    root = sd_workspace
    config = tiny_config(finetune={"epochs": 1, "align_weight": 0.0, "select_metric": "val/loss"},
                         generate={"start_row": False, "lowlevel": False, "attention_stimuli": 0,
                                   "mixed_precision": "bf16"})
    config["ldm"]["image_size"] = 16
    finetune(config, "sub-01", root / "responses.h5", root / "stimuli.h5", root / "sd", tmp_path / "dcldm",
             mbm_dir=root / "mbm")

    def refuse(*args, **kwargs):
        raise AssertionError(".cuda() called outside mindvis/utils/device.py")

    monkeypatch.setattr(torch.Tensor, "cuda", refuse)
    monkeypatch.setattr(torch.nn.Module, "cuda", refuse)
    chosen = torch.device("cpu")
    placed = []
    original_to = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, torch.device):
            placed.append((type(module).__name__, target))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(run, "select_device", lambda preference: chosen)
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    summary = run.generate_subject(config, "sub-01", tmp_path / "dcldm", root / "responses.h5",
                                   root / "stimuli.h5", tmp_path / "samples", device="cuda")
    kinds = {name for name, device in placed if device == chosen}
    assert {"AutoencoderKL", "UNet2DConditionModel", "DCLDM"} <= kinds
    assert summary["device"] == "cpu" and summary["mixed_precision"] == "bf16" and summary["images_per_s"] > 0
    samples = np.asarray(__import__("h5py").File(tmp_path / "samples" / "samples.h5")["samples"])
    assert samples.dtype == np.uint8 and samples.shape[2:] == (16, 16, 3)
