"""The metrics table: reading ``metrics.json`` and formatting its numbers.

One formatting rule for every place a metric is shown (the per-subject report,
the summary table, the browser test that checks the report against
``metrics.json``): :func:`format_value` and :func:`format_ci`; a figure
withheld with a reason shows as :data:`WITHHELD`, its reason listed once
below the table (:func:`withheld_notes`).

Layout of ``results/{subject}/evaluation/metrics.json`` (written by the
``evaluate`` stage): ``subject``, ``n_way``, ``trials``, ``n_samples``,
``n_stimuli``, ``chance``, ``ci_level``, ``n_bootstrap``, ``image_size``,
``classifier`` (``name``, ``n_classes``, ``held_out_accuracy``, ...),
``class_names``, ``rows`` (in a fixed order; each ``id``, ``label``, ``kind``
in floor / model / baseline / ceiling, ``available``, ``reason`` when not
available, ``metrics``: metric id -> ``{"value", "ci"}``, null where it does
not apply, or ``{"value": null, "reason"}`` where it is withheld),
``per_class``, ``confusion``, ``per_stimulus``, ``category`` (per stimulus:
seen / novel / null), ``subsets`` (``seen`` / ``novel`` -> ``n_stimuli``,
``available``, ``rows``: row id -> metric id -> entry, or ``reason``),
``comparisons`` (list of ``a``, ``b``, ``subset``, ``metric``, ``difference``,
``ci``), ``inputs``, ``config``, ``versions``, ``wall_time_s``.

Every table is shown for all test stimuli and for the seen- and
novel-category subsets (:func:`subsets`, ``subset=`` of :func:`table_rows`);
the paired comparisons by :func:`comparison_rows`; the report's headline (each
row's key metric, :func:`headline_rows`) and the rows its tables leave out
(:func:`left_out_rows`). A ``metrics.json`` from
before the subsets existed shows the ``all`` table only.
"""

from __future__ import annotations

import json
from pathlib import Path

from mindvis.errors import MindvisError

# (metric id, column title, larger is better); definitions in mindvis.evaluate.metrics. Each title names the
# column's one ground truth (mindvis.evaluate.table.GROUND_TRUTH).
METRIC_COLUMNS = (
    ("n_way_top1_mean", "n-way top-1 vs. classifier on true image (mean of k)", True),
    ("n_way_top1_best_of_k", "n-way top-1 vs. classifier on true image (best of k)", True),
    ("label_top1_mean", "top-1 vs. data label (mean of k)", True),
    ("two_way_id", "2-way identification (classifier features)", True),
    ("two_way_id_pixels", "2-way identification (pixels)", True),
    ("pixcorr", "PixCorr (true pixels)", True),
    ("ssim", "SSIM (true pixels)", True),
    ("pixcorr_mindvis", "MinD-Vis's pair-wise PCC (true pixels)", True),
    ("ssim_mindvis", "MinD-Vis's pair-wise SSIM (true pixels)", True),
    ("retrieval_brain_to_image_top1", "retrieval brain -> image top-1 (prior embedding of the true images)", True),
    ("retrieval_image_to_brain_top1", "retrieval image -> brain top-1 (prior embedding of the true images)", True),
    ("fid", "FID (classifier features)", False),
)
#: How a figure withheld with a reason is shown.
WITHHELD = "–"
METRIC_TITLES = {metric: title for metric, title, _ in METRIC_COLUMNS}
_REQUIRED_KEYS = ("subject", "n_way", "n_samples", "n_stimuli", "chance", "rows")
#: The test-stimulus subsets of every table, in order, with their titles.
SUBSET_TITLES = {"all": "All test stimuli", "seen": "Seen categories (in the training trials)",
                 "novel": "Novel categories (absent from the training trials)"}
#: Metrics that are not shown per subset (FID compares sets of images).
SET_METRICS = ("fid",)
# Decimals shown: FID is a distance in feature units, the rest are fractions or correlations.
_DECIMALS = {"fid": 2}
_DEFAULT_DECIMALS = 3


def format_value(metric, value):
    """A metric value as the report shows it (``n/a`` when it does not apply)."""
    if value is None:
        return "n/a"
    return f"{float(value):.{_DECIMALS.get(metric, _DEFAULT_DECIMALS)}f}"


def format_ci(metric, ci):
    """A confidence interval as ``[low, high]`` (empty when there is none)."""
    if not ci:
        return ""
    low, high = ci
    return f"[{format_value(metric, low)}, {format_value(metric, high)}]"


