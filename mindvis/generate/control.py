"""Prompt-to-Prompt attention control in the UNet's cross-attention: replace, refine and reweight.

Hertz et al. (2022): the cross-attention maps ``M = softmax(Q K^T / sqrt(d))``
between the image's positions (``Q``) and the condition tokens (``K``) carry
the layout of an image, so a second ("edited") run that is given the first
("source") run's maps for its first ``tau`` denoising steps keeps the source's
composition while its values ``V`` come from its own condition:

* **replace**: the edited run uses the source's maps at steps ``< tau``;
* **refine**: at steps ``< tau`` it uses the source's maps on every token but
  ``own`` (the tokens the edit changed), where it keeps its own (the paper's
  word-alignment case, here with the identity alignment: a brain condition
  always has the same tokens);
* **reweight**: it scales the maps of chosen tokens by ``weights`` (on the
  maps it uses: injected or its own). Unlike the paper, where reweighting
  rides on the injection window, it acts at every step, so a reweight-only
  edit is defined; a weight of 1 leaves the run unchanged.

Source and edited rows run in one batch with the same per-sample noise
(:func:`sample_edit`); only the conditioned branch is controlled, as in the
paper, never classifier-free guidance's null branch. The controller installs a
:class:`ControlledAttention` processor (a diffusers attention processor, the
explicit softmax(QK^T)V of ``AttnProcessor``) on every ``attn2`` layer of the
UNet; the same code runs for the embedded prior's UNet and for Stable
Diffusion's. It can also record the maps each run used (mean over heads).

Imports :mod:`mindvis.generate.attention`, :mod:`mindvis.models` and :mod:`mindvis.utils` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mindvis.generate.attention import AttentionHook
from mindvis.models.conditioning import Condition

MODES = ("replace", "refine", None)


@dataclass
class AttentionEdit:
    """What the edited run does with its cross-attention.

    Parameters
    ----------
    mode : {'replace', 'refine', None}
        Inject the source's maps (all tokens, or all but ``own``) at steps ``< tau``; None injects nothing.
    tau : int
        Steps injected, from the first (noisiest); 0 injects none, the number of steps (or more) all.
    own : bool [T], optional
        refine: the tokens whose own maps the edited run keeps (required by refine;
        :func:`mindvis.generate.edit.edit_trials` defaults it to the tokens the edit changed).
    weights : float [T], optional
        reweight: each token's maps are multiplied by its weight (1 = unchanged), at every step.
    """

    mode: str | None = "replace"
    tau: int = 0
    own: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown attention edit mode {self.mode!r}; use one of {MODES}")
        if int(self.tau) < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")


class ControlledAttention:
    """A diffusers attention processor that hands the attention probabilities to a controller.

    The computation is diffusers' ``AttnProcessor`` (explicit probabilities, then ``probs @ V``), so the maps
    can be read and changed; self-attention layers are never given one.
    """

    def __init__(self, controller, name):
        self.controller = controller
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B * heads, Q, T]
        probs = self.controller.control(self.name, probs.view(batch_size, attn.heads, *probs.shape[1:]))
        hidden_states = torch.bmm(probs.reshape(-1, *probs.shape[2:]).to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionController(AttentionHook):
    """Controls (and optionally records) the cross-attention of source and edited rows during sampling.

    Use as a context manager around :func:`~mindvis.generate.sampling.sample_latents`, passed as its
    ``recorder``: the sampler calls :meth:`begin_step` with the conditioned rows before each UNet call. Those
    rows must be ``n`` source rows followed by ``n`` edited rows (edited row ``i`` edits source row ``i``).

    Attributes
    ----------
    maps : dict
        With ``record``: ``maps[step][layer]`` -> float32 ``[2, n, Q, T]`` (source, edited; mean over heads),
        the maps each run used.
    """

    def __init__(self, unet, edit, n_rows, record=False):
        super().__init__(unet)
        self.edit = edit
        self.n_rows = int(n_rows)
        self.record = record
        self.maps = {}

    def make_processor(self, name, inner):
        return ControlledAttention(self, name)

    def control(self, layer, probs):
        """``probs`` [B, heads, Q, T] of one layer -> the probabilities the layer uses."""
        if self.step is None:
            return probs
        conditioned = probs[self.rows]
        if conditioned.shape[0] != 2 * self.n_rows:
            raise ValueError(f"expected {self.n_rows} source and {self.n_rows} edited rows, "
                             f"got {conditioned.shape[0]} conditioned rows")
        source, edited = conditioned[:self.n_rows], conditioned[self.n_rows:]
        edit = self.edit
        if edit.mode is not None and self.step < int(edit.tau):
            if edit.mode == "replace":
                edited = source
            elif edit.own is None:
                raise ValueError("refine needs the tokens whose own maps the edited run keeps (AttentionEdit.own)")
            else:
                own = torch.as_tensor(edit.own, dtype=torch.bool, device=probs.device)
                edited = torch.where(own, edited, source)
        if edit.weights is not None:
            edited = edited * torch.as_tensor(edit.weights, dtype=edited.dtype, device=probs.device)
        if self.record:
            self.maps.setdefault(self.step, {})[layer] = torch.stack([source, edited]).mean(dim=2).float().cpu()
        out = probs.clone()
        out[self.rows] = torch.cat([source, edited])
        return out


@torch.no_grad()
def sample_edit(generator, source, edited, null_condition, seeds, settings, edit, record=False):
    """Sample a source condition and its edit side by side, the edit under attention control.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
    source, edited : mindvis.models.conditioning.Condition
        ``n`` rows each; edited row ``i`` is an edit of source row ``i``.
    null_condition : callable
        ``batch_size -> Condition`` (a decoder's ``null``).
    seeds : int [n]
        One sample per row; the edited row starts from its source row's noise.
    settings : dict
        The ``generate`` config section (sampler, steps, guidance_scale, eta; ``mixed_precision`` as in
        :func:`mindvis.generate.decode.sample_conditions`).
    edit : AttentionEdit
    record : bool
        Keep the maps each run used (``controller.maps``).

    Returns
    -------
    images : torch.Tensor
        ``[2, n, C, H, W]`` in [-1, 1]: the source's, then the edit's.
    controller : AttentionController
    """
    from mindvis.generate.sampling import make_scheduler, sample_latents, sampler_steps, seeded_generators
    from mindvis.utils.device import autocast_dtype, resolve_precision

    n = len(source)
    if len(edited) != n or len(seeds) != n:
        raise ValueError(f"need as many edited rows and seeds as source rows ({n}), got {len(edited)} and "
                         f"{len(seeds)}")
    seeds = [int(seed) for seed in seeds]
    both = Condition.cat([source, edited])
    scheduler = make_scheduler(settings["sampler"], generator.scheduler_config, eta=settings["eta"])
    steps = sampler_steps(settings["sampler"], settings["steps"], generator.scheduler_config)
    precision = autocast_dtype(resolve_precision(settings.get("mixed_precision", "no"), both.context.device))
    with AttentionController(generator.unet, edit, n, record=record) as controller:
        latents = sample_latents(generator.unet, scheduler, both, null_condition=null_condition(2 * n),
                                 guidance_scale=settings["guidance_scale"], num_steps=steps,
                                 generators=seeded_generators(seeds + seeds), latent_shape=generator.latent_shape(2 * n),
                                 eta=settings["eta"], recorder=controller, autocast_dtype=precision)
    vae_dtype = next(generator.vae.parameters()).dtype
    images = generator.decode(latents.to(vae_dtype)).float().clamp(-1, 1)
    return images.reshape(2, n, *images.shape[1:]), controller
