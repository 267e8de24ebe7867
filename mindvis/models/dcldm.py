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
    (written by the fine-tuning stage). ``inputs`` records the responses file
    it was fitted on (:func:`responses_record`: its SHA-256 and its voxels'
    space spec), which :func:`check_decoder_responses` compares with the
    responses a later stage decodes; with the subject and the stimulus file's
    SHA-256 (``stimuli_sha256``), which :func:`check_decoder_inputs` compares
    with the subject, responses and stimuli a later stage gives. ``prior``
    (:func:`prior_record`) records the base generator: its path as given,
    relative to the decoder folder and, for the bundled prior, by name (a
    moved checkout still finds it), and the identity of each of its files,
    which :func:`load_dcldm` checks before it samples with it.
``lowlevel.safetensors``, ``lowlevel.json`` (optional)
    The low-level start (:class:`LowLevelStart`): a linear map fMRI -> the
    VAE latent of the image seen and the img2img strength chosen on the
    validation split.
``embedding_prior.safetensors``, ``embedding_prior.json`` (optional)
    The prior in embedding space (:mod:`mindvis.models.embedding_prior`): a
    bank of real image embeddings and the projection's settings chosen on the
    validation split.
``start/`` (optional)
    The same decoder at its start, before any fine-tuning step (a decoder
    folder of its own), so that what fine-tuning adds can be measured.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mindvis.data.voxel_space import same_space, space_spec
from mindvis.errors import MindvisError
from mindvis.models.bundled import ASSETS
from mindvis.models.conditioning import FmriConditioner, MindVisConditioner, ReadoutConditioner
from mindvis.models.embedding_prior import EMBEDDING_PRIOR_FILE, EMBEDDING_PRIOR_META
from mindvis.models.ldm import load_generator
from mindvis.models.mbm import MBMAutoencoder, load_pretrained_mbm, mbm_from_config
from mindvis.models.weights import save_weights
from mindvis.utils.io import atomic_path, check_digests, file_digests, file_identity, sha256_file, write_json_atomic

MODEL_FILE = "dcldm.safetensors"
META_FILE = "dcldm.json"
LOWLEVEL_FILE = "lowlevel.safetensors"
LOWLEVEL_META = "lowlevel.json"
START_DIR = "start"
#: The files ``dcldm.json`` records the SHA-256 of (``sha256``), checked by :func:`load_dcldm`.
#: The mapper classes a decoder folder's ``conditioner/config.json`` may name.
CONDITIONERS = {kind.__name__: kind for kind in (FmriConditioner, MindVisConditioner, ReadoutConditioner)}
DIGESTED_FILES = (MODEL_FILE, "encoder/config.json", "conditioner/config.json", LOWLEVEL_FILE, LOWLEVEL_META,
                  EMBEDDING_PRIOR_FILE, EMBEDDING_PRIOR_META)

log = logging.getLogger(__name__)


