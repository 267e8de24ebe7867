# Configuration, validation and input functions shared by all rules.
# All of the workflow's Python lives here; rules stay declarative.

import glob
import hashlib
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))


envvars:
    "PATH",


# Jobs call the `mindvis` of the environment running Snakemake, so a virtualenv
# works without being activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

from snakemake import __version__ as _SNAKEMAKE_VERSION

if (9, 10) <= tuple(int(part) for part in _SNAKEMAKE_VERSION.split(".")[:2]) < (9, 17):
    print(f"mindvis: Snakemake {_SNAKEMAKE_VERSION} starts more jobs at once than --cores allows "
          "(snakemake/snakemake#3913), which slows every job down; install 9.17 or later "
          "(`pip install -e .` does).", file=sys.stderr)

from mindvis.config import dump_config, embedding_prior_wanted, rest_subjects, subjects, validate as validate_config
from mindvis.errors import MindvisError

_CONFIG_SOURCES = ", ".join(str(path) for path in workflow.configfiles) or "<--config>"
try:
    config = validate_config(config, path=_CONFIG_SOURCES)
except MindvisError as error:
    raise WorkflowError(f"invalid configuration: {error}")

from mindvis.data.sources import is_adapter_source

try:
    SUBJECTS = subjects(config)
except MindvisError as error:
    raise WorkflowError(f"invalid configuration: {_CONFIG_SOURCES}: {error}")
REST_SUBJECTS = rest_subjects(config)
RESOLVED_CONFIG = "results/config.yaml"
# Where fMRI comes from: the embedded simulation, a lab's own BIDS data set (both
# through the preprocess stage), or a real-data adapter (the convert stage).
SIMULATED = config["data"]["source"] == "simulated"
USES_ADAPTER = is_adapter_source(config)
BIDS = config["data"]["bids_dir"] if config["data"]["source"] == "bids" else "results/bids"
STIMULI = config["data"]["bids_stimuli"] or f"{BIDS}/stimuli/stimuli.h5"
# The simulator's group template (preprocess.space: template), written with the dataset metadata.
SIMULATED_TEMPLATE = f"{BIDS}/derivatives/simulation/template/tpl-MNI152NLin2009aAsym_desc-visual_mask.nii.gz"
# The deep-network features the simulated higher visual cortex reads (simulate.category_model: deepnet),
# computed once for every subject.
SIMULATION_FEATURES = f"{BIDS}/derivatives/simulation/stimulus_features.h5"
DEEPNET = SIMULATED and config["simulate"]["category_model"] == "deepnet"


def simulation_inputs(wildcards):
    """Input function: the stimuli, and their deep-network features under the deepnet category model."""
    return {"stimuli": STIMULI, **({"features": SIMULATION_FEATURES} if DEEPNET else {})}


def features_flag(wildcards, input):
    """Params function: `--features FILE` under the deepnet category model, else nothing."""
    return f" --features {input.features}" if DEEPNET else ""


wildcard_constraints:
    subject=r"sub-[A-Za-z0-9]+",


def _write_resolved_config():
    """Write the resolved config once per change; rules read their settings from it."""
    path = Path(RESOLVED_CONFIG)
    text = json.dumps(config, sort_keys=True)
    if path.exists():
        try:
            from mindvis.config import load_config

            if json.dumps(load_config(path), sort_keys=True) == text:
                return
        except MindvisError:
            pass
    dump_config(config, path)


_write_resolved_config()


def config_digest(*sections):
    """A short hash of config sections, used as a rule parameter so that a rule
    reruns when (and only when) the science it depends on changes."""
    chosen = {name: config[name] for name in ("seed",) + sections}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def bids_root(wildcards, output):
    """The BIDS root a simulation job writes into, derived from its declared output."""
    first = Path(output[0])
    return str(first.parent if first.name == "dataset_description.json" else first.parents[3])


def simulation_manifest(subject):
    return f"{BIDS}/derivatives/simulation/{subject}/{subject}_desc-simulation_manifest.json"


