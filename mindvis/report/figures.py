"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes.

Figures are built as :class:`matplotlib.figure.Figure` objects on an Agg canvas,
without pyplot, so drawing them neither needs a display nor changes the
backend of the process that imports this module (a notebook keeps its own).

Every function takes plain arrays (or the parsed ``metrics.json``) and returns
``bytes``, so the HTML report can embed them (base64) and the Snakemake rule
can also write them as files for ``snakemake --report``.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Tiles of the image grids are shown at least this many pixels wide (nearest-neighbour upscaling
# keeps 32-pixel stimuli readable) and at most this many (keeps ImageNet-size reports small).
MIN_TILE_PIXELS = 64
MAX_TILE_PIXELS = 128
# Class axes with more classes than this get no tick labels, and figures stop growing with the class count.
MAX_LABELLED_CLASSES = 40
MAX_FIGURE_INCHES = 14.0
# Denoising steps shown per stimulus in the attention figure (evenly spaced, first and last included).
ATTENTION_STEPS_SHOWN = 5


def new_figure(figsize):
    """A matplotlib figure on its own Agg canvas (not registered with pyplot)."""
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure, dpi=90):
    """Render a matplotlib figure to PNG bytes (Agg)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def array_png(image):
    """uint8 [H, W, 3] (or [H, W]) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def placeholder_png(text):
    """A small figure that only says ``text`` (for a figure file that must exist but has nothing to show)."""
    figure = new_figure((4, 0.6))
    figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    return figure_png(figure)


def _tile_scale(side):
    """Integer upscale (or fractional downscale) that brings a tile side into the display range."""
    if side < MIN_TILE_PIXELS:
        return int(np.ceil(MIN_TILE_PIXELS / side))
    return min(1.0, MAX_TILE_PIXELS / side)


def _resize(image, scale):
    """uint8 [H, W, 3] resized by ``scale`` (nearest when enlarging, Lanczos when shrinking)."""
    if scale == 1:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.NEAREST if scale > 1 else Image.LANCZOS
    return np.asarray(Image.fromarray(image).resize(size, resample))


def image_grid_png(samples, true_images):
    """The true image of each stimulus beside its k samples, as one PNG.

    Parameters
    ----------
    samples : uint8 [N, k, H, W, C]
    true_images : uint8 [N, H0, W0, C0]
        Resized to H x W when they differ.

    Returns
    -------
    bytes
    """
    from mindvis.generate.writing import make_grid

    samples = np.asarray(samples)
    grid = make_grid(samples, truth=true_images)
    return array_png(_resize(grid, _tile_scale(samples.shape[2])))


def per_class_png(per_class, class_names, labels):
    """Grouped bars: accuracy per true class for each evaluated row.

    Parameters
    ----------
    per_class : dict of str -> list of float
        ``metrics.json`` ``per_class``: row id -> accuracy per class (NaN or None where a class has no stimulus).
    class_names : list of str
    labels : dict of str -> str
        Row id -> the label shown in the legend.
    """
    rows = [row for row in per_class if per_class[row] is not None]
    n_classes = len(class_names)
    figure = new_figure((min(MAX_FIGURE_INCHES, max(6.0, 0.7 * n_classes + 2)), 3.4))
    axes = figure.subplots()
    width = 0.8 / max(len(rows), 1)
    positions = np.arange(n_classes)
    for index, row in enumerate(rows):
        values = np.array([np.nan if v is None else v for v in per_class[row]], dtype=float)
        axes.bar(positions + (index - (len(rows) - 1) / 2) * width, values, width, label=labels.get(row, row))
    if n_classes <= MAX_LABELLED_CLASSES:
        axes.set_xticks(positions, class_names, rotation=45, ha="right")
    else:
        axes.set_xlabel("true class (index)")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy per true class")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(figure)


