"""Scoring decoded images: ``metrics`` (n-way top-1, 2-way identification, PixCorr, SSIM, FID, bootstrap),
``baselines`` (ridge, fMRI probe, base given the true class), ``table`` (rows and their intervals) and the
``evaluate`` stage (``run``).

May import: every layer below it (``train``, ``generate``, ``models``, ``data`` ...); not ``report`` or ``cli``.
"""
