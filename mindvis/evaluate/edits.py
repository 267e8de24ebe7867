"""The report's brain-token edits of a subject, and their in-silico check (rule ``edit``).

For a few test stimuli (one per class first) the decoder's image beside its edits: each voxel group of
``generate.edit_groups`` has its tokens swapped in from a donor stimulus of another class
(:func:`mindvis.generate.edit.edit_trials`), at each share of ``generate.edit_taus`` of the steps with
the decoded stimulus's cross-attention injected; and each edit's change map (mean absolute pixel change
from the decoded image).

The check (``generate.edit_check``): every test stimulus, each group swapped from its donor without
injection, scored with the image classifier and PixCorr:

* ``donor_prob``: the classifier's probability of the donor's class on the edited image, minus on the
  decoded one;
* ``donor_top1``: whether the edited image's top-1 is the donor's class (``floor``: the decoded images'
  rate);
* ``donor_pixcorr``: PixCorr(edited, donor's true image) minus PixCorr(decoded, donor's true image);

means with bootstrap intervals over stimuli, and with two groups the paired difference (second minus
first). On the simulated default the ground truth says what to expect (higher visual areas carry the
category, early ones local contrast): ``benchmarks/brain_edit.py`` runs the same check on every subject.

Files in ``out_dir`` (``results/{subject}/edits/``): ``edits.h5`` (``source`` uint8 [N, H, W, C],
``true_images``, ``donor_images``, ``edited/{g}`` uint8 [N, n_tau, H, W, C] and ``change/{g}`` float32
[N, n_tau, H, W] for the ``g``-th name of ``shown_groups``, its attribute (JSON)) and ``edits.json`` (stimuli, donors,
groups with their voxel and token counts or why they were skipped, taus, the check, config, versions).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from mindvis.errors import MindvisError
from mindvis.evaluate.metrics import bootstrap_ci, pixcorr
from mindvis.generate.control import AttentionEdit
from mindvis.generate.decode import diagnostic_settings
from mindvis.generate.edit import (EDITS_FILE, EDITS_JSON, TokenEdit, edit_trials, group_tokens, resize_images,
                                  write_edits)
from mindvis.utils.io import derive_seed, software_versions

log = logging.getLogger(__name__)

MEASURES = ("donor_prob", "donor_top1", "donor_pixcorr")


def donor_rows(labels, seed):
    """For each row, a seeded random row of another class (-1 where every row has the same class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        others = np.flatnonzero(labels != label)
        out.append(int(rng.choice(others)) if len(others) else -1)
    return np.asarray(out, np.int64)


def shown_rows(labels, n):
    """Up to ``n`` rows, one per class first (in class order), then the rest in order; sorted."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    order = list(first) + [i for i in range(len(labels)) if i not in set(first)]
    return sorted(order[:n])


def swap_scores(edited, source, donor_truth, donor_labels, classifier, size):
    """Per-stimulus check values (:data:`MEASURES`) of edited images against their decoded sources."""
    index = np.arange(len(donor_labels))
    source_probs = classifier.predict_proba(source)
    probs = classifier.predict_proba(edited)
    return {"donor_prob": probs[index, donor_labels] - source_probs[index, donor_labels],
            "donor_top1": (probs.argmax(1) == donor_labels).astype(np.float64),
            "donor_pixcorr": pixcorr(edited, donor_truth, size) - pixcorr(source, donor_truth, size),
            "floor_top1": (source_probs.argmax(1) == donor_labels).astype(np.float64)}


def summarise(values, n_boot, level, seed=0):
    """Mean and percentile bootstrap interval over stimuli."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return {"value": float(values.mean()) if len(values) else None, "ci": None, "n": int(len(values))}
    low, high = bootstrap_ci(np.mean, values, n_boot=n_boot, level=level, seed=seed)
    return {"value": float(values.mean()), "ci": [low, high], "n": int(len(values))}


def _groups(settings, voxel_roi, decoder):
    """Display name -> {'voxels', 'rois', 'n_voxels', 'n_tokens'} or {'skipped': reason}."""
    names = set(np.asarray(voxel_roi).astype(str))
    out = {}
    for name, rois in settings["edit_groups"].items():
        missing = sorted(set(rois) - names)
        if missing:
            out[name] = {"rois": list(rois), "skipped": f"ROI {', '.join(missing)} not in voxel_roi "
                                                        f"({', '.join(sorted(names))})"}
            continue
        voxels = np.isin(np.asarray(voxel_roi).astype(str), list(rois))
        out[name] = {"rois": list(rois), "voxels": voxels, "n_voxels": int(voxels.sum()),
                     "n_tokens": int(group_tokens(decoder, voxels).sum())}
    return out


def edit_set(config, subject, model_dir, responses, stimuli, out_dir, classifier_dir=None, base=None,
             device="auto"):
    """Write a subject's report edits and their check (see the module docstring); returns ``edits.json``."""
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.models.classifiers.load import load_image_classifier
    from mindvis.models.dcldm import check_decoder_inputs, check_decoder_responses, load_dcldm
    from mindvis.utils.device import select_device

    started = time.perf_counter()
    # Edits show what a token group changes: generate.diagnostic_steps where set (recorded as "steps").
    settings, evaluate = diagnostic_settings(config["generate"]), config["evaluate"]
    out_dir = Path(out_dir)
    data = load_responses(responses, splits=(settings["split"],))
    split = data[settings["split"]]
    ids = [str(s) for s in split.stimulus_id]
    stimulus_set = load_stimulus_set(stimuli)
    truth, labels = stimulus_set.lookup(ids)
    labels = np.asarray(labels, np.int64)
    donors = donor_rows(labels, derive_seed(config["seed"], "edit", subject))
    if len(ids) < 2 or (donors < 0).any():
        # Nothing to swap with: say so in the record (the report shows it) rather than fail the workflow.
        reason = (f"{len(ids)} test stimuli of {len(set(labels.tolist()))} class(es): no donor of another class "
                  f"for every stimulus")
        log.warning("%s: no edits: %s", subject, reason)
        return _write_empty(out_dir, {"stage": "edit", "subject": subject, "model_dir": str(model_dir),
                                      "skipped": reason, "groups": {}, "shown_groups": [], "taus": [],
                                      "stimulus_id": [], "donor_id": [], "check": None, "config": config,
                                      "versions": software_versions()})
    generator, decoder, meta = load_dcldm(model_dir, base=base)
    check_decoder_responses(meta, data, responses, model_dir)
    check_decoder_inputs(meta, model_dir, subject=subject, data=data, responses=responses, stimuli=stimuli)
    device = select_device(device)
    generator.to(device)
    decoder.to(device)
    size = generator.image_size
    seeds = [derive_seed(config["seed"], "generate", subject, sid, 0) for sid in ids]
    steps = int(settings["steps"])
    taus = sorted({int(round(float(share) * steps)) for share in settings["edit_taus"]})
    groups = _groups(settings, data.voxel_roi, decoder)
    shown = shown_rows(labels, int(settings["edit_stimuli"]))
    fmri, donor_fmri = split.fmri, split.fmri[donors]

    record = {"stage": "edit", "subject": subject, "model_dir": str(model_dir), "operation": "swap",
              "stimulus_id": [ids[r] for r in shown], "donor_id": [ids[donors[r]] for r in shown],
              "taus": taus, "steps": steps, "tau_shares": [float(x) for x in settings["edit_taus"]], "groups": {},
              "check": None, **{k: settings[k] for k in ("sampler", "guidance_scale", "eta", "split")}}
    edited_images, changes, source = {}, {}, None
    for name, group in groups.items():
        record["groups"][name] = {k: v for k, v in group.items() if k != "voxels"}
        if "skipped" in group:
            log.warning("%s: edit group %s skipped: %s", subject, name, group["skipped"])
            continue
        if not shown:
            continue
        per_tau = []
        for tau in taus:
            out = edit_trials(decoder, generator, fmri[shown], TokenEdit(group["voxels"], "swap"), settings,
                              [seeds[r] for r in shown], donor=donor_fmri[shown],
                              attention=AttentionEdit("replace", tau), source=source)
            source = out["source"]
            per_tau.append(out["edited"])
        edited_images[name] = np.stack(per_tau, axis=1)
        changes[name] = (np.abs(edited_images[name].astype(np.float32) - source[:, None].astype(np.float32))
                         .mean(axis=-1) / 255.0)
    active = [name for name, group in groups.items() if "skipped" not in group]
    record["shown_groups"] = list(edited_images)
    if settings["edit_check"] and active:
        classifier = load_image_classifier(config, classifier_dir)
        n_boot, level = int(evaluate["n_bootstrap"]), float(evaluate["ci_level"])
        check, per_stimulus, decoded = {"n_stimuli": len(ids), "tau": 0, "groups": {}}, {}, None
        for name in active:
            out = edit_trials(decoder, generator, fmri, TokenEdit(groups[name]["voxels"], "swap"), settings, seeds,
                              donor=donor_fmri, source=decoded)
            decoded = out["source"]  # tau 0 needs no source beside each edit: sampled once for every group
            values = swap_scores(out["edited"], out["source"], resize_images(truth[donors], size), labels[donors], classifier,
                                 size)
            per_stimulus[name] = values
            check["groups"][name] = {m: summarise(values[m], n_boot, level) for m in MEASURES}
            check["floor_top1"] = summarise(values["floor_top1"], n_boot, level)
        if len(active) == 2:
            first, second = active
            check["difference"] = {"label": f"{second} - {first}", **{
                m: summarise(per_stimulus[second][m] - per_stimulus[first][m], n_boot, level) for m in MEASURES}}
        record["check"] = check
    elif settings["edit_check"]:
        record["check_reason"] = "no edit group's ROIs are in voxel_roi"
    record.update({"config": config, "versions": software_versions(),
                   "wall_time_s": round(time.perf_counter() - started, 2)})
    arrays = {"true_images": resize_images(truth[shown], size),
              "donor_images": resize_images(truth[donors[shown]], size)}
    if source is not None:
        arrays["source"] = source
    for index, name in enumerate(record["shown_groups"]):  # by index: a display name may hold any character
        arrays[f"edited/{index}"] = edited_images[name]
        arrays[f"change/{index}"] = changes[name].astype(np.float32)
    write_edits(out_dir, arrays, record)
    log.info("%s: edits of %d stimuli x %d groups x %d taus in %.1f s", subject, len(shown), len(active), len(taus),
             record["wall_time_s"])
    return record


def _write_empty(out_dir, record):
    empty = np.zeros((0, 1, 1, 1), np.uint8)
    write_edits(out_dir, {"true_images": empty, "donor_images": empty}, record)
    return record


def read_edits(out_dir):
    """``edits.json`` and the arrays of ``edits.h5`` of a finished edit rule."""
    import h5py

    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / EDITS_JSON).read_text())
        with h5py.File(out_dir / EDITS_FILE, "r") as handle:
            arrays = {"true_images": handle["true_images"][:], "donor_images": handle["donor_images"][:],
                      "source": handle["source"][:] if "source" in handle else None,
                      "edited": {name: handle[f"edited/{i}"][:] for i, name in enumerate(record["shown_groups"])},
                      "change": {name: handle[f"change/{i}"][:] for i, name in enumerate(record["shown_groups"])}}
    except (OSError, KeyError, ValueError) as error:
        raise MindvisError(f"cannot read the edits ({error})", path=out_dir,
                           fix="rerun the edit rule (snakemake results/{subject}/edits/edits.json).") from error
    return record, arrays