def subject_manifest(wildcards):
    """Input function: the files that say a subject's BIDS data are complete.

    Simulated data: the simulation manifest (written last). A lab's BIDS data set:
    the subject's BOLD runs of the task.
    """
    subject = wildcards.subject
    if SIMULATED:
        return simulation_manifest(subject)
    task = "rest" if subject.startswith("sub-rest") else config["preprocess"]["task"]
    runs = sorted(Path(BIDS, subject, "func").glob(f"{subject}_task-{task}_*bold.nii.gz"))
    if not runs:
        raise WorkflowError(f"{BIDS}/{subject}/func: no {subject}_task-{task}_*bold.nii.gz runs. "
                            "Fix: check data.bids_dir, subjects and preprocess.task.")
    return [str(run) for run in runs]


def template_mask_input(wildcards):
    """Input function: the group template mask of preprocess.space template (the simulator's or a file), else nothing."""
    section = config["preprocess"]
    if section["space"] != "template":
        return []
    if section["template_mask"] == "simulation":
        return SIMULATED_TEMPLATE
    return section["template_mask"]


def manifest_bids_root(wildcards, input):
    """The BIDS root a preprocessing job reads."""
    return str(Path(input.manifest).parents[3]) if SIMULATED else BIDS


def decode_targets():
    """Files the `decode` target asks for."""
    targets = []
    if SIMULATED:
        targets += [STIMULI, f"{BIDS}/dataset_description.json"]
        targets += [simulation_manifest(subject) for subject in SUBJECTS + REST_SUBJECTS]
    targets += [f"results/{subject}/responses.h5" for subject in SUBJECTS]
    targets += [f"results/pretrain/rest/{subject}.h5" for subject in REST_SUBJECTS]
    targets += mbm_targets()
    targets += dcldm_targets()
    # Reports (workflow/rules/report.smk): each subject's report.html, then the table over subjects.
    targets += [f"results/{subject}/report.html" for subject in SUBJECTS]
    targets += ["results/summary.csv", "results/summary.html"]
    return targets


# -- real data sets (workflow/rules/sources.smk) --


def subject_stimuli(wildcards):
    """The stimulus HDF5 a subject's responses refer to: its own for real data, the shared one otherwise."""
    return f"results/{wildcards.subject}/stimuli.h5" if USES_ADAPTER else STIMULI


# The base generator's image corpus: the shared stimulus set, or for real data the union of the
# subjects' training images (never an image any subject is tested on), merged by merge_stimuli.
LDM_STIMULI = "results/pretrain/stimuli.h5" if USES_ADAPTER else STIMULI
# HCP resting-state subjects (data.hcp.subjects) converted by convert_rest for SC-MBM pretraining.
HCP_REST = [f"results/pretrain/rest/hcp-{hcp_id}.h5" for hcp_id in config["data"]["hcp"]["subjects"]]


def mbm_rest_inputs():
    """Resting-state files of the SC-MBM corpus: simulated rest subjects and HCP subjects, as configured."""
    return [f"results/pretrain/rest/{subject}.h5" for subject in REST_SUBJECTS] + HCP_REST


def subject_stimuli_all():
    """Every subject's stimulus HDF5 from the convert stage (merged into LDM_STIMULI)."""
    return [f"results/{subject}/stimuli.h5" for subject in SUBJECTS]


def hcp_inputs(wildcards):
    """Input function: one HCP subject's dtseries runs (data.hcp.runs_glob) and the parcellation."""
    section = config["data"]["hcp"]
    pattern = section["runs_glob"].format(subject=wildcards.hcp_id)
    runs = sorted(glob.glob(pattern))
    if not runs:
        raise WorkflowError(f"HCP subject {wildcards.hcp_id}: no runs match {pattern}. "
                            "Fix: set data.hcp.runs_glob to where the dtseries files are, or correct data.hcp.subjects.")
    return {"runs": runs, "parcellation": section["parcellation"]}