class DCLDM(torch.nn.Module):
    """The fMRI decoder: SC-MBM encoder -> FmriConditioner -> the generator's UNet.

    The VAE is not part of it (always frozen; training encodes images outside).

    Parameters
    ----------
    encoder : mindvis.models.mbm.MBMAutoencoder
        Only its encoder (``encode``) is used.
    conditioner : mindvis.models.conditioning.FmriConditioner
    unet : diffusers.UNet2DConditionModel
    prior : mindvis.models.conditioning.ImageConditioner, optional
        Required by an embedding-space conditioner (``conditioner.config.embedding``):
        the base prior's frozen image conditioner, whose :meth:`condition` maps the
        decoded embedding to the UNet condition and whose null condition is used.
        Not stored with the decoder (it is the base's).
    """

    def __init__(self, encoder, conditioner, unet, prior=None):
        super().__init__()
        if conditioner.config.embedding and prior is None:
            raise ValueError("an embedding-space conditioner needs the prior's image conditioner")
        self.encoder = encoder
        self.conditioner = conditioner
        self.unet = unet
        self.prior = prior if conditioner.config.embedding else None

    def token_mask(self, fmri):
        """``[B, 1 + n_tokens]`` bool: the class token and every token holding a real voxel."""
        _, voxel_mask = self.encoder.pad(fmri)
        real = self.encoder.token_padding_mask(voxel_mask)
        return torch.cat([torch.ones_like(real[:, :1]), real], dim=1)

    def embedding(self, fmri):
        """What the conditioner outputs for fmri [B, V]: the prior embedding ``[B, tokens, dim]`` in
        embedding space, else the UNet condition (a :class:`~mindvis.models.conditioning.Condition`)."""
        if not getattr(self.conditioner, "class_token", True):  # MinD-Vis's own mapper: its encoder layout
            output = self.conditioner(self.encoder.encode(self.conditioner.pad_fmri(fmri), class_token=False))
        else:
            output = self.conditioner(self.encoder.encode(fmri), self.token_mask(fmri), fmri=fmri)
        return output.context if self.prior is not None else output

    def condition(self, fmri):
        """fmri: float32 [B, V] -> :class:`~mindvis.models.conditioning.Condition`."""
        output = self.embedding(fmri)
        return self.prior.condition(output) if self.prior is not None else output

    def null(self, batch_size):
        """The null condition (classifier-free guidance's unconditional branch): the prior's in embedding space."""
        return (self.prior if self.prior is not None else self.conditioner).null(batch_size)

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
        output = self.embedding(fmri)
        condition = used = self.prior.condition(output) if self.prior is not None else output
        if drop is not None:
            used = drop_condition(condition, self.null(len(condition)), drop)
        prediction = self.unet(noisy_latents, timesteps, encoder_hidden_states=used.context,
                               class_labels=used.pooled).sample
        return (prediction, output) if return_condition else prediction


def drop_condition(condition, null, drop):
    """Condition dropout: the rows of ``condition`` where ``drop`` [B] is True replaced by the ``null`` condition."""
    return type(condition)(
        torch.where(drop[:, None, None], null.context.to(condition.context.dtype), condition.context),
        torch.where(drop[:, None], null.pooled.to(condition.pooled.dtype), condition.pooled))


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
        encoder = load_pretrained_mbm(mbm_dir)
    if n_voxels > encoder.capacity:
        # More voxels than the pretrained table covers: interpolate positions (logged by the encoder).
        encoder.resize_positions(n_voxels)
    space = condition_space(config, generator)
    prior = generator.image_conditioner if space == "embedding" else None
    tokens, width = prior.embedding_shape if prior is not None else (generator.context_tokens,
                                                                       generator.cross_attention_dim)
    settings = config["finetune"]
    mapper = settings.get("mapper", "readout")
    if mapper == "mindvis":
        return DCLDM(encoder, mindvis_mapper(encoder, generator, settings, prior), generator.unet)
    if mapper == "readout":
        return DCLDM(encoder, readout_mapper(encoder, generator, settings, prior, tokens, width, n_voxels),
                     generator.unet, prior=prior)
    n_outputs = tokens * width + (0 if prior is not None else generator.pooled_dim)
    rank = voxel_path_rank(int(n_voxels), n_outputs, settings.get("voxel_path_max_params", 8_000_000),
                           settings.get("voxel_path_rank"))
    conditioner = FmriConditioner(input_tokens=1 + encoder.n_tokens, input_dim=encoder.config.embed_dim,
                                  context_tokens=tokens, cross_attention_dim=width,
                                  pooled_dim=generator.pooled_dim, dropout=settings["mapper_dropout"],
                                  n_voxels=int(n_voxels) if settings["voxel_path"] else 0,
                                  embedding=prior is not None, voxel_rank=rank)
    # The base was trained with its own null condition: starting from it keeps the unconditional branch intact
    # (a Stable Diffusion's is its text encoder's empty prompt).
    if generator.conditioner is not None:
        conditioner.init_null_from(generator.conditioner)
    elif generator.null_condition is not None and not conditioner.config.embedding:
        conditioner.set_null(generator.null_condition)
    return DCLDM(encoder, conditioner, generator.unet, prior=prior)


