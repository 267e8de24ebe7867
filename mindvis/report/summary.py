"""The paper-style table over subjects: ``results/summary.csv`` and ``results/summary.html``.

One row per subject and a ``mean`` row (the mean over subjects of each
column). Columns: for the model (``dcldm``) n-way top-1 as the mean over the k
samples and as best-of-k, 2-way identification, PixCorr, SSIM and FID; for
every floor, baseline and ceiling of ``metrics.json`` its key metric, n-way
top-1 (mean of k), or, where a row has none, its top-1 against the labels,
else its PixCorr. Numbers in the CSV are unrounded (empty where unavailable);
the HTML and the printed table use :func:`mindvis.report.tables.format_value`
and list below the table why each empty cell is empty (:func:`summary_notes`:
an unavailable row, or a figure withheld, such as every figure of a classifier
that cannot ground them).
"""

from __future__ import annotations

import datetime
import html
from pathlib import Path

import numpy as np
import pandas as pd

from mindvis.errors import MindvisError
from mindvis.report import tables
from mindvis.utils.io import atomic_path, software_versions

MODEL_ROW = "dcldm"
MODEL_METRICS = ("n_way_top1_mean", "n_way_top1_best_of_k", "two_way_id", "two_way_id_pixels", "pixcorr", "ssim",
                 "fid")
# A baseline's or ceiling's key metric: the first of these it has.
KEY_METRICS = ("n_way_top1_mean", "label_top1_mean", "pixcorr")
# Where each subject's metrics.json lies relative to summary.csv (results/summary.csv).
METRICS_BESIDE_SUMMARY = "{subject}/evaluation/metrics.json"


def _key_metric(metrics, row_id):
    for metric in KEY_METRICS:
        if tables.metric_value(metrics, row_id, metric) is not None:
            return metric
    return KEY_METRICS[0]


def summary_table(metrics_list):
    """One row per subject and a mean row.

    Parameters
    ----------
    metrics_list : list of dict
        Parsed ``metrics.json`` of each subject (:func:`mindvis.report.tables.load_metrics`).

    Returns
    -------
    pandas.DataFrame
        Index ``subject`` (the subjects, then ``mean``); columns ``{row_id}/{metric_id}``
        (NaN where unavailable); ``attrs['titles']`` maps columns to display titles.
    """
    if not metrics_list:
        raise MindvisError("no metrics.json given", key="metrics", fix="run the evaluate stage first.")
    columns, titles = [], {}
    reference = metrics_list[0]
    labels = {row["id"]: row["label"] for row in reference["rows"]}
    for metric in MODEL_METRICS:
        columns.append((MODEL_ROW, metric))
        titles[f"{MODEL_ROW}/{metric}"] = f"{labels.get(MODEL_ROW, MODEL_ROW)}: {tables.METRIC_TITLES[metric]}"
    for row in reference["rows"]:
        if row["id"] != MODEL_ROW:
            metric = _key_metric(reference, row["id"])
            columns.append((row["id"], metric))
            titles[f"{row['id']}/{metric}"] = f"{row['label']}: {tables.METRIC_TITLES[metric]}"
    records = {}
    for metrics in metrics_list:
        values = [tables.metric_value(metrics, row_id, metric) for row_id, metric in columns]
        records[metrics["subject"]] = [np.nan if value is None else float(value) for value in values]
    frame = pd.DataFrame.from_dict(records, orient="index", columns=[f"{r}/{m}" for r, m in columns])
    frame.loc["mean"] = frame.mean(axis=0, skipna=False)
    frame.index.name = "subject"
    frame.attrs["titles"] = titles
    return frame


def summary_notes(metrics_list, frame):
    """Why cells of the summary are empty, one line per subject and reason.

    Parameters
    ----------
    metrics_list : list of dict
        Parsed ``metrics.json`` of each subject.
    frame : pandas.DataFrame
        :func:`summary_table` (its columns ``{row_id}/{metric}``).

    Returns
    -------
    list of str
        ``"{subject}: {columns}: {reason}"``, columns named as the printed table names them.
    """
    lines = []
    for metrics in metrics_list:
        reasons = {}
        for column in frame.columns:
            row_id, metric = column.split("/", 1)
            row = tables.row_by_id(metrics, row_id)
            if row is None:
                continue
            entry = (row.get("metrics") or {}).get(metric)
            if not row["available"]:
                reason = f"row not available ({row.get('reason') or 'no reason given'})"
            elif entry is not None and entry.get("value") is None and entry.get("reason"):
                reason = f"withheld ({entry['reason']})"
            else:
                continue
            reasons.setdefault(reason, []).append(column)
        lines.extend(f"{metrics['subject']}: {', '.join(columns)}: {reason}" for reason, columns in reasons.items())
    return lines


