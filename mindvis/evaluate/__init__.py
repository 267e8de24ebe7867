"""Scoring decoded images: ``metrics`` (n-way top-1, 2-way identification, PixCorr, SSIM, retrieval in
embedding space, FID, bootstrap, Wilson interval), ``classifier_check`` (whether the image classifier can ground
the figures it scores), ``baselines`` (ridges into the VAE latent, into pixels and into the prior's embedding
(sampled by the frozen prior), the mean training image, fMRI probe, the embedding-prototype and base-generator
ceilings), ``table`` (rows, floors and their intervals, the seen- and
novel-category subsets, paired comparisons) and the ``evaluate`` stage (``run``).

May import: every layer below it (``train``, ``generate``, ``models``, ``data`` ...); not ``report`` or ``cli``.
"""
