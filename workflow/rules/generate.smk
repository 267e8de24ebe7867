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
    log:
        "logs/generate/{subject}.log",
    benchmark:
        "logs/benchmarks/generate/{subject}.tsv",
    threads: 1
    # A finished decoder's images before the next decoder's fine-tuning.
    priority: 30
    resources:
        mem_mb=4000,
    shell:
        "mindvis generate --config {params.config} --subject {wildcards.subject} --model-dir {params.model_dir}"
        " --responses {input.responses} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " {params.classifier} --threads {threads} > {log} 2>&1"


use rule generate as generate_baseline with:
    input:
        model="results/{subject}/dcldm-baseline/dcldm.json",
        responses="results/{subject}/responses.h5",
        stimuli=subject_stimuli,
        classifier=classifier_input,
    output:
        samples="results/{subject}/samples-baseline/samples.h5",
        grid="results/{subject}/samples-baseline/grid.png",
        summary="results/{subject}/samples-baseline/summary.json",
    log:
        "logs/generate/{subject}-baseline.log",
    benchmark:
        "logs/benchmarks/generate/{subject}-baseline.tsv",
    priority: 15
