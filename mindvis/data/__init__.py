"""File contracts and data sources: what every stage reads and writes.

``stimuli`` and ``responses`` (the HDF5 contracts), ``bids_layout`` (file
names the simulator writes and the preprocessing reads), ``reliability``
(the one noise ceiling), ``images`` (uint8 images <-> tensors), ``pairs``
(fMRI trials with their images), ``image_corpus`` (a lab's images for
pretraining the prior: folders, arrays, IDX), ``sources`` (adapters from real data sets).

May import: ``config``, ``utils``, ``errors``.
"""
