"""The paper-style table over subjects: ``results/summary.csv`` and ``results/summary.html``.

One row per subject and a ``mean`` row (the mean over subjects of each
column). Columns: for the model (``dcldm``) n-way top-1 as the mean over the k
samples and as best-of-k, 2-way identification, PixCorr, SSIM and FID (and,
where some subject has them, MinD-Vis's own PixCorr and SSIM and the
retrieval top-1 in the prior's embedding space: :data:`SCORED_METRICS`); for
every floor, baseline and ceiling of ``metrics.json`` its key metric, n-way
top-1 (mean of k), or, where a row has none, its top-1 against the labels,
else its PixCorr. The same columns follow for the seen- and novel-category
test stimuli (``seen:`` and ``novel:`` before the column name, no FID: it is a
set figure), each subset led by its number of stimuli (``n_stimuli``,
``seen:n_stimuli``, ``novel:n_stimuli``). The first column, ``classifier``, names the
classifier that scored each subject's classifier metrics (``metrics.json``'s ``classifier.name``; the
mean row: the one name, or ``mixed``), and the printed and HTML tables name it above the tables. Numbers in the CSV are unrounded
(empty where unavailable); the HTML and the printed table show one table per
subset, use :func:`mindvis.report.tables.format_value` and list below the
tables why each empty cell is empty (:func:`summary_notes`: an unavailable
row, an omitted subset, or a figure withheld, such as every figure of a
classifier that cannot ground them), then each subject's paired comparisons
of the key metrics (:data:`COMPARISON_METRICS`: a - b with its interval, and
whether the interval lies above 0).

The terminal gets :func:`headline_text` (``mindvis summary``, the end of ``make decode``): one table of each
row's key metric for all / seen / novel test stimuli, the mean over subjects with the lowest and highest
subject, decoders first, then their baselines, floors and ceilings, in about 30 lines, and where the rest is;
``mindvis summary --full`` prints :func:`summary_text`, every column and comparison.
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
# MinD-Vis's own pixel metrics (evaluate.mindvis_metrics), shown for the model where scored.
MINDVIS_METRICS = ("pixcorr_mindvis", "ssim_mindvis")
#: The model's metrics shown only where some subject has them: MinD-Vis's own pixel metrics, and retrieval in the
#: image prior's embedding space (a decoder that records its decoded embedding, an image prior).
SCORED_METRICS = MINDVIS_METRICS + ("retrieval_brain_to_image_top1", "retrieval_image_to_brain_top1")
# A baseline's or ceiling's key metric: the first of these it has.
KEY_METRICS = tables.KEY_METRICS
# Where each subject's metrics.json lies relative to summary.csv (results/summary.csv).
METRICS_BESIDE_SUMMARY = "{subject}/evaluation/metrics.json"
#: The subsets of the table, in order (``all``: the columns without a prefix).
SUBSETS = ("all", "seen", "novel")
#: The column of each subset's number of test stimuli (before the prefix).
N_STIMULI = "n_stimuli"
#: The column naming the classifier that scored each subject (the only column of text).
CLASSIFIER = "classifier"
#: The metrics whose paired comparisons the summary lists (the per-subject report lists every one).
COMPARISON_METRICS = ("n_way_top1_mean", "label_top1_mean", "two_way_id", "pixcorr", "ssim")


def column_name(subset, row_id, metric):
    """``{row}/{metric}`` for all stimuli, ``{subset}:{row}/{metric}`` for a subset (``row_id`` None: the subset's
    ``n_stimuli`` column)."""
    name = N_STIMULI if row_id is None else f"{row_id}/{metric}"
    return name if subset == "all" else f"{subset}:{name}"


def parse_column(column):
    """``(subset, row_id, metric)`` of a column name (row_id None for an ``n_stimuli`` column)."""
    subset, _, name = column.rpartition(":")
    subset = subset or "all"
    if name == N_STIMULI:
        return subset, None, N_STIMULI
    row_id, metric = name.split("/", 1)
    return subset, row_id, metric


def _key_metric(metrics, row_id):
    for metric in KEY_METRICS:
        if tables.metric_value(metrics, row_id, metric) is not None:
            return metric
    return KEY_METRICS[0]


def _n_stimuli(metrics, subset):
    if subset == "all":
        return metrics["n_stimuli"]
    entry = (metrics.get("subsets") or {}).get(subset)
    return None if entry is None else entry.get("n_stimuli")


def summary_table(metrics_list):
    """One row per subject and a mean row.

    Parameters
    ----------
    metrics_list : list of dict
        Parsed ``metrics.json`` of each subject (:func:`mindvis.report.tables.load_metrics`).

    Returns
    -------
    pandas.DataFrame
        Index ``subject`` (the subjects, then ``mean``); columns :func:`column_name` (NaN where unavailable):
        all stimuli, then the seen and novel subsets when ``metrics.json`` records them; ``attrs['titles']`` maps
        columns to display titles (without the subset, which heads each table).
    """
    if not metrics_list:
        raise MindvisError("no metrics.json given", key="metrics", fix="run the evaluate stage first.")
    reference = metrics_list[0]
    labels = {row["id"]: row["label"] for row in reference["rows"]}
    scored = {metric for metrics in metrics_list for metric in SCORED_METRICS
              if tables.metric_value(metrics, MODEL_ROW, metric) is not None}
    picked = [(MODEL_ROW, metric) for metric in MODEL_METRICS + tuple(m for m in SCORED_METRICS if m in scored)]
    picked += [(row["id"], _key_metric(reference, row["id"])) for row in reference["rows"] if row["id"] != MODEL_ROW]
    has_subsets = any(metrics.get("subsets") for metrics in metrics_list)
    columns, titles = [], {}
    for subset in SUBSETS if has_subsets else ("all",):
        columns.append((subset, None, N_STIMULI))
        titles[column_name(subset, None, N_STIMULI)] = "test stimuli"
        for row_id, metric in picked:
            if subset != "all" and metric in tables.SET_METRICS:
                continue
            columns.append((subset, row_id, metric))
            title = f"{labels.get(row_id, row_id)}: {tables.METRIC_TITLES[metric]}"
            titles[column_name(subset, row_id, metric)] = title
    records = {}
    for metrics in metrics_list:
        values = [_n_stimuli(metrics, subset) if row_id is None else
                  tables.metric_value(metrics, row_id, metric, subset) for subset, row_id, metric in columns]
        records[metrics["subject"]] = [np.nan if value is None else float(value) for value in values]
    frame = pd.DataFrame.from_dict(records, orient="index", columns=[column_name(*column) for column in columns])
    frame.loc["mean"] = frame.mean(axis=0, skipna=False)
    names = [classifier_name(metrics) for metrics in metrics_list]
    frame.insert(0, CLASSIFIER, names + [names[0] if len(set(names)) == 1 else "mixed"])
    frame.index.name = "subject"
    frame.attrs["titles"] = titles
    return frame


def classifier_name(metrics):
    """The name of the classifier that scored ``metrics.json`` (``unknown`` where it records none)."""
    return str((metrics.get("classifier") or {}).get("name") or "unknown")


def _numeric_columns(frame):
    return [column for column in frame.columns if column != CLASSIFIER]


def _classifier_line(frame):
    """'Classifier metrics scored by X' (per subject where they differ); '' without the column."""
    if CLASSIFIER not in frame.columns:
        return ""
    names = frame[CLASSIFIER].drop(index="mean", errors="ignore")
    if names.nunique() == 1:
        return f"Classifier metrics (n-way, 2-way, FID) scored by the classifier '{names.iloc[0]}'."
    each = ", ".join(f"{subject}: '{name}'" for subject, name in names.items())
    return f"Classifier metrics (n-way, 2-way, FID) scored by: {each}."


def summary_notes(metrics_list, frame):
    """Why cells of the summary are empty, one line per subject and reason.

    Parameters
    ----------
    metrics_list : list of dict
        Parsed ``metrics.json`` of each subject.
    frame : pandas.DataFrame
        :func:`summary_table` (its columns :func:`column_name`).

    Returns
    -------
    list of str
        ``"{subject}: {columns}: {reason}"``, columns named as the printed table names them.
    """
    lines = []
    for metrics in metrics_list:
        reasons = {}
        for column in _numeric_columns(frame):
            subset, row_id, metric = parse_column(column)
            if subset != "all":
                entry = (metrics.get("subsets") or {}).get(subset)
                if entry is None or not entry.get("available", True):
                    reason = (f"{subset} subset omitted ({entry.get('reason') or 'no reason given'})" if entry
                              else "no seen / novel subsets in this metrics.json (evaluated by an older mindvis)")
                    listed = reasons.setdefault(reason, [])
                    if f"{subset}:*" not in listed:  # every column of the subset: named once
                        listed.append(f"{subset}:*")
                    continue
            if row_id is None:
                continue
            row = tables.row_by_id(metrics, row_id)
            if row is None:
                continue
            entry = tables.row_metrics(metrics, row, subset).get(metric)
            if not row["available"]:
                reason = f"row not available ({row.get('reason') or 'no reason given'})"
            elif entry is not None and entry.get("value") is None and entry.get("reason"):
                reason = f"withheld ({entry['reason']})"
            else:
                continue
            reasons.setdefault(reason, []).append(column)
        lines.extend(f"{metrics['subject']}: {', '.join(columns)}: {reason}" for reason, columns in reasons.items())
    return lines


#: What the headline (:func:`headline_text`) calls each row; the report and summary.html keep the full labels.
SHORT_LABELS = {
    "chance": "chance (guessing)", "shuffled-pairs": "shuffled pairs", "mean-train-image": "mean training image",
    "dcldm": "DC-LDM (the decoder)", "dcldm-start": "DC-LDM before fine-tuning",
    "dcldm-lowlevel": "DC-LDM, low-level start", "dcldm-prior": "DC-LDM + embedding prior",
    "dcldm-prior-lowlevel": "DC-LDM + embedding prior, low-level", "dcldm-shared": "DC-LDM shared by subjects",
    "dcldm-fewshot": "DC-LDM few-shot (new subject)", "dcldm-baseline": "DC-LDM without SC-MBM",
    "ridge": "ridge fMRI -> VAE latent", "ridge-pixels": "ridge fMRI -> pixels",
    "ridge-embedding": "ridge fMRI -> prior embedding", "fmri-linear": "linear classifier on fMRI",
    "embedding-prototype": "fMRI -> nearest class prototype", "base-ceiling": "prior given the true image",
    "true-images": "classifier on the true images",
}
#: The headline's order of row kinds: each decoder beside its baselines, floors and ceilings.
HEADLINE_KINDS = ("model", "baseline", "floor", "ceiling")
#: What the headline calls each kind.
KIND_TITLES = {"model": "decoder", "baseline": "baseline", "floor": "floor", "ceiling": "ceiling"}
#: Rows whose headline figure is not the first of :data:`KEY_METRICS` they have: the true images' n-way top-1
#: is 1 by definition (they are their own ground truth), so their line shows the classifier's label top-1, and
#: no line where the summary has no such column.
ROW_KEY_METRICS = {"true-images": "label_top1_mean"}
#: What the headline calls each key metric (:data:`KEY_METRICS`).
KEY_METRIC_TITLES = {"n_way_top1_mean": "n-way", "label_top1_mean": "label top-1", "pixcorr": "PixCorr"}


def summary_rows(metrics_list):
    """Each row of the evaluation, with its kind and, when no subject has it, why (for :func:`headline_text`).

    Returns
    -------
    list of dict
        ``id``, ``kind`` (floor / model / baseline / ceiling), ``label`` and ``left_out`` (the first subject's
        reason when the row is unavailable for every subject, else None), in the order of ``metrics.json``.
    """
    out = []
    for row in (metrics_list[0]["rows"] if metrics_list else []):
        found = [tables.row_by_id(metrics, row["id"]) for metrics in metrics_list]
        available = [entry for entry in found if entry is not None and entry.get("available")]
        reason = None if available else (row.get("reason") or "not available")
        out.append({"id": row["id"], "kind": row.get("kind", "baseline"), "label": row["label"], "left_out": reason})
    return out


def summary_warnings(metrics_list):
    """What the run warns about, once per distinct warning (subjects named): the image classifier's check
    (:mod:`mindvis.evaluate.classifier_check`) and the prior's (:mod:`mindvis.evaluate.prior_check`).

    Returns
    -------
    list of str
    """
    found = {}
    for metrics in metrics_list:
        classifier = metrics.get("classifier") or {}
        if classifier.get("usable") is False and classifier.get("reason"):
            found.setdefault(f"{classifier['reason']} (every n-way, 2-way and FID figure withheld)", []).append(
                metrics["subject"])
        prior = metrics.get("prior") or {}
        if prior.get("usable") is False and prior.get("reason"):
            found.setdefault(prior["reason"], []).append(metrics["subject"])
    return [f"{', '.join(subjects)}: {warning}" for warning, subjects in found.items()]


def _headline_cell(frame, subset, row_id, metric, subjects):
    """``mean (lowest-highest)`` over subjects of one column; ``n/a`` where the column is missing or empty."""
    column = column_name(subset, row_id, metric)
    if column not in frame.columns or np.isnan(frame.loc["mean", column]):
        return "n/a"
    mean = tables.format_value(metric, frame.loc["mean", column])
    if len(subjects) < 2:
        return mean
    values = frame.loc[subjects, column]
    return f"{mean} ({tables.format_value(metric, values.min())}-{tables.format_value(metric, values.max())})"


def headline_text(frame, rows, warnings=(), csv_path="results/summary.csv"):
    """The headline for the terminal: one table, about 30 lines, and where the rest is.

    Parameters
    ----------
    frame : pandas.DataFrame
        :func:`summary_table` (or :func:`read_summary`).
    rows : list of dict
        :func:`summary_rows`: rows unavailable for every subject are left out, one line naming them and why.
    warnings : sequence of str
        :func:`summary_warnings`, printed above the table.
    csv_path : path
        The summary CSV, to say where summary.html and the per-subject reports lie.

    Returns
    -------
    str
        Each row's key metric (n-way top-1, mean of the k samples; else its top-1 against the labels; else
        PixCorr) on all / seen / novel test stimuli: the mean over subjects, and the lowest and highest subject.
    """
    csv_path = Path(csv_path)
    subjects = [subject for subject in frame.index if subject != "mean"]
    subsets = [subset for subset in SUBSETS if column_name(subset, None, N_STIMULI) in frame.columns]
    keys = {}
    for column in _numeric_columns(frame):
        subset, row_id, metric = parse_column(column)
        if subset == "all" and row_id is not None and row_id not in keys and (
                metric == ROW_KEY_METRICS[row_id] if row_id in ROW_KEY_METRICS
                else metric in KEY_METRICS if row_id != MODEL_ROW else metric == KEY_METRICS[0]):
            keys[row_id] = metric
    ordered = sorted((row for row in rows if row["id"] in keys and not row["left_out"]),
                     key=lambda row: HEADLINE_KINDS.index(row["kind"]) if row["kind"] in HEADLINE_KINDS else 9)
    spread = ", and (lowest-highest subject)" if len(subjects) > 1 else ""
    lines = [f"Each row's key metric, mean over {len(subjects)} subject{'s' if len(subjects) != 1 else ''}{spread}:",
             "n-way top-1 (mean of k samples); label top-1 or PixCorr where a row has no n-way figure."]
    if _classifier_line(frame):
        lines.append(_classifier_line(frame))
    lines.extend(f"WARNING: {warning}" for warning in warnings)
    header = ["", "row", "metric"] + [f"{subset} ({_format_cell(N_STIMULI, frame.loc['mean', column_name(subset, None, N_STIMULI)])})"
                                      for subset in subsets]
    body = [[KIND_TITLES.get(row["kind"], row["kind"]), SHORT_LABELS.get(row["id"], row["id"]),
             KEY_METRIC_TITLES.get(keys[row["id"]], keys[row["id"]])]
            + [_headline_cell(frame, subset, row["id"], keys[row["id"]], subjects) for subset in subsets]
            for row in ordered]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    for line in [header] + body:
        cells = [line[i].ljust(widths[i]) if i < 3 else line[i].rjust(widths[i]) for i in range(len(line))]
        lines.append("  " + "  ".join(cells).rstrip())
    left_out = [row for row in rows if row["left_out"]]
    if left_out:
        lines.append("Left out, as no subject has them:")
        lines.extend(f"  {SHORT_LABELS.get(row['id'], row['id'])}: {row['left_out']}" for row in left_out)
    empty = sum(1 for row in ordered for subset in subsets
                if _headline_cell(frame, subset, row["id"], keys[row["id"]], subjects) == "n/a")
    html_path, reports = csv_path.with_suffix(".html"), f"{csv_path.parent}/<subject>/report.html"
    where = [(str(html_path), "every metric of each subject, why cells are empty, the paired comparisons"),
             (str(csv_path), "every number, unrounded"),
             (reports, "each subject's decoded images, every row with its interval"),
             ("mindvis summary --full", "every table and comparison, printed here")]
    if empty:
        lines.append(f"{empty} cell{'s' if empty != 1 else ''} n/a: why, per subject, in {html_path}.")
    lines.append("The rest:")
    width = max(len(place) for place, _ in where)
    lines.extend(f"  {place.ljust(width)}  {what}" for place, what in where)
    return "\n".join(lines)


def summary_comparisons(metrics_list):
    """Each subject's paired comparisons of :data:`COMPARISON_METRICS`, formatted.

    Returns
    -------
    list of dict
        :func:`mindvis.report.tables.comparison_rows` entries with ``subject`` added.
    """
    return [{"subject": metrics["subject"], **row} for metrics in metrics_list
            for row in tables.comparison_rows(metrics, COMPARISON_METRICS)]


def _format_cell(metric, value):
    if value is None or np.isnan(value):
        return "n/a"
    if metric == N_STIMULI:
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return tables.format_value(metric, value)


def _formatted(frame):
    """The table with every number formatted as the report shows it."""
    out = frame.copy().astype(object)
    for column in _numeric_columns(frame):
        metric = parse_column(column)[2]
        out[column] = [_format_cell(metric, v) for v in frame[column]]
    return out


def _subset_columns(frame):
    """Subset -> its columns of ``frame``, in :data:`SUBSETS` order (subsets without a column left out)."""
    groups = {}
    for column in _numeric_columns(frame):
        groups.setdefault(parse_column(column)[0], []).append(column)
    return {subset: groups[subset] for subset in SUBSETS if subset in groups}


def summary_html(frame, title, notes=(), comparisons=(), warnings=()):
    """A self-contained HTML page of the summary tables (inline CSS, no script): one per subset of
    :func:`summary_table`; ``notes``: :func:`summary_notes`; ``comparisons``: :func:`summary_comparisons`;
    ``warnings``: :func:`summary_warnings`, above the tables."""
    versions = software_versions()
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    formatted = _formatted(frame)
    titles = frame.attrs.get("titles", {})
    sections = []
    for subset, columns in _subset_columns(frame).items():
        head = "".join(f'<th data-column="{html.escape(c)}">{html.escape(titles.get(c, c))}</th>' for c in columns)
        body = []
        for subject, row in formatted[columns].iterrows():
            cells = "".join(f'<td data-column="{html.escape(c)}">{html.escape(v)}</td>' for c, v in row.items())
            css = ' class="mean"' if subject == "mean" else ""
            body.append(f'<tr{css}><td class="label">{html.escape(str(subject))}</td>{cells}</tr>')
        sections.append(f'<h2>{html.escape(tables.SUBSET_TITLES[subset])}</h2>\n'
                        f'<table data-subset="{subset}"><thead><tr><th>subject</th>{head}</tr></thead><tbody>\n'
                        f'{chr(10).join(body)}\n</tbody></table>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 0.3em 0.55em; text-align: right; }}
th {{ background: #f3f3f3; max-width: 11em; }} td.label {{ text-align: left; }}
tr.mean td {{ font-weight: 600; border-top: 2px solid #888; }}
tr.above-zero td {{ font-weight: 600; background: #eefbea; }}
.warning {{ background: #fff4e5; border-left: 4px solid #d97706; padding: 0.5em 0.8em 0.5em 2em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>One row per subject and the mean over subjects, for all test stimuli and again for the seen categories (among
the subject's training trials) and the novel ones (absent from them), each with its number of test stimuli.
DC-LDM columns: the model; the others: each baseline's and ceiling's key metric (n-way top-1, mean of k). FID:
lower is better (not per subset: it compares whole sets). Per-subject reports with confidence
intervals: <code>results/&lt;subject&gt;/report.html</code>. <span id="classifier">{html.escape(_classifier_line(frame), quote=False)}</span> Written {html.escape(written)} by mindvis
{html.escape(versions.get("mindvis", "?"))} (torch {html.escape(versions.get("torch", "?"))}).</p>
{_warnings_html(warnings)}{chr(10).join(sections)}
{_notes_html(notes)}{_comparisons_html(comparisons)}</body></html>
"""


