"""The denoising objective shared by the base generator's pretraining and DC-LDM fine-tuning."""

from __future__ import annotations


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet predicts: the noise (``epsilon``) or the velocity (``v_prediction``)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
