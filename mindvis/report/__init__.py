"""Per-subject HTML reports and the summary table over subjects.

Public API
----------
``html.build_report(metrics_path, out_path, *, config, samples, responses, curves, figures_dir)``
    ``results/{subject}/report.html``: one self-contained file (embedded PNGs, inline CSS, no script).
``summary.write_summary(metrics_paths, csv_path, html_path)``
    ``results/summary.csv`` and ``results/summary.html``; ``summary.summary_text`` prints it.
``tables.format_value(metric, value)``, ``tables.format_ci(metric, ci)``
    The one number format of every table.
``brainmap.voxel_importance(maps, token_weights, patch_size, n_voxels)``
    The attention-based voxel importance of the brain map.
``brainmap.attribution_paths(model_dir, metrics)``
    Which decoder path (trained and carrying signal) each brain map may attribute importance through.

May import: every layer below it (``evaluate``, ``generate``, ``models``, ``data`` ...); not ``cli``.
"""