def _comparisons_html(comparisons):
    if not comparisons:
        return ""
    rows = []
    for row in comparisons:
        css = "above-zero" if row["above_zero"] else "not-above-zero"
        cells = [row["subject"], row["pair"], row["subset"], row["title"], row["difference"], row["ci"], row["verdict"]]
        rows.append(f'<tr class="{css}">' + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    return ('<h2>Paired comparisons</h2><p>Mean over test stimuli of a - b with its paired-bootstrap interval '
            '(the same resampled stimuli for both rows); in bold where the interval lies above 0.</p>'
            '<table id="comparisons"><thead><tr><th>subject</th><th>a - b</th><th>stimuli</th><th>metric</th>'
            '<th>difference</th><th>interval</th><th>interval</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _warnings_html(warnings):
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(warning)}</li>" for warning in warnings)
    return f'<ul id="warnings" class="warning">{items}</ul>\n'


def _notes_html(notes):
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return f'<h2>Empty cells</h2><ul id="empty-cells">{items}</ul>'



def summary_text(frame, notes=(), comparisons=(), warnings=()):
    """The tables as plain text for the terminal, one per subset: one line per ``row/metric``, one column per
    subject and the mean; then why cells are empty (``notes``: :func:`summary_notes`) and the paired comparisons
    (``comparisons``: :func:`summary_comparisons`); ``warnings`` (:func:`summary_warnings`) above the tables."""
    formatted = _formatted(frame)
    blocks = []
    for subset, columns in _subset_columns(frame).items():
        table = formatted[columns].T
        table.index = [column.rpartition(":")[2] for column in columns]
        table.index.name = "row/metric"
        blocks.append(f"{tables.SUBSET_TITLES[subset]}:\n{table.to_string()}")
    text = "\n\n".join(blocks)
    if warnings:
        text = "\n".join(f"WARNING: {warning}" for warning in warnings) + f"\n\n{text}"
    if _classifier_line(frame):
        text = f"{_classifier_line(frame)}\n\n{text}"
    if notes:
        text += "\n\nEmpty cells (n/a):\n" + "\n".join(f"  {note}" for note in notes)
    if comparisons:
        lines = [f"  {row['subject']}  {row['a']} - {row['b']}  {row['subset']:<5}  {row['metric']:<16}"
                 f"{row['difference']:>8} {row['ci']:<18} {row['verdict']}" for row in comparisons]
        text += "\n\nPaired comparisons (a - b, paired bootstrap interval):\n" + "\n".join(lines)
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
    frame.attrs["comparisons"] = summary_comparisons(metrics_list)
    frame.attrs["rows"] = summary_rows(metrics_list)
    frame.attrs["warnings"] = summary_warnings(metrics_list)
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, float_format="%.6g")
    with atomic_path(html_path) as tmp:
        Path(tmp).write_text(summary_html(frame, title, frame.attrs["notes"], frame.attrs["comparisons"],
                                          frame.attrs["warnings"]), encoding="utf-8")
    return frame


