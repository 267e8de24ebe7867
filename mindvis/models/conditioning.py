"""Conditions for the latent diffusion UNet: fMRI tokens or object classes -> context + pooled vector.

Both conditioners return a :class:`Condition`: ``context`` ``[B, context_tokens,
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
  zero and learns what the linear map misses.
* :class:`ClassConditioner` is the embedded base generator's stand-in for a
  text encoder: one learned context and pooled vector per class, plus null.

Both subclass diffusers' ``ModelMixin, ConfigMixin``, so they save and load
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
    """

    @register_to_config
    def __init__(self, input_tokens: int, input_dim: int, context_tokens: int, cross_attention_dim: int,
                 pooled_dim: int, dropout: float = 0.0, n_voxels: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim)
        self.width_map = nn.Linear(input_dim, cross_attention_dim)
        # A 1x1 convolution over the token axis: each context token is a learned mix of encoder tokens.
        self.token_map = nn.Conv1d(input_tokens, context_tokens, kernel_size=1)
        self.token_dropout = nn.Dropout(dropout)
        self.pooled_proj = nn.Sequential(nn.Linear(cross_attention_dim, pooled_dim), nn.SiLU(),
                                         nn.Linear(pooled_dim, pooled_dim))
        self.voxel_map = None
        if n_voxels:
            # The encoder path starts at exactly zero beside the voxel path (as ControlNet's zero convolutions
            # do), so a ridge-initialised voxel map alone sets the starting condition; gradients still reach
            # every layer once the zeroed ones move.
            for layer in (self.width_map, self.pooled_proj[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.token_map.bias)
            self.voxel_map = nn.Linear(n_voxels, context_tokens * cross_attention_dim + pooled_dim)
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
        pooled = self.pooled_proj(context.mean(dim=1))
        if self.voxel_map is not None:
            if fmri is None or fmri.shape[-1] != self.config.n_voxels:
                got = None if fmri is None else fmri.shape[-1]
                raise ValueError(f"this conditioner's voxel path takes {self.config.n_voxels} voxels, got {got}")
            direct = self.voxel_map(fmri.to(self.voxel_map.weight.dtype))
            n_context = context.shape[1] * context.shape[2]
            context = context + direct[:, :n_context].reshape(context.shape)
            pooled = pooled + direct[:, n_context:]
        return Condition(context, pooled)

    @torch.no_grad()
    def set_voxel_map(self, weight, bias):
        """Set the voxel path: ``condition = weight @ fmri + bias`` (flattened context, then pooled).

        Parameters
        ----------
        weight : [context_tokens * cross_attention_dim + pooled_dim, n_voxels] tensor
        bias : [context_tokens * cross_attention_dim + pooled_dim] tensor
        """
        if self.voxel_map is None:
            raise ValueError("this conditioner has no voxel path (n_voxels = 0)")
        self.voxel_map.weight.copy_(torch.as_tensor(weight, dtype=self.voxel_map.weight.dtype))
        self.voxel_map.bias.copy_(torch.as_tensor(bias, dtype=self.voxel_map.bias.dtype))

    def token_weights(self):
        """``[context_tokens, input_tokens]``: how strongly each context token draws on each encoder token.

        The absolute weights of the token mapping, normalised per context token;
        with the encoder's patch-to-voxel map this traces attention on a
        context token back to voxel groups.
        """
        weights = self.token_map.weight.detach()[..., 0].abs().float()
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def init_null_from(self, other):
        """Start the null condition from another conditioner's (e.g. the base generator's)."""
        if other is None:
            return
        if tuple(other.null_context.shape) != tuple(self.null_context.shape) or \
                tuple(other.null_pooled.shape) != tuple(self.null_pooled.shape):
            raise ValueError("null condition shapes differ")
        self.null_context.copy_(other.null_context)
        self.null_pooled.copy_(other.null_pooled)


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
