"""Conditions for the latent diffusion UNet: fMRI tokens or object classes -> context + pooled vector.

Every conditioner returns a :class:`Condition`: ``context`` ``[B, context_tokens,
cross_attention_dim]`` for the UNet's cross-attention (in place of CLIP text;
77 x 768 for Stable Diffusion 1.x) and ``pooled`` ``[B, pooled_dim]`` added to
the timestep embedding (the second half of MinD-Vis's double conditioning).
Each also holds a learned *null* condition, used when a condition is dropped
during training and as the unconditional branch of classifier-free guidance.

* :class:`FmriConditioner` maps the SC-MBM encoder's tokens: a width mapping
  (encoder width -> cross-attention width) and a token-count mapping (a 1x1
  convolution over the token axis, as MinD-Vis's channel mapper), then a pooled
  projection of the mean mapped token. Optionally (``n_voxels`` > 0) a linear
  *voxel path* from the fMRI itself adds to both, around the encoder: the
  fine-tuning stage can start it from a closed-form ridge fit
  (:meth:`FmriConditioner.set_voxel_map`), and the encoder path then starts at
  zero and learns what the linear map misses. With ``embedding=True`` it
  speaks an image-conditioned prior's own language instead: its output is a
  grid of unit-scale embedding tokens of the prior's :class:`ImageConditioner`
  (each token standardised as the prior's are), which the frozen prior's
  :meth:`ImageConditioner.condition` turns into the UNet's condition, both its
  cross-attention context and its pooled timestep vector (so the double
  conditioning of MinD-Vis is kept, through the prior's own mapping).
* :class:`ReadoutConditioner` (the default mapper) reads every encoder token
  out by one linear map, which fine-tuning starts at the ridge solution from
  the starting encoder's features and then trains with everything else.
* :class:`MindVisConditioner` is MinD-Vis's own mapper, layer for layer.
* :class:`ClassConditioner` is the embedded base generator's stand-in for a
  text encoder: one learned context and pooled vector per class, plus null.

All subclass diffusers' ``ModelMixin, ConfigMixin``, so they save and load
with ``save_pretrained`` / ``from_pretrained`` like any diffusers part.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class Condition(NamedTuple):
    """``context``: [B, T, D] cross-attention states; ``pooled``: [B, P] added to the timestep embedding."""

    context: torch.Tensor
    pooled: torch.Tensor

    def __len__(self):  # the batch size, not the tuple length
        return self.context.shape[0]

    def select(self, index):
        return Condition(self.context[index], self.pooled[index])

    @staticmethod
    def cat(conditions):
        return Condition(torch.cat([c.context for c in conditions]), torch.cat([c.pooled for c in conditions]))


class _NullMixin:
    def null(self, batch_size):
        """The learned null condition repeated ``batch_size`` times."""
        return Condition(self.null_context[None].expand(batch_size, -1, -1),
                         self.null_pooled[None].expand(batch_size, -1))

    @torch.no_grad()
    def set_null(self, condition):
        """Start the null condition from a :class:`Condition` of one row (e.g. a text encoder's empty prompt)."""
        self.null_context.copy_(condition.context.reshape(self.null_context.shape))
        self.null_pooled.copy_(condition.pooled.reshape(self.null_pooled.shape))

    @torch.no_grad()
    def init_null_from(self, other):
        """Start the null condition from another conditioner's (e.g. the base generator's)."""
        if other is None or getattr(self.config, "embedding", False):  # an embedding-space one uses the prior's null
            return
        if tuple(other.null_context.shape) != tuple(self.null_context.shape) or \
                tuple(other.null_pooled.shape) != tuple(self.null_pooled.shape):
            raise ValueError("null condition shapes differ")
        self.null_context.copy_(other.null_context)
        self.null_pooled.copy_(other.null_pooled)


class FmriConditioner(_NullMixin, ModelMixin, ConfigMixin):
    """SC-MBM encoder tokens -> UNet condition (double conditioning).

    Parameters
    ----------
    input_tokens : int
        Tokens the encoder gives per sample (patches, plus a class token if it has one).
    input_dim : int
        Encoder width (``embed_dim``).
    context_tokens : int
        Cross-attention tokens the UNet takes (77 for Stable Diffusion).
    cross_attention_dim : int
        Cross-attention width of the UNet (768 for SD 1.x, 1024 for 2.x).
    pooled_dim : int
        Width of the UNet's timestep embedding.
    dropout : float
        Dropout on the mapped tokens during training.
    n_voxels : int
        Width of the fMRI vectors for the linear voxel path; 0 (MinD-Vis's
        mapper) leaves it out.
    embedding : bool
        Output an image prior's embedding instead of the UNet condition:
        ``context_tokens`` x ``cross_attention_dim`` are then the prior's
        token count and token width, each output token is standardised by a
        LayerNorm without weights (as the prior's own tokens are), ``pooled``
        is empty (``[B, 0]``; the prior derives its own) and the null condition
        is the prior's (:class:`DCLDM` holds it).
    voxel_rank : int
        0: the voxel path is one full linear map (``n_voxels`` x outputs). r > 0: a rank-r map,
        ``voxel_down`` (``n_voxels`` -> r, no bias) then ``voxel_map`` (r -> outputs), for a
        condition too wide for a full map: Stable Diffusion's 77 x 768 context from 15,000 voxels
        would take 0.9 B parameters; rank 128 takes 9.7 M. It starts at zero (``voxel_map``
        zeroed, ``voxel_down`` random, as LoRA starts), or from the best rank-r approximation of a
        ridge fit (:meth:`set_voxel_map`).
    """

    @register_to_config
    def __init__(self, input_tokens: int, input_dim: int, context_tokens: int, cross_attention_dim: int,
                 pooled_dim: int, dropout: float = 0.0, n_voxels: int = 0, embedding: bool = False,
                 voxel_rank: int = 0):
        super().__init__()
        pooled_dim = 0 if embedding else pooled_dim
        self.norm = nn.LayerNorm(input_dim)
        self.width_map = nn.Linear(input_dim, cross_attention_dim)
        # A 1x1 convolution over the token axis: each context token is a learned mix of encoder tokens.
        self.token_map = nn.Conv1d(input_tokens, context_tokens, kernel_size=1)
        self.token_dropout = nn.Dropout(dropout)
        self.pooled_proj = None
        if pooled_dim:
            self.pooled_proj = nn.Sequential(nn.Linear(cross_attention_dim, pooled_dim), nn.SiLU(),
                                             nn.Linear(pooled_dim, pooled_dim))
        self.output_norm = nn.LayerNorm(cross_attention_dim, elementwise_affine=False) if embedding else None
        self.voxel_map = self.voxel_down = None
        if n_voxels:
            # The encoder path starts at exactly zero beside the voxel path (as ControlNet's zero convolutions
            # do), so a ridge-initialised voxel map alone sets the starting condition; gradients still reach
            # every layer once the zeroed ones move.
            for layer in (self.width_map,) + ((self.pooled_proj[-1],) if pooled_dim else ()):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.token_map.bias)
            width = voxel_rank if 0 < voxel_rank < n_voxels else n_voxels
            if width < n_voxels:
                self.voxel_down = nn.Linear(n_voxels, width, bias=False)
                nn.init.normal_(self.voxel_down.weight, std=n_voxels ** -0.5)
            self.voxel_map = nn.Linear(width, context_tokens * cross_attention_dim + pooled_dim)
            nn.init.zeros_(self.voxel_map.weight)
            nn.init.zeros_(self.voxel_map.bias)
        self.null_context = nn.Parameter(torch.zeros(context_tokens, cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))

    def forward(self, tokens, token_mask=None, fmri=None):
        """Map encoder tokens (and, with a voxel path, the fMRI itself) to a condition.

        Parameters
        ----------
        tokens : [B, input_tokens, input_dim] float
        token_mask : [B, input_tokens] bool, optional
            False at padded tokens; they are zeroed so they cannot carry information.
        fmri : [B, n_voxels] float, optional
            The voxel vectors; required when the conditioner has a voxel path.

        Returns
        -------
        Condition
            ``context`` [B, context_tokens, cross_attention_dim], ``pooled`` [B, pooled_dim].
        """
        if tokens.shape[1] != self.config.input_tokens:
            raise ValueError(f"expected {self.config.input_tokens} encoder tokens, got {tokens.shape[1]}")
        hidden = self.width_map(self.norm(tokens))
        if token_mask is not None:
            hidden = hidden * token_mask[..., None].to(hidden.dtype)
        context = self.token_dropout(self.token_map(hidden))
        pooled = self.pooled_proj(context.mean(dim=1)) if self.pooled_proj is not None else context[:, 0, :0]
        if self.voxel_map is not None:
            if fmri is None or fmri.shape[-1] != self.config.n_voxels:
                got = None if fmri is None else fmri.shape[-1]
                raise ValueError(f"this conditioner's voxel path takes {self.config.n_voxels} voxels, got {got}")
            voxels = fmri.to(self.voxel_map.weight.dtype)
            direct = self.voxel_map(self.voxel_down(voxels) if self.voxel_down is not None else voxels)
            n_context = context.shape[1] * context.shape[2]
            context = context + direct[:, :n_context].reshape(context.shape)
            pooled = pooled + direct[:, n_context:]
        if self.output_norm is not None:
            context = self.output_norm(context)
        return Condition(context, pooled)

    @torch.no_grad()
    def set_voxel_map(self, weight, bias):
        """Set the voxel path: ``condition = weight @ fmri + bias`` (flattened context, then pooled).

        A rank-r path takes the best rank-r approximation of ``weight`` (its truncated SVD,
        ``U_r S_r V_r^T``, split as ``voxel_down = S_r^1/2 V_r^T`` and ``voxel_map = U_r S_r^1/2``).

        Parameters
        ----------
        weight : [context_tokens * cross_attention_dim + pooled_dim, n_voxels] tensor
        bias : [context_tokens * cross_attention_dim + pooled_dim] tensor
        """
        if self.voxel_map is None:
            raise ValueError("this conditioner has no voxel path (n_voxels = 0)")
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if self.voxel_down is not None:
            rank = self.voxel_down.weight.shape[0]
            left, singular, right = torch.linalg.svd(weight.double(), full_matrices=False)
            root = singular[:rank].sqrt()
            self.voxel_down.weight.copy_((root[:, None] * right[:rank]).to(self.voxel_down.weight.dtype))
            weight = left[:, :rank] * root[None]
        self.voxel_map.weight.copy_(weight.to(self.voxel_map.weight.dtype))
        self.voxel_map.bias.copy_(torch.as_tensor(bias, dtype=self.voxel_map.bias.dtype))

    def token_weights(self):
        """``[context_tokens, input_tokens]``: how strongly each context token draws on each encoder token.

        The absolute weights of the token mapping, normalised per context token;
        with the encoder's patch-to-voxel map this traces attention on a
        context token back to voxel groups.
        """
        weights = self.token_map.weight.detach()[..., 0].abs().float()
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)

