# The embedded base generator (VAE, then class-conditioned UNet) on the image corpus (LDM_STIMULI: the
# stimulus pool + training images for the simulation, the subjects' merged training images for real
# data), and the domain classifier that scores generated images when evaluate.classifier picks it
# (an ImageNet classifier is not trained here). Test images are never read for training.

if DOMAIN_CLASSIFIER and CLASSIFIER_TRAINED:

    rule train_classifier:
        """Domain classifier on the training images (part held out): results/classifier/."""
        input:
            stimuli=LDM_STIMULI,
        output:
            config=f"{CLASSIFIER}/config.json",
            weights=f"{CLASSIFIER}/diffusion_pytorch_model.safetensors",
            metrics=f"{CLASSIFIER}/metrics.json",
        conda:
            "../envs/mindvis.yaml"
        params:
            config=RESOLVED_CONFIG,
            out_dir=output_dir,
            digest=config_digest("stimuli"),
        log:
            "logs/train_classifier.log",
        benchmark:
            "logs/benchmarks/train_classifier.tsv",
        threads: stage_threads("train_classifier")
        resources:
            **stage_resources("train_classifier"),
        # Fine-tuning waits for it (validation accuracy): start it early.
        priority: 50
        shell:
            "mindvis train-classifier --config {params.config} --stimuli {input.stimuli} --out-dir {params.out_dir}"
            " --threads {threads} --resume > {log} 2>&1"


rule pretrain_ldm:
    """The image prior for ldm.base: embedded (vae/, unet/, scheduler/, image_conditioner/ + metrics.json).

    It does not wait for the classifier (the longest stage starts first): its ceiling samples are scored
    by the evaluate stage (row base-ceiling), or by `mindvis pretrain-ldm --classifier`.
    """
    input:
        stimuli=LDM_STIMULI,
        corpus=[] if config["ldm"]["corpus"] == "stimuli" else config["ldm"]["corpus"],
    output:
        generator="results/pretrain/ldm/generator.json",
        # class_samples.png is written too, when the stimuli have classes (NSD has none).
        metrics="results/pretrain/ldm/metrics.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        out_dir=output_dir,
        digest=config_digest("stimuli", "ldm"),
    log:
        "logs/pretrain_ldm.log",
    benchmark:
        "logs/benchmarks/pretrain_ldm.tsv",
    threads: stage_threads("pretrain_ldm")
    resources:
        **stage_resources("pretrain_ldm"),
    # The longest stage, on the critical path: first in line for a core.
    priority: 50
    shell:
        "mindvis pretrain-ldm --config {params.config} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " --threads {threads} --resume > {log} 2>&1"


rule import_ldm:
    """A CompVis latent-diffusion checkpoint (ldm.base: a .ckpt file) as a diffusers-format base generator."""
    input:
        checkpoint=config["ldm"]["base"] if LDM_COMPVIS else [],
    output:
        generator="results/pretrain/ldm-compvis/generator.json",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        out_dir=output_dir,
        ldm_config=f"--ldm-config {config['ldm']['compvis_config']}" if config["ldm"].get("compvis_config") else "",
        image_size=f"--image-size {config['ldm']['image_size']}" if config["ldm"].get("image_size") else "",
    log:
        "logs/import_ldm.log",
    threads: stage_threads("import_ldm")
    resources:
        **stage_resources("import_ldm"),
    shell:
        "mindvis import-ldm --config {params.config} --checkpoint {input.checkpoint} --out-dir {params.out_dir} {params.ldm_config}"
        " {params.image_size} > {log} 2>&1"
