"""SC-MBM: a masked autoencoder over a 1-D voxel vector (MinD-Vis's sparse-coded masked brain modelling).

Modules only; the loss loop, data and checkpoints live in :mod:`mindvis.train`.

A voxel vector ``fmri: [B, V]`` is cut into ``L = ceil(V / patch_size)``
contiguous patches (tokens); a Conv1d with kernel = stride = ``patch_size``
embeds each into ``embed_dim`` >> ``patch_size`` dimensions (the "sparse
coding"). Fixed 1-D sine-cosine positions are added, a class token is
prepended, a random ``mask_ratio`` of the tokens is hidden, the encoder sees
the rest, and a lighter decoder predicts the hidden patches' voxels.

Variable voxel counts
---------------------
Subjects have different numbers of voxels. A vector shorter than the model's
capacity (``n_tokens * patch_size``) is zero-padded at the end, and a voxel
mask ``voxel_mask: [B, V] bool`` (True = a real voxel) says which entries are
real. Padded voxels are zeroed before embedding (they carry no information and
get no gradient), tokens without any real voxel are kept out of attention
(as keys), out of the random masking (never kept, never counted) and out of
the loss, and padded voxels inside a partly filled last patch are out of the
loss. Nothing is wrap-padded with copies of real voxels.

When a pretrained model meets a subject whose token count differs from its
position table, :meth:`MBMAutoencoder.resize_positions` interpolates the
table (and logs that it did).

The model is a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained``
writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` and
``MBMAutoencoder.from_pretrained(folder)`` rebuilds it, like any diffusers part.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from mindvis.models.presets import MBM_PRESETS

log = logging.getLogger(__name__)

#: Named sizes (``paper`` is MinD-Vis's SC-MBM), in a torch-free module the workflow reads too.
PRESETS = MBM_PRESETS
ATTENTION_CHOICES = ("sdpa", "plain")


def sincos_positions(n_positions, dim):
    """Fixed 1-D sine-cosine position table.

    Parameters
    ----------
    n_positions : int
    dim : int
        Even embedding width.

    Returns
    -------
    Tensor
        float32 [n_positions, dim]: the first half sines, the second cosines,
        at geometrically spaced frequencies from 1 to 1/10000.
    """
    if dim % 2:
        raise ValueError(f"the embedding width must be even for sine-cosine positions, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def interpolate_positions(table, n_tokens):
    """Resample a position table (class slot first) to ``n_tokens`` patch positions.

    Parameters
    ----------
    table : [1, 1 + L, D] float
        Class-token position, then one row per patch.
    n_tokens : int
        New number of patches.

    Returns
    -------
    Tensor
        [1, 1 + n_tokens, D]; the class slot is kept, the patch rows are
        linearly interpolated with the first and last positions pinned.
    """
    cls_slot, patches = table[:, :1], table[:, 1:]
    if patches.shape[1] == n_tokens:
        return table.clone()
    resized = F.interpolate(patches.transpose(1, 2).float(), size=n_tokens, mode="linear", align_corners=True)
    return torch.cat([cls_slot, resized.transpose(1, 2).to(table.dtype)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask.

    ``implementation`` 'sdpa' uses ``F.scaled_dot_product_attention`` (fused
    kernels where available), 'plain' the explicit softmax(QK^T / sqrt(d)) V;
    both give the same result (tested).
    """

    def __init__(self, dim, num_heads, implementation="sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_valid=None):
        """x: [B, S, D]; key_valid: [B, S] bool (True = may be attended to) or None -> [B, S, D]."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=1.0, attention="sdpa"):
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, key_valid=None):
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class MBMAutoencoder(ModelMixin, ConfigMixin):
    """Masked brain modelling autoencoder over voxel vectors.

    Parameters
    ----------
    n_voxels : int
        Largest voxel count the model takes; sets ``n_tokens = ceil(n_voxels /
        patch_size)`` and the position tables.
    patch_size : int
        Voxels per token.
    embed_dim, depth, num_heads : int
        Encoder width, blocks and heads.
    decoder_embed_dim, decoder_depth, decoder_num_heads : int
        Decoder width, blocks and heads.
    mlp_ratio : float
        Hidden width of the blocks' MLPs relative to their width.
    mask_ratio : float
        Fraction of real tokens hidden from the encoder in training.
    norm_pix_loss : bool
        Compare predictions with per-patch standardised targets.
    attention : {'sdpa', 'plain'}
        Attention implementation (same results; 'sdpa' is faster).
    """

    @register_to_config
    def __init__(self, n_voxels, patch_size=16, embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64,
                 decoder_depth=2, decoder_num_heads=4, mlp_ratio=1.0, mask_ratio=0.75, norm_pix_loss=False,
                 attention="sdpa"):
        super().__init__()
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, not {attention!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.n_tokens = math.ceil(n_voxels / patch_size)
        self.patch_embed = nn.Conv1d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (not learned) tables, but persistent: they travel with the weights, so an
        # interpolated table (resize_positions) is what a reloaded model gets back.
        self.register_buffer("pos_embed", self._table(self.n_tokens, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", self._table(self.n_tokens, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attention)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size)
        self._init_weights()

    @classmethod
    def from_preset(cls, preset, n_voxels, **overrides):
        """Build a named size (``tiny``, ``small``, ``base``, ``paper``) for ``n_voxels`` voxels."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        return cls(n_voxels=n_voxels, **{**PRESETS[preset], **overrides})

    @staticmethod
    def _table(n_tokens, dim):
        return torch.cat([torch.zeros(1, dim), sincos_positions(n_tokens, dim)])[None]

    def _init_weights(self):
        # Linear layers (and the patch embedding, a linear map on each patch) start Xavier-uniform,
        # tokens small normal, norms at identity: the usual ViT/MAE start, stable with AdamW.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        """Parameter names AdamW should not decay."""
        return {"cls_token", "mask_token"}

    @property
    def capacity(self):
        """Voxels the model takes: ``n_tokens * patch_size``."""
        return self.n_tokens * self.config.patch_size

    # -- geometry -------------------------------------------------------------------

    def resize_positions(self, n_voxels):
        """Fit the position tables to ``n_voxels`` voxels, interpolating them when the token count changes.

        Parameters
        ----------
        n_voxels : int
            A subject's voxel count.

        Returns
        -------
        bool
            True if the tables were interpolated.
        """
        n_tokens = math.ceil(n_voxels / self.config.patch_size)
        if n_tokens == self.n_tokens:
            self.register_to_config(n_voxels=max(n_voxels, self.config.n_voxels))
            return False
        log.info("interpolating the SC-MBM position table from %d to %d tokens (%d voxels, patch %d)",
                 self.n_tokens, n_tokens, n_voxels, self.config.patch_size)
        self.pos_embed = interpolate_positions(self.pos_embed, n_tokens)
        self.decoder_pos_embed = interpolate_positions(self.decoder_pos_embed, n_tokens)
        self.n_tokens = n_tokens
        self.register_to_config(n_voxels=n_voxels)
        return True

    def pad(self, fmri, voxel_mask=None):
        """Zero-pad voxel vectors to the model's capacity.

        Parameters
        ----------
        fmri : [B, V] float, V <= capacity
        voxel_mask : [B, V] bool, optional
            True for real voxels; default all True.

        Returns
        -------
        fmri : [B, n_tokens * patch_size] float
            Padded voxels (and any masked out by ``voxel_mask``) are 0.
        voxel_mask : [B, n_tokens * patch_size] bool
        """
        batch, n_voxels = fmri.shape
        if n_voxels > self.capacity:
            raise ValueError(f"{n_voxels} voxels exceed the model's capacity of {self.capacity} "
                             f"({self.n_tokens} tokens x {self.config.patch_size}); call resize_positions first")
        if voxel_mask is None:
            voxel_mask = torch.ones(batch, n_voxels, dtype=torch.bool, device=fmri.device)
        extra = self.capacity - n_voxels
        if extra:
            fmri = F.pad(fmri, (0, extra))
            voxel_mask = F.pad(voxel_mask, (0, extra), value=False)
        return fmri * voxel_mask.to(fmri.dtype), voxel_mask.bool()

    def patchify(self, fmri):
        """fmri: [B, L * patch_size] -> patches [B, L, patch_size] (contiguous voxels per patch)."""
        return fmri.reshape(fmri.shape[0], -1, self.config.patch_size)

    def unpatchify(self, patches):
        """patches: [B, L, patch_size] -> fmri [B, L * patch_size]."""
        return patches.reshape(patches.shape[0], -1)

    def token_padding_mask(self, voxel_mask):
        """voxel_mask: [B, L * patch_size] bool -> [B, L] bool, True for tokens holding a real voxel."""
        return self.patchify(voxel_mask).any(dim=-1)

    # -- the named steps ----------------------------------------------------------

    @staticmethod
    def random_masking(tokens, token_real, mask_ratio, generator=None):
        """Hide a random ``mask_ratio`` of each sample's real tokens.

        Parameters
        ----------
        tokens : [B, L, D]
        token_real : [B, L] bool
            False for padding tokens: they are never kept and never count.
        mask_ratio : float
        generator : torch.Generator, optional
            For reproducible masks (evaluation); default torch's global generator.

        Returns
        -------
        kept : [B, K, D]
            The kept tokens, K = the largest kept count in the batch.
        kept_valid : [B, K] bool
            False for slots beyond a sample's own kept count.
        mask : [B, L] float
            1 for real tokens hidden from the encoder (the ones to reconstruct).
        ids_restore : [B, L] long
            Undoes the shuffle: ``shuffled.gather(1, ids_restore)`` is in token order.
        n_keep : [B] long
            Kept tokens per sample.
        """
        batch, length, dim = tokens.shape
        noise = torch.rand(batch, length, generator=generator,
                           device=generator.device if generator is not None else tokens.device).to(tokens.device)
        noise = noise.masked_fill(~token_real, 2.0)  # padding sorts after every real token
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        n_real = token_real.sum(dim=1)
        n_keep = torch.clamp((n_real.float() * (1.0 - mask_ratio)).long(), min=1)
        n_keep = torch.minimum(n_keep, n_real.clamp(min=1))
        n_kept_max = int(n_keep.max())
        kept = tokens.gather(1, ids_shuffle[:, :n_kept_max, None].expand(-1, -1, dim))
        slots = torch.arange(length, device=tokens.device)[None, :]
        kept_valid = slots[:, :n_kept_max] < n_keep[:, None]
        hidden_shuffled = (slots >= n_keep[:, None]).to(tokens.dtype)
        mask = hidden_shuffled.gather(1, ids_restore) * token_real.to(tokens.dtype)
        return kept, kept_valid, mask, ids_restore, n_keep

    def _embed(self, fmri):
        """fmri: [B, L * patch_size] (padded, zeros at padding) -> tokens [B, L, D] with positions."""
        tokens = self.patch_embed(fmri[:, None, :]).transpose(1, 2)
        return tokens + self.pos_embed[:, 1:].to(tokens.dtype)

    def _run(self, blocks, norm, x, key_valid):
        # A mask costs the fused attention kernels their fast path: pass none when every key is valid.
        if key_valid is not None and bool(key_valid.all()):
            key_valid = None
        for block in blocks:
            x = block(x, key_valid)
        return norm(x)

    def forward_encoder(self, fmri, voxel_mask, mask_ratio, generator=None):
        """Encode the kept tokens of a masked voxel vector.

        Parameters
        ----------
        fmri : [B, L * patch_size] float
            Padded (see :meth:`pad`).
        voxel_mask : [B, L * patch_size] bool
        mask_ratio : float
        generator : torch.Generator, optional

        Returns
        -------
        latent : [B, 1 + K, embed_dim]
            Class token, then the kept tokens in shuffled order.
        latent_valid : [B, 1 + K] bool
        mask : [B, L] float
            1 for hidden real tokens.
        ids_restore : [B, L] long
        n_keep : [B] long
        """
        token_real = self.token_padding_mask(voxel_mask)
        tokens = self._embed(fmri)
        kept, kept_valid, mask, ids_restore, n_keep = self.random_masking(tokens, token_real, mask_ratio, generator)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(kept.shape[0], -1, -1).to(kept.dtype)
        latent_valid = torch.cat([torch.ones_like(kept_valid[:, :1]), kept_valid], dim=1)
        latent = self._run(self.blocks, self.norm, torch.cat([cls, kept], dim=1), latent_valid)
        return latent, latent_valid, mask, ids_restore, n_keep

    def forward_decoder(self, latent, ids_restore, n_keep, token_real):
        """Predict every patch's voxels from the encoded kept tokens.

        Parameters
        ----------
        latent : [B, 1 + K, embed_dim]
        ids_restore : [B, L] long
        n_keep : [B] long
        token_real : [B, L] bool

        Returns
        -------
        pred : [B, L, patch_size]
        """
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        kept = x[:, 1:]
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, length - kept.shape[1], -1)
        shuffled = torch.cat([kept, mask_tokens], dim=1)
        # Slots past a sample's own kept count hold other samples' padding: make them mask tokens.
        is_kept = torch.arange(length, device=x.device)[None, :] < n_keep[:, None]
        shuffled = torch.where(is_kept[..., None], shuffled, self.mask_token.to(x.dtype))
        ordered = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], ordered], dim=1) + self.decoder_pos_embed.to(x.dtype)
        key_valid = torch.cat([torch.ones_like(token_real[:, :1]), token_real], dim=1)
        x = self._run(self.decoder_blocks, self.decoder_norm, x, key_valid)
        return self.decoder_pred(x[:, 1:])

    def loss_target(self, fmri, voxel_mask):
        """The reconstruction target: patches [B, L, patch_size], standardised per patch over real voxels
        when ``norm_pix_loss``."""
        target = self.patchify(fmri).float()
        if self.config.norm_pix_loss:
            real = self.patchify(voxel_mask).float()
            count = real.sum(-1, keepdim=True).clamp(min=1)
            mean = (target * real).sum(-1, keepdim=True) / count
            var = (((target - mean) * real) ** 2).sum(-1, keepdim=True) / count
            target = (target - mean) / (var + 1e-6).sqrt() * real
        return target

    def forward_loss(self, target_fmri, pred, mask, voxel_mask):
        """Mean squared error over the real voxels of hidden tokens.

        Parameters
        ----------
        target_fmri : [B, L * patch_size] float
            Padded clean vector.
        pred : [B, L, patch_size]
        mask : [B, L] float
            1 for hidden real tokens.
        voxel_mask : [B, L * patch_size] bool

        Returns
        -------
        Tensor
            Scalar float32 loss.
        """
        target = self.loss_target(target_fmri, voxel_mask)
        weight = mask.float()[..., None] * self.patchify(voxel_mask).float()
        squared = (pred.float() - target) ** 2
        return (squared * weight).sum() / weight.sum().clamp(min=1.0)

    def forward(self, fmri, voxel_mask=None, target=None, mask_ratio=None, generator=None):
        """Mask, encode, decode and score a batch of voxel vectors.

        Parameters
        ----------
        fmri : [B, V] float32, V <= capacity
            Input vectors (possibly augmented).
        voxel_mask : [B, V] bool, optional
            True for real voxels; default all real.
        target : [B, V] float32, optional
            Clean vectors the loss compares with (default ``fmri``), so that
            augmented inputs are reconstructed to their clean values.
        mask_ratio : float, optional
            Default ``config.mask_ratio``.
        generator : torch.Generator, optional

        Returns
        -------
        loss : scalar float32
        pred : [B, L, patch_size]
        mask : [B, L] float (1 = hidden real token)
        """
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        padded, full_mask = self.pad(fmri, voxel_mask)
        padded_target = padded if target is None else self.pad(target, voxel_mask)[0]
        latent, _, mask, ids_restore, n_keep = self.forward_encoder(padded, full_mask, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore, n_keep, self.token_padding_mask(full_mask))
        loss = self.forward_loss(padded_target, pred, mask, full_mask)
        return loss, pred, mask

    def encode(self, fmri, voxel_mask=None, class_token=True):
        """Encode whole (unmasked) voxel vectors: the features the decoder stage conditions on.

        Parameters
        ----------
        fmri : [B, V] float32, V <= capacity
        voxel_mask : [B, V] bool, optional
        class_token : bool
            False: the patch tokens alone, as MinD-Vis's fine-tuning encoder
            (``fmri_encoder.forward_encoder``) runs them: no class token, and
            every token attends to every other (give it whole-capacity vectors,
            padded as MinD-Vis pads them).

        Returns
        -------
        Tensor
            [B, 1 + n_tokens, embed_dim]: class token first, then one token per
            patch; rows of padding tokens are zero (use
            ``token_padding_mask(pad(...)[1])`` to pool over real tokens).
            [B, n_tokens, embed_dim] without the class token.
        """
        padded, full_mask = self.pad(fmri, voxel_mask)
        token_real = self.token_padding_mask(full_mask)
        tokens = self._embed(padded)
        if not class_token:
            return self._run(self.blocks, self.norm, tokens, None)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        key_valid = torch.cat([torch.ones_like(token_real[:, :1]), token_real], dim=1)
        latent = self._run(self.blocks, self.norm, torch.cat([cls, tokens], dim=1), key_valid)
        return latent * key_valid[..., None].to(latent.dtype)


