"""The latent diffusion generator: diffusers' AutoencoderKL + UNet2DConditionModel + a scheduler.

The same :class:`Generator` drives the embedded model (pretrained by the
``pretrain_ldm`` stage on the stimulus images) and a real Stable Diffusion
folder: both are diffusers-format folders with ``vae/``, ``unet/`` and
``scheduler/`` sub-folders, loaded by :func:`load_generator` with
``from_pretrained(..., local_files_only=True)``.

Double conditioning (DC-LDM) reaches the UNet two ways:

* ``encoder_hidden_states`` ``[B, context_tokens, cross_attention_dim]`` feed
  every cross-attention (``attn2``) layer, in place of CLIP text;
* a pooled vector ``[B, time_embed_dim]`` is added to the timestep embedding.
  It enters through diffusers' ``class_embed_type="identity"``, which adds
  ``class_labels`` unchanged to the timestep embedding; a Stable Diffusion UNet
  is loaded with that option, which adds no weights, so its checkpoint loads
  exactly.

Only modules live here; training lives in :mod:`mindvis.train.pretrain_ldm`
and :mod:`mindvis.train.finetune`, sampling in :mod:`mindvis.generate`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_folder, check_digests, file_digests, write_json_atomic

log = logging.getLogger(__name__)

#: Context length of CLIP text encoders (Stable Diffusion 1.x and 2.x).
SD_CONTEXT_TOKENS = 77
#: File written beside the generator's sub-folders: image size, channels, context length.
GENERATOR_FILE = "generator.json"


@dataclass
class Generator:
    """An image generator in a VAE's latent space.

    Attributes
    ----------
    vae : diffusers.AutoencoderKL or diffusers.VQModel
    unet : diffusers.UNet2DConditionModel
        Its ``class_embed_type`` is ``"identity"`` (pooled condition added to
        the timestep embedding).
    scheduler_config : dict
        The training noise schedule (betas, prediction type); samplers are built
        from it with ``from_config``.
    image_size : int
        Side of the generated square images in pixels.
    context_tokens : int
        Number of cross-attention context tokens the UNet was trained with.
    class_conditioner : mindvis.models.conditioning.ClassConditioner or None
        The learned class-or-null embedding of a class-conditioned embedded
        base (``ldm.conditioning: class``); None otherwise.
    image_conditioner : mindvis.models.conditioning.ImageConditioner or None
        The label-free image encoder an embedded prior is conditioned on
        (``ldm.conditioning: image``, the default); None for SD and class bases.
    null_condition : mindvis.models.conditioning.Condition or None
        A text-to-image base's own unconditional condition (one row): its text
        encoder's embedding of the empty prompt, with a zero pooled vector; the
        start of a decoder's null condition. None when the folder has no text encoder.
    source : str
        Where it was loaded from.
    """

    vae: object
    unet: object
    scheduler_config: dict
    image_size: int
    context_tokens: int
    class_conditioner: object = None
    source: str = ""
    image_conditioner: object = None
    null_condition: object = None

    @property
    def conditioner(self):
        """The base's own condition encoder (image or class), or None (Stable Diffusion)."""
        return self.image_conditioner if self.image_conditioner is not None else self.class_conditioner

    @property
    def image_channels(self):
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self):
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self):
        return self.image_size // self.vae_scale

    @property
    def vae_scale(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cross_attention_dim(self):
        dim = self.unet.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def pooled_dim(self):
        """Width of the timestep embedding the pooled condition is added to."""
        return int(self.unet.time_embedding.linear_2.out_features)

    @property
    def scaling_factor(self):
        return float(self.vae.config.scaling_factor)

    def latent_shape(self, batch_size):
        return (batch_size, int(self.unet.config.in_channels), self.latent_size, self.latent_size)

    @property
    def is_vq(self):
        """Whether the first stage is a VQ autoencoder (CompVis's cin256-v2) rather than a KL one."""
        return type(self.vae).__name__ == "VQModel"

    def encode(self, images, sample=True, generator=None):
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents ``[B, c, H/f, W/f]``.

        A VQ first stage returns its pre-quantisation latents, as latent-diffusion's
        ``VQModelInterface.encode`` does (``sample`` and ``generator`` do not apply).
        """
        if self.is_vq:
            return (self.vae.encode(images).latents * self.scaling_factor).contiguous()
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        # The VAE returns channels-last strides on CPU; a UNet backward pass through such an input
        # segfaults in torch 2.13 CPU, so hand on a standard-layout tensor.
        return (latents * self.scaling_factor).contiguous()

    def decode(self, latents):
        """Scaled latents -> images ``[B, C, H, W]`` in [-1, 1] (not clamped); a VQ first stage quantises
        them first, as latent-diffusion's ``VQModelInterface.decode`` does."""
        return self.vae.decode(latents / self.scaling_factor).sample.contiguous()

    def encode_all(self, images, batch_size=64):
        """Posterior-mean scaled latents of any number of images, a batch at a time: float32 ``[N, 4, h, w]``
        on the VAE's device (the ridge targets of the low-level start and of the ridge baseline)."""
        import torch

        parameter = next(self.vae.parameters())
        with torch.no_grad():
            parts = [self.encode(images[i:i + batch_size].to(parameter.device, parameter.dtype), sample=False).float()
                     for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, *self.latent_shape(1)[1:], device=parameter.device)

    def embed_all(self, images, batch_size=256):
        """The image prior's embedding of any number of images ``[N, C, S, S]`` in [-1, 1], a batch at a time:
        float32 ``[N, tokens, token_dim]`` on the image conditioner's device (label-free)."""
        import torch

        conditioner = self.image_conditioner
        if conditioner is None:
            raise ValueError("this generator has no image conditioner")
        device = next(conditioner.parameters()).device
        with torch.no_grad():
            parts = [conditioner.embed(images[i:i + batch_size].to(device)).float()
                     for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, *conditioner.embedding_shape, device=device)

    def to(self, device=None, dtype=None):
        for module in (self.vae, self.unet, self.class_conditioner, self.image_conditioner):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self


# -- embedded architecture ----------------------------------------------------

def embedded_vae(image_size, image_channels, ldm_config):
    """A small AutoencoderKL: ``image_size`` -> ``image_size / 2**(len(blocks)-1)``, 4 latent channels.

    Parameters
    ----------
    image_size : int
    image_channels : int
        1 (grey) or 3 (RGB).
    ldm_config : dict
        The ``ldm`` config section (``vae_block_out_channels``, ``vae_layers_per_block``,
        ``latent_channels``, ``norm_num_groups``).
    """
    from diffusers import AutoencoderKL

    blocks = tuple(ldm_config["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=ldm_config["vae_layers_per_block"],
        latent_channels=ldm_config["latent_channels"], norm_num_groups=ldm_config["norm_num_groups"],
        sample_size=image_size,
    )


def embedded_unet(latent_size, ldm_config):
    """A small UNet2DConditionModel with cross-attention at every level.

    ``ldm.attention_heads`` is passed as diffusers' ``attention_head_dim``,
    which UNet2DConditionModel uses as the number of heads (a naming quirk).
    """
    from diffusers import UNet2DConditionModel

    blocks = tuple(ldm_config["unet_block_out_channels"])
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=ldm_config["latent_channels"],
        out_channels=ldm_config["latent_channels"],
        down_block_types=("CrossAttnDownBlock2D",) * len(blocks),
        up_block_types=("CrossAttnUpBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=ldm_config["unet_layers_per_block"],
        cross_attention_dim=ldm_config["cross_attention_dim"], attention_head_dim=ldm_config["attention_heads"],
        norm_num_groups=ldm_config["norm_num_groups"], class_embed_type="identity",
    )


def embedded_scheduler_config(ldm_config):
    """The training noise schedule of the embedded generator, as a DDPMScheduler config dict."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(num_train_timesteps=ldm_config["num_train_timesteps"],
                              beta_schedule=ldm_config["beta_schedule"],
                              prediction_type=ldm_config["prediction_type"], clip_sample=False).config)


def build_embedded_generator(image_size, image_channels, n_classes, ldm_config):
    """A freshly initialised embedded generator: VAE, UNet and its condition encoder.

    ``ldm.conditioning`` picks the encoder: ``image`` (default) a label-free
    :class:`~mindvis.models.conditioning.ImageConditioner` with
    ``ldm.token_grid ** 2`` context tokens; ``class`` a
    :class:`~mindvis.models.conditioning.ClassConditioner` with
    ``ldm.context_tokens``.
    """
    from mindvis.models.conditioning import ClassConditioner, ImageConditioner

    vae = embedded_vae(image_size, image_channels, ldm_config)
    scale = 2 ** (len(ldm_config["vae_block_out_channels"]) - 1)
    if image_size % scale:
        raise MindvisError(f"image size {image_size} is not divisible by the VAE's downsampling factor {scale}",
                           key="ldm.vae_block_out_channels", fix="use fewer VAE blocks or another image size.")
    unet = embedded_unet(image_size // scale, ldm_config)
    image_conditioned = ldm_config.get("conditioning", "image") == "image"
    context_tokens = ldm_config["token_grid"] ** 2 if image_conditioned else ldm_config["context_tokens"]
    generator = Generator(vae=vae, unet=unet, scheduler_config=embedded_scheduler_config(ldm_config),
                          image_size=image_size, context_tokens=context_tokens, source="embedded")
    if image_conditioned:
        generator.image_conditioner = ImageConditioner(
            image_size=image_size, in_channels=image_channels, widths=tuple(ldm_config["encoder_widths"]),
            token_grid=ldm_config["token_grid"], token_dim=ldm_config["token_dim"],
            cross_attention_dim=generator.cross_attention_dim, pooled_dim=generator.pooled_dim,
            embedding_noise=ldm_config["embedding_noise"])
    else:
        generator.class_conditioner = ClassConditioner(
            n_classes=n_classes, context_tokens=generator.context_tokens,
            cross_attention_dim=generator.cross_attention_dim, pooled_dim=generator.pooled_dim)
    return generator


# -- saving and loading -------------------------------------------------------

def save_generator(generator, out_dir, extra=None):
    """Write a generator as a diffusers-format folder (``vae/``, ``unet/``, ``scheduler/``).

    The class conditioner (if any) goes to ``class_conditioner/``; image size
    and context length to ``generator.json`` (with ``extra`` merged in), with
    the SHA-256 of every file written (``sha256``), which :func:`load_generator`
    checks. Each part is written to a temporary folder and renamed into place;
    while they are, ``generator.json`` says ``"incomplete": true``, so a write
    cut short is refused on load instead of mixing two generators.
    """
    from diffusers import DDPMScheduler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / GENERATOR_FILE, {"incomplete": True})
    parts = {"vae": generator.vae, "unet": generator.unet,
             "scheduler": DDPMScheduler.from_config(generator.scheduler_config),
             "class_conditioner": generator.class_conditioner, "image_conditioner": generator.image_conditioner}
    for name, part in parts.items():
        if part is None:
            shutil.rmtree(out_dir / name, ignore_errors=True)  # an older generator's part must not be loaded
            continue
        with atomic_folder(out_dir / name) as staging:
            part.save_pretrained(staging)
    files = sorted(str(f.relative_to(out_dir)) for name in parts if (out_dir / name).is_dir()
                   for f in (out_dir / name).rglob("*") if f.is_file())
    meta = {"image_size": generator.image_size, "context_tokens": generator.context_tokens, **(extra or {}),
            "sha256": file_digests(out_dir, files)}
    write_json_atomic(out_dir / GENERATOR_FILE, meta)


def _sd_context_tokens(folder):
    """Context length of an SD folder: its tokenizer's or text encoder's, else 77."""
    for sub, name, key in (("tokenizer", "tokenizer_config.json", "model_max_length"),
                           ("text_encoder", "config.json", "max_position_embeddings")):
        path = Path(folder) / sub / name
        if path.exists():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 100_000:
                return value
    return SD_CONTEXT_TOKENS


def load_generator(folder, image_size=None, dtype=None):
    """Load a generator from a diffusers-format folder: an embedded base or a Stable Diffusion.

    Parameters
    ----------
    folder : str or Path
        Holds ``vae/``, ``unet/`` and ``scheduler/`` (as written by
        ``save_pretrained`` or distributed with Stable Diffusion 1.x / 2.x).
    image_size : int, optional
        Side of generated images; default: the folder's ``generator.json``,
        else the UNet's ``sample_size`` times the VAE factor (512 for SD 1.5).
    dtype : torch.dtype, optional

    Raises
    ------
    MindvisError
        When a sub-folder is missing or the UNet cannot take a pooled condition.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel

    folder = Path(folder)
    meta_path = folder / GENERATOR_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("incomplete"):
        raise MindvisError("a write of this generator did not finish (generator.json says incomplete)",
                           path=meta_path, key="incomplete",
                           fix="rerun the stage that writes it (pretrain-ldm, import-ldm or bundle).")
    check_digests(folder, meta.get("sha256"), GENERATOR_FILE,
                  fix="rerun the stage that wrote this generator (pretrain-ldm, import-ldm or bundle).")
    for sub in ("vae", "unet", "scheduler"):
        if not (folder / sub).is_dir():
            raise MindvisError(f"not a diffusers-format generator: '{sub}/' is missing", path=folder,
                               key="ldm.base",
                               fix="point ldm.base at a Stable Diffusion folder in diffusers format "
                                   "(vae/, unet/, scheduler/), or use 'embedded'.")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    if unet_config.get("class_embed_type") not in (None, "identity") or unet_config.get("num_class_embeds"):
        raise MindvisError("this UNet already has a class embedding of another kind, so the pooled fMRI "
                           "condition cannot be added to its timestep embedding", path=folder / "unet",
                           key="class_embed_type", fix="use a text-to-image Stable Diffusion 1.x or 2.x folder.")
    kwargs = dict(local_files_only=True)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        vae_class = json.loads((folder / "vae" / "config.json").read_text()).get("_class_name")
        vae = (VQModel if vae_class == "VQModel" else AutoencoderKL).from_pretrained(folder, subfolder="vae", **kwargs)
        # 'identity' adds class_labels (our pooled condition) to the timestep embedding; it has no weights.
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", class_embed_type="identity", **kwargs)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise MindvisError(f"cannot load the generator ({err})", path=folder, key="ldm.base",
                           fix="check that the folder is a complete diffusers-format model.") from None
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = image_size or meta.get("image_size") or int(unet.config.sample_size) * scale
    if size % scale:
        raise MindvisError(f"image size {size} is not divisible by the VAE factor {scale}", key="ldm.image_size",
                           fix=f"use a multiple of {scale}.")
    context = meta.get("context_tokens") or _sd_context_tokens(folder)
    generator = Generator(vae=vae, unet=unet, scheduler_config=dict(scheduler.config), image_size=int(size),
                          context_tokens=int(context), source=str(folder))
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        generator.null_condition = empty_prompt_condition(folder, generator.pooled_dim, generator.context_tokens)
    if (folder / "class_conditioner").is_dir():
        from mindvis.models.conditioning import ClassConditioner

        generator.class_conditioner = ClassConditioner.from_pretrained(folder / "class_conditioner", **kwargs)
    if (folder / "image_conditioner").is_dir():
        from mindvis.models.conditioning import ImageConditioner

        generator.image_conditioner = ImageConditioner.from_pretrained(folder / "image_conditioner", **kwargs)
        generator.image_conditioner.eval().requires_grad_(False)
    log.info("loaded generator from %s: %d px, latents %s, context %d x %d, pooled %d", folder, size,
             generator.latent_shape(1)[1:], generator.context_tokens, generator.cross_attention_dim,
             generator.pooled_dim)
    return generator


def empty_prompt_condition(folder, pooled_dim, context_tokens):
    """A Stable Diffusion folder's unconditional condition: its CLIP text encoder's embedding of ``""``.

    The empty prompt padded to the context length, as diffusers' pipelines encode
    a negative prompt, run once on the CPU in float32 (the text encoder is then
    freed); the pooled part is zero, as the base adds nothing to its timestep
    embedding. Needs ``transformers``.

    Returns
    -------
    Condition
        ``context`` [1, context_tokens, D], ``pooled`` [1, pooled_dim].
    """
    import torch

    from mindvis.models.conditioning import Condition

    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise MindvisError(f"encoding the empty prompt needs transformers, which does not import ({error})",
                           path=Path(folder) / "text_encoder", key="ldm.base", fix="pip install transformers.") \
            from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True,
                                                     torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise MindvisError(f"cannot load the text encoder or tokenizer ({err})", path=folder, key="text_encoder",
                           fix="use a complete Stable Diffusion folder, or remove text_encoder/ and tokenizer/ "
                               "(the null condition then starts at zeros).") from None
    ids = tokenizer([""], padding="max_length", max_length=context_tokens, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids).last_hidden_state.float()
    log.info("null condition: the text encoder's empty prompt (%s), norm %.2f", folder, float(context.norm()))
    return Condition(context, torch.zeros(1, pooled_dim))


def cross_attention_modules(unet):
    """Names of the UNet's cross-attention layers (``...attn2``), in module order."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]
