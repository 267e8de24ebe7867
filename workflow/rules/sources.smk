# Real data sets: data.source other than simulated / bids is read by an adapter
# (mindvis/data/sources/) into the same files the preprocess stage writes for
# BIDS. The convert rule exists only for adapter sources, and the preprocess
# rule only for BIDS sources, so exactly one rule can make responses.h5.

if USES_ADAPTER:

    rule convert:
        """One subject of a real data set to per-trial responses and its stimulus images."""
        output:
            responses="results/{subject}/responses.h5",
            stimuli="results/{subject}/stimuli.h5",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            digest=config_digest("stimuli", "preprocess", "data"),
        log:
            "logs/convert/{subject}.log",
        threads: 1
        resources:
            mem_mb=8000,
        shell:
            "mindvis convert --config {params.config} --subject {wildcards.subject}"
            " --out {output.responses} --stimuli-out {output.stimuli} --threads {threads} > {log} 2>&1"
