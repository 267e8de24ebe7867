# The embedded default's stimulus set (real data bring their own stimuli).

if SIMULATED:

    rule stimuli:
        """Stimulus images (train shown once, test shown many times, generator pool) as HDF5."""
        output:
            STIMULI,
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            digest=config_digest("stimuli"),
        log:
            "logs/stimuli.log",
        benchmark:
            "logs/benchmarks/stimuli.tsv",
        threads: stage_threads("stimuli")
        resources:
            **stage_resources("stimuli"),
        shell:
            "mindvis stimuli --config {params.config} --out {output} --threads {threads} > {log} 2>&1"