# -- DC-LDM (workflow/rules/pretrain_ldm.smk, finetune.smk, generate.smk) --
# classifier.weights: null -> trained here (train_classifier); 'bundled' -> shipped with mindvis; else a folder.
from mindvis.models.bundled import BUNDLED, BUNDLED_CLASSIFIER, BUNDLED_PRIOR, resolve_bundled

CLASSIFIER_TRAINED = config["classifier"]["weights"] is None
CLASSIFIER = ("results/classifier" if CLASSIFIER_TRAINED
              else str(resolve_bundled(config["classifier"]["weights"], BUNDLED_CLASSIFIER, "classifier.weights")))


def _uses_domain_classifier():
    """Whether images are scored by the domain classifier the workflow trains (train_classifier).

    evaluate.classifier 'auto' means the domain classifier for the simulation and an ImageNet
    classifier (which is not trained here) for every other source.
    """
    choice = config["evaluate"]["classifier"]
    return choice == "domain" or (choice == "auto" and SIMULATED)


DOMAIN_CLASSIFIER = _uses_domain_classifier()


def classifier_input(wildcards):
    """Input function: the domain classifier a job reads, or nothing when an ImageNet classifier scores."""
    return f"{CLASSIFIER}/config.json" if DOMAIN_CLASSIFIER else []


def classifier_flag(wildcards, input):
    """Params function: --classifier <folder> when the domain classifier is an input, else nothing."""
    return f"--classifier {Path(input.classifier).parent}" if input.get("classifier") else ""
# 'embedded': the prior is trained by pretrain_ldm; 'bundled': the one shipped with mindvis (hash-checked
# here); otherwise ldm.base is a folder (a prior written by pretrain_ldm, or a Stable Diffusion).
# A CompVis single-file checkpoint (.ckpt, e.g. cin256-v2's model.ckpt that MinD-Vis fine-tunes) is converted
# once by import_ldm into results/pretrain/ldm-compvis/.
LDM_EMBEDDED = config["ldm"]["base"] == "embedded"
LDM_COMPVIS = str(config["ldm"]["base"]).endswith((".ckpt", ".pth"))
LDM_BASE = ("results/pretrain/ldm" if LDM_EMBEDDED
            else "results/pretrain/ldm-compvis" if LDM_COMPVIS
            else str(resolve_bundled(config["ldm"]["base"], BUNDLED_PRIOR, "ldm.base")))
# The decoders' prior in embedding space (finetune.embedding_prior), drawn as rows dcldm-prior(-lowlevel).
EMBEDDING_PRIOR = embedding_prior_wanted(config)
# Fine-tuned decoders per subject: with SC-MBM pretraining, and the no-pretraining ablation if asked.
DCLDM_VARIANTS = {"dcldm": "samples"}
if config["finetune"]["baseline"]:
    DCLDM_VARIANTS["dcldm-baseline"] = "samples-baseline"


def ldm_base_input(wildcards):
    """Input function: the base generator a fine-tuning job needs (none to build for an external folder)."""
    return f"{LDM_BASE}/generator.json" if LDM_EMBEDDED or LDM_COMPVIS or config["ldm"]["base"] == BUNDLED else []


def output_dir(wildcards, output):
    """Params function: the folder of the first output (for stages that write a whole folder)."""
    return str(Path(output[0]).parent)


def input_dir(key):
    """Params function factory: the folder of the named input (a model folder read as a whole)."""

    def folder(wildcards, input):
        return str(Path(input[key]).parent)

    return folder


def ldm_base_dir(wildcards, input):
    """Params function: the base generator folder (pretrain_ldm's output, or the configured SD folder)."""
    return str(Path(input.base).parent) if input.get("base") else LDM_BASE


# mbm.base 'embedded': SC-MBM is pretrained here (pretrain_mbm); otherwise the shipped encoder ('bundled',
# hash-checked) or a folder, adapted per subject (adapt_mbm) into results/{subject}/mbm/.
MBM_EMBEDDED = config["mbm"]["base"] == "embedded"
# Subjects whose decoder is imported whole (finetune.released: MinD-Vis's finetuned.pth) need no SC-MBM stage.
RELEASED = {subject: path for subject, path in (config["finetune"].get("released") or {}).items() if path}
MBM_SUBJECTS = [subject for subject in SUBJECTS if subject not in RELEASED]


