"""Adapters from real data sets to mindvis's files (``responses.h5`` and the stimulus HDF5).

``data.source`` in the config picks one:

=============  ===========================================  ==========================================
source         what it reads                                module
=============  ===========================================  ==========================================
``simulated``  the embedded simulated BIDS data set         (the ``preprocess`` stage, not an adapter)
``bids``       a lab's own BIDS data set                    (the ``preprocess`` stage, not an adapter)
``god_npz``    GOD as MinD-Vis ships it (``sbj_N.npz``)     :mod:`mindvis.data.sources.god`
``god_bdata``  GOD as Kamitani ships it (BData ``.h5``)     :mod:`mindvis.data.sources.god`
``bold5000``   BOLD5000 GLMsingle ROI betas (``.npy``)      :mod:`mindvis.data.sources.bold5000`
``nsd``        NSD single-trial betas (HDF5 or NIfTI)       :mod:`mindvis.data.sources.nsd`
``matrix``     a lab's own ``.npz`` / ``.mat`` / ``.h5``    :mod:`mindvis.data.sources.matrix`
=============  ===========================================  ==========================================

HCP resting state, the SC-MBM pretraining corpus, goes to the resting-state
file instead (:func:`mindvis.data.sources.hcp.convert_hcp_rest`).
"""

from __future__ import annotations

import importlib

from mindvis.errors import MindvisError

#: Adapter name -> "module:function" returning a SourceData for (config, subject).
ADAPTERS = {
    "god_npz": "mindvis.data.sources.god:read_god_npz",
    "god_bdata": "mindvis.data.sources.god:read_god_bdata",
    "bold5000": "mindvis.data.sources.bold5000:read_bold5000",
    "nsd": "mindvis.data.sources.nsd:read_nsd",
    "matrix": "mindvis.data.sources.matrix:read_matrix",
}
#: Sources the ``preprocess`` stage handles from BIDS.
BIDS_SOURCES = ("simulated", "bids")


def is_adapter_source(config):
    """True when ``data.source`` is read by an adapter (not preprocessed from BIDS)."""
    return config["data"]["source"] not in BIDS_SOURCES


def read_source(config, subject):
    """The :class:`~mindvis.data.sources.common.SourceData` of one subject, from ``data.source``."""
    name = config["data"]["source"]
    if name not in ADAPTERS:
        raise MindvisError(f"'{name}' is not read by an adapter (adapters: {', '.join(ADAPTERS)})",
                           key="data.source",
                           fix="run the 'preprocess' stage for BIDS sources, or pick an adapter source.")
    module_name, function = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(config, subject)


def convert_subject(config, subject, out_responses, out_stimuli):
    """Convert one subject of the configured source to ``responses.h5`` and a stimulus HDF5.

    Parameters
    ----------
    config : dict
        Validated experiment config.
    subject : str
        mindvis subject label (``sub-01``); ``data.subject_map`` names it in the source.
    out_responses, out_stimuli : str or Path

    Returns
    -------
    dict
        Summary of the conversion (trials per split, voxels kept and dropped).
    """
    from mindvis.data.sources.common import convert_source

    source = read_source(config, subject)
    try:
        return convert_source(source, config, subject, config["data"]["source"], out_responses, out_stimuli)
    finally:
        if source.close is not None:
            source.close()