def readout_mapper(encoder, generator, settings, prior, tokens, width, n_voxels=0):
    """The read-out route's mapper (``finetune.mapper: readout``): one linear map of every encoder token, and of
    the voxels with ``finetune.readout_inputs: both`` (:class:`~mindvis.models.conditioning.ReadoutConditioner`),
    within ``finetune.voxel_path_max_params``."""
    n_voxels = int(n_voxels) if settings.get("readout_inputs", "tokens") == "both" else 0
    n_inputs = (1 + encoder.n_tokens) * encoder.config.embed_dim + n_voxels
    n_outputs = tokens * width + (0 if prior is not None else generator.pooled_dim)
    if n_inputs * n_outputs > settings.get("voxel_path_max_params", 8_000_000):
        raise MindvisError(f"finetune.mapper 'readout' would map {n_inputs} encoder features onto {n_outputs} "
                           f"condition values ({n_inputs * n_outputs:,} parameters, over "
                           "finetune.voxel_path_max_params)", key="finetune.mapper",
                           fix="use mapper: mindvis (MinD-Vis's factorised token and width maps) for a condition "
                               "this wide, or raise finetune.voxel_path_max_params.")
    conditioner = ReadoutConditioner(input_tokens=1 + encoder.n_tokens, input_dim=encoder.config.embed_dim,
                                     context_tokens=tokens, cross_attention_dim=width,
                                     pooled_dim=generator.pooled_dim, dropout=settings["mapper_dropout"],
                                     embedding=prior is not None, n_voxels=n_voxels)
    if generator.conditioner is not None:
        conditioner.init_null_from(generator.conditioner)
    elif generator.null_condition is not None and prior is None:
        conditioner.set_null(generator.null_condition)
    return conditioner


def mindvis_mapper(encoder, generator, settings, prior):
    """MinD-Vis's own mapper (``finetune.mapper: mindvis``): patch tokens -> 77 context tokens, and its
    time conditioning as the pooled vector (:class:`~mindvis.models.conditioning.MindVisConditioner`)."""
    if prior is not None:
        raise MindvisError("finetune.mapper 'mindvis' maps onto the UNet condition, and condition_space is "
                           "'embedding'", key="finetune.mapper",
                           fix="set finetune.condition_space: condition, or mapper: mindvis-ext.")
    if settings["voxel_path"]:
        raise MindvisError("finetune.mapper 'mindvis' has no voxel path", key="finetune.voxel_path",
                           fix="set finetune.voxel_path: false (MinD-Vis's mapper alone).")
    conditioner = MindVisConditioner(input_tokens=encoder.n_tokens, input_dim=encoder.config.embed_dim,
                                     context_tokens=generator.context_tokens,
                                     cross_attention_dim=generator.cross_attention_dim,
                                     pooled_dim=generator.pooled_dim, n_voxels=encoder.capacity)
    if generator.null_condition is not None:
        conditioner.set_null(generator.null_condition)
    return conditioner


def voxel_path_rank(n_voxels, n_outputs, max_params, rank=None):
    """The voxel path's rank: 0 (a full ``n_voxels`` x ``n_outputs`` map) when it fits ``max_params``,
    else the largest r whose rank-r map (``r * n_voxels + r * n_outputs + n_outputs`` parameters) does;
    ``rank`` fixes it instead (``finetune.voxel_path_rank``)."""
    if rank:
        return 0 if int(rank) >= min(n_voxels, n_outputs) else int(rank)
    if n_voxels * n_outputs + n_outputs <= max_params:
        return 0
    fitted = (int(max_params) - n_outputs) // (n_voxels + n_outputs)
    if fitted < 1:
        raise MindvisError(f"finetune.voxel_path_max_params {max_params} cannot hold even a rank-1 voxel path "
                           f"({n_voxels} voxels -> {n_outputs} condition values needs {n_voxels + 2 * n_outputs})",
                           key="finetune.voxel_path_max_params", fix="raise it, or set finetune.voxel_path: false.")
    return min(fitted, n_voxels, n_outputs)


