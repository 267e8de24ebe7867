# SC-MBM pretraining: one job over every subject's training trials and the resting-state
# corpus: the simulated rest subjects for the embedded default, HCP subjects (data.hcp.subjects)
# when listed. Test trials are never read; see mindvis.train.pretrain_mbm.
# With mbm.base other than 'embedded', adapt_mbm instead adapts that pretrained encoder (the shipped
# one for 'bundled') to each subject's train + val fMRI (+ test fMRI only if mbm.transductive).


rule pretrain_mbm:
    """Pretrain the masked brain model (the fMRI encoder) on all subjects; writes results/pretrain/mbm/."""
    input:
        responses=expand("results/{subject}/responses.h5", subject=SUBJECTS),
        rest=mbm_rest_inputs(),
    output:
        config="results/pretrain/mbm/config.json",
        weights="results/pretrain/mbm/diffusion_pytorch_model.safetensors",
        metrics="results/pretrain/mbm/metrics.jsonl",
        summary="results/pretrain/mbm/summary.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        out_dir=output_dir,
        digest=config_digest("mbm"),
        launch=launcher("pretrain_mbm"),
        threads=process_threads("pretrain_mbm"),
    log:
        "logs/pretrain_mbm.log",
    benchmark:
        "logs/benchmarks/pretrain_mbm.tsv",
    threads: stage_threads("pretrain_mbm")
    resources:
        **stage_resources("pretrain_mbm"),
    # The SC-MBM decoders wait for it: ahead of the jobs that can wait (evaluation, reports).
    priority: 40
    shell:
        # --resume: a retried job continues from its last checkpoint of this config and these inputs.
        "{params.launch} pretrain-mbm --config {params.config} --responses {input.responses} --rest {input.rest}"
        " --out-dir {params.out_dir} --threads {params.threads} --resume > {log} 2>&1"


rule adapt_mbm:
    """One subject's SC-MBM encoder: the pretrained mbm.base adapted to its fMRI (MinD-Vis's stage A2)."""
    input:
        responses="results/{subject}/responses.h5",
    output:
        config="results/{subject}/mbm/config.json",
        weights="results/{subject}/mbm/diffusion_pytorch_model.safetensors",
        metrics="results/{subject}/mbm/metrics.jsonl",
        summary="results/{subject}/mbm/summary.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        out_dir=output_dir,
        digest=config_digest("mbm"),
        launch=launcher("adapt_mbm"),
        threads=process_threads("adapt_mbm"),
    log:
        "logs/adapt_mbm/{subject}.log",
    benchmark:
        "logs/benchmarks/adapt_mbm/{subject}.tsv",
    threads: stage_threads("adapt_mbm")
    resources:
        **stage_resources("adapt_mbm"),
    priority: 40
    shell:
        "{params.launch} adapt-mbm --config {params.config} --subject {wildcards.subject} --responses {input.responses}"
        " --out-dir {params.out_dir} --threads {params.threads} --resume > {log} 2>&1"
