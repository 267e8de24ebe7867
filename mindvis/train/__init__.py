"""Training: the shared engine (:mod:`mindvis.train.engine`) and one entry point per stage."""