def condition_space(config, generator):
    """``embedding`` or ``condition``: what the fMRI conditioner outputs (``finetune.condition_space``).

    ``auto`` is the prior's image-embedding space when the base has an image
    conditioner (the embedded and shipped priors), else the UNet condition itself
    (a class base, Stable Diffusion: MinD-Vis's mapping onto the cross-attention).
    """
    space = config["finetune"].get("condition_space", "auto")
    if space == "auto":
        return "embedding" if generator.image_conditioner is not None else "condition"
    if space == "embedding" and generator.image_conditioner is None:
        raise MindvisError("finetune.condition_space is 'embedding' but the base generator has no image "
                           "conditioner (a class-conditioned or Stable Diffusion base)",
                           key="finetune.condition_space", fix="set it to auto or condition.")
    return space


#: The prior's parts whose files a decoder records (never its training folders, which a rerun rewrites).
PRIOR_PARTS = ("vae", "unet", "scheduler", "class_conditioner", "image_conditioner", "text_encoder", "tokenizer")
#: The command-line flag that lets a decoder meet each kind of input other than its own (recorded in outputs).
OVERRIDE_FLAGS = {"subject": "--allow-other-subject", "stimuli": "--allow-other-stimuli",
                  "prior": "--allow-other-prior"}


def prior_digests(folder):
    """``{relative path: identity}`` (:func:`mindvis.utils.io.file_identity`) of a base generator's files."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): file_identity(path) for part in PRIOR_PARTS if (folder / part).is_dir()
            for path in sorted((folder / part).rglob("*")) if path.is_file()}


def prior_record(base, decoder_dir, files_at=None):
    """What a decoder records of its base generator (``dcldm.json`` ``prior``).

    Parameters
    ----------
    base : path
        The base generator folder as the stage was given it.
    decoder_dir : path
        The decoder folder being written (the relative path starts there).
    files_at : path, optional
        Where the base's files are now, when that is not ``base`` yet (a generator written into the decoder's
        staging folder).

    Returns
    -------
    dict
        ``path`` (as given), ``relative`` (from the decoder folder), ``bundled`` (the name of a prior shipped in
        mindvis, else None) and ``sha256`` (:func:`prior_digests`).
    """
    files_at = Path(files_at if files_at is not None else base)
    absolute = files_at.resolve()
    return {"path": str(base), "relative": os.path.relpath(absolute, Path(decoder_dir).resolve()),
            "bundled": absolute.name if absolute.parent == ASSETS.resolve() else None,
            "sha256": prior_digests(files_at)}


def _record_missing(folder, key, what):
    return MindvisError(f"dcldm.json has no record of {what}, so the decoder cannot be checked against what it "
                        "is given", path=Path(folder) / META_FILE, key=key, fix=RERUN_FINETUNE)


def resolve_prior(meta, folder, base=None):
    """The base generator folder of a decoder: ``base`` when given, else the first of the bundled prior of the
    recorded name, the recorded path and the path relative to the decoder folder that exists.

    Raises
    ------
    MindvisError
        When the record is missing, or the prior is in none of those places (each is named).
    """
    folder = Path(folder)
    if base is not None:
        return Path(base)
    record = meta.get("prior")
    if not isinstance(record, dict) or "path" not in record:
        raise _record_missing(folder, "prior", "its prior (path and SHA-256)")
    places = []
    if record.get("bundled"):
        places.append(("the bundled prior", ASSETS / record["bundled"]))
    places.append(("its recorded path", Path(record["path"])))
    if record.get("relative"):
        places.append(("relative to the decoder folder", folder / record["relative"]))
    for _, place in places:
        if (place / "unet").is_dir():
            return place
    looked = "; ".join(f"{what}: {place}" for what, place in places)
    raise MindvisError(f"the prior this decoder was fine-tuned on is not found (looked at {looked})",
                       path=folder / META_FILE, key="prior.path",
                       fix="put the prior folder back at one of those places, or give its folder (--base); it is "
                           "checked against the decoder's record.")


def check_prior(meta, folder, prior_dir, allow=False):
    """Refuse a prior whose files differ from those the decoder recorded (``prior.sha256``).

    Returns
    -------
    bool
        Whether the prior is the recorded one (False only with ``allow``, which the caller records).
    """
    folder, prior_dir = Path(folder), Path(prior_dir)
    record = meta.get("prior")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), dict) or not record["sha256"]:
        raise _record_missing(folder, "prior.sha256", "its prior's files (SHA-256)")
    expected, actual = record["sha256"], prior_digests(prior_dir)
    differing = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if not differing:
        return True
    if allow:
        log.warning("%s: decoding with the prior %s, whose %d files differ from those the decoder was fine-tuned "
                    "on (%s)", folder, prior_dir, len(differing), OVERRIDE_FLAGS["prior"])
        return False
    name = differing[0]
    state = ("missing" if name not in actual else "not in the prior the decoder was fine-tuned on" if name not in
             expected else f"SHA-256 {str(actual[name])[:12]}... is not the {str(expected[name])[:12]}... recorded")
    raise MindvisError(f"this prior is not the one the decoder {folder / META_FILE} was fine-tuned on "
                       f"({record['path']}): {len(differing)} files differ, first {name} ({state})",
                       path=prior_dir / name, key=f"prior.sha256.{name}",
                       fix=f"use the prior the decoder was fine-tuned on, rerun finetune on this one, or pass "
                           f"{OVERRIDE_FLAGS['prior']} to decode with it anyway (recorded in the outputs).")


def check_decoder_inputs(meta, folder, *, subject=None, data=None, responses=None, stimuli=None, allow=()):
    """Refuse another subject's responses or other stimuli than the decoder was trained on.

    Parameters
    ----------
    meta : dict
        The decoder's ``dcldm.json``.
    folder : path
        The decoder folder (named in errors).
    subject : str, optional
        The subject the stage was asked to decode.
    data : mindvis.data.responses.Responses, optional
        The responses given (their ``subject`` attribute); ``responses`` is their path.
    stimuli : path, optional
        The stimulus file given.
    allow : collection of str
        Kinds of mismatch the user means (``subject``, ``stimuli``: :data:`OVERRIDE_FLAGS`); each is logged and
        returned, for the caller to record.

    Returns
    -------
    list of str
        The mismatches let through by ``allow``.

    Raises
    ------
    MindvisError
        On a mismatch not in ``allow``, or when the decoder lacks the record (never a skipped check).
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    inputs = meta.get("inputs") or {}
    overridden = []

    def refuse(kind, message, path, key, fix):
        if kind in allow:
            log.warning("%s (%s given)", message, OVERRIDE_FLAGS[kind])
            overridden.append(kind)
            return
        raise MindvisError(message, path=path, key=key,
                           fix=f"{fix}, or pass {OVERRIDE_FLAGS[kind]} if you mean it (recorded in the outputs).")

    trained_subject = meta.get("subject")
    if not trained_subject:
        raise _record_missing(folder, "subject", "the subject it was trained on")
    given = [(str(subject), None, "--subject")] if subject is not None else []
    if data is not None:
        given.append((data.subject, responses, "subject"))
    for value, path, key in given:
        if value != str(trained_subject):
            refuse("subject", f"{value} is another subject than the one the decoder {meta_path} was trained on "
                   f"({trained_subject})", path if path is not None else meta_path, key,
                   f"decode {value} with its own decoder (results/{value}/...), or give {trained_subject}'s responses")
            break
    if stimuli is not None:
        if "stimuli_sha256" not in inputs:
            raise _record_missing(folder, "inputs.stimuli_sha256", "the stimuli it was trained on (SHA-256)")
        expected = inputs["stimuli_sha256"]
        if expected is not None and sha256_file(stimuli) != expected:
            refuse("stimuli", f"not the stimulus file the decoder {meta_path} was trained on "
                   f"({inputs.get('stimuli')}): its SHA-256 differs", stimuli, "stimuli_sha256",
                   f"give the stimuli the decoder was trained on ({inputs.get('stimuli')}), or fine-tune a decoder "
                   "on these")
    return overridden