class ReadoutConditioner(_NullMixin, ModelMixin, ConfigMixin):
    """SC-MBM encoder tokens -> condition by one linear read-out of every token (the default mapper).

    Each token is standardised (a LayerNorm over the encoder width), the class
    token and the patch tokens are concatenated, and one linear map gives the
    condition: ``context_tokens`` x ``cross_attention_dim`` (and ``pooled_dim``)
    values. MinD-Vis's mapper (a 1x1 convolution over the token axis, then a
    width map) is the Kronecker-structured special case of this map. Being one
    linear layer on the encoder's features, it can start at the ridge solution
    from the starting encoder's features (:meth:`features`, :meth:`set_readout`),
    so the encoder carries the condition from the first step and every part
    goes on training, the encoder included. In ``embedding`` mode (an image
    prior) each output token is standardised as the prior's own are, the pooled
    vector is empty and the null condition is the prior's, as in
    :class:`FmriConditioner`.

    Parameters
    ----------
    input_tokens : int
        Tokens the encoder gives per sample (the class token, then the patches).
    input_dim : int
        Encoder width.
    context_tokens, cross_attention_dim, pooled_dim : int
        As in :class:`FmriConditioner`.
    dropout : float
        Dropout on the standardised features during training.
    embedding : bool
        Output an image prior's embedding (see :class:`FmriConditioner`).
    n_voxels : int
        Also read the voxels themselves (``finetune.readout_inputs: both``): the trial's fMRI, standardised by
        the training trials' mean and a per-voxel scale (:meth:`set_voxel_scaling`: 1 / SD times the voxel
        block's weight, chosen with the ridge start), appended to the token features. 0: tokens only.

    Attributes
    ----------
    voxel_map : None
        No separate voxel path (kept so that code that asks finds none): voxels enter the one read-out.
    """

    @register_to_config
    def __init__(self, input_tokens: int, input_dim: int, context_tokens: int, cross_attention_dim: int,
                 pooled_dim: int, dropout: float = 0.0, embedding: bool = False, n_voxels: int = 0):
        super().__init__()
        pooled_dim = 0 if embedding else pooled_dim
        self.norm = nn.LayerNorm(input_dim)
        self.feature_dropout = nn.Dropout(dropout)
        n_features = input_tokens * input_dim + n_voxels
        self.readout = nn.Linear(n_features, context_tokens * cross_attention_dim + pooled_dim)
        nn.init.normal_(self.readout.weight, std=n_features ** -0.5)
        self.register_buffer("voxel_mean", torch.zeros(n_voxels))
        self.register_buffer("voxel_scale", torch.ones(n_voxels))
        nn.init.zeros_(self.readout.bias)
        self.output_norm = nn.LayerNorm(cross_attention_dim, elementwise_affine=False) if embedding else None
        self.voxel_map = self.voxel_down = None
        self.null_context = nn.Parameter(torch.zeros(context_tokens, cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))

    def features(self, tokens, token_mask=None, fmri=None):
        """The read-out's input: ``[B, input_tokens * input_dim (+ n_voxels)]``, each token standardised, padding
        zeroed, then the scaled voxels (``fmri`` [B, n_voxels], needed when ``n_voxels`` > 0)."""
        if tokens.shape[1] != self.config.input_tokens:
            raise ValueError(f"expected {self.config.input_tokens} encoder tokens, got {tokens.shape[1]}")
        hidden = self.norm(tokens)
        if token_mask is not None:
            hidden = hidden * token_mask[..., None].to(hidden.dtype)
        hidden = hidden.flatten(1)
        if not self.config.n_voxels:
            return hidden
        if fmri is None or fmri.shape[-1] != self.config.n_voxels:
            raise ValueError(f"this read-out also reads {self.config.n_voxels} voxels: pass the trials' fMRI "
                             f"(got {None if fmri is None else tuple(fmri.shape)})")
        voxels = (fmri.to(hidden.dtype) - self.voxel_mean.to(hidden.dtype)) * self.voxel_scale.to(hidden.dtype)
        return torch.cat([hidden, voxels], dim=1)

    @torch.no_grad()
    def set_voxel_scaling(self, mean, scale):
        """Standardise the read-out's voxel inputs: ``(fmri - mean) * scale`` (each [n_voxels])."""
        self.voxel_mean.copy_(torch.as_tensor(mean, dtype=self.voxel_mean.dtype))
        self.voxel_scale.copy_(torch.as_tensor(scale, dtype=self.voxel_scale.dtype))

    def forward(self, tokens, token_mask=None, fmri=None):
        """Encoder tokens ``[B, input_tokens, input_dim]`` (and ``fmri`` [B, n_voxels] when the read-out reads
        voxels) -> :class:`Condition`."""
        direct = self.readout(self.feature_dropout(self.features(tokens, token_mask, fmri)))
        n_context = self.config.context_tokens * self.config.cross_attention_dim
        context = direct[:, :n_context].reshape(len(direct), self.config.context_tokens, -1)
        if self.output_norm is not None:
            context = self.output_norm(context)
        return Condition(context, direct[:, n_context:])

    @torch.no_grad()
    def set_readout(self, weight, bias):
        """Set the read-out: ``condition = weight @ features + bias`` (flattened context, then pooled)."""
        self.readout.weight.copy_(torch.as_tensor(weight, dtype=self.readout.weight.dtype))
        self.readout.bias.copy_(torch.as_tensor(bias, dtype=self.readout.bias.dtype))

    def token_weights(self):
        """``[context_tokens, input_tokens]``: the read-out's weight magnitude from each encoder token into each
        context token, normalised per context token (as :meth:`FmriConditioner.token_weights`)."""
        config = self.config
        n_context = config.context_tokens * config.cross_attention_dim
        n_token_features = config.input_tokens * config.input_dim
        weight = self.readout.weight.detach()[:n_context, :n_token_features].float().abs()
        weights = weight.reshape(config.context_tokens, config.cross_attention_dim, config.input_tokens,
                                 config.input_dim).sum(dim=(1, 3))
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)

