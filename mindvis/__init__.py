"""mindvis: decode what a person saw from fMRI.

Stages (one sub-package each): ``data`` (file contracts and sources),
``simulate`` (the embedded simulated experiment), ``preprocess`` (BIDS runs to
per-trial responses), ``models`` (SC-MBM, conditioning, DC-LDM), ``train``
(the shared training engine), ``generate``, ``evaluate`` and ``report``.
"""

__version__ = "0.1.0"