def decoder_binding(meta, folder):
    """What a decoder's outputs record of what it is bound to (``samples.h5`` attribute ``decoder``): the subject,
    the stimuli's and responses' SHA-256 and the prior record, in ``dcldm.json``'s layout, so that
    :func:`check_decoder_inputs` and :func:`check_prior` read it as they read the decoder's own."""
    inputs = meta.get("inputs") or {}
    return {"model_dir": str(folder), "subject": meta.get("subject"),
            "inputs": {key: inputs.get(key) for key in ("responses", "responses_sha256", "stimuli", "stimuli_sha256")
                       if key in inputs},
            "prior": meta.get("prior")}


#: The remedy for a decoder folder that is incomplete, changed or unreadable.
RERUN_FINETUNE = "rerun finetune for this subject (snakemake deletes and rewrites the folder)."


def read_decoder_meta(folder):
    """A decoder folder's ``dcldm.json`` as a dict, with its hash record (``sha256``); one-line errors otherwise.

    A record without ``sha256`` is refused, never loaded unchecked: every writer (:func:`save_dcldm`) stores it.
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise MindvisError("not a fine-tuned DC-LDM folder (dcldm.json missing)", path=folder,
                           fix="run the finetune stage for this subject first.")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise MindvisError(f"not readable JSON ({type(error).__name__}: {' '.join(str(error).split())}): the file "
                           "is truncated or damaged", path=meta_path, fix=RERUN_FINETUNE) from None
    if not isinstance(meta, dict):
        raise MindvisError(f"must be a JSON object, found {type(meta).__name__}", path=meta_path, fix=RERUN_FINETUNE)
    if not isinstance(meta.get("sha256"), dict) or not meta["sha256"]:
        raise MindvisError("the record of its files' SHA-256 is missing, so the weights cannot be checked",
                           path=meta_path, key="sha256", fix=RERUN_FINETUNE)
    return meta


def load_dcldm(folder, base=None, dtype=None, allow_other_prior=False):
    """Load a fine-tuned decoder and its generator.

    Parameters
    ----------
    folder : path
        A ``finetune`` output folder.
    base : path, optional
        The base generator folder; default: the one recorded in ``dcldm.json`` (:func:`resolve_prior`). Either
        way its files must be those the decoder recorded (:func:`check_prior`).
    allow_other_prior : bool
        Decode with a prior whose files differ (``--allow-other-prior``); ``meta['prior_used']`` says so.

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
    meta = read_decoder_meta(folder)
    check_digests(folder, meta["sha256"], META_FILE, fix=RERUN_FINETUNE)
    prior_dir = resolve_prior(meta, folder, base)
    same_prior = check_prior(meta, folder, prior_dir, allow=allow_other_prior)
    # Where the prior was found and whether it is the recorded one, for the stage's outputs (not in the file).
    meta = {**meta, "prior_used": {"path": str(prior_dir), "same_as_recorded": same_prior}}
    generator = load_generator(prior_dir, image_size=meta.get("image_size"), dtype=dtype)
    encoder = MBMAutoencoder.from_config(MBMAutoencoder.load_config(folder / "encoder"))
    conditioner_config = FmriConditioner.load_config(folder / "conditioner")
    kind = CONDITIONERS.get(conditioner_config.get("_class_name"), FmriConditioner)
    conditioner = kind.from_config(conditioner_config)
    if conditioner.config.embedding and generator.image_conditioner is None:
        raise MindvisError("this decoder outputs an image prior's embedding, and its base has no image conditioner",
                           path=folder / "conditioner", key="embedding",
                           fix="load it with the base generator it was fine-tuned on (dcldm.json 'base').")
    decoder = DCLDM(encoder, conditioner, generator.unet, prior=generator.image_conditioner)
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


