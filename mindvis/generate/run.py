"""The ``generate`` stage: k decoded images per test stimulus from a subject's fine-tuned DC-LDM.

For every stimulus of ``generate.split`` (default ``test_avg``, the test fMRI
averaged over repeats) it samples ``generate.n_samples`` images with the
configured sampler and guidance scale. Sample ``j`` of stimulus ``s`` is drawn
from the seed ``derive_seed(seed, "generate", subject, s, j)``: a rerun, or a
run with another batch size, gives the same images (up to float rounding of
batched convolutions), and the pretrained and baseline decoders of a subject
start from the same noise.

Outputs in ``out_dir`` (``results/{subject}/samples/``): ``png/{stimulus}_{j}.png``,
``grid.png`` (each true image beside its samples), ``samples.h5``
(:mod:`mindvis.generate.writing`; with each stimulus's decoded prior embedding,
``embedding``, where the decoder's condition lives in the image prior's
embedding space: the evaluate stage's retrieval reads it) and ``summary.json``
(the classifier's top-1 when a classifier is given, timings, settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from mindvis.data.responses import check_stimuli_pair, load_responses
from mindvis.data.stimuli import load_stimulus_set
from mindvis.generate.decode import capture_attention, decode, decoded_embeddings, diagnostic_settings
from mindvis.generate.writing import (SAMPLES_FILE, read_samples_attrs, read_samples_h5, save_grid, save_png,
                                     write_samples_h5)
from mindvis.models.classifiers.domain import load_classifier
from mindvis.errors import MindvisError
from mindvis.models.dcldm import (LOWLEVEL_FILE, LOWLEVEL_META, check_decoder_inputs, check_decoder_responses,
                                  decoder_binding, load_dcldm, load_lowlevel)
from mindvis.models.embedding_prior import EMBEDDING_PRIOR_FILE, EMBEDDING_PRIOR_META, load_embedding_prior
from mindvis.utils.device import device_name, resolve_precision, select_device, synchronize
from mindvis.utils.io import (atomic_folder, check_own_folder, derive_seed, sha256_file, software_versions,
                              tensor_digest, write_json_atomic)

log = logging.getLogger(__name__)


def sample_seeds(seed, subject, stimulus_ids, n_samples):
    """int64 [N, k]: the seed of sample ``j`` of each stimulus."""
    return np.array([[derive_seed(seed, "generate", subject, sid, j) for j in range(n_samples)]
                     for sid in stimulus_ids], dtype=np.int64)


def generate_subject(config, subject, model_dir, responses, stimuli, out_dir, classifier_dir=None, base=None,
                     batch_size=None, lowlevel=False, device="auto", overrides=(), same_as=(), embedding_prior=False):
    """Decode the subject's test fMRI and write PNGs, a grid, ``samples.h5`` and ``summary.json``.

    Parameters
    ----------
    config : dict
        Resolved experiment config (``generate`` section, ``seed``).
    subject : str
    model_dir : path
        The subject's ``finetune`` output.
    responses, stimuli : path
        ``responses.h5`` (only ``generate.split`` is read) and ``stimuli.h5``.
    out_dir : path
    classifier_dir : path, optional
        Domain classifier to score the samples.
    base : path, optional
        The base generator folder, where it is not where ``finetune`` recorded it (its files are checked all
        the same).
    batch_size : int, optional
        Default ``generate.batch_size``.
    lowlevel : bool
        Start from the decoder's low-level start (img2img from its ridge-predicted VAE latent, at the
        strength chosen on the val split; ``lowlevel.json`` in ``model_dir``).
    embedding_prior : bool
        Move each decoded embedding onto the decoder's bank of real image embeddings first (its prior in
        embedding space, settings chosen on the val split; ``embedding_prior.json`` in ``model_dir``). The
        attention maps, which show the decoder's own condition, are then left out.
    device : str
        Where the models run (:func:`mindvis.utils.device.select_device`; ``auto``: the GPU Accelerate
        picks, else the CPU), under ``generate.mixed_precision`` autocast.
    overrides : collection of str
        Inputs other than the decoder's own that the user means (``subject``, ``stimuli``, ``prior``:
        :data:`mindvis.models.dcldm.OVERRIDE_FLAGS`); without them a mismatch is an error. Those used are
        recorded in ``summary.json`` and ``samples.h5`` (``overrides``).
    same_as : sequence of path
        ``samples.h5`` files of other decoders of this subject. Where one was drawn with the same
        :func:`sampling_key` (the same weights, low-level start, fMRI, seeds and ``generate`` settings), its
        images, embeddings and attention maps are this decoder's too: they are copied, not drawn again, and
        ``same_decoder_as`` in ``summary.json`` and ``samples.h5`` names that file. A fine-tuned decoder whose
        validation kept its start is its start.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    started = time.perf_counter()
    settings = config["generate"]
    out_dir = Path(out_dir)
    check_own_folder(out_dir, OUTPUT_NAMES, "generate")
    generator, decoder, meta = load_dcldm(model_dir, base=base, allow_other_prior="prior" in overrides)
    device = select_device(device)
    precision = resolve_precision(settings["mixed_precision"], device)
    generator.to(device)
    decoder.to(device)
    start = None
    if lowlevel:
        start = load_lowlevel(model_dir)
        if start is None:
            raise MindvisError("this decoder has no low-level start", path=Path(model_dir) / LOWLEVEL_FILE,
                               key="generate.lowlevel",
                               fix="rerun finetune with generate.lowlevel: true, or decode without --lowlevel.")
    projection = None
    if embedding_prior:
        projection = load_embedding_prior(model_dir)
        if projection is None:
            raise MindvisError("this decoder has no prior in embedding space",
                               path=Path(model_dir) / EMBEDDING_PRIOR_FILE, key="finetune.embedding_prior",
                               fix="rerun finetune with finetune.embedding_prior: true, or decode without "
                                   "--embedding-prior.")
    data = load_responses(responses, splits=(settings["split"],))
    fitted_on = check_decoder_responses(meta, data, responses, model_dir)
    if "stimuli" not in overrides:  # --allow-other-stimuli: the user means another stimulus file
        check_stimuli_pair(data, responses, stimuli)
    used = check_decoder_inputs(meta, model_dir, subject=subject, data=data, responses=responses, stimuli=stimuli,
                                allow=overrides)
    used += [] if meta["prior_used"]["same_as_recorded"] else ["prior"]
    split = data[settings["split"]]
    stimulus_set = load_stimulus_set(stimuli)
    stimulus_ids = [str(s) for s in split.stimulus_id]
    true_images, labels = stimulus_set.lookup(stimulus_ids) if stimulus_ids else (
        np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64))
    seeds = sample_seeds(config["seed"], subject, stimulus_ids, settings["n_samples"])
    key = sampling_key(decoder, generator, model_dir if lowlevel else None, split.fmri, seeds, settings,
                       prior_dir=model_dir if embedding_prior else None)
    reused = _same_drawing(same_as, key)
    if reused is not None:
        # The same function of the same inputs: its images, not new ones.
        drawn = read_samples_h5(reused)
        samples, embedding, sampling_s = drawn["samples"], drawn.get("embedding"), 0.0
        log.info("%s: the decoder in %s has the weights and sampling of the one that drew %s: its %d images are "
                 "reused, not drawn again", subject, model_dir, reused, samples.shape[0] * samples.shape[1])
    else:
        log.info("%s: %d stimuli x %d samples, %s %d steps, guidance %.2f%s%s", subject, len(stimulus_ids),
                 settings["n_samples"], settings["sampler"], settings["steps"], settings["guidance_scale"],
                 "" if start is None else f", from the low-level start at strength {start.strength:.2f}",
                 "" if projection is None else f", through the embedding prior ({projection.settings()})")
        tick = time.perf_counter()
        samples = decode(decoder, generator, split.fmri, seeds, settings, batch_size=batch_size, lowlevel=start,
                         embedding_prior=projection)
        synchronize(device)
        sampling_s = time.perf_counter() - tick
        embedding = decoded_embeddings(decoder, split.fmri, embedding_prior=projection)
        log.info("%s: %d images in %.1f s on %s (%s autocast): %.2f images/s", subject,
                 samples.shape[0] * samples.shape[1], sampling_s, device_name(device), precision,
                 samples.shape[0] * samples.shape[1] / max(sampling_s, 1e-9))

    summary = {"stage": "generate", "subject": subject, "model_dir": str(model_dir), "baseline": meta.get("baseline"),
               "lowlevel_strength": None if start is None else start.strength,
               "embedding_prior": None if projection is None else projection.settings(),
               "n_stimuli": len(stimulus_ids), "n_samples": int(settings["n_samples"]), "split": settings["split"],
               **{k: settings[k] for k in ("sampler", "steps", "guidance_scale", "eta")},
               "sampling_s": round(sampling_s, 2),
               "images_per_s": round(samples.shape[0] * samples.shape[1] / max(sampling_s, 1e-9), 3),
               "device": device_name(device), "mixed_precision": precision,
               "batch_size": int(batch_size or settings["batch_size"]),
               "responses": str(responses), "responses_fitted_on": fitted_on, "stimuli": str(stimuli),
               "prior": meta["prior_used"]["path"], "overrides": sorted(used), "sampling_key": key,
               "same_decoder_as": None if reused is None else str(reused)}
    predicted = None
    if classifier_dir is not None and len(stimulus_ids):
        classifier = load_classifier(classifier_dir).to(device)
        flat = samples.reshape(-1, *samples.shape[2:])
        predicted = classifier.predict_proba(flat).argmax(axis=1).reshape(samples.shape[:2])
        correct = predicted == labels[:, None]
        summary["classifier_top1_mean"] = float(correct.mean())
        summary["classifier_top1_best_of_k"] = float(correct.any(axis=1).mean())
        summary["chance"] = 1.0 / stimulus_set.n_classes
        log.info("%s: classifier top-1 of samples %.3f (best of %d: %.3f; chance %.3f)", subject,
                 summary["classifier_top1_mean"], samples.shape[1], summary["classifier_top1_best_of_k"],
                 summary["chance"])

    attention = None
    n_attention = 0 if projection is not None else min(int(settings["attention_stimuli"]), len(stimulus_ids))
    if reused is not None:
        attention = drawn.get("attention")
    elif n_attention:
        # One stimulus per class first, so the maps cover different objects.
        _, first_of_class = np.unique(labels, return_index=True)
        order = list(first_of_class) + [i for i in range(len(labels)) if i not in set(first_of_class)]
        chosen = sorted(order[:n_attention])
        maps, timesteps = capture_attention(decoder, generator, split.fmri[chosen], seeds[chosen, 0].tolist(),
                                            diagnostic_settings(settings))
        attention = {"maps": maps, "stimulus_id": [stimulus_ids[i] for i in chosen], "timesteps": timesteps,
                     "token_weights": decoder.conditioner.token_weights().cpu().numpy()}

    summary.update({"wall_time_s": round(time.perf_counter() - started, 2), "config": config,
                    "versions": software_versions()})
    attrs = {"subject": subject, "model_dir": str(model_dir), "n_samples": int(settings["n_samples"]),
             "split": settings["split"], "class_names": list(stimulus_set.class_names),
             "patch_size": int(decoder.encoder.config.patch_size), "n_voxels": int(split.fmri.shape[1]),
             "lowlevel_strength": -1.0 if start is None else float(start.strength),
             "embedding_prior": "" if projection is None else json.dumps(projection.settings(), sort_keys=True),
             "overrides": sorted(used), "decoder": decoder_binding(meta, model_dir),
             **{k: settings[k] for k in ("sampler", "steps", "guidance_scale", "eta")},
             "sampling_key": key, "same_decoder_as": "" if reused is None else str(reused),
             "config": config, "versions": software_versions()}
    # The folder is replaced as one unit: a full disk or a kill leaves the previous run's folder whole, never
    # this run's images beside the previous run's samples.h5.
    with atomic_folder(out_dir) as staging:
        _write_outputs(staging, stimulus_ids, samples, true_images, labels, seeds, predicted, attention, embedding,
                       summary, attrs)
    return summary


