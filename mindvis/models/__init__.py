"""Model modules: the SC-MBM fMRI autoencoder (:mod:`mindvis.models.mbm`), augmentations, and the
conditioning and generator parts of the decoder."""
