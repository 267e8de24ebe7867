# Reports: one self-contained report.html per subject, and the summary table over subjects.
# Figures are also registered with report() so that `snakemake --report report.zip` collects them.
# The report also shows the ridge/, ridge-pixels/, ridge-embedding/ and base-ceiling/ samples that evaluate writes
# beside metrics.json, and the fine-tuning curves in each decoder's train/metrics.jsonl.


rule report:
    """One subject's self-contained HTML report and its figures (results/{subject}/report.html)."""
    input:
        metrics="results/{subject}/evaluation/metrics.json",
        samples="results/{subject}/samples/samples.h5",
        baseline=baseline_samples_input,
        start=start_samples_input,
        lowlevel=lowlevel_samples_input,
        prior=prior_samples_input,
        prior_lowlevel=prior_lowlevel_samples_input,
        shared=shared_samples_input,
        fewshot=fewshot_samples_input,
        responses="results/{subject}/responses.h5",
        mbm=mbm_curve_input,
        models=expand("results/{{subject}}/{model}/dcldm.json", model=DCLDM_VARIANTS),
        shared_models=shared_models_input,
        edits=edits_input,
    output:
        html=report("results/{subject}/report.html", caption="../report/report.rst", category="{subject}",
                    labels={"figure": "report (HTML)"}),
        grid=report("results/{subject}/report/grid.png", caption="../report/grid.rst", category="{subject}",
                    labels={"figure": "decoded images"}),
        per_class=report("results/{subject}/report/per_class.png", caption="../report/per_class.rst",
                         category="{subject}", labels={"figure": "per-class accuracy"}),
        confusion=report("results/{subject}/report/confusion.png", caption="../report/confusion.rst",
                         category="{subject}", labels={"figure": "confusion matrix"}),
        curves=report("results/{subject}/report/curves.png", caption="../report/curves.rst", category="{subject}",
                      labels={"figure": "training curves"}),
        attention=report("results/{subject}/report/attention.png", caption="../report/attention.rst",
                         category="{subject}", labels={"figure": "cross-attention"}),
        brain=report("results/{subject}/report/brain_map.png", caption="../report/brain_map.rst",
                     category="{subject}", labels={"figure": "brain map (attention-based)"}),
        brain_voxel=report("results/{subject}/report/brain_map_voxel_path.png",
                           caption="../report/brain_map_voxel_path.rst", category="{subject}",
                           labels={"figure": "brain map (voxel-path weights)"}),
        fewshot=report("results/{subject}/report/fewshot_curve.png", caption="../report/fewshot_curve.rst",
                       category="{subject}", labels={"figure": "few-shot learning curve"}),
        edits=report("results/{subject}/report/brain_edits.png", caption="../report/brain_edits.rst",
                     category="{subject}", labels={"figure": "brain-token edits"}),
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        figures="results/{subject}/report",
        mbm_curve=mbm_curve_flag,
        edits=edits_flag,
    log:
        "logs/report/{subject}.log",
    benchmark:
        "logs/benchmarks/report/{subject}.tsv",
    threads: stage_threads("report")
    resources:
        **stage_resources("report"),
    shell:
        "mindvis report --config {params.config} --metrics {input.metrics} --out {output.html}"
        " --samples {input.samples} --baseline-samples {input.baseline} --start-samples {input.start}"
        " --lowlevel-samples {input.lowlevel} --prior-samples {input.prior}"
        " --prior-lowlevel-samples {input.prior_lowlevel} --shared-samples {input.shared} --fewshot-samples {input.fewshot}"
        " --responses {input.responses} {params.mbm_curve} --finetune-models {input.models} {input.shared_models}"
        " --figures-dir {params.figures} {params.edits}"
        " --threads {threads} > {log} 2>&1"


rule summary:
    """The table over subjects (results/summary.csv, results/summary.html), printed into its log."""
    input:
        metrics=expand("results/{subject}/evaluation/metrics.json", subject=SUBJECTS),
    output:
        csv=report("results/summary.csv", caption="../report/summary.rst", category="Summary",
                   labels={"table": "per subject (CSV)"}),
        html=report("results/summary.html", caption="../report/summary.rst", category="Summary",
                    labels={"table": "per subject (HTML)"}),
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
    log:
        "logs/summary.log",
    benchmark:
        "logs/benchmarks/summary.tsv",
    threads: stage_threads("summary")
    resources:
        **stage_resources("summary"),
    shell:
        "mindvis summary --config {params.config} --metrics {input.metrics} --csv {output.csv}"
        " --html {output.html} > {log} 2>&1"