class ClassConditioner(_NullMixin, ModelMixin, ConfigMixin):
    """A learned condition per object class (and a null one): the embedded base's "text encoder".

    Parameters
    ----------
    n_classes : int
    context_tokens, cross_attention_dim, pooled_dim : int
        As in :class:`FmriConditioner`.
    """

    @register_to_config
    def __init__(self, n_classes: int, context_tokens: int, cross_attention_dim: int, pooled_dim: int):
        super().__init__()
        self.context = nn.Parameter(torch.randn(n_classes, context_tokens, cross_attention_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(n_classes, pooled_dim) * 0.02)
        self.null_context = nn.Parameter(torch.zeros(context_tokens, cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))

    def forward(self, labels):
        """labels: int64 [B], class index or -1 for null -> Condition."""
        labels = torch.as_tensor(labels, device=self.context.device)
        if self.config.n_classes == 0:  # a stimulus set without classes (NSD): an unconditional generator
            if bool((labels >= 0).any()):
                raise ValueError("this class conditioner has no classes; only -1 (null) is valid")
            return self.null(len(labels))
        unknown = labels < 0
        safe = labels.clamp_min(0)
        context = torch.where(unknown[:, None, None], self.null_context[None], self.context[safe])
        pooled = torch.where(unknown[:, None], self.null_pooled[None], self.pooled[safe])
        return Condition(context, pooled)


class ImageConditioner(_NullMixin, ModelMixin, ConfigMixin):
    """A label-free image encoder: image -> a grid of image-embedding tokens -> UNet condition.

    The embedded prior's counterpart of the CLIP image embedding that Stable
    Diffusion image variations, Brain-Diffuser and MindEye condition on, and
    the space the fMRI is mapped into. It is trained with the prior by the
    diffusion loss alone, as the semantic encoder of Diffusion Autoencoders
    (Preechakul et al., CVPR 2022): no labels, and nothing shared with the
    evaluation classifier; after pretraining it is frozen.

    Two parts:

    * :meth:`embed`: a convolutional encoder (a stride-2 stage per width, then
      an adaptive pool to a ``token_grid`` x ``token_grid`` grid and a 1x1
      projection to ``token_dim``), each token standardised by a LayerNorm
      without weights: ``[B, token_grid**2, token_dim]``, a narrow, unit-scale
      bottleneck that a linear map from fMRI can reach;
    * :meth:`condition`: embedding -> :class:`Condition` (a per-token width
      projection plus a position embedding for the context, an MLP of the
      flattened embedding for the pooled vector).

    Parameters
    ----------
    image_size, in_channels : int
        Input images ``[B, in_channels, image_size, image_size]`` in [-1, 1].
    widths : tuple of int
        Channels of the encoder's stages.
    token_grid : int
        Side of the token grid (context tokens = ``token_grid ** 2``).
    token_dim : int
        Width of each embedding token.
    cross_attention_dim, pooled_dim : int
        As in :class:`FmriConditioner`.
    embedding_noise : float
        Standard deviation of Gaussian noise added to the (unit-scale)
        embedding during training, so that the prior learns to work from an
        imprecise embedding, as a decoded one will be.
    """

    @register_to_config
    def __init__(self, image_size: int = 32, in_channels: int = 1, widths: tuple = (32, 64, 128),
                 token_grid: int = 4, token_dim: int = 8, cross_attention_dim: int = 64, pooled_dim: int = 128,
                 embedding_noise: float = 0.0):
        super().__init__()
        layers, channels = [nn.Conv2d(in_channels, widths[0], 3, padding=1)], widths[0]
        for width in widths:
            groups = next(g for g in (8, 4, 2, 1) if width % g == 0)
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(token_grid), nn.Conv2d(channels, token_dim, 1)]
        self.encoder = nn.Sequential(*layers)
        self.token_norm = nn.LayerNorm(token_dim, elementwise_affine=False)
        n_tokens = token_grid * token_grid
        self.context_proj = nn.Linear(token_dim, cross_attention_dim)
        self.position = nn.Parameter(torch.randn(n_tokens, cross_attention_dim) * 0.02)
        self.pooled_proj = nn.Sequential(nn.Linear(n_tokens * token_dim, pooled_dim), nn.SiLU(),
                                         nn.Linear(pooled_dim, pooled_dim))
        self.null_context = nn.Parameter(torch.zeros(n_tokens, cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))

    @property
    def n_tokens(self):
        return self.config.token_grid ** 2

    @property
    def embedding_shape(self):
        """``(tokens, token_dim)`` of one image's embedding."""
        return (self.n_tokens, int(self.config.token_dim))

    def embed(self, images):
        """Images ``[B, C, S, S]`` in [-1, 1] -> embedding ``[B, tokens, token_dim]`` (each token unit-scale)."""
        grid = self.encoder(images.to(self.position.dtype))
        return self.token_norm(grid.flatten(2).transpose(1, 2))

    def condition(self, embedding):
        """Embedding ``[B, tokens, token_dim]`` -> :class:`Condition`."""
        context = self.context_proj(embedding) + self.position[None]
        pooled = self.pooled_proj(embedding.flatten(1))
        return Condition(context, pooled)

    def forward(self, images, drop=None):
        """Images -> Condition; rows where ``drop`` (bool [B]) is True get the null condition.

        In training mode the embedding gets ``embedding_noise``.
        """
        embedding = self.embed(images)
        if self.training and self.config.embedding_noise:
            embedding = embedding + self.config.embedding_noise * torch.randn_like(embedding)
        condition = self.condition(embedding)
        if drop is None:
            return condition
        null = self.null(len(images))
        return Condition(torch.where(drop[:, None, None], null.context, condition.context),
                         torch.where(drop[:, None], null.pooled, condition.pooled))


