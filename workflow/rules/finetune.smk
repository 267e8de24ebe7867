# Per-subject DC-LDM fine-tuning on the training trials (model selection on the val split only),
# with SC-MBM pretraining (dcldm/) and, if finetune.baseline, without it (dcldm-baseline/).


rule finetune:
    """One subject's decoder: SC-MBM encoder + mapper + UNet cross-attention and norms."""
    input:
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        base=ldm_base_input,
        mbm=mbm_input,
        classifier=classifier_input,
    output:
        weights="results/{subject}/dcldm/dcldm.safetensors",
        meta="results/{subject}/dcldm/dcldm.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        base=ldm_base_dir,
        classifier=classifier_flag,
        out_dir=output_dir,
        encoder=encoder_flag,
        digest=config_digest("ldm", "mbm", "finetune", "generate"),  # generate: the start and low-level start it writes
        released=released_flag,
        launch=launcher("finetune"),
        threads=process_threads("finetune"),
    log:
        "logs/finetune/{subject}.log",
    benchmark:
        "logs/benchmarks/finetune/{subject}.tsv",
    threads: stage_threads("finetune")
    resources:
        **stage_resources("finetune"),
    # The decoder before its ablation, so the decoded images come first when cores are few.
    priority: 20
    shell:
        # --resume: a retried job continues from its last checkpoint of this config and these inputs.
        "{params.launch} finetune --config {params.config} --subject {wildcards.subject} --responses {input.responses}"
        " --stimuli {input.stimuli} --base {params.base} --out-dir {params.out_dir} {params.encoder}"
        " {params.classifier} {params.released} --threads {params.threads} --resume > {log} 2>&1"


use rule finetune as finetune_baseline with:
    input:
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        base=ldm_base_input,
        classifier=classifier_input,
    output:
        weights="results/{subject}/dcldm-baseline/dcldm.safetensors",
        meta="results/{subject}/dcldm-baseline/dcldm.json",
    log:
        "logs/finetune/{subject}-baseline.log",
    benchmark:
        "logs/benchmarks/finetune/{subject}-baseline.tsv",
    priority: 10