def released_flag(wildcards):
    """Params function: --released <finetuned.pth> for a subject whose decoder is imported (finetune.released)."""
    return f"--released {RELEASED[wildcards.subject]}" if wildcards.subject in RELEASED else ""


if not MBM_EMBEDDED and MBM_SUBJECTS:
    from mindvis.train.pretrain_mbm import resolve_base

    try:
        MBM_BASE = str(resolve_base(config, _CONFIG_SOURCES)[0])
    except MindvisError as error:
        raise WorkflowError(f"invalid configuration: {error}")


def mbm_folder(wildcards):
    """The SC-MBM folder a subject's decoder starts from: the shared pretraining, or the subject's adaptation."""
    return "results/pretrain/mbm" if MBM_EMBEDDED else f"results/{wildcards.subject}/mbm"


def mbm_input(wildcards):
    """Input function: the SC-MBM encoder's config.json a subject's fine-tuning reads (none for a released decoder)."""
    return [] if wildcards.subject in RELEASED else f"{mbm_folder(wildcards)}/config.json"


def mbm_curve_input(wildcards):
    """Input function: the SC-MBM training curve a subject's report shows (pretraining, or its adaptation)."""
    return [] if wildcards.subject in RELEASED else f"{mbm_folder(wildcards)}/metrics.jsonl"


def mbm_curve_flag(wildcards, input):
    """Params function: --mbm-curve <metrics.jsonl> when the subject has an SC-MBM curve."""
    return f"--mbm-curve {input.mbm}" if input.mbm else ""


def mbm_targets():
    """SC-MBM outputs the `decode` target asks for."""
    if MBM_EMBEDDED:
        return ["results/pretrain/mbm/summary.json"] if MBM_SUBJECTS else []
    return [f"results/{subject}/mbm/summary.json" for subject in MBM_SUBJECTS]


def encoder_flag(wildcards, input):
    """Params function: the pretrained SC-MBM folder, or --baseline (random encoder) when it is not an input."""
    if "mbm" not in input.keys():
        return "--baseline"
    return f"--mbm {Path(input.mbm).parent}" if input.mbm else ""  # a released decoder brings its own encoder


def dcldm_targets():
    """Fine-tuned decoders and their samples, for every subject and variant."""
    targets = []
    for subject in SUBJECTS:
        for model, samples in DCLDM_VARIANTS.items():
            targets += [f"results/{subject}/{model}/dcldm.json", f"results/{subject}/{samples}/samples.h5"]
    return targets + shared_targets()


def edits_input(wildcards):
    """Input function: the subject's brain-token edits when generate.edit_stimuli > 0, else nothing."""
    return f"results/{wildcards.subject}/edits/edits.json" if config["generate"]["edit_stimuli"] else []


def edits_flag(wildcards, input):
    """Params function: --edits <folder> when the edits are an input, else nothing."""
    return f"--edits {Path(input.edits).parent}" if input.get("edits") else ""


def baseline_samples_input(wildcards):
    """Input function: the no-pretraining ablation's samples when finetune.baseline, else nothing."""
    return f"results/{wildcards.subject}/samples-baseline/samples.h5" if config["finetune"]["baseline"] else []


def baseline_samples_flag(wildcards, input):
    """Params function: --baseline-samples <file> when the ablation's samples are an input, else nothing."""
    return f"--baseline-samples {input.baseline}" if input.get("baseline") else ""


def start_samples_input(wildcards):
    """Input function: the DC-LDM's samples at its start (0 fine-tuning steps) when generate.start_row, else nothing."""
    wanted = config["generate"].get("start_row", False)
    return f"results/{wildcards.subject}/samples-start/samples.h5" if wanted else []


def start_samples_flag(wildcards, input):
    """Params function: --start-samples <file> when the start row's samples are an input, else nothing."""
    return f"--start-samples {input.start}" if input.get("start") else ""


