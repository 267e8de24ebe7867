"""The one sampling entry point: k images per condition, from a decoder's fMRI or a base's classes.

:func:`decode` draws what a DC-LDM decodes from fMRI; fine-tuning validation,
the ``generate`` stage and the reports all call it. :func:`sample_classes`
draws a class-conditioned base's images of given classes,
:func:`sample_embeddings` an image-conditioned prior's images given any
embeddings (a ridge's predictions, say), and :func:`sample_like` given each
image's own embedding (the reconstruction ceiling). All go through
:func:`sample_conditions`, so every image of the project comes from one loop
with one seeding rule: sample ``j`` of row ``i`` starts from the noise of
``seeds[i, j]`` alone, whatever else shares its batch.

Imports :mod:`mindvis.models` and :mod:`mindvis.data` only.
"""

from __future__ import annotations

import numpy as np
import torch

from mindvis.data.images import tensor_to_images
from mindvis.generate.attention import CrossAttentionRecorder
from mindvis.generate.sampling import make_scheduler, sample_images, sample_latents, sampler_steps, seeded_generators
from mindvis.utils.device import autocast_dtype, resolve_precision


@torch.no_grad()
def sample_conditions(generator, condition, null_condition, seeds, settings, batch_size=None, num_steps=None,
                      init_latents=None, strength=1.0):
    """``k`` images per row of ``condition`` with classifier-free guidance.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
    condition : mindvis.models.conditioning.Condition
        N rows.
    null_condition : callable
        ``batch_size -> Condition``: the learned null condition of that many rows
        (a conditioner's ``null``).
    seeds : int [N, k]
    settings : dict
        The ``generate`` config section (sampler, steps, guidance_scale, eta, batch_size and
        ``mixed_precision``: the UNet's autocast on the condition's device, ``auto`` = bf16 / fp16 on a
        GPU, float32 on the CPU).
    batch_size : int, optional
        Images per sampler call (the null and conditioned branches together make twice that);
        default ``settings['batch_size']``.
    num_steps : int, optional
        Overrides ``settings['steps']``.
    init_latents : torch.Tensor, optional
        ``[N, C, h, w]``: start each row's samples from these latents noised to ``strength``
        (img2img; :func:`mindvis.generate.sampling.sample_latents`).
    strength : float

    Returns
    -------
    numpy.ndarray
        uint8 [N, k, H, W, C].
    """
    seeds = np.asarray(seeds, np.int64)
    n_rows, n_samples = seeds.shape
    if n_rows == 0 or n_samples == 0:
        return np.zeros((n_rows, n_samples, generator.image_size, generator.image_size, generator.image_channels),
                        np.uint8)
    batch_size = max(1, int(batch_size or settings["batch_size"]))
    flat_rows = np.repeat(np.arange(n_rows), n_samples)
    flat_seeds = seeds.reshape(-1)
    device = condition.context.device
    precision = autocast_dtype(resolve_precision(settings.get("mixed_precision", "no"), device))
    out = []
    for start in range(0, len(flat_rows), batch_size):
        rows = torch.as_tensor(flat_rows[start:start + batch_size], device=device)
        images = sample_images(generator, condition.select(rows), null_condition=null_condition(len(rows)),
                               sampler=settings["sampler"], num_steps=num_steps or settings["steps"],
                               guidance_scale=settings["guidance_scale"],
                               seeds=flat_seeds[start:start + batch_size].tolist(), eta=settings["eta"],
                               init_latents=None if init_latents is None else init_latents[rows],
                               strength=strength, autocast_dtype=precision)
        out.append(tensor_to_images(images))
    images = np.concatenate(out)
    return images.reshape(n_rows, n_samples, *images.shape[1:])


@torch.no_grad()
def decode(decoder, generator, fmri, seeds, settings, batch_size=None, num_steps=None, lowlevel=None,
           embedding_prior=None):
    """Decode ``k`` images per fMRI row.

    Parameters
    ----------
    decoder : mindvis.models.dcldm.DCLDM
    generator : mindvis.models.ldm.Generator
        Whose UNet the decoder holds.
    fmri : float32 [N, V]
    seeds : int [N, k]
    settings, batch_size, num_steps
        As in :func:`sample_conditions`.
    lowlevel : mindvis.models.dcldm.LowLevelStart, optional
        Start from its linear prediction of each row's VAE latent, noised to its strength (img2img).
    embedding_prior : mindvis.models.embedding_prior.EmbeddingPrior, optional
        Move each decoded embedding onto the bank of real image embeddings before the prior conditions on it.

    Returns
    -------
    numpy.ndarray
        uint8 [N, k, H, W, C].
    """
    device = next(decoder.parameters()).device
    fmri = torch.as_tensor(fmri, dtype=torch.float32, device=device)
    condition = decoder.condition(fmri) if embedding_prior is None else \
        decoder.prior.condition(embedding_prior(decoder.embedding(fmri)))
    init, strength = None, 1.0
    if lowlevel is not None:
        init, strength = lowlevel.latents(fmri, generator.latent_shape(len(fmri))), lowlevel.strength
    return sample_conditions(generator, condition, decoder.null, seeds, settings, batch_size, num_steps,
                             init_latents=init, strength=strength)


