"""The per-subject HTML report (``results/{subject}/report.html``).

One self-contained file a scientist can open and send: PNG figures are
embedded as base64 ``data:`` URIs, the CSS is inline, there is no script and
no external URL. Sections: header (subject, date, config name) and the
warnings (a classifier that cannot ground its figures, a prior of another
domain); the image grids (model, ablation, ridge baselines, the base
generator's ceiling: their first :data:`PREVIEW_STIMULI` stimuli where there
are more, every stimulus further down); the headline (each available row's key metric with its
interval, for all test stimuli and the seen and novel categories: decoders,
then baselines, floors and ceilings); the metrics tables of ``metrics.json``
with confidence intervals, floors, baselines and ceilings marked, each
column's ground truth in its header, n, k and chance stated, withheld figures
with their reason (a degenerate image classifier withholds every figure it
computes), shown for all test stimuli and again for the seen- and
novel-category stimuli (n of each stated, or why a subset is omitted), the
rows that are not available left out and named in one line with why; then the
paired comparisons (a - b with its interval, marked where the interval lies
above 0); per-class accuracy
and the confusion matrix; SC-MBM and fine-tuning curves; for a few-shot new subject, its learning curve
(adapted vs from scratch) and the other subjects' scores before and after; the brain-token edits (a voxel
group's tokens from another stimulus) with their in-silico check; cross-attention maps
over denoising steps; the brain maps, each drawn only through a decoder path
that was trained and carries signal, the path named (or the map left out with
the reason: :func:`mindvis.report.brainmap.attribution_paths`); and provenance
(config, input hashes, software versions).

The same figures can be written as PNG files (``figures_dir``) so that
Snakemake's ``report()`` can register them. That folder is the report's own (a
folder holding other files is refused) and is replaced as one unit, before
``report.html`` is renamed into place: a full disk or a kill leaves the previous
figures and report whole.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from mindvis.errors import MindvisError
from mindvis.report import figures, tables
from mindvis.utils.io import (
    atomic_folder,
    atomic_path,
    check_own_folder,
    sha256_file,
    software_versions,
)

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
# File names of the figures written beside the report (also the keys of the embedded figures).
FIGURE_FILES = {"grid": "grid.png", "per_class": "per_class.png", "confusion": "confusion.png",
                "curves": "curves.png", "attention": "attention.png", "brain": "brain_map.png",
                "brain_voxel": "brain_map_voxel_path.png", "fewshot": "fewshot_curve.png",
                "edits": "brain_edits.png"}
#: Stimuli in the preview grids that open the report (the test stimuli interleave their classes, so the first
#: ones show every class of a 10-class set); every stimulus is drawn further down.
PREVIEW_STIMULI = 10
# Which samples.h5 grids the report shows, in order, with their titles.
GRID_TITLES = {
    "dcldm": "DC-LDM (SC-MBM pretrained)",
    "dcldm-start": "DC-LDM at its start (0 fine-tuning steps)",
    "dcldm-lowlevel": "DC-LDM, low-level start (img2img from the ridge latent)",
    "dcldm-prior": "DC-LDM + embedding prior",
    "dcldm-prior-lowlevel": "DC-LDM + embedding prior, low-level start",
    "dcldm-shared": "DC-LDM shared by the subjects",
    "dcldm-fewshot": "DC-LDM shared, adapted to this new subject (few-shot)",
    "dcldm-baseline": "DC-LDM without SC-MBM pretraining",
    "ridge": "Ridge fMRI -> VAE latent (baseline)",
    "ridge-pixels": "Ridge fMRI -> pixels (baseline)",
    "ridge-embedding": "Ridge fMRI -> prior embedding, frozen prior (baseline)",
    "base-ceiling": "Base generator given the truth (ceiling)",
}


def template_environment():
    """The Jinja2 environment of the report templates (autoescaping on)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("mindvis.report", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              undefined=jinja2.StrictUndefined)


