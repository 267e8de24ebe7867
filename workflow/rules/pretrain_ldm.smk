# The embedded base generator (VAE, then class-conditioned UNet) on the stimulus pool + training images,
# and the domain classifier that scores generated images. Test images are never read for training.


rule train_classifier:
    """Domain classifier on the training images (part held out): results/classifier/."""
    input:
        stimuli=STIMULI,
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
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "mindvis train-classifier --config {params.config} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " --threads {threads} > {log} 2>&1"


rule pretrain_ldm:
    """Base generator for ldm.base: embedded (vae/, unet/, scheduler/, class_conditioner/ + metrics.json)."""
    input:
        stimuli=STIMULI,
        classifier=f"{CLASSIFIER}/config.json",
    output:
        generator="results/pretrain/ldm/generator.json",
        metrics="results/pretrain/ldm/metrics.json",
        samples="results/pretrain/ldm/class_samples.png",
    conda:
        "../envs/mindvis.yaml"
    params:
        config=RESOLVED_CONFIG,
        out_dir=output_dir,
        classifier=input_dir("classifier"),
        digest=config_digest("stimuli", "ldm"),
    log:
        "logs/pretrain_ldm.log",
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "mindvis pretrain-ldm --config {params.config} --stimuli {input.stimuli} --out-dir {params.out_dir}"
        " --classifier {params.classifier} --threads {threads} > {log} 2>&1"