def load_metrics(path):
    """Read and check ``metrics.json``.

    Raises
    ------
    MindvisError
        When the file is missing, not JSON, or lacks a key the report needs.
    """
    path = Path(path)
    if not path.is_file():
        raise MindvisError("metrics file not found", path=path, fix="run the evaluate stage for this subject first.")
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
        raise MindvisError(f"not valid JSON ({' '.join(str(error).split())})", path=path,
                           fix="rerun the evaluate stage.") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rows", []), list):
        raise MindvisError("not a metrics record (a JSON object with a list of rows)", path=path, key="rows",
                           fix="rerun the evaluate stage.")
    missing = [key for key in _REQUIRED_KEYS if key not in metrics]
    if missing:
        raise MindvisError(f"missing keys {missing}", path=path, key=missing[0],
                           fix="rerun the evaluate stage with this version of mindvis.")
    for index, row in enumerate(metrics["rows"]):
        if not isinstance(row, dict):
            raise MindvisError(f"row {index} is not a JSON object", path=path, key=f"rows[{index}]",
                               fix="rerun the evaluate stage.")
        for key in ("id", "label", "kind", "available"):
            if key not in row:
                raise MindvisError(f"row {index} lacks '{key}'", path=path, key=f"rows[{index}].{key}",
                                   fix="rerun the evaluate stage with this version of mindvis.")
    return metrics


def metric_columns(metrics, subset="all"):
    """The metric columns any available row of ``metrics`` has a value for, in table order (no FID in a subset)."""
    present = {metric for row in metrics["rows"] if row["available"]
               for metric, entry in (row.get("metrics") or {}).items() if entry is not None}
    return [(metric, title, higher) for metric, title, higher in METRIC_COLUMNS
            if metric in present and (subset == "all" or metric not in SET_METRICS)]


def subsets(metrics):
    """The subsets a table is shown for: all test stimuli, then the seen and novel categories where recorded.

    Returns
    -------
    list of dict
        ``name`` (all / seen / novel), ``title``, ``n_stimuli``, ``available``, ``reason`` (why a subset is
        omitted: fewer than 2 stimuli).
    """
    out = [{"name": "all", "title": SUBSET_TITLES["all"], "n_stimuli": metrics["n_stimuli"], "available": True,
            "reason": ""}]
    for name, entry in (metrics.get("subsets") or {}).items():
        out.append({"name": name, "title": SUBSET_TITLES.get(name, name), "n_stimuli": entry.get("n_stimuli", 0),
                    "available": bool(entry.get("available", "rows" in entry)), "reason": entry.get("reason", "")})
    return out


def row_metrics(metrics, row, subset="all"):
    """A row's metric entries on ``subset`` (``all``: the row's own; else from ``subsets``; {} when absent)."""
    if subset == "all":
        return row.get("metrics") or {}
    entry = (metrics.get("subsets") or {}).get(subset) or {}
    return (entry.get("rows") or {}).get(row["id"]) or {}


def withheld_notes(metrics):
    """The distinct reasons figures are withheld, numbered as the table's footnotes.

    Returns
    -------
    list of dict
        ``number`` (1, 2, ...), ``reason``, ``cells``: ``(row label, column title)`` of each withheld figure.
    """
    notes = {}
    for row in metrics["rows"]:
        if not row["available"]:
            continue
        for metric, title, _ in METRIC_COLUMNS:
            entry = (row.get("metrics") or {}).get(metric)
            if entry is not None and entry.get("value") is None and entry.get("reason"):
                notes.setdefault(entry["reason"], []).append((row["label"], title))
    return [{"number": number, "reason": reason, "cells": cells}
            for number, (reason, cells) in enumerate(notes.items(), start=1)]


def table_rows(metrics, subset="all"):
    """Rows of the report's metrics table, for all test stimuli or a subset (``seen``, ``novel``).

    Returns
    -------
    list of dict
        ``id``, ``label``, ``kind``, ``available``, ``reason`` and ``cells``: one
        ``{"metric", "value", "ci", "note"}`` of formatted strings per column of :func:`metric_columns`
        (``note``: the number of the :func:`withheld_notes` entry of a withheld figure, else None).
    """
    columns = metric_columns(metrics, subset)
    numbers = {note["reason"]: note["number"] for note in withheld_notes(metrics)}
    out = []
    for row in metrics["rows"]:
        cells = []
        for metric, _, _ in columns:
            entry = row_metrics(metrics, row, subset).get(metric)
            if entry is not None and entry.get("value") is None and entry.get("reason"):
                cells.append({"metric": metric, "value": WITHHELD, "ci": "", "note": numbers.get(entry["reason"])})
                continue
            cells.append({"metric": metric, "value": format_value(metric, entry and entry.get("value")),
                          "ci": format_ci(metric, entry and entry.get("ci")), "note": None})
        out.append({"id": row["id"], "label": row["label"], "kind": row["kind"], "available": row["available"],
                    "reason": row.get("reason", ""), "cells": cells})
    return out


#: A row's key metric: the first of these it has (n-way top-1 as MinD-Vis reports it; else its top-1 against the
#: data set's labels, as the fMRI probes; else PixCorr).
KEY_METRICS = ("n_way_top1_mean", "label_top1_mean", "pixcorr")
#: The order of row kinds in the headline: each decoder beside its baselines, floors and ceilings.
HEADLINE_KINDS = ("model", "baseline", "floor", "ceiling")


def key_metric(metrics, row_id):
    """The first of :data:`KEY_METRICS` that row ``row_id`` has a value (or a withheld figure) for."""
    row = row_by_id(metrics, row_id)
    entries = (row or {}).get("metrics") or {}
    return next((metric for metric in KEY_METRICS if entries.get(metric) is not None), KEY_METRICS[0])


