"""Parameters and disk per subject of a Stable Diffusion 1.5 decoder, before and after the voxel-path budget.

What a subject's decoder folder stores (``dcldm.safetensors``: the SC-MBM encoder and the fMRI
conditioner whole, and the UNet tensors fine-tuning trains, float32), counted from the real modules
built on PyTorch's meta device (no memory, no download): SD 1.5's UNet from its config, mindvis's
``FmriConditioner`` onto its 77 x 768 context plus the 1,280-wide pooled vector, and the SC-MBM
encoder at MinD-Vis's size (``paper`` preset) and at the ``tiny`` one. "before" is the full voxel
path (voxels x 60,416 outputs), "after" the rank-r map within ``finetune.voxel_path_max_params``.

    python benchmarks/sd_budget.py            # prints and writes benchmarks/results/sd_budget.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import SD15_UNET_CONFIG  # noqa: E402 - SD 1.5's UNet config, written once (benchmarks/gpu.py)


DEFAULT_TRAIN = ["encoder", "conditioner", "attn2", "norms"]


def count(module, prefix=""):
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


def measure(n_voxels, preset, budget):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from mindvis.models.conditioning import FmriConditioner
    from mindvis.models.dcldm import DCLDM, voxel_path_rank
    from mindvis.models.mbm import MBMAutoencoder
    from mindvis.train.finetune import trainable_parameter_names

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        encoder = MBMAutoencoder.from_preset(preset, n_voxels=n_voxels)
    pooled = int(unet.time_embedding.linear_2.out_features)
    n_outputs = 77 * 768 + pooled
    rows = {}
    for label, rank in (("before (full map)", 0), ("after (budget)", voxel_path_rank(n_voxels, n_outputs, budget))):
        with init_empty_weights():
            conditioner = FmriConditioner(input_tokens=1 + encoder.n_tokens, input_dim=encoder.config.embed_dim,
                                          context_tokens=77, cross_attention_dim=768, pooled_dim=pooled,
                                          n_voxels=n_voxels, voxel_rank=rank)
        decoder = DCLDM(encoder, conditioner, unet)
        trained = trainable_parameter_names(decoder, DEFAULT_TRAIN)
        unet_trained = sum(p.numel() for name, p in decoder.named_parameters()
                           if name.startswith("unet.") and name in trained)
        # dcldm.safetensors: the encoder and the conditioner whole (the encoder's reconstruction decoder too),
        # and the trained UNet tensors, float32.
        stored = count(encoder) + count(conditioner) + unet_trained
        rows[label] = {"voxel_rank": rank, "voxel_path": count(conditioner, "voxel_"),
                       "conditioner": count(conditioner), "encoder": count(encoder),
                       "unet_trained": unet_trained, "trained": sum(p.numel() for name, p in decoder.named_parameters()
                                                                    if name in trained),
                       "stored": stored, "disk_mb": round(stored * 4 / 2 ** 20, 1)}
    return {"n_voxels": n_voxels, "preset": preset, "n_outputs": n_outputs, "unet_total": count(unet), "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=8_000_000, help="finetune.voxel_path_max_params")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    results = [measure(v, preset, args.budget) for preset in ("paper", "tiny") for v in (1_700, 15_000)]
    lines = ["# Stable Diffusion 1.5 decoder: parameters and disk per subject", "",
             f"`python benchmarks/sd_budget.py` (budget `finetune.voxel_path_max_params` = {args.budget:,}); "
             f"modules built on the meta device from SD 1.5's UNet config (torch {torch.__version__}, "
             f"{platform.machine()}). Trained: the default groups {DEFAULT_TRAIN}. Stored: what "
             "`dcldm.safetensors` holds (encoder and conditioner whole, trained UNet tensors), float32.", "",
             "| SC-MBM | voxels | voxel path | rank | voxel-path params | conditioner | encoder | UNet trained "
             "| trained in all | stored | disk (MB) |", "|" + "---|" * 11]
    for result in results:
        for label, row in result["rows"].items():
            lines.append(f"| {result['preset']} | {result['n_voxels']:,} | {label} | {row['voxel_rank'] or 'full'} "
                         f"| {row['voxel_path']:,} | {row['conditioner']:,} | {row['encoder']:,} "
                         f"| {row['unet_trained']:,} | {row['trained']:,} | {row['stored']:,} | {row['disk_mb']:,} |")
    lines += ["", f"SD 1.5's UNet has {results[0]['unet_total']:,} parameters in all (frozen ones stay in the base "
              "folder, never copied per subject). The voxel path maps onto "
              f"{results[0]['n_outputs']:,} condition values (77 x 768 context + 1,280 pooled)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd_budget.md").write_text(text)
    (out / "sd_budget.json").write_text(json.dumps({"budget": args.budget, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
