# Real data sets: data.source other than simulated / bids is read by an adapter
# (mindvis/data/sources/) into the same files the preprocess stage writes for
# BIDS. The convert rule exists only for adapter sources, and the preprocess
# rule only for BIDS sources, so exactly one rule can make responses.h5.
# HCP resting state (data.hcp.subjects) joins the SC-MBM corpus through convert_rest.

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
        benchmark:
            "logs/benchmarks/convert/{subject}.tsv",
        threads: stage_threads("convert")
        resources:
            **stage_resources("convert"),
        shell:
            "mindvis convert --config {params.config} --subject {wildcards.subject}"
            " --out {output.responses} --stimuli-out {output.stimuli} --threads {threads} > {log} 2>&1"


    rule merge_stimuli:
        """The subjects' stimulus files as one image corpus for pretrain_ldm (no test image of any subject trains)."""
        input:
            stimuli=subject_stimuli_all(),
        output:
            stimuli=LDM_STIMULI,
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
        log:
            "logs/merge_stimuli.log",
        benchmark:
            "logs/benchmarks/merge_stimuli.tsv",
        threads: stage_threads("merge_stimuli")
        resources:
            **stage_resources("merge_stimuli"),
        shell:
            "mindvis merge-stimuli --config {params.config} --stimuli {input.stimuli} --out {output.stimuli}"
            " > {log} 2>&1"


rule convert_rest:
    """One HCP subject's resting-state CIFTI runs (data.hcp) to a resting-state file for SC-MBM pretraining."""
    input:
        unpack(hcp_inputs),
    output:
        rest="results/pretrain/rest/hcp-{hcp_id}.h5",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        digest=config_digest("data"),
    log:
        "logs/convert_rest/hcp-{hcp_id}.log",
    benchmark:
        "logs/benchmarks/convert_rest/hcp-{hcp_id}.tsv",
    wildcard_constraints:
        hcp_id=r"[0-9]+",
    threads: stage_threads("convert_rest")
    resources:
        **stage_resources("convert_rest"),
    shell:
        "mindvis convert-rest --config {params.config} --hcp-subject {wildcards.hcp_id}"
        " --subject sub-hcp{wildcards.hcp_id} --out {output.rest} --threads {threads} > {log} 2>&1"
