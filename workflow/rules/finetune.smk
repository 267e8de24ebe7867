# Per-subject DC-LDM fine-tuning on the training trials (model selection on the val split only, by a
# criterion that reads no label and not the evaluation classifier),
# with SC-MBM pretraining (dcldm/) and, if finetune.baseline, without it (dcldm-baseline/).


rule finetune:
    """One subject's decoder: SC-MBM encoder + mapper + UNet cross-attention and norms."""
    input:
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        base=ldm_base_input,
        mbm=mbm_input,
    output:
        weights="results/{subject}/dcldm/dcldm.safetensors",
        meta="results/{subject}/dcldm/dcldm.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        base=ldm_base_dir,
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
        " {params.released} --threads {params.threads} --resume > {log} 2>&1"


use rule finetune as finetune_baseline with:
    input:
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        base=ldm_base_input,
    output:
        weights="results/{subject}/dcldm-baseline/dcldm.safetensors",
        meta="results/{subject}/dcldm-baseline/dcldm.json",
    log:
        "logs/finetune/{subject}-baseline.log",
    benchmark:
        "logs/benchmarks/finetune/{subject}-baseline.tsv",
    priority: 10


# One decoder shared by several subjects (finetune.shared, or implied by finetune.new_subject): one SC-MBM encoder,
# mapper and UNet cross-attention for every subject of SHARED_SUBJECTS, a linear adapter each; each subject's
# decoder is written as an ordinary decoder folder (results/{subject}/dcldm-shared/) that generate reads.
if SHARED_SUBJECTS:

    rule finetune_shared:
        """The shared decoder (results/shared/dcldm/) and every shared subject's view of it."""
        input:
            responses=expand("results/{subject}/responses.h5", subject=SHARED_SUBJECTS),
            stimuli=LDM_STIMULI,
            base=ldm_base_input,
            mbm=SHARED_MBM_INPUT,
        output:
            summary="results/shared/dcldm/shared.json",
            views=expand("results/{subject}/dcldm-shared/dcldm.json", subject=SHARED_SUBJECTS),
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            subjects=" ".join(SHARED_SUBJECTS),
            view_dirs=" ".join(f"results/{subject}/dcldm-shared" for subject in SHARED_SUBJECTS),
            base=ldm_base_dir,
            mbm=SHARED_MBM,
            digest=config_digest("ldm", "mbm", "finetune", "generate"),
            launch=launcher("finetune_shared"),
            threads=process_threads("finetune_shared"),
        log:
            "logs/finetune/shared.log",
        benchmark:
            "logs/benchmarks/finetune/shared.tsv",
        threads: stage_threads("finetune_shared")
        resources:
            **stage_resources("finetune_shared"),
        priority: 18
        shell:
            "{params.launch} finetune-shared --config {params.config} --subjects {params.subjects}"
            " --responses {input.responses} --stimuli {input.stimuli} --base {params.base} --mbm {params.mbm}"
            " --out-dir results/shared/dcldm --view-dirs {params.view_dirs}"
            " --threads {params.threads} --resume > {log} 2>&1"


# The few-shot subject: the shared decoder adapted to finetune.new_subject from finetune.train_fraction of its
# training trials; its own per-subject decoder (rule finetune) is trained from scratch on the same trials.
if NEW_SUBJECT:

    rule adapt_subject:
        """finetune.new_subject's decoder: the shared one with a new adapter (results/{subject}/dcldm-fewshot/)."""
        input:
            responses=f"results/{NEW_SUBJECT}/responses.h5",
            stimuli=LDM_STIMULI,
            views=expand("results/{subject}/dcldm-shared/dcldm.json", subject=SHARED_SUBJECTS),
            old=expand("results/{subject}/responses.h5", subject=SHARED_SUBJECTS),
        output:
            meta=f"results/{NEW_SUBJECT}/dcldm-fewshot/dcldm.json",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            subjects=" ".join(SHARED_SUBJECTS),
            view_dirs=" ".join(f"results/{subject}/dcldm-shared" for subject in SHARED_SUBJECTS),
            digest=config_digest("ldm", "mbm", "finetune", "generate"),
            launch=launcher("adapt_subject"),
            threads=process_threads("adapt_subject"),
        log:
            f"logs/finetune/{NEW_SUBJECT}-fewshot.log",
        benchmark:
            f"logs/benchmarks/finetune/{NEW_SUBJECT}-fewshot.tsv",
        threads: stage_threads("adapt_subject")
        resources:
            **stage_resources("adapt_subject"),
        priority: 17
        shell:
            "{params.launch} adapt-subject --config {params.config} --subject " + NEW_SUBJECT +
            " --responses {input.responses} --stimuli {input.stimuli} --shared-subjects {params.subjects}"
            " --shared-views {params.view_dirs} --shared-responses {input.old} --out-dir results/"
            + NEW_SUBJECT + "/dcldm-fewshot --threads {params.threads} --resume > {log} 2>&1"
