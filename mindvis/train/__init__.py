"""Training: the shared engine (``engine``, its checkpoint folders in ``checkpoint``) and one entry point per
trained artefact: SC-MBM (``pretrain_mbm``), the embedded base generator (``pretrain_ldm``), the domain
classifier (``classifier``) and per-subject DC-LDM fine-tuning (``finetune``).

May import: ``generate``, ``models``, ``data`` and below.
"""