def responses_record(path, data):
    """What a decoder records of the responses it is fitted on (``dcldm.json`` ``inputs``).

    Parameters
    ----------
    path : path
        The ``responses.h5``.
    data : mindvis.data.responses.Responses
        Its contents, as loaded.

    Returns
    -------
    dict
        ``responses`` (the path), ``responses_sha256`` and ``voxel_space`` (:func:`mindvis.data.voxel_space.space_spec`
        of its voxels: the grid and the voxel order, which a decoder's voxel ``i`` means).
    """
    return {"responses": str(path), "responses_sha256": sha256_file(path),
            "voxel_space": space_spec(data.voxel_ijk, data.affine, data.volume_shape, space="fitted")}


def check_decoder_responses(meta, data, path, model_dir):
    """Refuse to decode responses whose voxels are not those the decoder was fitted on.

    The voxel count (``n_voxels``), then, where the decoder recorded it, the voxels themselves (grid, indices and
    order: ``inputs.voxel_space``) must match; a decoder released without them (MinD-Vis's weights) is checked by
    what it has. The same voxels in another file (new sessions, a rerun preprocessing) decode with a warning, and
    the return value says so.

    Parameters
    ----------
    meta : dict
        The decoder's ``dcldm.json``.
    data : mindvis.data.responses.Responses
        The responses to decode, as loaded.
    path, model_dir : path
        The responses file and the decoder folder (named in the error).

    Returns
    -------
    bool or None
        Whether the file is the one it was fitted on (its SHA-256); None where the decoder does not record it.

    Raises
    ------
    MindvisError
    """
    inputs = meta.get("inputs") or {}
    fitted = inputs.get("responses", "its training responses")
    fix = (f"decode the responses this decoder was fitted on ({fitted}), or fine-tune a decoder on these "
           f"(snakemake results/{{subject}}/dcldm/dcldm.json after deleting {model_dir}).")
    n_voxels = meta.get("n_voxels")
    if n_voxels is not None and int(n_voxels) != data.n_voxels:
        raise MindvisError(f"{data.n_voxels} voxels, but the decoder {model_dir} was fitted on {int(n_voxels)}",
                           path=path, key="voxel_ijk", fix=fix)
    space = inputs.get("voxel_space")
    if space is not None:
        here = space_spec(data.voxel_ijk, data.affine, data.volume_shape, space="decoded")
        if not same_space(space, here):
            what = ("voxels (indices or order)" if here["voxel_ijk_sha256"] != space["voxel_ijk_sha256"]
                    else "grid (affine or shape)")
            raise MindvisError(f"the same number of voxels, but another {what} than the decoder {model_dir} was "
                               "fitted on: its voxel i would read another place of the brain", path=path,
                               key="voxel_ijk", fix=fix)
    expected = inputs.get("responses_sha256")
    if expected is None:
        return None
    same = sha256_file(path) == expected
    if not same:
        log.warning("%s is not the file the decoder %s was fitted on (%s); %s", path, model_dir, fitted,
                    "its voxels are the same" if space is not None else
                    "the decoder does not record its voxels, so only their count was checked")
    return same