def confusion_png(confusion, class_names, title):
    """A confusion matrix (true label x predicted class) with counts in the cells."""
    confusion = np.asarray(confusion, dtype=float)
    n_classes = len(class_names)
    side = min(MAX_FIGURE_INCHES, 0.45 * n_classes + 2)
    figure = new_figure((side + 0.5, side))
    axes = figure.subplots()
    shown = axes.imshow(confusion, cmap="Blues")
    threshold = confusion.max() / 2 if confusion.size else 0
    if n_classes <= MAX_LABELLED_CLASSES // 2:
        for (i, j), count in np.ndenumerate(confusion):
            axes.text(j, i, f"{count:g}", ha="center", va="center", fontsize=7,
                      color="white" if count > threshold else "black")
    if n_classes <= MAX_LABELLED_CLASSES:
        axes.set_xticks(range(n_classes), class_names, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(n_classes), class_names, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true label")
    axes.set_title(title)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="samples")
    return figure_png(figure)


def _curve_panels(runs):
    """(stage, quantity) -> [(run, key, points)]: train and val losses share a panel, other val metrics get one each."""
    panels = {}
    for name, lines in runs.items():
        stage = name.split(":")[0]
        keys = sorted({key for line in lines for key in line if key == "train/loss" or key.startswith("val/")})
        for key in keys:
            points = [(line["epoch"] + 1, line[key]) for line in lines if line.get(key) is not None]
            if points:
                quantity = "loss" if key in ("train/loss", "val/loss") else key
                panels.setdefault((stage, quantity), []).append((name, key, points))
    return panels


def curves_png(runs):
    """Training curves per epoch: one panel per stage and quantity, one line per run and split.

    Parameters
    ----------
    runs : dict of str -> list of dict
        Run name (``"stage: run"``, e.g. ``"DC-LDM: SC-MBM pretrained"``) -> the engine's
        ``metrics.jsonl`` lines. ``train/loss`` (solid) and ``val/loss`` (dashed) share a
        panel; every other ``val/*`` metric gets its own.

    Returns
    -------
    bytes or None
        None when no run has a line.
    """
    from matplotlib.ticker import MaxNLocator

    panels = _curve_panels(runs)
    if not panels:
        return None
    n_cols = min(4, len(panels))
    n_rows = int(np.ceil(len(panels) / n_cols))
    figure = new_figure((3.4 * n_cols, 2.7 * n_rows))
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    colours = {name: f"C{index}" for index, name in enumerate(runs)}
    for axis, ((stage, quantity), lines) in zip(axes.flat, panels.items()):
        for name, key, points in lines:
            epochs, values = zip(*points)
            run = name.split(":", 1)[-1].strip()
            axis.plot(epochs, values, marker="o", markersize=3, color=colours[name],
                      linestyle="--" if key.startswith("val/") else "-",
                      label=f"{run}, {key.split('/')[0]}" if quantity == "loss" else run)
        axis.set_title(f"{stage}: {quantity}", fontsize=9)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    return figure_png(figure)


def _steps_shown(n_steps):
    return sorted(set(np.linspace(0, n_steps - 1, min(ATTENTION_STEPS_SHOWN, n_steps)).round().astype(int)))


def attention_png(maps, timesteps, samples, true_images, stimulus_ids, n_stimuli):
    """Cross-attention over denoising steps, overlaid on the sample it produced.

    For each stimulus, the context token it attends to most (mean over steps and
    positions) is shown at a few steps from the first to the last.

    Parameters
    ----------
    maps : float [S, A, h, w, T]
    timesteps : int [S]
    samples : uint8 [A, H, W, C]
        Sample 0 of each recorded stimulus.
    true_images : uint8 [A, H0, W0, C0]
    stimulus_ids : str [A]
    n_stimuli : int
        How many of the recorded stimuli to show.
    """
    maps = np.asarray(maps, dtype=np.float32)
    shown = min(int(n_stimuli), maps.shape[1])
    steps = _steps_shown(maps.shape[0])
    figure = new_figure((1.6 * (len(steps) + 2), 1.7 * shown))
    axes = figure.subplots(shown, len(steps) + 2, squeeze=False)
    for row in range(shown):
        token = int(maps[:, row].mean(axis=(0, 1, 2)).argmax())
        sample = _grey_or_rgb(samples[row])
        _show(axes[row, 0], _grey_or_rgb(true_images[row]), f"true {stimulus_ids[row]}")
        _show(axes[row, 1], sample, "sample 0")
        for column, step in enumerate(steps, start=2):
            heat = np.asarray(Image.fromarray(maps[step, row, :, :, token]).resize(
                (sample.shape[1], sample.shape[0]), Image.BILINEAR))
            _show(axes[row, column], sample, f"t={int(timesteps[step])}, token {token}")
            axes[row, column].imshow(heat, cmap="jet", alpha=0.5)
    figure.tight_layout()
    return figure_png(figure)