def mbm_from_config(mbm_config, n_voxels):
    """A freshly initialised :class:`MBMAutoencoder` of the ``mbm`` config section's preset for ``n_voxels`` voxels."""
    return MBMAutoencoder.from_preset(mbm_config["preset"], n_voxels=n_voxels, patch_size=mbm_config["patch_size"],
                                      mask_ratio=mbm_config["mask_ratio"], norm_pix_loss=mbm_config["norm_pix_loss"],
                                      attention=mbm_config["attention"])


#: The files of an SC-MBM folder whose SHA-256 its ``summary.json`` records (``sha256``).
MBM_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def load_pretrained_mbm(folder):
    """An SC-MBM folder's autoencoder, after checking its files against the SHA-256 its ``summary.json`` recorded.

    A folder without them (an import of MinD-Vis's checkpoint, or one written before they were recorded) loads
    unchecked.

    Raises
    ------
    MindvisError
        When a file is not the one its writer recorded (changed, or its write cut short).
    """
    import json
    from pathlib import Path

    from mindvis.errors import MindvisError
    from mindvis.utils.io import check_digests

    folder = Path(folder)
    fix = "rerun the SC-MBM stage that wrote this folder (pretrain-mbm, adapt-mbm or import-checkpoint)."
    summary = folder / "summary.json"
    if summary.exists():
        try:
            digests = json.loads(summary.read_text()).get("sha256")
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise MindvisError("not a JSON object", path=summary, key="sha256", fix=fix) from None
        check_digests(folder, digests, "summary.json", fix=fix)
    for name in MBM_FILES:
        if not (folder / name).is_file():
            raise MindvisError("SC-MBM file missing", path=folder / name, fix=fix)
    try:
        # use_safetensors: never fall back to a pickled diffusion_pytorch_model.bin.
        return MBMAutoencoder.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise MindvisError(f"cannot be loaded as an SC-MBM autoencoder ({type(err).__name__}: {reason})",
                           path=folder / MBM_FILES[1], fix=fix) from None
