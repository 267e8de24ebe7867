# Preprocessing: BIDS runs to per-trial responses (one job per subject) and
# resting-state runs to cleaned time points (the SC-MBM pretraining corpus).
# Only for BIDS sources; adapter sources make responses.h5 in the convert rule.

if not USES_ADAPTER:

    rule preprocess:
        """One subject's task runs to results/{subject}/responses.h5 (+ preprocess_report.json)."""
        input:
            manifest=subject_manifest,
            stimuli=STIMULI,
            template=template_mask_input,
        output:
            responses="results/{subject}/responses.h5",
            report="results/{subject}/preprocess_report.json",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            bids=manifest_bids_root,
            digest=config_digest("preprocess"),
        log:
            "logs/preprocess/{subject}.log",
        benchmark:
            "logs/benchmarks/preprocess/{subject}.tsv",
        wildcard_constraints:
            subject=r"sub-(?!rest)[A-Za-z0-9]+",
        threads: stage_threads("preprocess")
        resources:
            **stage_resources("preprocess"),
        shell:
            "mindvis preprocess --config {params.config} --bids-dir {params.bids} --subject {wildcards.subject}"
            " --stimuli {input.stimuli} --out {output.responses} --threads {threads} > {log} 2>&1"


rule preprocess_rest:
    """One resting-state subject's runs to cleaned, per-run z-scored time points."""
    input:
        manifest=subject_manifest,
        template=template_mask_input,
    output:
        rest="results/pretrain/rest/{subject}.h5",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        bids=manifest_bids_root,
        digest=config_digest("preprocess"),
    log:
        "logs/preprocess_rest/{subject}.log",
    benchmark:
        "logs/benchmarks/preprocess_rest/{subject}.tsv",
    wildcard_constraints:
        subject=r"sub-rest[0-9]+",
    threads: stage_threads("preprocess")
    resources:
        **stage_resources("preprocess"),
    shell:
        "mindvis preprocess-rest --config {params.config} --bids-dir {params.bids} --subject {wildcards.subject}"
        " --out {output.rest} --threads {threads} > {log} 2>&1"