def lowlevel_samples_input(wildcards):
    """Input function: the DC-LDM's samples from the ridge latent (img2img) when generate.lowlevel, else nothing."""
    wanted = config["generate"].get("lowlevel", False)
    return f"results/{wildcards.subject}/samples-lowlevel/samples.h5" if wanted else []


def lowlevel_samples_flag(wildcards, input):
    """Params function: --lowlevel-samples <file> when the low-level start's samples are an input, else nothing."""
    return f"--lowlevel-samples {input.lowlevel}" if input.get("lowlevel") else ""


def prior_samples_input(wildcards):
    """Input function: the DC-LDM's samples through its prior in embedding space when finetune.embedding_prior
    applies (mindvis.config.embedding_prior_wanted), else nothing."""
    return f"results/{wildcards.subject}/samples-prior/samples.h5" if EMBEDDING_PRIOR else []


def prior_lowlevel_samples_input(wildcards):
    """Input function: the same from the low-level start when generate.lowlevel too, else nothing."""
    wanted = EMBEDDING_PRIOR and config["generate"].get("lowlevel", False)
    return f"results/{wildcards.subject}/samples-prior-lowlevel/samples.h5" if wanted else []


def prior_samples_flag(wildcards, input):
    """Params function: --prior-samples / --prior-lowlevel-samples <file> for the embedding prior's rows given."""
    flags = [f"--prior-samples {input.prior}" if input.get("prior") else "",
             f"--prior-lowlevel-samples {input.prior_lowlevel}" if input.get("prior_lowlevel") else ""]
    return " ".join(flag for flag in flags if flag)


# One decoder shared by several subjects (finetune.shared) and the few-shot new subject (finetune.new_subject):
# see workflow/rules/finetune.smk. The shared decoder's fMRI enters one SC-MBM encoder: the pretraining's
# (mbm.base embedded) or the pretrained base itself, not one subject's adaptation of it.
from mindvis.config import shared_subjects

SHARED_SUBJECTS = shared_subjects(config)
NEW_SUBJECT = config["finetune"]["new_subject"]
SHARED_MBM = "results/pretrain/mbm" if MBM_EMBEDDED else (MBM_BASE if SHARED_SUBJECTS else None)
SHARED_MBM_INPUT = ["results/pretrain/mbm/config.json"] if MBM_EMBEDDED and SHARED_SUBJECTS else []


def shared_targets():
    """The shared decoder's subject folders and samples, and the few-shot subject's."""
    targets = []
    for subject in SHARED_SUBJECTS:
        targets += [f"results/{subject}/dcldm-shared/dcldm.json", f"results/{subject}/samples-shared/samples.h5"]
    if NEW_SUBJECT:
        targets += [f"results/{NEW_SUBJECT}/dcldm-fewshot/dcldm.json",
                    f"results/{NEW_SUBJECT}/samples-fewshot/samples.h5"]
    return targets


def shared_samples_input(wildcards):
    """Input function: the shared decoder's samples of a subject in it, else nothing."""
    return f"results/{wildcards.subject}/samples-shared/samples.h5" if wildcards.subject in SHARED_SUBJECTS else []


def fewshot_samples_input(wildcards):
    """Input function: the few-shot decoder's samples of finetune.new_subject, else nothing."""
    return f"results/{wildcards.subject}/samples-fewshot/samples.h5" if wildcards.subject == NEW_SUBJECT else []


def shared_samples_flag(wildcards, input):
    """Params function: --shared-samples / --fewshot-samples for the rows a subject has."""
    flags = [f"--shared-samples {input.shared}" if input.get("shared") else "",
             f"--fewshot-samples {input.fewshot}" if input.get("fewshot") else ""]
    return " ".join(flag for flag in flags if flag)


def shared_models_input(wildcards):
    """Input function: the shared and few-shot decoders of a subject (their training curves in its report)."""
    if wildcards.subject in SHARED_SUBJECTS:
        return [f"results/{wildcards.subject}/dcldm-shared/dcldm.json"]
    return [f"results/{wildcards.subject}/dcldm-fewshot/dcldm.json"] if wildcards.subject == NEW_SUBJECT else []


