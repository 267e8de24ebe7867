"""Recreate golden.safetensors from MinD-Vis's own model code (not part of the test suite; no code of theirs
is committed). MinD-Vis's ``code/dc_ldm`` is its copy of CompVis latent-diffusion's ``ldm`` package with its
time conditioning added (off here: ``use_time_cond=False`` is CompVis's UNetModel).

    git -C <mind-vis clone> archive 08d5386 code | tar x -C /tmp/golden
    python -m pip install --target /tmp/golden/pkgs einops
    PYTHONPATH=/tmp/golden/pkgs:/tmp/golden/code python tests/data/compvis_golden/make_golden.py

It builds a tiny randomly initialised ``UNetModel`` (the sizes of tests/compvis_fixtures.py's TINY_LDM_PARAMS),
saves its state dict under LatentDiffusion's names (``model.diffusion_model.*``), and records its output for a
fixed latent, timesteps and context, and 10 steps of MinD-Vis's ``PLMSSampler`` from a fixed start.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dc_ldm.models.diffusion.plms import PLMSSampler
from dc_ldm.modules.diffusionmodules.openaimodel import UNetModel

HERE = Path(__file__).resolve().parent
UNET_PARAMS = {"image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32,
               "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
               "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}
PLMS_STEPS = 10


class TinyLatentDiffusion(torch.nn.Module):
    """What PLMSSampler reads of a LatentDiffusion: cin256's linear schedule and apply_model."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.num_timesteps = 1000
        # ldm.modules.diffusionmodules.util.make_beta_schedule("linear", 1000, 0.0015, 0.0195)
        betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
        self.betas = betas.float()
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.alphas_cumprod_prev = torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32)
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c):
        return self.unet(x, t, context=c)


def main():
    torch.manual_seed(0)
    unet = UNetModel(**UNET_PARAMS).eval()
    with torch.no_grad():  # CompVis zero-initialises output layers: perturb every tensor so each one matters
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 3, 4, 4, generator=generator)
    timesteps = torch.tensor([1, 600])
    context = torch.randn(2, 5, 16, generator=generator)
    x_T = torch.randn(2, 3, 4, 4, generator=generator)
    with torch.no_grad():
        eps = unet(latent, timesteps, context=context)
        sampler = PLMSSampler(TinyLatentDiffusion(unet))
        plms, _ = sampler.sample(S=PLMS_STEPS, batch_size=2, shape=(3, 4, 4), conditioning=context, x_T=x_T,
                                 verbose=False)
    tensors = {f"model.diffusion_model.{key}": value.contiguous() for key, value in unet.state_dict().items()}
    tensors.update({"inputs.latent": latent, "inputs.timesteps": timesteps, "inputs.context": context,
                    "inputs.x_T": x_T, "outputs.eps": eps, "outputs.plms": plms,
                    "outputs.plms_timesteps": torch.as_tensor(sampler.ddim_timesteps.copy())})
    save_file(tensors, HERE / "golden.safetensors",
              metadata={"source": "zjc062/mind-vis 08d5386 code/dc_ldm (CompVis latent-diffusion's ldm, copied)",
                        "plms_steps": str(PLMS_STEPS)})


if __name__ == "__main__":
    main()