def read_summary(csv_path):
    """Read ``summary.csv`` back (for printing it); ``attrs['notes']`` and ``attrs['comparisons']`` from the
    subjects' ``metrics.json`` beside it (:data:`METRICS_BESIDE_SUMMARY`), where they exist."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise MindvisError("summary table not found", path=csv_path, fix="run `snakemake decode` first.")
    fix = ("give the summary.csv that `mindvis summary --metrics ...` wrote, or rewrite it: rerun mindvis summary "
           "with --metrics and --html.")
    try:
        frame = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as error:
        raise MindvisError(f"not a readable summary CSV ({type(error).__name__}: {' '.join(str(error).split())})",
                           path=csv_path, fix=fix) from None
    if "subject" not in frame.columns:
        raise MindvisError(f"not a mindvis summary table: no 'subject' column (found: "
                           f"{', '.join(map(str, frame.columns[:5]))})", path=csv_path, key="subject", fix=fix)
    frame = frame.set_index("subject")
    for column in _numeric_columns(frame):
        subset, _, name = str(column).rpartition(":")
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        if (name != N_STIMULI and "/" not in name) or (subset and subset not in SUBSETS) or not numeric:
            raise MindvisError(f"column {str(column)!r} is not a summary column (row/metric with numbers)",
                               path=csv_path, key=str(column), fix=fix)
    paths = [csv_path.parent / METRICS_BESIDE_SUMMARY.format(subject=subject) for subject in frame.index
             if subject != "mean"]
    existing = [path for path in paths if path.exists()]
    metrics_list = [tables.load_metrics(path) for path in existing]
    frame.attrs["notes"] = summary_notes(metrics_list, frame) if existing else []
    frame.attrs["comparisons"] = summary_comparisons(metrics_list)
    frame.attrs["rows"] = summary_rows(metrics_list) if existing else _rows_from_columns(frame)
    frame.attrs["warnings"] = summary_warnings(metrics_list)
    return frame


def _rows_from_columns(frame):
    """:func:`summary_rows` from the CSV alone (no metrics.json beside it): kinds from the evaluation's rows."""
    from mindvis.evaluate.table import ROWS

    kinds = {row_id: (label, kind) for row_id, label, kind in ROWS}
    columns = {}
    for column in _numeric_columns(frame):
        row_id = parse_column(column)[1]
        if row_id is not None:
            columns.setdefault(row_id, []).append(column)
    empty = "no subject has a figure (no metrics.json beside the CSV to say why)"
    return [{"id": row_id, "kind": kinds.get(row_id, (row_id, "baseline"))[1],
             "label": kinds.get(row_id, (row_id,))[0],
             "left_out": empty if frame[names].isna().all().all() else None} for row_id, names in columns.items()]