class MindVisConditioner(_NullMixin, ModelMixin, ConfigMixin):
    """MinD-Vis's own mapping from SC-MBM tokens to the LDM condition, layer for layer (imported decoders).

    MinD-Vis's ``cond_stage_model`` (``global_pool: false``): the encoder's patch
    tokens (no class token) go through a token mapper (two 1x1 convolutions over
    the token axis, ``L -> L // 2 -> context_tokens``) and a width mapper
    (``embed_dim -> cross_attention_dim``) into the cross-attention context. Its
    UNet's ``time_embed_condtion`` (two 1x1 convolutions ``context_tokens ->
    context_tokens // 2 -> 1`` and a linear map to the timestep width) turns
    that context into the vector added to the timestep embedding; here it is the
    pooled condition, so the UNet stays diffusers' own.

    Parameters
    ----------
    input_tokens : int
        The encoder's patch tokens ``L`` (MinD-Vis's ``num_patches``).
    input_dim : int
        Encoder width (1024 in MinD-Vis).
    context_tokens : int
        77 in MinD-Vis.
    cross_attention_dim : int
        The UNet's context width (512 for ``cin256-v2``).
    pooled_dim : int
        The UNet's timestep-embedding width (768 for ``cin256-v2``); 0 without
        MinD-Vis's time conditioning (``use_time_cond: false``).
    n_voxels : int
        The encoder's capacity ``L * patch_size``: MinD-Vis pads each vector to it
        by wrapping (``numpy.pad(..., 'wrap')``), which :meth:`pad_fmri` repeats.

    Attributes
    ----------
    voxel_map : None
        No voxel path (kept so that code that asks finds none).
    """

    #: The encoder runs without its class token (``DCLDM`` reads this).
    class_token = False

    @register_to_config
    def __init__(self, input_tokens: int, input_dim: int = 1024, context_tokens: int = 77,
                 cross_attention_dim: int = 512, pooled_dim: int = 768, n_voxels: int = 0, embedding: bool = False):
        super().__init__()
        if embedding:
            raise ValueError("MinD-Vis's mapper outputs the UNet condition, not an image embedding")
        self.channel_mapper = nn.Sequential(nn.Conv1d(input_tokens, input_tokens // 2, 1),
                                            nn.Conv1d(input_tokens // 2, context_tokens, 1))
        self.dim_mapper = nn.Linear(input_dim, cross_attention_dim)
        self.time_condition = None
        if pooled_dim:
            self.time_condition = nn.Sequential(nn.Conv1d(context_tokens, context_tokens // 2, 1),
                                                nn.Conv1d(context_tokens // 2, 1, 1),
                                                nn.Linear(cross_attention_dim, pooled_dim))
        self.voxel_map = self.voxel_down = None
        self.null_context = nn.Parameter(torch.zeros(context_tokens, cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))

    def pad_fmri(self, fmri):
        """fmri [B, V] -> [B, n_voxels], wrapped as MinD-Vis's ``pad_to_length`` does (V <= n_voxels)."""
        target = int(self.config.n_voxels)
        if not target or fmri.shape[-1] == target:
            return fmri
        if fmri.shape[-1] > target:
            raise ValueError(f"{fmri.shape[-1]} voxels exceed the imported encoder's {target}")
        repeats = -(-target // fmri.shape[-1])
        return fmri.repeat(1, repeats)[:, :target]

    def forward(self, tokens, token_mask=None, fmri=None):
        """Patch tokens ``[B, L, input_dim]`` -> :class:`Condition` (``token_mask`` and ``fmri`` are unused)."""
        if tokens.shape[1] != self.config.input_tokens:
            raise ValueError(f"expected {self.config.input_tokens} encoder tokens, got {tokens.shape[1]}")
        context = self.dim_mapper(self.channel_mapper(tokens))
        if self.time_condition is None:
            return Condition(context, context[:, 0, :0])
        return Condition(context, self.time_condition(context)[:, 0])

    def token_weights(self):
        """``[context_tokens, input_tokens]``: the token mapper's two convolutions multiplied, absolute,
        normalised per context token (as :meth:`FmriConditioner.token_weights`)."""
        first, second = (layer.weight.detach()[..., 0].float() for layer in self.channel_mapper)
        weights = (second @ first).abs()
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
