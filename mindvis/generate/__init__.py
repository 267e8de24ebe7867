"""Sampling decoded images: samplers with classifier-free guidance (``sampling``), cross-attention capture
(``attention``), the one sampling entry point ``decode`` (``decode``: fMRI or classes -> images, used by
fine-tuning validation, the ``generate`` stage and the baselines), output files (``writing``) and the
``generate`` stage (``run``).

May import: ``models``, ``data`` and below.
"""