# -- resources: what each job asks a scheduler for (mem_mb, runtime, gpu, threads) --
# Sized from the science settings, not set per cluster: model presets, image size, the base generator's
# weights on disk, and the job's input files (input.size_mb, known when the job is about to start). A
# retried job asks for more memory and time (attempt). SLURM account and partitions live only in
# workflow/profiles/.
from mindvis.models.presets import MBM_PRESETS

COMPUTE = config["compute"]
PROCESSES = COMPUTE["processes"]
# MB per trained parameter on the host: float32 weights, gradients and AdamW's two moments.
TRAINED_MB_PER_PARAMETER = 16e-6
SD15_MB = 5200  # a Stable Diffusion 1.5 folder in float32 (UNet, VAE, text encoder), for a folder not on this machine


def _mbm_parameters():
    """SC-MBM's parameter count from its preset (transformer blocks of 4 d^2 attention + 2 mlp_ratio d^2 MLP)."""
    preset = MBM_PRESETS[config["mbm"]["preset"]]
    block = lambda width, depth: depth * (4 + 2 * preset["mlp_ratio"]) * width**2
    return block(preset["embed_dim"], preset["depth"]) + block(preset["decoder_embed_dim"], preset["decoder_depth"])


def _weights_mb(path):
    """Megabytes of model weights at path (a file, or the weight files of a folder); None when it is not here."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 1e6
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt", ".pth")
                 and "checkpoints" not in f.parts]
        return sum(f.stat().st_size for f in files) / 1e6
    return None


# The base generator: the embedded / shipped prior is a few MB; Stable Diffusion and CompVis are gigabytes.
LDM_EXTERNAL = not (LDM_EMBEDDED or config["ldm"]["base"] == BUNDLED)
GENERATOR_MB = (_weights_mb(config["ldm"]["base"]) or SD15_MB) if LDM_EXTERNAL else 100
IMAGE_SIZE = config["ldm"].get("image_size") or config["stimuli"]["image_size"]
# Which stages run GPU-sized models (compute.gpu auto): the generator's, and SC-MBM's above the small preset.
GPU_SIZED = {
    "ldm": LDM_EXTERNAL or IMAGE_SIZE >= 128,
    "mbm": config["mbm"]["preset"] in ("base", "paper"),
    "classifier": config["evaluate"]["classifier"] == "vit_h_14",
}


def _uses_gpu(kind):
    return COMPUTE["gpu"] is True or (COMPUTE["gpu"] == "auto" and GPU_SIZED.get(kind, False))


# stage: (model kind, training?, host MB besides the inputs, input multiple, minutes on CPU-sized / GPU-sized models)
STAGES = {
    "stimuli": (None, False, 1000, 0, (30, 30)),
    "bids_metadata": (None, False, 1000, 0, (10, 10)),
    "simulate": (None, False, 1500, 0, (60, 60)),  # measured peak 660 MiB on configs/default.yaml
    "stimulus_features": (None, False, 1500, 0, (30, 30)),  # EfficientNet-Lite0 on the stimuli, batches of 64
    "preprocess": (None, False, 2000, 8, (60, 120)),  # gzip-compressed BOLD expands about fourfold, in float32
    "convert": (None, False, 8000, 4, (60, 120)),  # reads its data set's files from the config, not as inputs
    "convert_rest": (None, False, 2000, 2, (60, 60)),  # one run's visual grayordinates in float64 at a time
    "merge_stimuli": (None, False, 1000, 3, (30, 30)),
    "pretrain_mbm": ("mbm", True, 2000, 4, (120, 720)),
    "adapt_mbm": ("mbm", True, 2000, 4, (60, 240)),
    "train_classifier": (None, True, 2000, 4, (60, 60)),
    "pretrain_ldm": ("ldm", True, 3000, 4, (240, 720)),
    "import_ldm": ("ldm", False, 2000, 3, (30, 30)),
    "finetune": ("ldm", True, 3000, 4, (120, 480)),
    "finetune_shared": ("ldm", True, 3000, 4, (240, 960)),  # every shared subject's trials in one job
    "adapt_subject": ("ldm", True, 3000, 4, (60, 240)),
    "generate": ("ldm", False, 2000, 2, (60, 120)),
    "evaluate": ("ldm", False, 3000, 2, (60, 120)),
    "report": (None, False, 2000, 1, (30, 30)),
    "summary": (None, False, 1000, 1, (10, 10)),
}


#: The training stages that run compute.processes processes (accelerate launch).
MULTI_PROCESS_STAGES = ("pretrain_mbm", "adapt_mbm", "finetune", "finetune_shared", "adapt_subject")


def _model_mb(stage):
    """Host memory of a stage's models: the base generator's weights (1.5x: loaded, then placed), the trained
    parameters' optimiser state, the ViT-H/14 classifier."""
    kind, training = STAGES[stage][:2]
    mb = 1.5 * GENERATOR_MB if kind == "ldm" else 0.0
    if stage in MULTI_PROCESS_STAGES:
        # Gradients and AdamW's moments live on the GPU when there is one; the host keeps the weights.
        per_parameter = 4e-6 if stage_gpus(stage) else TRAINED_MB_PER_PARAMETER
        mb += _mbm_parameters() * per_parameter * stage_processes(stage)
    if stage == "evaluate" and config["evaluate"]["classifier"] == "vit_h_14":
        mb += 2 * 2530  # ViT-H/14 in float32, loaded then placed
    return mb


