"""Cross-attention capture: which condition tokens drive which image regions, per denoising step.

The Prompt-to-Prompt idea: the softmax of a cross-attention layer,
``softmax(Q K^T / sqrt(d))`` with ``Q`` from image positions and ``K`` from the
condition tokens, says how much each latent pixel reads from each token. The
:class:`CrossAttentionRecorder` installs a processor on every ``attn2`` layer
that computes these maps beside the layer's usual processor (diffusers' SDPA by
default), whose output it returns unchanged, so capturing never changes the
samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mindvis.models.ldm import cross_attention_modules


class _RecordingProcessor:
    """Wraps an attention processor; records the attention probabilities of the chosen rows."""

    def __init__(self, recorder, name, inner):
        self.recorder = recorder
        self.name = name
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.recorder.active and encoder_hidden_states is not None:
            self.recorder.record(self.name, self._probabilities(attn, hidden_states, encoder_hidden_states))
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, temb=temb, **kwargs)

    @torch.no_grad()
    def _probabilities(self, attn, hidden_states, context):
        """[B, query positions, context tokens], averaged over heads."""
        rows = self.recorder.rows
        hidden_states, context = hidden_states[rows], context[rows]
        if hidden_states.ndim == 4:  # [B, C, H, W] -> [B, HW, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query.float(), key.float(), None)  # [B*heads, Q, T]
        return probs.reshape(-1, attn.heads, *probs.shape[1:]).mean(dim=1).cpu()


class AttentionHook:
    """Puts a processor on every ``attn2`` layer of a UNet for the length of a ``with`` block.

    Passed to :func:`~mindvis.generate.sampling.sample_latents` as its ``recorder``, it is told the step
    index and the conditioned batch rows before each UNet call (:meth:`begin_step`). Subclasses say which
    processor wraps each layer's own (:meth:`make_processor`); on exit the layers get theirs back.
    """

    def __init__(self, unet):
        self.unet = unet
        self.layers = cross_attention_modules(unet)
        self.step = None
        self.rows = slice(None)
        self._saved = {}

    @property
    def active(self):
        return self.step is not None

    def begin_step(self, step, rows):
        self.step, self.rows = int(step), rows

    def make_processor(self, name, inner):
        raise NotImplementedError

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        for name in self.layers:
            module = modules[name]
            self._saved[name] = module.processor
            module.set_processor(self.make_processor(name, module.processor))
        return self

    def __exit__(self, *exc):
        modules = dict(self.unet.named_modules())
        for name, processor in self._saved.items():
            modules[name].set_processor(processor)
        self._saved.clear()
        self.step = None
        return False


class CrossAttentionRecorder(AttentionHook):
    """Records cross-attention maps of a UNet per denoising step.

    Use as a context manager around :func:`~mindvis.generate.sampling.sample_latents`
    (pass it as ``recorder``); the sampler calls :meth:`begin_step` before each UNet
    evaluation with the batch rows of the conditioned branch.

    Attributes
    ----------
    maps : dict
        ``maps[step][layer]`` -> float32 [B, h_l * w_l, T] for each ``attn2`` layer.
    """

    def __init__(self, unet):
        super().__init__(unet)
        self.maps = {}

    def make_processor(self, name, inner):
        return _RecordingProcessor(self, name, inner)

    def record(self, layer, probs):
        self.maps.setdefault(self.step, {})[layer] = probs

    def aggregate(self, size):
        """Maps averaged over layers at one resolution.

        Parameters
        ----------
        size : int
            Side of the output maps (e.g. the latent size); each layer's
            ``h_l x w_l`` map is resized to it bilinearly.

        Returns
        -------
        torch.Tensor
            float32 [steps, B, size, size, T]; over T each position sums to 1.
        """
        per_step = []
        for step in sorted(self.maps):
            resized = []
            for probs in self.maps[step].values():
                batch, positions, tokens = probs.shape
                side = int(math.isqrt(positions))
                grid = probs.transpose(1, 2).reshape(batch, tokens, side, side)
                resized.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
            mean = torch.stack(resized).mean(dim=0)  # [B, T, size, size]
            per_step.append(mean.permute(0, 2, 3, 1))
        return torch.stack(per_step)