def _grey_or_rgb(image):
    image = np.asarray(image)
    return image[..., 0] if image.shape[-1] == 1 else image


def _show(axis, image, title):
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def fewshot_png(points, chance, full=None):
    """A new subject's learning curve: adapted from the shared decoder vs trained from scratch on the same trials.

    Parameters
    ----------
    points : list of dict
        One per share: ``n_train``, ``source`` (``"this run"`` or a benchmark's name), and ``adapted`` and
        ``scratch``, each ``{metric: {subset: {"value", "ci"}}}`` for ``n_way_top1_mean`` (subsets ``all``
        and ``novel``) and ``two_way_id`` (``all``); a missing cell is skipped.
    chance : dict
        Metric -> its chance level (``n_way_top1_mean``, ``two_way_id``).
    full : dict, optional
        The same metrics of the subject's own decoder on all its training trials (a horizontal line).

    Returns
    -------
    bytes or None
        None when no point has a value.
    """
    panels = [("n_way_top1_mean", "n-way top-1 (mean of k samples)"), ("two_way_id", "2-way identification")]
    drawn = [("adapted", "all", "adapted from the shared decoder", dict(color="C0", marker="o")),
             ("scratch", "all", "trained from scratch", dict(color="C1", marker="o")),
             ("adapted", "novel", "adapted, novel categories",
              dict(color="C0", marker="s", linestyle="--", markerfacecolor="white")),
             ("scratch", "novel", "from scratch, novel categories",
              dict(color="C1", marker="s", linestyle="--", markerfacecolor="white"))]
    sources = list(dict.fromkeys(point["source"] for point in points))
    figure = new_figure((9.0, 3.6))
    axes = figure.subplots(1, 2)
    anything = False
    for axis, (metric, title) in zip(axes, panels):
        for index, (variant, subset, label, style) in enumerate(drawn):
            for source in sources:
                cells = sorted((point["n_train"], point[variant].get(metric, {}).get(subset)) for point in points
                               if point["source"] == source)
                cells = [(n, cell) for n, cell in cells if cell and cell.get("value") is not None]
                if not cells:
                    continue
                anything = True
                x = np.array([n for n, _ in cells], np.float64) * 1.03 ** (index - 1.5)
                y = np.array([cell["value"] for _, cell in cells])
                error = np.abs(np.array([cell.get("ci") or [cell["value"]] * 2 for _, cell in cells],
                                        np.float64).T - y)
                this_run = source == "this run"
                axis.errorbar(x, y, yerr=error, capsize=2, linewidth=1.0 if this_run else 1.2,
                              label=f"{label} ({source})", markersize=9 if this_run else 5,
                              **{**style, **({"marker": "*", "linestyle": "none"} if this_run else {})})
        if full and (full.get(metric) or {}).get("all", {}).get("value") is not None:
            axis.axhline(full[metric]["all"]["value"], color="0.3", linewidth=1,
                         label="own decoder, all training trials")
        if chance.get(metric) is not None:
            axis.axhline(chance[metric], color="black", linestyle=":", linewidth=1, label="chance")
        axis.set_xscale("log")
        shown = sorted({point["n_train"] for point in points})
        axis.set_xticks(shown)
        axis.set_xticklabels([str(n) for n in shown], fontsize=7)
        axis.minorticks_off()
        axis.set_ylim(0, 1)
        axis.set_xlabel("the new subject's training trials (log)")
        axis.set_title(title, fontsize=9)
    if not anything:
        return None
    handles, labels = axes[0].get_legend_handles_labels()
    figure.tight_layout()
    figure.legend(handles, labels, loc="upper center", ncol=2, fontsize=6.5, frameon=False,
                  bbox_to_anchor=(0.5, 0.02))
    return figure_png(figure)
