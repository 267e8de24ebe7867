"""Sampling decoded images: samplers with classifier-free guidance (:mod:`.sampling`), cross-attention
capture (:mod:`.attention`), output files (:mod:`.writing`) and the ``generate`` stage (:mod:`.run`)."""