def headline_rows(metrics):
    """The report's headline: each available row's key metric for all test stimuli and each recorded subset.

    Returns
    -------
    list of dict
        ``id``, ``label``, ``kind``, ``metric``, ``title`` and ``cells``: one ``{"subset", "value", "ci"}`` of
        formatted strings per available subset of :func:`subsets` (:data:`WITHHELD` for a withheld figure);
        decoders first, then baselines, floors and ceilings (:data:`HEADLINE_KINDS`), each in table order.
    """
    shown = [subset["name"] for subset in subsets(metrics) if subset["available"]]
    rows = [row for row in metrics["rows"] if row["available"]]
    rows.sort(key=lambda row: HEADLINE_KINDS.index(row["kind"]) if row["kind"] in HEADLINE_KINDS else
              len(HEADLINE_KINDS))
    out = []
    for row in rows:
        metric = key_metric(metrics, row["id"])
        cells = []
        for subset in shown:
            entry = row_metrics(metrics, row, subset).get(metric)
            withheld = entry is not None and entry.get("value") is None and entry.get("reason")
            cells.append({"subset": subset, "value": WITHHELD if withheld else format_value(metric, entry and
                                                                                          entry.get("value")),
                          "ci": "" if withheld else format_ci(metric, entry and entry.get("ci"))})
        out.append({"id": row["id"], "label": row["label"], "kind": row["kind"], "metric": metric,
                    "title": METRIC_TITLES[metric], "cells": cells})
    return out


def left_out_rows(metrics):
    """The rows the report's tables leave out: those not available, with why (``id``, ``label``, ``reason``)."""
    return [{"id": row["id"], "label": row["label"], "reason": row.get("reason") or "no reason given"}
            for row in metrics["rows"] if not row["available"]]


def same_decoder_rows(metrics):
    """The rows whose decoder has another row's weights (``generate --same-as``: its images were copied, not
    drawn again): ``id``, ``label`` and ``same_as`` (the twin row's label, as evaluate named it)."""
    out = []
    for row in metrics["rows"]:
        same = row.get("same_decoder_as")
        if same and row["available"]:
            twin = row_by_id(metrics, same)
            out.append({"id": row["id"], "label": row["label"], "same_as": twin["label"] if twin else same})
    return out


def row_by_id(metrics, row_id):
    """The row called ``row_id``, or None."""
    return next((row for row in metrics["rows"] if row["id"] == row_id), None)


def metric_entry(metrics, row_id, metric, subset="all"):
    """A row's metric entry on ``subset``, or None when the row is missing, unavailable or lacks it."""
    row = row_by_id(metrics, row_id)
    if row is None or not row["available"]:
        return None
    return row_metrics(metrics, row, subset).get(metric)


def metric_value(metrics, row_id, metric, subset="all"):
    """A row's metric value on ``subset``, or None when the row is missing, unavailable or lacks it."""
    entry = metric_entry(metrics, row_id, metric, subset)
    return None if entry is None else entry.get("value")


def comparison_verdict(ci):
    """Where a difference's interval lies: ``above 0``, ``below 0`` or ``includes 0`` (None: no interval)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    if ci[0] > 0:
        return "above 0"
    if ci[1] < 0:
        return "below 0"
    return "includes 0"


def comparison_rows(metrics, metrics_shown=None):
    """The paired comparisons of ``metrics.json`` (a - b), formatted.

    Parameters
    ----------
    metrics_shown : sequence of str, optional
        Only these metrics (default: all).

    Returns
    -------
    list of dict
        ``a``, ``b``, ``pair`` (``"{a label} - {b label}"``), ``subset``, ``subset_title``, ``metric``, ``title``,
        ``difference`` (formatted with its sign), ``ci``, ``verdict`` (:func:`comparison_verdict`) and
        ``above_zero`` (the interval lies above 0), in the order of ``metrics.json``.
    """
    labels = {row["id"]: row["label"] for row in metrics["rows"]}
    out = []
    for entry in metrics.get("comparisons") or []:
        if metrics_shown is not None and entry["metric"] not in metrics_shown:
            continue
        metric = entry["metric"]
        difference = entry.get("difference")
        verdict = comparison_verdict(entry.get("ci"))
        out.append({"a": entry["a"], "b": entry["b"],
                    "pair": f"{labels.get(entry['a'], entry['a'])} - {labels.get(entry['b'], entry['b'])}",
                    "subset": entry["subset"], "subset_title": SUBSET_TITLES.get(entry["subset"], entry["subset"]),
                    "metric": metric, "title": METRIC_TITLES.get(metric, metric),
                    "difference": "n/a" if difference is None else f"{float(difference):+.{_decimals(metric)}f}",
                    "ci": format_ci(metric, entry.get("ci")) if verdict else "", "verdict": verdict or "",
                    "above_zero": verdict == "above 0"})
    return out


def _decimals(metric):
    return _DECIMALS.get(metric, _DEFAULT_DECIMALS)