def data_uri(png):
    """PNG bytes -> a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_jsonl(path):
    """The lines of a ``metrics.jsonl`` (an empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except ValueError as error:
                raise MindvisError(f"line {number} is not JSON ({error})", path=path,
                                   fix="rerun the training stage that wrote it.") from error
    return lines


def _load_samples(path):
    from mindvis.generate.writing import read_samples_h5

    try:
        return read_samples_h5(path)
    except (OSError, KeyError) as error:
        raise MindvisError(f"cannot read samples ({error})", path=path,
                           fix="rerun the stage that wrote it (generate or evaluate).") from error


def grid_figures(samples_paths, first=None):
    """Grids of true images beside their samples, for each ``samples.h5`` that exists.

    Parameters
    ----------
    samples_paths : dict of str -> path
    first : int, optional
        Draw only the first ``first`` stimuli (the report's preview); all by default.

    Returns
    -------
    list of dict
        ``id``, ``title``, ``png`` (bytes), ``n_stimuli`` (drawn), ``n_samples``, ``n_total`` (stimuli in the file).
    """
    grids = []
    for row_id, path in samples_paths.items():
        if path is None or not Path(path).exists():
            continue
        data = _load_samples(path)
        title = GRID_TITLES.get(row_id, row_id)
        if row_id == "base-ceiling" and data["attrs"].get("method"):
            title = f"{data['attrs']['method']} (ceiling)"  # what the base was given: the image or the class
        shown = slice(None, first)
        grids.append({"id": row_id, "title": title,
                      "png": figures.image_grid_png(data["samples"][shown], data["true_images"][shown]),
                      "n_stimuli": int(data["samples"][shown].shape[0]), "n_samples": int(data["samples"].shape[1]),
                      "n_total": int(data["samples"].shape[0])})
    return grids


def attention_figures(samples, n_stimuli, responses, path, metrics=None):
    """The cross-attention figure and the brain maps of the model's samples.

    Parameters
    ----------
    samples : dict
        :func:`mindvis.generate.writing.read_samples_h5` of the model's ``samples.h5``.
    n_stimuli : int
        Stimuli shown in the attention figure.
    responses : mindvis.data.responses.Responses or None
        The grid for the brain maps (None: no brain map).
    path : path
        The ``samples.h5``, named in errors.
    metrics : dict, optional
        The parsed ``metrics.json`` (whether the decoder carries signal).

    Returns
    -------
    dict
        ``attention``, ``brain`` and ``brain_voxel`` PNG bytes (each absent when not drawn),
        ``attention_stimuli`` (ids shown), ``brain_paths``: per map (``attention``, ``voxel``) ``show`` and
        ``text``, the path it attributes importance through or why it is left out
        (:func:`mindvis.report.brainmap.attribution_paths`).
    """
    from mindvis.report.brainmap import attribution_paths, brain_map_png, voxel_importance, voxel_path_importance

    attrs = samples["attrs"]
    attention = samples.get("attention")
    recorded_maps = attention is not None and attention["maps"].shape[1] > 0
    out = {}
    if recorded_maps:
        recorded = list(samples["stimulus_id"])
        rows = [recorded.index(sid) for sid in attention["stimulus_id"]]
        out["attention_stimuli"] = list(attention["stimulus_id"][:n_stimuli])
        out["attention"] = figures.attention_png(
            attention["maps"], attention["timesteps"], samples["samples"][rows, 0], samples["true_images"][rows],
            attention["stimulus_id"], n_stimuli)
    paths = attribution_paths(attrs.get("model_dir"), metrics)
    if responses is None:
        for key in paths:
            paths[key] = {"show": False, "text": "no responses.h5 was given: no voxel grid to draw on"}
    if not recorded_maps and paths["attention"]["show"]:
        paths["attention"] = {"show": False, "text": "the samples hold no recorded attention maps"}
    if paths["attention"]["show"]:
        importance = voxel_importance(attention["maps"], attention["token_weights"], int(attrs["patch_size"]),
                                      responses.n_voxels, path=path)
        out["brain"] = brain_map_png(importance, responses.voxel_ijk, responses.affine, responses.volume_shape,
                                     "attention-based voxel importance (x mean)")
    if paths["voxel"]["show"]:
        direct = voxel_path_importance(attrs["model_dir"])
        if direct is not None and len(direct) == responses.n_voxels:
            out["brain_voxel"] = brain_map_png(direct, responses.voxel_ijk, responses.affine,
                                               responses.volume_shape, "voxel-path weight norm (x mean)")
        else:
            paths["voxel"] = {"show": False, "text": f"the voxel path's width does not match the "
                                                     f"{responses.n_voxels} voxels of responses.h5"}
    out["brain_paths"] = paths
    return out


def metrics_tables(metrics):
    """The metrics table for all test stimuli, then for each recorded subset (seen, novel categories).

    Returns
    -------
    list of dict
        :func:`mindvis.report.tables.subsets` entries with ``table_id`` (``metrics-table`` for all stimuli,
        ``metrics-table-{subset}`` else), ``columns`` and ``rows`` (:func:`mindvis.report.tables.table_rows`).
    """
    out = []
    for subset in tables.subsets(metrics):
        name = subset["name"]
        out.append({**subset, "table_id": "metrics-table" if name == "all" else f"metrics-table-{name}",
                    "columns": tables.metric_columns(metrics, name),
                    # Unavailable rows are left out of the tables; the report names them once, with why.
                    "rows": [row for row in tables.table_rows(metrics, name) if row["available"]]
                    if subset["available"] else []})
    return out


def _confusion_row(metrics):
    """The row whose confusion matrix the report draws: the model's, else the first available."""
    confusion = metrics.get("confusion") or {}
    for row_id in ["dcldm", *confusion]:
        if confusion.get(row_id) is not None:
            return row_id
    return None


def class_figures(metrics):
    """Per-class accuracy bars and the confusion matrix (absent when ``metrics.json`` has none)."""
    out = {}
    class_names = metrics.get("class_names") or []
    labels = {row["id"]: row["label"] for row in metrics["rows"]}
    per_class = {row: values for row, values in (metrics.get("per_class") or {}).items() if values is not None}
    if per_class and class_names:
        out["per_class"] = figures.per_class_png(per_class, class_names, labels)
    row_id = _confusion_row(metrics)
    if row_id and class_names:
        out["confusion"] = figures.confusion_png(metrics["confusion"][row_id], class_names,
                                                 f"Confusion: {labels.get(row_id, row_id)}")
    return out


def _metric_cell(metrics, row_id, metric, subset):
    """``{"value", "ci"}`` of a metrics.json row on a subset (``all`` or a recorded subset), else None."""
    if subset == "all":
        row = next((row for row in metrics["rows"] if row["id"] == row_id), None)
        cell = (row.get("metrics") or {}).get(metric) if row and row.get("available", True) else None
    else:
        recorded = (metrics.get("subsets") or {}).get(subset) or {}
        cell = ((recorded.get("rows") or {}).get(row_id) or {}).get(metric) if recorded.get("available") else None
    return cell if isinstance(cell, dict) and cell.get("value") is not None else None


CURVE_CELLS = {"n_way_top1_mean": ("all", "novel"), "two_way_id": ("all",)}


def new_subject_curve(metrics, model_json, benchmark=None):
    """The few-shot learning curve of a new subject's report, and what the adaptation did to the old subjects.

    Parameters
    ----------
    metrics : dict
        The subject's parsed ``metrics.json``: its ``dcldm-fewshot`` row (the shared decoder adapted to it) and
        its ``dcldm`` row (with ``finetune.new_subject`` set, trained from scratch on the same trials).
    model_json : path
        ``results/{subject}/dcldm-fewshot/dcldm.json`` (how many trials; the old subjects' val scores
        before and after the adaptation).
    benchmark : path, optional
        A ``benchmarks/new_subject.py`` results JSON: its shares for this subject are drawn beside this run's,
        only when its entry was measured on the same ``responses.h5`` (SHA-256).

    Returns
    -------
    dict
        ``points`` (for :func:`mindvis.report.figures.fewshot_png`), ``full`` (or None), ``chance``,
        ``notes`` (sentences for the caption), ``old`` (rows: subject, metric, before, after).
    """
    meta = json.loads(Path(model_json).read_text())
    this_run = {"n_train": int(meta["n_train"]), "source": "this run",
                **{variant: {metric: {subset: _metric_cell(metrics, row_id, metric, subset) for subset in subsets}
                             for metric, subsets in CURVE_CELLS.items()}
                   for variant, row_id in (("adapted", "dcldm-fewshot"), ("scratch", "dcldm"))}}
    share = (f"its first {meta['train_runs']} training run(s)" if meta.get("train_runs")
             else f"a random {float(meta.get('train_fraction', 1.0)):.0%} of its training trials")
    notes = [f"This run: {meta['n_train']} of {meta['n_train_all']} training trials ({share}); the from-scratch "
             "decoder is this subject's dcldm row, trained on the same trials."]
    points, full = [this_run], None
    if benchmark:
        report = json.loads(Path(benchmark).read_text())
        entry = next((e for e in report.get("entries", []) if e.get("left_out") == metrics["subject"]), None)
        if entry is None:
            notes.append(f"{benchmark} has no entry for {metrics['subject']}: not drawn.")
        elif entry.get("responses_sha256") != meta.get("responses_sha256"):
            notes.append(f"{benchmark} was measured on another responses.h5 (SHA-256 differs or is not recorded): "
                         "not drawn.")
        else:
            name = Path(benchmark).stem
            for run in entry["runs"].values():
                points.append({"n_train": int(run["n_train"]), "source": name,
                               **{variant: {metric: {subset: run[key]["metrics"][metric].get(subset)
                                                     for subset in subsets}
                                            for metric, subsets in CURVE_CELLS.items()}
                                  for variant, key in (("adapted", "fewshot"), ("scratch", "scratch"))}})
            full = entry["full"]["metrics"]
            notes.append(f"{name}: the benchmark's own decoders on the same responses.h5 ({report.get('command', '')}); "
                         "the line is its decoder trained on all the training trials.")
    chance_row = next((row for row in metrics["rows"] if row["id"] == "chance"), {})
    chance = {metric: ((chance_row.get("metrics") or {}).get(metric) or {}).get("value") for metric in CURVE_CELLS}
    preservation = meta.get("prior_preservation") or {}
    old = []
    for subject, before in (preservation.get("old_val_before") or {}).items():
        after = (preservation.get("old_val_after") or {}).get(subject, {})
        for key, value in before.items():
            old.append({"subject": subject, "metric": key, "before": value, "after": after.get(key)})
    if preservation.get("weight") is None:
        notes.append("Only this subject's adapter trained: the old subjects' decoders are unchanged.")
    return {"points": points, "full": full, "chance": chance, "notes": notes, "old": old}


def _check_cell(summary, signed=True):
    """``+0.025 [-0.001, +0.051] (n 50)`` for a check summary (a shift; ``signed=False``: a rate), else a dash."""
    if not summary or summary.get("value") is None:
        return "–"
    form = "+.3f" if signed else ".3f"
    if not summary.get("ci"):
        return f"{summary['value']:{form}} (n {summary['n']})"
    low, high = summary["ci"]
    return f"{summary['value']:{form}} [{low:{form}}, {high:{form}}] (n {summary['n']})"


def edit_section(edits_dir):
    """The report's brain-token edits: the figure's PNG (or None), its column labels, the check's rows, notes.

    Reads the edit rule's ``edits.json`` and ``edits.h5`` (:mod:`mindvis.evaluate.edits`).
    """
    from mindvis.evaluate.edits import MEASURES, read_edits
    from mindvis.generate.writing import make_grid

    record, arrays = read_edits(edits_dir)
    notes = [f"{name}: skipped, {group['skipped']}." for name, group in record["groups"].items()
             if "skipped" in group] + ([f"No edits: {record['skipped']}."] if record.get("skipped") else [])
    png, columns = None, []
    source = arrays["source"]
    if record["shown_groups"] and source is not None and len(source):
        parts = [arrays["donor_images"][:, None], source[:, None]]
        columns = ["donor's image", "decoded"]
        for name in record["shown_groups"]:
            heat = (np.clip(arrays["change"][name][:, -1] * 4, 0, 1) * 255).astype(np.uint8)[..., None]
            heat = np.repeat(heat, source.shape[-1], axis=-1)
            parts += [arrays["edited"][name], heat[:, None]]
            columns += [f"{name}, tau {tau}" for tau in record["taus"]] + [f"{name}: change at tau {record['taus'][-1]}"]
        png = figures.array_png(make_grid(np.concatenate(parts, axis=1), arrays["true_images"]))
    check_rows = []
    check = record.get("check")
    if check:
        for name, values in check["groups"].items():
            # A group's top-1 is a rate; every cell of the difference row is a shift.
            check_rows.append({"group": name, "cells": [_check_cell(values[m], signed=m != "donor_top1")
                                                        for m in MEASURES]})
        if check.get("difference"):
            difference = check["difference"]
            check_rows.append({"group": difference["label"], "cells": [_check_cell(difference[m]) for m in MEASURES]})
    elif record.get("check_reason"):
        notes.append(f"No check: {record['check_reason']}.")
    return {"record": record, "png": png, "columns": columns, "check": check, "check_rows": check_rows,
            "floor": _check_cell(check.get("floor_top1"), signed=False) if check else None, "notes": notes}


def _curve_runs(curves):
    """Run name -> metrics.jsonl lines, for the files that exist and hold lines."""
    runs = {name: read_jsonl(path) for name, path in (curves or {}).items() if path}
    return {name: lines for name, lines in runs.items() if lines}


def _file_hashes(paths):
    return {str(path): sha256_file(path) for path in paths if path and Path(path).is_file()}


def check_report_inputs(metrics, metrics_path, samples, responses):
    """Refuse files other than those ``metrics.json`` scored: a report must show the run its tables are of.

    Every given file that ``metrics.json`` recorded (``inputs``: path -> SHA-256, as evaluate was given them)
    must have that content, and the model's samples must be of the metrics' subject.
    """
    recorded = {}
    for name, digest in (metrics.get("inputs") or {}).items():
        if isinstance(digest, str):
            recorded[Path(name).resolve()] = (name, digest)
    for path in [responses, *samples.values()]:
        if not path or not Path(path).is_file() or Path(path).resolve() not in recorded:
            continue
        name, digest = recorded[Path(path).resolve()]
        if sha256_file(path) != digest:
            raise MindvisError(f"not the file {metrics_path} scored (its SHA-256 differs from the one recorded for "
                               f"{name}): it was rewritten after the evaluation", path=path, key="inputs",
                               fix="rerun evaluate for this subject (snakemake reruns it when its inputs change), "
                                   "then the report.")
    model = samples.get("dcldm")
    if model and Path(model).is_file():
        subject = _load_samples(model)["attrs"].get("subject")
        if subject is not None and str(subject) != str(metrics["subject"]):
            raise MindvisError(f"samples of {subject}, but {metrics_path} is of {metrics['subject']}", path=model,
                               key="subject", fix=f"give {metrics['subject']}'s own samples.h5.")


def build_report(metrics_path, out_path, *, config, samples=None, responses=None, curves=None, figures_dir=None,
                 fewshot_model=None, fewshot_benchmark=None, edits=None):
    """Write a subject's self-contained ``report.html``.

    Parameters
    ----------
    metrics_path : path
        ``results/{subject}/evaluation/metrics.json``.
    out_path : path
        The HTML file to write (atomically).
    config : dict
        The resolved experiment config (its name goes in the header; ``evaluate.attention_stimuli``
        caps the stimuli of the attention figure).
    samples : dict of str -> path, optional
        ``samples.h5`` per row id (``dcldm``, ``dcldm-baseline``, ``ridge``, ``ridge-pixels``, ``ridge-embedding``,
        ``base-ceiling``, ...);
        missing files are skipped; ``dcldm``'s attention maps feed the attention figure and brain map.
    responses : path, optional
        The subject's ``responses.h5`` (voxel grid of the brain map).
    curves : dict of str -> path, optional
        Curve name (``"stage: run"``) -> an engine ``metrics.jsonl``; missing files are skipped.
    figures_dir : path, optional
        Also write every figure there as PNG (names in :data:`FIGURE_FILES`); the folder is replaced as a unit,
        so it must hold nothing else.
    fewshot_model : path, optional
        ``results/{subject}/dcldm-fewshot/dcldm.json`` of a new subject: the report gains its learning curve
        (:func:`new_subject_curve`).
    fewshot_benchmark : path, optional
        A ``benchmarks/new_subject.py`` results JSON whose shares the learning curve also draws.
    edits : path, optional
        The subject's edits folder (rule ``edit``): the brain-token edits and their check (:func:`edit_section`).

    Returns
    -------
    dict
        ``path``, ``figures`` (names drawn), ``bytes``, ``wall_time_s``.
    """
    from mindvis.data.responses import load_responses

    start = time.perf_counter()
    if figures_dir is not None:
        check_own_folder(figures_dir, set(FIGURE_FILES.values()), "report", key="--figures-dir")
    metrics = tables.load_metrics(metrics_path)
    samples = dict(samples or {})
    check_report_inputs(metrics, metrics_path, samples, responses)
    drawn = {}
    grids = grid_figures(samples)
    if grids:
        drawn["grid"] = grids[0]["png"]
    drawn.update(class_figures(metrics))
    curve_png = figures.curves_png(_curve_runs(curves))
    if curve_png is not None:
        drawn["curves"] = curve_png
    fewshot = None
    if fewshot_model:
        fewshot = new_subject_curve(metrics, fewshot_model, fewshot_benchmark)
        png = figures.fewshot_png(fewshot["points"], fewshot["chance"], fewshot["full"])
        if png is not None:
            drawn["fewshot"] = png
    edit = None
    if edits:
        edit = edit_section(edits)
        if edit["png"] is not None:
            drawn["edits"] = edit["png"]
    attention = {}
    model_samples = samples.get("dcldm")
    if model_samples and Path(model_samples).exists():
        grid_responses = load_responses(responses, splits=()) if responses else None
        n_attention = int(config.get("evaluate", {}).get("attention_stimuli", config["generate"]["attention_stimuli"]))
        attention = attention_figures(_load_samples(model_samples), n_attention, grid_responses, model_samples,
                                      metrics)
        drawn.update({key: attention[key] for key in ("attention", "brain", "brain_voxel") if key in attention})

    read = [metrics_path, responses, *samples.values(), *(curves or {}).values(), fewshot_model, fewshot_benchmark,
            *([Path(edits) / "edits.json", Path(edits) / "edits.h5"] if edits else [])]
    context = {
        "subject": metrics["subject"],
        "experiment": config.get("experiment", ""),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "metrics": metrics,
        "tables": metrics_tables(metrics),
        "headline": tables.headline_rows(metrics),
        "left_out": tables.left_out_rows(metrics),
        "same_decoder": tables.same_decoder_rows(metrics),
        "comparisons": tables.comparison_rows(metrics),
        "fmt": tables.format_value,
        "grids": [{**grid, "uri": data_uri(grid["png"])} for grid in grids],
        "previews": [{**grid, "uri": data_uri(grid["png"])} for grid in grid_figures(samples, first=PREVIEW_STIMULI)
                     if grid["n_total"] > PREVIEW_STIMULI],
        "figures": {name: data_uri(png) for name, png in drawn.items()},
        "attention_stimuli": attention.get("attention_stimuli", []),
        "brain_paths": attention.get("brain_paths") or {
            key: {"show": False, "text": "no samples of the model were found"} for key in ("attention", "voxel")},
        "fewshot": fewshot,
        "edit": edit,
        "notes": tables.withheld_notes(metrics),
        "withheld": tables.WITHHELD,
        "config_yaml": yaml.safe_dump(config, sort_keys=False),
        "input_hashes": {**(metrics.get("inputs") or {}), **_file_hashes(read)},
        "versions": {"evaluation": metrics.get("versions") or {}, "report": software_versions()},
    }
    html = template_environment().get_template(TEMPLATE).render(**context)
    # The figures folder is swapped in as one unit and report.html renamed after it: a failure before the swap
    # leaves the previous figures and report.html both whole. (Only a kill between the two renames leaves new
    # figures beside the previous report.html, each whole; the report embeds its own figures.)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
        if figures_dir is not None:
            with atomic_folder(figures_dir) as staging:
                write_figures(drawn, staging)
    seconds = time.perf_counter() - start
    log.info("%s: %d figures, %.0f kB in %.1f s", out_path, len(drawn), len(html) / 1024, seconds)
    return {"path": str(out_path), "figures": sorted(drawn), "bytes": len(html.encode()), "wall_time_s": seconds}


def write_figures(drawn, figures_dir):
    """Write each drawn figure to ``figures_dir``; a figure not drawn becomes a placeholder PNG saying so.

    Snakemake declares every figure file as an output, so each one must exist.
    """
    figures_dir = Path(figures_dir)
    for name, filename in FIGURE_FILES.items():
        png = drawn.get(name) or figures.placeholder_png(f"{name.replace('_', ' ')}: not available for this run")
        with atomic_path(figures_dir / filename) as tmp:
            Path(tmp).write_bytes(png)
