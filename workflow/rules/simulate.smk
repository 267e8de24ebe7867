# The embedded default's simulated subjects.

if SIMULATED:

    rule simulate:
        """One simulated subject's task fMRI written as BIDS (runs, events, confounds, ROI, ground truth)."""
        input:
            unpack(simulation_inputs),
        output:
            manifest=f"{BIDS}/derivatives/simulation/{{subject}}/{{subject}}_desc-simulation_manifest.json",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            bids=bids_root,
            digest=config_digest("stimuli", "simulate"),
            features=features_flag,
        log:
            "logs/simulate/{subject}.log",
        benchmark:
            "logs/benchmarks/simulate/{subject}.tsv",
        wildcard_constraints:
            subject=r"sub-(?!rest)[A-Za-z0-9]+",
        threads: stage_threads("simulate")
        resources:
            **stage_resources("simulate"),
        shell:
            "mindvis simulate --config {params.config} --stimuli {input.stimuli} --bids-dir {params.bids}"
            " --subject {wildcards.subject}{params.features} --threads {threads} > {log} 2>&1"


    rule stimulus_features:
        """The deep-network features of every stimulus that the simulated higher visual cortex reads, once."""
        input:
            stimuli=STIMULI,
        output:
            features=SIMULATION_FEATURES,
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            digest=config_digest("stimuli", "simulate"),
        log:
            "logs/stimulus_features.log",
        benchmark:
            "logs/benchmarks/stimulus_features.tsv",
        threads: stage_threads("stimulus_features")
        resources:
            **stage_resources("stimulus_features"),
        shell:
            "mindvis stimulus-features --config {params.config} --stimuli {input.stimuli} --out {output.features}"
            " --threads {threads} > {log} 2>&1"


    rule simulate_rest:
        """One simulated resting-state subject (the stand-in for HCP in SC-MBM pretraining)."""
        output:
            manifest=f"{BIDS}/derivatives/simulation/{{subject}}/{{subject}}_desc-simulation_manifest.json",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            bids=bids_root,
            digest=config_digest("simulate"),
        log:
            "logs/simulate_rest/{subject}.log",
        benchmark:
            "logs/benchmarks/simulate_rest/{subject}.tsv",
        wildcard_constraints:
            subject=r"sub-rest[0-9]+",
        threads: stage_threads("simulate")
        resources:
            **stage_resources("simulate"),
        shell:
            "mindvis simulate-rest --config {params.config} --bids-dir {params.bids}"
            " --subject {wildcards.subject} --threads {threads} > {log} 2>&1"


    rule bids_metadata:
        """dataset_description.json and participants.tsv of the simulated BIDS dataset, and its group template."""
        output:
            description=f"{BIDS}/dataset_description.json",
            participants=f"{BIDS}/participants.tsv",
            template=SIMULATED_TEMPLATE,
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            bids=bids_root,
            digest=config_digest("simulate"),
        log:
            "logs/bids_metadata.log",
        benchmark:
            "logs/benchmarks/bids_metadata.tsv",
        threads: stage_threads("bids_metadata")
        resources:
            **stage_resources("bids_metadata"),
        shell:
            "mindvis bids-metadata --config {params.config} --bids-dir {params.bids} > {log} 2>&1"
