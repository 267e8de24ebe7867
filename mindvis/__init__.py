"""mindvis: decode what a person saw from fMRI.

Layers, bottom up; each package imports only those below it, function-local
imports included (the ``layers`` contract in ``pyproject.toml``, checked by
``lint-imports`` in ``make test``)::

    cli                    the command line the Snakemake rules call
    report                 per-subject HTML reports, the summary table
    evaluate               metrics, baselines, ceilings, the evaluation table
    train                  the engine and every training entry point
    generate               sampling, attention capture, the one decode()
    models                 every nn.Module and its save / load; linear fMRI models
    simulate | preprocess  producers of data (independent of each other)
    data                   file contracts (stimuli, responses, BIDS names) and real-data sources
    config                 the schema and its validation
    utils                  atomic writes, hashes, seeds, threads, the device and precision
    errors                 MindvisError

What two layers share lives in the lower one: a stage never reaches up.
"""

__version__ = "0.1.0"