def _formatted(frame):
    """The table with every number formatted as the report shows it."""
    out = frame.copy().astype(object)
    for column in frame.columns:
        metric = column.split("/", 1)[1]
        out[column] = [tables.format_value(metric, None if np.isnan(v) else v) for v in frame[column]]
    return out


def summary_html(frame, title, notes=()):
    """A self-contained HTML page of the summary table (inline CSS, no script); ``notes``: :func:`summary_notes`."""
    versions = software_versions()
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    formatted = _formatted(frame)
    titles = frame.attrs.get("titles", {})
    head = "".join(f'<th data-column="{html.escape(c)}">{html.escape(titles.get(c, c))}</th>' for c in frame.columns)
    body = []
    for subject, row in formatted.iterrows():
        cells = "".join(f'<td data-column="{html.escape(c)}">{html.escape(v)}</td>' for c, v in row.items())
        css = ' class="mean"' if subject == "mean" else ""
        body.append(f'<tr{css}><td class="label">{html.escape(str(subject))}</td>{cells}</tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 0.3em 0.55em; text-align: right; }}
th {{ background: #f3f3f3; max-width: 11em; }} td.label {{ text-align: left; }}
tr.mean td {{ font-weight: 600; border-top: 2px solid #888; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>One row per subject and the mean over subjects. DC-LDM columns: the model; the others: each baseline's
and ceiling's key metric (n-way top-1, mean of k). FID: lower is better. Per-subject reports with confidence
intervals: <code>results/&lt;subject&gt;/report.html</code>. Written {html.escape(written)} by mindvis
{html.escape(versions.get("mindvis", "?"))} (torch {html.escape(versions.get("torch", "?"))}).</p>
<table><thead><tr><th>subject</th>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{_notes_html(notes)}</body></html>
"""


def _notes_html(notes):
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return f'<h2>Empty cells</h2><ul id="empty-cells">{items}</ul>'



def summary_text(frame, notes=()):
    """The table as plain text for the terminal: one line per ``row/metric``, one column per subject and the mean;
    then why cells are empty (``notes``: :func:`summary_notes`)."""
    table = _formatted(frame).T
    table.index.name = "row/metric"
    text = table.to_string()
    if notes:
        text += "\n\nEmpty cells (n/a):\n" + "\n".join(f"  {note}" for note in notes)
    return text


def write_summary(metrics_paths, csv_path, html_path, title="mindvis summary"):
    """Build the summary from each subject's ``metrics.json`` and write the CSV and HTML atomically.

    Returns
    -------
    pandas.DataFrame
    """
    metrics_list = [tables.load_metrics(path) for path in metrics_paths]
    frame = summary_table(metrics_list)
    frame.attrs["notes"] = summary_notes(metrics_list, frame)
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, float_format="%.6g")
    with atomic_path(html_path) as tmp:
        Path(tmp).write_text(summary_html(frame, title, frame.attrs["notes"]), encoding="utf-8")
    return frame


def read_summary(csv_path):
    """Read ``summary.csv`` back (for printing it); ``attrs['notes']`` from the subjects' ``metrics.json`` beside it
    (:data:`METRICS_BESIDE_SUMMARY`), where they exist."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise MindvisError("summary table not found", path=csv_path, fix="run `snakemake decode` first.")
    frame = pd.read_csv(csv_path, index_col="subject")
    paths = [csv_path.parent / METRICS_BESIDE_SUMMARY.format(subject=subject) for subject in frame.index
             if subject != "mean"]
    existing = [path for path in paths if path.exists()]
    frame.attrs["notes"] = summary_notes([tables.load_metrics(path) for path in existing], frame) if existing else []
    return frame
