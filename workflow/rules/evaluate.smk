# Evaluation: the model's samples beside every baseline and ceiling, scored alike (metrics.json).


rule evaluate:
    """One subject's metrics with CIs (all, seen- and novel-category stimuli): chance, DC-LDM (at its start, from
    the ridge latent, without pretraining), ridges (into the prior's embedding: sampled), fMRI classifier,
    ceilings, retrieval in the prior's embedding space, and paired comparisons."""
    input:
        samples="results/{subject}/samples/samples.h5",
        baseline=baseline_samples_input,
        start=start_samples_input,
        lowlevel=lowlevel_samples_input,
        prior=prior_samples_input,
        prior_lowlevel=prior_lowlevel_samples_input,
        shared=shared_samples_input,
        fewshot=fewshot_samples_input,
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        base=ldm_base_input,
        classifier=classifier_input,
    output:
        # Also written: ridge/, ridge-pixels/, ridge-embedding/ and base-ceiling/ (samples.h5 + grid.png) when those
        # rows are available.
        metrics="results/{subject}/evaluation/metrics.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        baseline=baseline_samples_flag,
        start=start_samples_flag,
        lowlevel=lowlevel_samples_flag,
        prior=prior_samples_flag,
        shared=shared_samples_flag,
        base=ldm_base_dir,
        classifier=classifier_flag,
        out_dir=output_dir,
        digest=config_digest("evaluate", "generate"),
    log:
        "logs/evaluate/{subject}.log",
    benchmark:
        "logs/benchmarks/evaluate/{subject}.tsv",
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    shell:
        "mindvis evaluate --config {params.config} --subject {wildcards.subject} --responses {input.responses}"
        " --stimuli {input.stimuli} --samples {input.samples} {params.baseline} {params.start}"
        " {params.lowlevel} {params.prior} {params.shared} --base {params.base}"
        " {params.classifier} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"