def save_dcldm(decoder, out_dir, meta, metadata=None, prior_files_at=None):
    """Write a decoder folder (see the module docstring): configs, weights, then ``dcldm.json`` last.

    Parameters
    ----------
    decoder : DCLDM
    out_dir : path
    meta : dict
        The contents of ``dcldm.json`` (``base`` names the base generator folder).
    metadata : dict of str -> str, optional
        Stored in the safetensors header.
    prior_files_at : path, optional
        Where the base's files are now, when not yet at ``meta['base']`` (:func:`prior_record`).

    ``meta`` gains what binds the decoder to its inputs: ``prior`` (:func:`prior_record`) and
    ``inputs.stimuli_sha256`` (None where ``inputs`` names no stimulus file: an imported decoder's).
    """
    out_dir = Path(out_dir)
    inputs = dict(meta.get("inputs") or {})
    if "stimuli_sha256" not in inputs:
        inputs["stimuli_sha256"] = sha256_file(inputs["stimuli"]) if inputs.get("stimuli") else None
    meta = {**meta, "inputs": inputs, "prior": prior_record(meta["base"], out_dir, prior_files_at)}
    # dcldm.json goes first and comes back last, with the SHA-256 of every file it stands for: a write cut short
    # leaves a folder the loader refuses ("run finetune"), never old metadata over new weights.
    (out_dir / META_FILE).unlink(missing_ok=True)
    decoder.encoder.save_config(out_dir / "encoder")
    decoder.conditioner.save_config(out_dir / "conditioner")
    # The encoder and conditioner are stored whole, trained or not (the loader builds them from config);
    # of the UNet only what was trained (the rest is the base generator's).
    save_weights(decoder, out_dir / MODEL_FILE, which="trainable", always=("encoder.", "conditioner."),
                 metadata=metadata)
    write_json_atomic(out_dir / META_FILE, {**meta, "sha256": file_digests(out_dir, DIGESTED_FILES)})