def sampling_key(decoder, generator, lowlevel_dir, fmri, seeds, settings, prior_dir=None):
    """SHA-256 of everything a decoder's images depend on: the decoder's and the generator's weights, the
    low-level start's files (``lowlevel_dir``; None without one), the embedding prior's files (``prior_dir``;
    None without one), the fMRI, the seeds and the ``generate`` settings other than the batch size (which
    changes no image beyond float rounding)."""
    digest = hashlib.sha256()
    digest.update(tensor_digest(decoder.state_dict()).encode())
    for module in (generator.vae, generator.unet, generator.image_conditioner, generator.class_conditioner):
        digest.update(b"-" if module is None else tensor_digest(module.state_dict()).encode())
    if lowlevel_dir is not None:
        for name in (LOWLEVEL_FILE, LOWLEVEL_META):
            digest.update(sha256_file(Path(lowlevel_dir) / name).encode())
    if prior_dir is not None:
        digest.update(b"embedding-prior")
        for name in (EMBEDDING_PRIOR_FILE, EMBEDDING_PRIOR_META):
            digest.update(sha256_file(Path(prior_dir) / name).encode())
    digest.update(np.ascontiguousarray(fmri, np.float32).tobytes())
    digest.update(np.ascontiguousarray(seeds, np.int64).tobytes())
    digest.update(json.dumps({k: v for k, v in settings.items() if k != "batch_size"}, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()


def _same_drawing(candidates, key):
    """The first of ``candidates`` (``samples.h5`` paths) drawn with sampling key ``key``, or None."""
    for path in candidates or ():
        if Path(path).is_file() and read_samples_attrs(path).get("sampling_key") == key:
            return Path(path)
    return None


#: What generate writes in its folder (replaced as a unit, so nothing else may live there).
OUTPUT_NAMES = ("png", "grid.png", SAMPLES_FILE, "summary.json")


def _write_outputs(out_dir, stimulus_ids, samples, true_images, labels, seeds, predicted, attention, embedding,
                   summary, attrs):
    """The PNGs, grid, ``samples.h5`` and ``summary.json`` of one run, into ``out_dir``."""
    # test_avg has one row per stimulus; per-trial splits repeat ids, so their file names carry the row too.
    unique = len(set(stimulus_ids)) == len(stimulus_ids)
    for row, sid in enumerate(stimulus_ids):
        stem = sid if unique else f"{row:04d}-{sid}"
        for j in range(samples.shape[1]):
            save_png(out_dir / "png" / f"{stem}_{j}.png", samples[row, j])
    if len(stimulus_ids):
        save_grid(out_dir / "grid.png", samples, truth=true_images)
    attrs.update({k: summary[k] for k in ("classifier_top1_mean", "classifier_top1_best_of_k") if k in summary})
    write_samples_h5(out_dir / SAMPLES_FILE, samples=samples, true_images=true_images, stimulus_id=stimulus_ids,
                     label=labels, seeds=seeds, attrs=attrs, predicted_label=predicted, attention=attention,
                     embedding=embedding)
    write_json_atomic(out_dir / "summary.json", summary)
