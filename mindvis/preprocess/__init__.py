"""BIDS runs to per-trial voxel responses (``responses.h5``) and cleaned rest runs.

Modules: :mod:`~mindvis.preprocess.bids` (find and read runs, events, sidecars,
confounds, ROI masks and the group template of ``preprocess.space: template``, with
validation), :mod:`~mindvis.preprocess.clean`
(nilearn signal cleaning), :mod:`~mindvis.preprocess.estimate` (LSS / LSA
single-trial betas with nilearn's GLM, lag averages), :mod:`~mindvis.preprocess.quality`
(tSNR, noise ceiling) and :mod:`~mindvis.preprocess.run` (the two entry points
the command line calls).

May import: ``data``, ``config``, ``utils``, ``errors`` (not ``simulate``: the file names both use are in
:mod:`mindvis.data.bids_layout`).
"""
