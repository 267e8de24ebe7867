"""Every model and its save / load: SC-MBM (``mbm``), conditioning, the latent diffusion generator (``ldm``),
the DC-LDM decoder as one object (``dcldm``), image classifiers (``classifiers``), linear fMRI models
(``linear``), augmentations, safetensors weights (``weights``) and the import of MinD-Vis's checkpoint
(``mindvis_checkpoint``), and the shipped prior and classifier with their provenance checks (``bundled``,
``assets/``). Modules hold models, not training loops (those are in ``train``).

May import: ``data``, ``config``, ``utils``, ``errors``.
"""