@torch.no_grad()
def decoded_embeddings(decoder, fmri, embedding_prior=None):
    """The prior embedding a decoder decodes from each fMRI row, or None where it has none.

    Parameters
    ----------
    decoder : mindvis.models.dcldm.DCLDM
    fmri : float32 [N, V]
    embedding_prior : mindvis.models.embedding_prior.EmbeddingPrior, optional
        Applied to the decoded embeddings (what the prior then conditions on).

    Returns
    -------
    numpy.ndarray or None
        float32 [N, tokens, token_dim] (:meth:`mindvis.models.dcldm.DCLDM.embedding`) when the decoder's
        condition lives in the image prior's embedding space, else None (its output is the UNet condition
        itself, e.g. MinD-Vis's own mapper).
    """
    if getattr(decoder, "prior", None) is None:
        return None
    device = next(decoder.parameters()).device
    embedding = decoder.embedding(torch.as_tensor(fmri, dtype=torch.float32, device=device))
    if embedding_prior is not None:
        embedding = embedding_prior(embedding)
    return embedding.float().cpu().numpy()


@torch.no_grad()
def sample_classes(generator, labels, seeds, settings, batch_size=None):
    """``k`` images per label from a base generator's class conditioner (-1: the null condition).

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        With a ``class_conditioner``.
    labels : int [N]
    seeds : int [N, k]
    settings, batch_size
        As in :func:`sample_conditions`.

    Returns
    -------
    numpy.ndarray
        uint8 [N, k, H, W, C].
    """
    conditioner = generator.class_conditioner
    condition = conditioner(torch.as_tensor(np.asarray(labels, np.int64)))
    return sample_conditions(generator, condition, conditioner.null, seeds, settings, batch_size)


@torch.no_grad()
def sample_like(generator, images, seeds, settings, batch_size=None):
    """``k`` images per input image from an image-conditioned prior, each given that image's own embedding.

    The prior's reconstruction ceiling: what a decoder that recovered the
    image embedding exactly would produce.

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        With an ``image_conditioner``.
    images : uint8 [N, H, W, C]
    seeds : int [N, k]
    settings, batch_size
        As in :func:`sample_conditions`.
    """
    from mindvis.data.images import images_to_tensor

    embeddings = generator.embed_all(images_to_tensor(images, generator.image_size, generator.image_channels))
    return sample_embeddings(generator, embeddings, seeds, settings, batch_size)


@torch.no_grad()
def sample_embeddings(generator, embeddings, seeds, settings, batch_size=None):
    """``k`` images per embedding from an image-conditioned prior (its frozen ``condition`` of each row).

    Parameters
    ----------
    generator : mindvis.models.ldm.Generator
        With an ``image_conditioner``.
    embeddings : float [N, tokens, token_dim]
        Array or tensor, in the prior's embedding space (``image_conditioner.embedding_shape``).
    seeds : int [N, k]
    settings, batch_size
        As in :func:`sample_conditions`.

    Returns
    -------
    numpy.ndarray
        uint8 [N, k, H, W, C].
    """
    conditioner = generator.image_conditioner
    parameter = next(conditioner.parameters())
    embeddings = torch.as_tensor(embeddings).to(parameter.device, parameter.dtype)
    return sample_conditions(generator, conditioner.condition(embeddings), conditioner.null, seeds, settings,
                             batch_size)


def diagnostic_settings(settings):
    """``generate`` settings for the diagnostic images (brain-token edits, attention capture): ``steps`` replaced
    by ``diagnostic_steps`` where set."""
    return {**settings, "steps": int(settings.get("diagnostic_steps") or settings["steps"])}


@torch.no_grad()
def capture_attention(decoder, generator, fmri, seeds, settings):
    """Cross-attention maps of one sample per fMRI row, per denoising step.

    Parameters
    ----------
    seeds : sequence of int, one per row

    Returns
    -------
    maps : float32 [S, A, h, w, T]
        At latent resolution (at most 32 x 32).
    timesteps : int64 [S]
    """
    device = next(decoder.parameters()).device
    condition = decoder.condition(torch.as_tensor(fmri, dtype=torch.float32, device=device))
    scheduler = make_scheduler(settings["sampler"], generator.scheduler_config, eta=settings["eta"])
    steps = sampler_steps(settings["sampler"], settings["steps"], generator.scheduler_config)
    with CrossAttentionRecorder(generator.unet) as recorder:
        sample_latents(generator.unet, scheduler, condition, null_condition=decoder.null(len(seeds)),
                       guidance_scale=settings["guidance_scale"], num_steps=steps,
                       generators=seeded_generators(seeds), latent_shape=generator.latent_shape(len(seeds)),
                       eta=settings["eta"], recorder=recorder,
                       autocast_dtype=autocast_dtype(resolve_precision(settings.get("mixed_precision", "no"),
                                                                       condition.context.device)))
    # At most 32 x 32 per map: SD's 64 x 64 latents x 77 tokens x 50 steps would otherwise take ~100 MB per stimulus.
    size = min(generator.latent_size, 32)
    return recorder.aggregate(size).numpy(), scheduler.timesteps.cpu().numpy().astype(np.int64)
