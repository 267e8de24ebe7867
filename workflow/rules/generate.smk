# Decoded images: k samples per test stimulus from each fine-tuned decoder (PNGs, grid, samples.h5).


rule generate:
    """One subject's decoded test images (results/{subject}/samples/)."""
    input:
        model="results/{subject}/dcldm/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
    output:
        samples="results/{subject}/samples/samples.h5",
        grid="results/{subject}/samples/grid.png",
        summary="results/{subject}/samples/summary.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra="",
    log:
        "logs/generate/{subject}.log",
    benchmark:
        "logs/benchmarks/generate/{subject}.tsv",
    threads: stage_threads("generate")
    resources:
        **stage_resources("generate"),
    # A finished decoder's images before the next decoder's fine-tuning.
    priority: 30
    shell:
        "mindvis generate --config {params.config} --subject {wildcards.subject} --model-dir {params.model_dir}"
        " --responses {input.responses} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " {params.classifier} {params.extra} --threads {threads} > {log} 2>&1"


rule edit:
    """The report's brain-token edits of one subject and their in-silico check (results/{subject}/edits/)."""
    input:
        model="results/{subject}/dcldm/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
    output:
        record="results/{subject}/edits/edits.json",
        arrays="results/{subject}/edits/edits.h5",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
    log:
        "logs/edit/{subject}.log",
    benchmark:
        "logs/benchmarks/edit/{subject}.tsv",
    threads: stage_threads("generate")
    resources:
        **stage_resources("generate"),
    shell:
        "mindvis edits --config {params.config} --subject {wildcards.subject} --model-dir {params.model_dir}"
        " --responses {input.responses} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " {params.classifier} --threads {threads} > {log} 2>&1"


use rule generate as generate_baseline with:
    # Copies the DC-LDM's images instead where the two decoders are the same weights (--same-as).
    input:
        model="results/{subject}/dcldm-baseline/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
        same_as="results/{subject}/samples/samples.h5",
    output:
        samples="results/{subject}/samples-baseline/samples.h5",
        grid="results/{subject}/samples-baseline/grid.png",
        summary="results/{subject}/samples-baseline/summary.json",
    log:
        "logs/generate/{subject}-baseline.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-baseline.tsv",
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra=lambda wildcards, input: f"--same-as {input.same_as}",
    priority: 15


def start_model_dir(wildcards, input):
    """Params function: the decoder as it was before fine-tuning (dcldm/start/, written by finetune)."""
    return os.path.join(os.path.dirname(input.model), "start")


use rule generate as generate_start with:
    # The decoder at 0 fine-tuning steps (generate.start_row): what fine-tuning adds is measured against it. When
    # validation kept the start, the fine-tuned decoder's images are copied (--same-as), not drawn again.
    input:
        model="results/{subject}/dcldm/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
        same_as="results/{subject}/samples/samples.h5",
    output:
        samples="results/{subject}/samples-start/samples.h5",
        grid="results/{subject}/samples-start/grid.png",
        summary="results/{subject}/samples-start/summary.json",
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=start_model_dir,
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra=lambda wildcards, input: f"--same-as {input.same_as}",
    log:
        "logs/generate/{subject}-start.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-start.tsv",
    priority: 12


use rule generate as generate_lowlevel with:
    # The same decoder started from its low-level start (generate.lowlevel; img2img from the ridge latent).
    output:
        samples="results/{subject}/samples-lowlevel/samples.h5",
        grid="results/{subject}/samples-lowlevel/grid.png",
        summary="results/{subject}/samples-lowlevel/summary.json",
    log:
        "logs/generate/{subject}-lowlevel.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-lowlevel.tsv",
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra="--lowlevel",
    priority: 25


use rule generate as generate_prior with:
    # The same decoder through its prior in embedding space (finetune.embedding_prior): each decoded embedding
    # moved onto the bank of real image embeddings before the prior draws it.
    output:
        samples="results/{subject}/samples-prior/samples.h5",
        grid="results/{subject}/samples-prior/grid.png",
        summary="results/{subject}/samples-prior/summary.json",
    log:
        "logs/generate/{subject}-prior.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-prior.tsv",
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra="--embedding-prior",
    priority: 25


use rule generate as generate_prior_lowlevel with:
    # Through the embedding prior and from the low-level start: MindEye2's semantic + low-level route in one row.
    output:
        samples="results/{subject}/samples-prior-lowlevel/samples.h5",
        grid="results/{subject}/samples-prior-lowlevel/grid.png",
        summary="results/{subject}/samples-prior-lowlevel/summary.json",
    log:
        "logs/generate/{subject}-prior-lowlevel.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-prior-lowlevel.tsv",
    params:
        config=RESOLVED_CONFIG,
        classifier=classifier_flag,
        model_dir=input_dir("model"),
        out_dir=output_dir,
        digest=config_digest("generate"),
        extra="--embedding-prior --lowlevel",
    priority: 25


use rule generate as generate_shared with:
    # The decoder shared by several subjects, through this subject's adapter (finetune.shared).
    input:
        model="results/{subject}/dcldm-shared/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
    output:
        samples="results/{subject}/samples-shared/samples.h5",
        grid="results/{subject}/samples-shared/grid.png",
        summary="results/{subject}/samples-shared/summary.json",
    log:
        "logs/generate/{subject}-shared.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-shared.tsv",
    priority: 14


use rule generate as generate_fewshot with:
    # The shared decoder adapted to finetune.new_subject from a share of its trials.
    input:
        model="results/{subject}/dcldm-fewshot/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
    output:
        samples="results/{subject}/samples-fewshot/samples.h5",
        grid="results/{subject}/samples-fewshot/grid.png",
        summary="results/{subject}/samples-fewshot/summary.json",
    log:
        "logs/generate/{subject}-fewshot.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-fewshot.tsv",
    priority: 13