@dataclass
class LowLevelStart:
    """Where img2img sampling starts: a linear prediction of the seen image's VAE latent from fMRI.

    The low-level route of Brain-Diffuser (Ozcelik & VanRullen 2023, VDVAE
    first stage) and MindEye (Scotti et al. 2023, its low-level submodule):
    the decoder's sampling starts from this latent noised to ``strength``
    instead of from pure noise, so the layout of the image comes from the
    linear map and its content from the fMRI condition.

    Attributes
    ----------
    weight : float32 [L, V]
    bias : float32 [L]
        ``latent = weight @ fmri + bias``, flattened scaled latents (the VAE's ``scaling_factor`` applied).
    strength : float
        In (0, 1]: the share of the sampling schedule that is run (1 = from pure noise).
    info : dict
        How it was fitted and chosen (ridge alpha, the validation scores of every strength).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    strength: float
    info: dict = field(default_factory=dict)

    def latents(self, fmri, shape):
        """fmri float [B, V] -> scaled latents of ``shape`` ``(B, C, h, w)``."""
        weight = self.weight.to(fmri.device)
        return (fmri.float() @ weight.T + self.bias.to(fmri.device)).reshape(shape)


def save_lowlevel(folder, start):
    """Write ``lowlevel.safetensors`` and ``lowlevel.json`` (the strength and fit record) into a decoder folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / LOWLEVEL_FILE) as tmp:
        save_file({"weight": start.weight.contiguous().float(), "bias": start.bias.contiguous().float()}, str(tmp))
    write_json_atomic(folder / LOWLEVEL_META, {"strength": float(start.strength), **start.info})


def load_lowlevel(folder):
    """The decoder folder's :class:`LowLevelStart`, or None when it has none."""
    folder = Path(folder)
    if not (folder / LOWLEVEL_FILE).exists():
        return None
    if not (folder / LOWLEVEL_META).exists():
        raise MindvisError("lowlevel.safetensors without lowlevel.json", path=folder, key=LOWLEVEL_META,
                           fix="rerun finetune for this subject; the folder is incomplete.")
    tensors = load_file(str(folder / LOWLEVEL_FILE))
    info = json.loads((folder / LOWLEVEL_META).read_text())
    strength = float(info.pop("strength"))
    return LowLevelStart(tensors["weight"], tensors["bias"], strength, info)