def stage_gpus(stage):
    """GPUs a stage's job asks for: one per process for training, one for sampling and scoring, else none."""
    kind, training = STAGES[stage][:2]
    wanted = _uses_gpu(kind) or (stage == "evaluate" and _uses_gpu("classifier"))
    if not wanted:
        return 0
    return PROCESSES if training and stage != "train_classifier" else 1


def stage_processes(stage):
    """Processes a stage's job runs (compute.processes for SC-MBM and fine-tuning, else 1)."""
    return PROCESSES if stage in MULTI_PROCESS_STAGES else 1


def stage_threads(stage):
    """Threads a stage's job asks for: compute.threads per process (default 1, 8 for a GPU job's data loading)."""
    per_process = COMPUTE["threads"] or (8 if stage_gpus(stage) else 1)
    return per_process * stage_processes(stage)


def stage_resources(stage):
    """The `resources:` of a stage's rules (baseline and variant rules share their parent's): mem_mb and runtime
    (minutes) as functions of the job's inputs and attempt, gpu, and mem_mb_per_process for the launcher."""
    kind, training, host_mb, input_factor, minutes = STAGES[stage]
    fixed_mb = host_mb * stage_processes(stage) + _model_mb(stage)
    gpu_sized = stage_gpus(stage) > 0

    def mem_mb(wildcards, input, attempt):
        # Each retry asks for half as much again: a job killed for memory gets more.
        return int(math.ceil((fixed_mb + input_factor * input.size_mb) * (1 + 0.5 * (attempt - 1)) / 100) * 100)

    def runtime(wildcards, attempt):
        return minutes[1 if gpu_sized else 0] * attempt

    return {"mem_mb": mem_mb, "runtime": runtime, "gpu": stage_gpus(stage)}


def launcher(stage):
    """The command a training stage runs as: `mindvis`, or `accelerate launch` of it for several processes
    (gloo on CPUs, NCCL on GPUs; a free port per job, so jobs sharing a node do not collide)."""
    processes = stage_processes(stage)
    if processes == 1:
        return "mindvis"
    return (f"accelerate launch --multi_gpu --num_processes {processes} --num_machines 1 --main_process_port 0 "
            "--mixed_precision no --dynamo_backend no -m mindvis.cli")


def process_threads(stage):
    """Params function: torch threads per process (the job's threads shared by its processes)."""
    return lambda wildcards, threads: max(1, threads // stage_processes(stage))
