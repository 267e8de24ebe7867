"""Evaluation of decoded images: the domain classifier (:mod:`.classifier`) and the metrics built on it."""
