"""The DC-LDM decoder as one object: SC-MBM encoder + fMRI conditioner + the generator's UNet.

Built (:func:`build_decoder`), saved (:func:`save_dcldm`) and loaded
(:func:`load_dcldm`) here; trained by :mod:`mindvis.train.finetune`, sampled
by :mod:`mindvis.generate`.

A decoder folder (``results/{subject}/dcldm/``)
----------------------------------------------
``dcldm.safetensors``
    The whole encoder (``encoder.*``) and conditioner (``conditioner.*``),
    trained or not, and the UNet's trained tensors (``unet.*``); the frozen
    UNet weights stay in the base generator.
``encoder/config.json``, ``conditioner/config.json``
    The architectures (diffusers configs) to rebuild them.
``dcldm.json``
    Base generator folder, trained groups, subject, voxel count, best epoch and
    metric, final validation metrics, input hashes, resolved config, versions
    (written by the fine-tuning stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mindvis.errors import MindvisError
from mindvis.models.conditioning import FmriConditioner
from mindvis.models.ldm import load_generator
from mindvis.models.mbm import MBMAutoencoder, mbm_from_config
from mindvis.models.weights import save_weights
from mindvis.utils.io import write_json_atomic

MODEL_FILE = "dcldm.safetensors"
META_FILE = "dcldm.json"


class DCLDM(torch.nn.Module):
    """The fMRI decoder: SC-MBM encoder -> FmriConditioner -> the generator's UNet.

    The VAE is not part of it (always frozen; training encodes images outside).

    Parameters
    ----------
    encoder : mindvis.models.mbm.MBMAutoencoder
        Only its encoder (``encode``) is used.
    conditioner : mindvis.models.conditioning.FmriConditioner
    unet : diffusers.UNet2DConditionModel
    """

    def __init__(self, encoder, conditioner, unet):
        super().__init__()
        self.encoder = encoder
        self.conditioner = conditioner
        self.unet = unet

    def token_mask(self, fmri):
        """``[B, 1 + n_tokens]`` bool: the class token and every token holding a real voxel."""
        _, voxel_mask = self.encoder.pad(fmri)
        real = self.encoder.token_padding_mask(voxel_mask)
        return torch.cat([torch.ones_like(real[:, :1]), real], dim=1)

    def condition(self, fmri):
        """fmri: float32 [B, V] -> :class:`~mindvis.models.conditioning.Condition`."""
        return self.conditioner(self.encoder.encode(fmri), self.token_mask(fmri), fmri=fmri)

    def forward(self, noisy_latents, timesteps, fmri, drop=None, return_condition=False):
        """Predict the noise (or v) of noisy latents given fMRI.

        Parameters
        ----------
        noisy_latents : [B, 4, h, w] float
        timesteps : [B] int64
        fmri : [B, V] float32
        drop : [B] bool, optional
            Samples whose condition is replaced by the learned null condition
            (condition dropout, for classifier-free guidance).
        return_condition : bool
            Also return the fMRI condition (before dropout), for the alignment loss.

        Returns
        -------
        Tensor or (Tensor, Condition)
            [B, 4, h, w], the UNet's prediction (and the condition).
        """
        noisy_latents = noisy_latents.contiguous()  # see Generator.encode
        condition = used = self.condition(fmri)
        if drop is not None:
            null = self.conditioner.null(len(condition))
            used = type(condition)(
                torch.where(drop[:, None, None], null.context.to(condition.context.dtype), condition.context),
                torch.where(drop[:, None], null.pooled.to(condition.pooled.dtype), condition.pooled))
        prediction = self.unet(noisy_latents, timesteps, encoder_hidden_states=used.context,
                               class_labels=used.pooled).sample
        return (prediction, condition) if return_condition else prediction


def build_decoder(config, generator, n_voxels, mbm_dir=None, baseline=False):
    """The decoder for a subject: encoder (pretrained or, if ``baseline``, random) + new conditioner + UNet.

    Parameters
    ----------
    config : dict
        Resolved experiment config (``mbm``, ``finetune`` sections, ``seed``).
    generator : mindvis.models.ldm.Generator
    n_voxels : int
        The subject's voxel count.
    mbm_dir : path, optional
        The pretrained SC-MBM folder (required unless ``baseline``).
    baseline : bool
        Random encoder of the configured preset instead of the pretrained one.
    """
    if baseline:
        encoder = mbm_from_config(config["mbm"], n_voxels=n_voxels)
    else:
        if mbm_dir is None or not (Path(mbm_dir) / "config.json").exists():
            raise MindvisError("no pretrained SC-MBM encoder here", path=mbm_dir, key="config.json",
                               fix="run pretrain_mbm first, or fine-tune in baseline mode.")
        encoder = MBMAutoencoder.from_pretrained(mbm_dir, local_files_only=True)
    if n_voxels > encoder.capacity:
        # More voxels than the pretrained table covers: interpolate positions (logged by the encoder).
        encoder.resize_positions(n_voxels)
    conditioner = FmriConditioner(input_tokens=1 + encoder.n_tokens, input_dim=encoder.config.embed_dim,
                                  context_tokens=generator.context_tokens,
                                  cross_attention_dim=generator.cross_attention_dim,
                                  pooled_dim=generator.pooled_dim, dropout=config["finetune"]["mapper_dropout"],
                                  n_voxels=int(n_voxels) if config["finetune"]["voxel_path"] else 0)
    # The base was trained with its own null condition: starting from it keeps the unconditional branch intact.
    if generator.conditioner is not None:
        conditioner.init_null_from(generator.conditioner)
    return DCLDM(encoder, conditioner, generator.unet)


def load_dcldm(folder, base=None, dtype=None):
    """Load a fine-tuned decoder and its generator.

    Parameters
    ----------
    folder : path
        A ``finetune`` output folder.
    base : path, optional
        The base generator folder; default: the one recorded in ``dcldm.json``.

    Returns
    -------
    generator : mindvis.models.ldm.Generator
        Its ``unet`` is the fine-tuned one (shared with ``decoder.unet``).
    decoder : mindvis.models.ldm.DCLDM
        In eval mode.
    meta : dict
        The contents of ``dcldm.json``.
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise MindvisError("not a fine-tuned DC-LDM folder (dcldm.json missing)", path=folder,
                           fix="run the finetune stage for this subject first.")
    meta = json.loads(meta_path.read_text())
    generator = load_generator(base or meta["base"], image_size=meta.get("image_size"), dtype=dtype)
    encoder = MBMAutoencoder.from_config(MBMAutoencoder.load_config(folder / "encoder"))
    conditioner = FmriConditioner.from_config(FmriConditioner.load_config(folder / "conditioner"))
    decoder = DCLDM(encoder, conditioner, generator.unet)
    tensors = load_file(str(folder / MODEL_FILE))
    if "encoder.pos_embed" in tensors:
        # The stored table may have been interpolated to the subject's token count.
        encoder.pos_embed = torch.empty_like(tensors["encoder.pos_embed"])
        encoder.decoder_pos_embed = torch.empty_like(tensors["encoder.decoder_pos_embed"])
        encoder.n_tokens = tensors["encoder.pos_embed"].shape[1] - 1
    result = decoder.load_state_dict(tensors, strict=False)
    # The UNet's untrained tensors come from the base; the SC-MBM reconstruction decoder is unused.
    missing = [key for key in result.missing_keys if key.startswith(("encoder.", "conditioner."))
               and not key.startswith(("encoder.decoder", "encoder.mask_token"))]
    if result.unexpected_keys or missing:
        raise MindvisError(f"weights do not fit the decoder (unexpected {result.unexpected_keys[:5]}, "
                           f"missing {missing[:5]})", path=folder / MODEL_FILE,
                           fix="rerun finetune; the folder mixes two versions.")
    if dtype is not None:
        decoder.to(dtype)
    return generator, decoder.eval(), meta


def save_dcldm(decoder, out_dir, meta, metadata=None):
    """Write a decoder folder (see the module docstring): configs, weights, then ``dcldm.json`` last.

    Parameters
    ----------
    decoder : DCLDM
    out_dir : path
    meta : dict
        The contents of ``dcldm.json`` (``base`` names the base generator folder).
    metadata : dict of str -> str, optional
        Stored in the safetensors header.
    """
    out_dir = Path(out_dir)
    decoder.encoder.save_config(out_dir / "encoder")
    decoder.conditioner.save_config(out_dir / "conditioner")
    # The encoder and conditioner are stored whole, trained or not (the loader builds them from config);
    # of the UNet only what was trained (the rest is the base generator's).
    save_weights(decoder, out_dir / MODEL_FILE, which="trainable", always=("encoder.", "conditioner."),
                 metadata=metadata)
    write_json_atomic(out_dir / META_FILE, meta)
