"""The ``mindvis`` command line: one sub-command per workflow stage.

Snakemake rules call these; each sub-command validates the config with the
project schema, caps threads, and calls one function of the package, so every
stage can also be run (and tested) without Snakemake. Imports are lazy: a
sub-command pays only for the libraries it uses.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from mindvis.errors import MindvisError

DEVICE_HELP = ("where the models run: auto (the GPU Accelerate picks for this process, else the CPU), cpu, "
               "cuda, cuda:N or mps")


def _call(target, *args, **kwargs):
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)


def _config(args):
    from mindvis.config import load_config

    return load_config(args.config)


def _decoder_arguments(sub, out_help):
    """The arguments of a command that runs one subject's fine-tuned decoder on its responses."""
    sub.add_argument("--subject", required=True)
    sub.add_argument("--model-dir", required=True, help="the subject's finetune output folder")
    sub.add_argument("--responses", required=True)
    sub.add_argument("--stimuli", required=True, help="stimuli.h5")
    sub.add_argument("--out-dir", required=True, help=out_help)


def _override_arguments(sub, base=True):
    """The flags that let a decoder meet inputs other than those it was trained on (each recorded in outputs)."""
    if base:
        sub.add_argument("--base", default=None,
                         help="the prior's folder, where it is not where finetune recorded it (checked all the same)")
    sub.add_argument("--allow-other-subject", action="store_true",
                     help="decode responses of another subject than the decoder's (recorded in the outputs)")
    sub.add_argument("--allow-other-stimuli", action="store_true",
                     help="accept a stimulus file other than the decoder's (recorded in the outputs)")
    sub.add_argument("--allow-other-prior", action="store_true",
                     help="sample with a prior whose files differ from the decoder's (recorded in the outputs)")


def _overrides(args):
    return tuple(kind for kind in ("subject", "stimuli", "prior") if getattr(args, f"allow_other_{kind}"))


# -- handlers -----------------------------------------------------------------

def cmd_check_config(args):
    from mindvis.config import subjects

    config = _config(args)
    print(f"{args.config}: valid; subjects: {', '.join(subjects(config))}")


def cmd_resolve_config(args):
    from mindvis.config import dump_config

    dump_config(_config(args), args.out)


def cmd_stimuli(args):
    _call("mindvis.data.stimuli:build_stimulus_set", _config(args), args.out)


def cmd_simulate(args):
    _call("mindvis.simulate.run:simulate_subject", _config(args), stimuli_path=args.stimuli,
          bids_dir=args.bids_dir, subject=args.subject, features_path=args.features)


def cmd_stimulus_features(args):
    config = _config(args)
    _call("mindvis.simulate.deepnet:write_stimulus_features", args.stimuli, args.out,
          network_name=config["simulate"]["feature_network"], threads=args.threads)


def cmd_simulate_rest(args):
    _call("mindvis.simulate.run:simulate_rest_subject", _config(args), bids_dir=args.bids_dir,
          subject=args.subject)


def cmd_bids_metadata(args):
    _call("mindvis.simulate.bids:write_dataset_metadata", _config(args), bids_dir=args.bids_dir)


def cmd_preprocess(args):
    _call("mindvis.preprocess.run:preprocess_subject", _config(args), bids_dir=args.bids_dir,
          subject=args.subject, out_path=args.out, stimuli_path=args.stimuli)


def cmd_preprocess_rest(args):
    _call("mindvis.preprocess.run:preprocess_rest_subject", _config(args), bids_dir=args.bids_dir,
          subject=args.subject, out_path=args.out)


def cmd_pretrain_mbm(args):
    _call("mindvis.train.pretrain_mbm:pretrain_mbm", _config(args), responses=args.responses,
          rest=args.rest, out_dir=args.out_dir, resume=args.resume)


def cmd_adapt_mbm(args):
    _call("mindvis.train.pretrain_mbm:adapt_mbm", _config(args), subject=args.subject, responses=args.responses,
          out_dir=args.out_dir, resume=args.resume, config_path=args.config)


def cmd_convert(args):
    _call("mindvis.data.sources:convert_subject", _config(args), args.subject, out_responses=args.out,
          out_stimuli=args.stimuli_out)


def cmd_convert_rest(args):
    _call("mindvis.data.sources.hcp:convert_hcp_rest", _config(args), hcp_subject=args.hcp_subject,
          subject=args.subject, out_path=args.out)


def cmd_merge_stimuli(args):
    _config(args)  # validated like every stage's, though merging reads no setting
    _call("mindvis.data.sources.corpus:merge_stimulus_files", args.stimuli, args.out)


def cmd_import_checkpoint(args):
    _call("mindvis.models.mindvis_checkpoint:import_mindvis_checkpoint", args.checkpoint, args.out_dir,
          num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads, strict=args.strict)


# -- DC-LDM (issue 5): domain classifier, base generator, fine-tuning, sampling --

def cmd_train_classifier(args):
    _call("mindvis.train.classifier:train_classifier", _config(args), stimuli_path=args.stimuli,
          out_dir=args.out_dir, resume=args.resume)


def cmd_pretrain_ldm(args):
    _call("mindvis.train.pretrain_ldm:pretrain_ldm", _config(args), stimuli=args.stimuli, out_dir=args.out_dir,
          classifier_dir=args.classifier, resume=args.resume)


def cmd_bundle(args):
    _call("mindvis.train.bundle:bundle", _config(args), kind=args.kind, source=args.source, stimuli=args.stimuli,
          quality=args.quality, commands=args.command, commit=args.commit, out_dir=args.out_dir)


def cmd_finetune(args):
    _call("mindvis.train.finetune:finetune", _config(args), subject=args.subject, responses=args.responses,
          stimuli=args.stimuli, base=args.base, out_dir=args.out_dir, mbm_dir=args.mbm,
          baseline=args.baseline, resume=args.resume, released=args.released)


def cmd_finetune_shared(args):
    if not (len(args.subjects) == len(args.responses) == len(args.view_dirs)):
        raise MindvisError("--subjects, --responses and --view-dirs must list as many entries each",
                           key="--subjects", fix="give one responses.h5 and one view folder per subject, in order.")
    _call("mindvis.train.shared:finetune_shared", _config(args), subjects=args.subjects, responses=args.responses,
          stimuli=args.stimuli, base=args.base, out_dir=args.out_dir, view_dirs=args.view_dirs, mbm_dir=args.mbm,
          resume=args.resume)


def cmd_adapt_subject(args):
    if len(args.shared_subjects) != len(args.shared_views) or \
            (args.shared_responses and len(args.shared_responses) != len(args.shared_subjects)):
        raise MindvisError("--shared-subjects, --shared-views (and --shared-responses) must list as many entries "
                           "each", key="--shared-views", fix="give one folder (and responses.h5) per shared subject.")
    _call("mindvis.train.shared:adapt_subject", _config(args), subject=args.subject, responses=args.responses,
          stimuli=args.stimuli, shared_views=dict(zip(args.shared_subjects, args.shared_views)),
          out_dir=args.out_dir, old_responses=dict(zip(args.shared_subjects, args.shared_responses)),
          resume=args.resume)


def cmd_import_ldm(args):
    _call("mindvis.models.compvis:import_compvis_checkpoint", args.checkpoint, args.out_dir,
          config=args.ldm_config, image_size=args.image_size)


def cmd_import_finetuned(args):
    _call("mindvis.models.mindvis_release:import_mindvis_finetuned", args.checkpoint, args.out_dir, base=args.base,
          ldm_config=args.ldm_config, subject=args.subject, num_heads=args.num_heads, strict=not args.no_strict)


def cmd_generate(args):
    _call("mindvis.generate.run:generate_subject", _config(args), subject=args.subject, model_dir=args.model_dir,
          responses=args.responses, stimuli=args.stimuli, out_dir=args.out_dir, classifier_dir=args.classifier,
          lowlevel=args.lowlevel, device=args.device, base=args.base, overrides=_overrides(args),
          same_as=args.same_as, embedding_prior=args.embedding_prior)


def cmd_edit(args):
    _call("mindvis.generate.edit:edit_subject", _config(args), subject=args.subject, model_dir=args.model_dir,
          responses=args.responses, stimuli=args.stimuli, out_dir=args.out_dir, stimulus_ids=args.stimuli_ids,
          operation=args.operation, donor_ids=args.donors, rois=args.rois, mask=args.mask, factor=args.factor,
          taus=args.tau, mode=args.mode, device=args.device, base=args.base, overrides=_overrides(args))


def cmd_edits(args):
    _call("mindvis.evaluate.edits:edit_set", _config(args), subject=args.subject, model_dir=args.model_dir,
          responses=args.responses, stimuli=args.stimuli, out_dir=args.out_dir, classifier_dir=args.classifier,
          device=args.device)


# -- reports (issue 6) --

# Display names of the fine-tuning runs (their folder names) in the report's training curves.
_FINETUNE_RUNS = {"dcldm": "SC-MBM pretrained", "dcldm-baseline": "no SC-MBM pretraining",
                  "dcldm-shared": "shared by the subjects",
                  "dcldm-fewshot": "shared, adapted to this subject (few-shot)"}


def cmd_report(args):
    # The evaluate stage writes ridge/, ridge-pixels/, ridge-embedding/ and base-ceiling/ samples beside
    # metrics.json when those rows exist.
    from mindvis.evaluate.run import IMAGE_ROWS
    from mindvis.generate.writing import SAMPLES_FILE

    evaluation = Path(args.metrics).parent
    samples = {"dcldm": args.samples, **{"dcldm-baseline": path for path in args.baseline_samples},
               **{"dcldm-start": path for path in args.start_samples},
               **{"dcldm-lowlevel": path for path in args.lowlevel_samples},
               **{"dcldm-prior": path for path in args.prior_samples},
               **{"dcldm-prior-lowlevel": path for path in args.prior_lowlevel_samples},
               **{"dcldm-shared": path for path in args.shared_samples},
               **{"dcldm-fewshot": path for path in args.fewshot_samples}}
    samples.update({row: evaluation / row / SAMPLES_FILE for row in IMAGE_ROWS})
    curves = {"SC-MBM: pretraining": args.mbm_curve} if args.mbm_curve else {}
    fewshot_model = None
    for model_json in args.finetune_models:
        run = Path(model_json).parent
        if run.name == "dcldm-fewshot":
            fewshot_model = model_json
        history = run / "train" / "metrics.jsonl"
        if run.name == "dcldm-shared":  # one training run for every shared subject, in the shared folder
            history = Path(json.loads(Path(model_json).read_text())["shared_dir"]) / "train" / "metrics.jsonl"
        curves[f"DC-LDM: {_FINETUNE_RUNS.get(run.name, run.name)}"] = history
    _call("mindvis.report.html:build_report", args.metrics, args.out, config=_config(args), samples=samples,
          responses=args.responses, curves=curves, figures_dir=args.figures_dir, fewshot_model=fewshot_model,
          fewshot_benchmark=args.fewshot_benchmark, edits=args.edits)


def cmd_summary(args):
    from mindvis.report import summary

    config = _config(args)
    if args.metrics:
        if not args.html:
            raise MindvisError("--metrics needs --html too", key="--html", fix="add --html results/summary.html.")
        frame = summary.write_summary(args.metrics, args.csv, args.html,
                                      title=f"mindvis summary: {config['experiment']}")
    else:
        frame = summary.read_summary(args.csv)
    print(f"mindvis: summary of '{config['experiment']}' ({args.csv})")
    if args.full:
        print(summary.summary_text(frame, frame.attrs.get("notes", ()), frame.attrs.get("comparisons", ()),
                                   frame.attrs.get("warnings", ())))
    else:
        print(summary.headline_text(frame, frame.attrs.get("rows", ()), frame.attrs.get("warnings", ()), args.csv))


def cmd_evaluate(args):
    _call("mindvis.evaluate.run:evaluate_subject", _config(args), subject=args.subject, responses=args.responses,
          stimuli=args.stimuli, samples=args.samples, base=args.base, out_dir=args.out_dir,
          baseline_samples=args.baseline_samples, classifier_dir=args.classifier,
          start_samples=args.start_samples, lowlevel_samples=args.lowlevel_samples,
          prior_samples=args.prior_samples, prior_lowlevel_samples=args.prior_lowlevel_samples,
          shared_samples=args.shared_samples, fewshot_samples=args.fewshot_samples, device=args.device,
          overrides=_overrides(args))


def cmd_where(args):
    from mindvis.config import subjects

    config = _config(args)
    root = Path(args.results).resolve()
    print(f"mindvis: outputs of '{config['experiment']}' are under {root}/")
    for subject in subjects(config):
        print(f"  {subject}: {root / subject}/")


# -- parser -------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="mindvis", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
        sub.add_argument("--threads", type=int, default=None, help="CPU threads for BLAS/torch")
        sub.set_defaults(handler=handler)
        return sub

    add("check-config", cmd_check_config, "validate a config and list its subjects")
    sub = add("resolve-config", cmd_resolve_config, "write the config with every default filled in")
    sub.add_argument("--out", required=True)

    sub = add("stimuli", cmd_stimuli, "build the stimulus set HDF5")
    sub.add_argument("--out", required=True, help="stimulus HDF5 to write")

    sub = add("simulate", cmd_simulate, "simulate one subject's task fMRI as BIDS")
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--bids-dir", required=True)
    sub.add_argument("--subject", required=True, help="BIDS label with prefix, e.g. sub-01")
    sub.add_argument("--features", default=None,
                     help="the stimuli's deep-network features (mindvis stimulus-features; category_model deepnet): "
                          "computed once for every subject instead of in each")

    sub = add("stimulus-features", cmd_stimulus_features,
              "compute the deep-network features the simulated higher visual cortex reads (deepnet), once")
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--out", required=True, help="HDF5 to write")

    sub = add("simulate-rest", cmd_simulate_rest, "simulate one resting-state subject as BIDS")
    sub.add_argument("--bids-dir", required=True)
    sub.add_argument("--subject", required=True)

    sub = add("bids-metadata", cmd_bids_metadata, "write dataset_description.json and participants.tsv")
    sub.add_argument("--bids-dir", required=True)

    sub = add("preprocess", cmd_preprocess, "BIDS task runs to per-trial responses.h5")
    sub.add_argument("--bids-dir", required=True)
    sub.add_argument("--subject", required=True)
    sub.add_argument("--stimuli", default=None, help="stimulus HDF5 (class names and labels)")
    sub.add_argument("--out", required=True)

    sub = add("preprocess-rest", cmd_preprocess_rest, "BIDS resting-state runs to cleaned TR vectors")
    sub.add_argument("--bids-dir", required=True)
    sub.add_argument("--subject", required=True)
    sub.add_argument("--out", required=True)

    sub = add("pretrain-mbm", cmd_pretrain_mbm, "pretrain the SC-MBM encoder on all subjects")
    sub.add_argument("--responses", nargs="*", default=[], help="responses.h5 files (training split only is used)")
    sub.add_argument("--rest", nargs="*", default=[], help="resting-state HDF5 files")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out-dir")

    sub = add("adapt-mbm", cmd_adapt_mbm,
              "adapt the pretrained SC-MBM encoder of mbm.base to one subject's fMRI (MinD-Vis's stage A2)")
    sub.add_argument("--subject", required=True)
    sub.add_argument("--responses", required=True,
                     help="the subject's responses.h5 (train + val fMRI; test fMRI only if mbm.transductive)")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out-dir")

    sub = add("convert", cmd_convert, "a real data set (data.source) to responses.h5 and a stimulus HDF5")
    sub.add_argument("--subject", required=True, help="mindvis subject label, e.g. sub-01")
    sub.add_argument("--out", required=True, help="responses.h5 to write")
    sub.add_argument("--stimuli-out", required=True, help="stimulus HDF5 to write")

    sub = add("convert-rest", cmd_convert_rest, "HCP resting-state CIFTI runs (data.hcp) to a resting-state file")
    sub.add_argument("--hcp-subject", required=True, help="HCP subject id, e.g. 100307")
    sub.add_argument("--subject", default=None, help="label written in the file (default sub-<hcp id>)")
    sub.add_argument("--out", required=True)

    sub = add("merge-stimuli", cmd_merge_stimuli,
              "subjects' stimulus HDF5 files to one image corpus (train minus every test image; no pool)")
    sub.add_argument("--stimuli", nargs="+", required=True, help="the subjects' stimulus HDF5 files")
    sub.add_argument("--out", required=True, help="merged stimulus HDF5 to write")

    sub = add("import-checkpoint", cmd_import_checkpoint,
              "MinD-Vis's SC-MBM checkpoint (fmri_encoder.pth) to a mindvis SC-MBM folder")
    sub.add_argument("--checkpoint", required=True, help="MinD-Vis .pth file (state dict under 'model')")
    sub.add_argument("--out-dir", required=True, help="folder for config.json + safetensors + import_report.json")
    sub.add_argument("--num-heads", type=int, default=None,
                     help="encoder heads when the checkpoint does not record them (MinD-Vis: 16)")
    sub.add_argument("--decoder-num-heads", type=int, default=None, help="decoder heads (MinD-Vis: 16)")
    sub.add_argument("--strict", action="store_true", help="fail if any tensor cannot be mapped")

    sub = add("train-classifier", cmd_train_classifier,
              "train the domain classifier on the training images (settings: the config's classifier section)")
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out-dir/train")

    sub = add("pretrain-ldm", cmd_pretrain_ldm,
              "train the embedded image prior (VAE, then UNet with its label-free image encoder)")
    sub.add_argument("--stimuli", required=True, help="stimulus HDF5 (pool + train images are used, never test)")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--classifier", default=None, help="domain classifier folder, to score class samples")
    sub.add_argument("--resume", action="store_true")

    sub = add("bundle", cmd_bundle,
              "ship a trained prior, classifier or SC-MBM encoder inside mindvis, with its provenance")
    sub.add_argument("--kind", required=True, choices=["prior", "classifier", "sc-mbm"])
    sub.add_argument("--source", required=True, help="the pretrain-ldm, train-classifier or pretrain-mbm output folder")
    sub.add_argument("--stimuli", default=None, help="the stimulus file it was trained on (prior, classifier)")
    sub.add_argument("--quality", default=None, help="benchmarks/prior_quality.py's JSON")
    sub.add_argument("--command", action="append", default=[], help="a command that made it (repeatable)")
    sub.add_argument("--commit", default=None, help="the commit that trained it (default: HEAD)")
    sub.add_argument("--out-dir", default=None, help="default: the bundled location in the package")

    sub = add("finetune", cmd_finetune, "fine-tune the DC-LDM decoder for one subject")
    sub.add_argument("--subject", required=True)
    sub.add_argument("--responses", required=True)
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--base", required=True, help="base generator folder (results/pretrain/ldm or Stable Diffusion)")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--mbm", default=None, help="pretrained SC-MBM folder (not used with --baseline)")
    sub.add_argument("--baseline", action="store_true", help="random encoder: no SC-MBM pretraining (ablation)")
    sub.add_argument("--resume", action="store_true")
    sub.add_argument("--released", default=None,
                     help="import this MinD-Vis finetuned.pth as the subject's decoder instead of training one")

    sub = add("finetune-shared", cmd_finetune_shared,
              "fine-tune one decoder shared by several subjects (a linear adapter each); writes each one's view")
    sub.add_argument("--subjects", nargs="+", required=True)
    sub.add_argument("--responses", nargs="+", required=True, help="each subject's responses.h5, in order")
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--base", required=True, help="base generator folder")
    sub.add_argument("--out-dir", required=True, help="the shared model's folder (train/, shared.json)")
    sub.add_argument("--view-dirs", nargs="+", required=True,
                     help="each subject's decoder folder to write (results/{subject}/dcldm-shared), in order")
    sub.add_argument("--mbm", default=None, help="the SC-MBM encoder every subject's fMRI enters")
    sub.add_argument("--resume", action="store_true")

    sub = add("adapt-subject", cmd_adapt_subject,
              "adapt a shared decoder to a new subject from finetune.train_fraction of its training trials")
    sub.add_argument("--subject", required=True)
    sub.add_argument("--responses", required=True)
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--shared-subjects", nargs="+", required=True)
    sub.add_argument("--shared-views", nargs="+", required=True, help="their dcldm-shared folders, in order")
    sub.add_argument("--shared-responses", nargs="*", default=[],
                     help="their responses.h5 (prior preservation and its measure), in order")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--resume", action="store_true")

    sub = add("import-ldm", cmd_import_ldm,
              "a CompVis latent-diffusion checkpoint (cin256-v2's model.ckpt) to a diffusers-format base generator")
    sub.add_argument("--checkpoint", required=True, help="the .ckpt file (weights under 'state_dict')")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--ldm-config", default=None,
                     help="its latent-diffusion YAML (default: cin256-v2's, as MinD-Vis's label2img/config.yaml)")
    sub.add_argument("--image-size", type=int, default=None, help="generated image size (default: the first stage's)")

    sub = add("import-finetuned", cmd_import_finetuned,
              "MinD-Vis's released finetuned.pth to a mindvis decoder folder that generate and evaluate read")
    sub.add_argument("--checkpoint", required=True, help="finetuned.pth (GOD subject 3 or BOLD5000 CSI1)")
    sub.add_argument("--out-dir", required=True, help="the decoder folder, e.g. results/sub-03/dcldm")
    sub.add_argument("--base", default=None,
                     help="the converted cin256-v2 folder (import-ldm); without it the checkpoint's own UNet and "
                          "first stage are written to <out-dir>/generator/")
    sub.add_argument("--ldm-config", default=None, help="latent-diffusion YAML (default: cin256-v2's)")
    sub.add_argument("--subject", default=None)
    sub.add_argument("--num-heads", type=int, default=None, help="encoder heads (not in the file; MinD-Vis: 16)")
    sub.add_argument("--no-strict", action="store_true", help="import what maps and list the rest")

    sub = add("generate", cmd_generate, "decode a subject's test fMRI into k images per stimulus")
    _decoder_arguments(sub, "folder for the PNGs, grid.png, samples.h5 and summary.json")
    sub.add_argument("--classifier", default=None, help="domain classifier folder, to score the samples")
    sub.add_argument("--lowlevel", action="store_true",
                     help="start sampling from the decoder's low-level start (img2img; lowlevel.json in --model-dir)")
    sub.add_argument("--embedding-prior", action="store_true",
                     help="move each decoded embedding onto the decoder's bank of real image embeddings first "
                          "(embedding_prior.json in --model-dir)")
    sub.add_argument("--same-as", nargs="*", default=[],
                     help="samples.h5 of other decoders of this subject: one drawn with the same weights and sampling "
                          "is copied instead of drawn again (recorded as same_decoder_as)")
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    _override_arguments(sub)

    sub = add("edit", cmd_edit, "decode test stimuli with a voxel group's brain tokens swapped, zeroed or scaled")
    _decoder_arguments(sub, "folder for edits.h5, edits.json and grid.png")
    sub.add_argument("--ids", dest="stimuli_ids", nargs="+", required=True,
                     help="stimulus ids of generate.split to decode (trial A)")
    sub.add_argument("--operation", choices=["swap", "zero", "scale"], default="swap")
    sub.add_argument("--donors", nargs="*", default=None, help="swap: one donor stimulus id per --ids (trial B)")
    group = sub.add_mutually_exclusive_group(required=True)
    group.add_argument("--rois", nargs="+", default=None, help="the voxel group as ROI names of voxel_roi")
    group.add_argument("--mask", default=None, help="the voxel group as a NIfTI mask on the responses' grid")
    sub.add_argument("--factor", type=float, default=None,
                     help="scale (and only scale): the multiplier of the group's tokens")
    sub.add_argument("--tau", type=int, nargs="+", default=[0],
                     help="denoising steps of the source's cross-attention injected (0: none)")
    sub.add_argument("--mode", choices=["replace", "refine"], default="replace")
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    _override_arguments(sub)

    sub = add("edits", cmd_edits, "the report's brain-token edits of a subject and their in-silico check "
                                  "(generate.edit_*)")
    _decoder_arguments(sub, "folder for edits.h5 and edits.json")
    sub.add_argument("--classifier", default=None, help="domain classifier folder (the check's classifier)")
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)

    sub = add("report", cmd_report, "write a subject's self-contained HTML report")
    sub.add_argument("--metrics", required=True, help="the subject's evaluation/metrics.json")
    sub.add_argument("--out", required=True, help="report.html to write")
    sub.add_argument("--samples", required=True, help="the model's samples.h5 (generate stage)")
    sub.add_argument("--baseline-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder without SC-MBM pretraining, if any")
    sub.add_argument("--start-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder at its start (0 fine-tuning steps), if any")
    sub.add_argument("--lowlevel-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder from its low-level start (img2img), if any")
    sub.add_argument("--prior-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder through its prior in embedding space, if any")
    sub.add_argument("--prior-lowlevel-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder through its embedding prior, from its low-level start, if any")
    sub.add_argument("--shared-samples", nargs="*", default=[],
                     help="samples.h5 of the decoder shared by several subjects, if any")
    sub.add_argument("--fewshot-samples", nargs="*", default=[],
                     help="samples.h5 of the shared decoder adapted to this new subject, if any")
    sub.add_argument("--responses", default=None, help="the subject's responses.h5 (voxel grid of the brain map)")
    sub.add_argument("--mbm-curve", default=None, help="SC-MBM pretraining metrics.jsonl")
    sub.add_argument("--finetune-models", nargs="*", default=[],
                     help="dcldm.json of each fine-tuned decoder (curves from train/metrics.jsonl beside it)")
    sub.add_argument("--figures-dir", default=None, help="also write the figures there as PNG files")
    sub.add_argument("--edits", default=None, help="the subject's edits folder (rule edit), if any")
    sub.add_argument("--fewshot-benchmark", default=None,
                     help="a benchmarks/new_subject.py results JSON: its shares for this subject join the few-shot "
                          "learning curve (drawn only when measured on the same responses.h5)")

    sub = add("summary", cmd_summary, "write (with --metrics) and print the summary table over subjects")
    sub.add_argument("--metrics", nargs="*", default=[], help="every subject's metrics.json (omit: print --csv)")
    sub.add_argument("--csv", required=True, help="summary.csv to write, or to print when no --metrics")
    sub.add_argument("--html", default=None, help="summary.html to write")
    sub.add_argument("--full", action="store_true",
                     help="print every table (each subject, every metric) and the paired comparisons, not the "
                          "headline")

    sub = add("evaluate", cmd_evaluate, "score a subject's decoded images beside the baselines and ceilings")
    sub.add_argument("--subject", required=True)
    sub.add_argument("--responses", required=True, help="train/val fit the baselines; the samples' split is decoded")
    sub.add_argument("--stimuli", required=True)
    sub.add_argument("--samples", required=True, help="the DC-LDM's samples.h5")
    sub.add_argument("--baseline-samples", default=None, help="samples.h5 of the decoder without SC-MBM pretraining")
    sub.add_argument("--start-samples", default=None,
                     help="samples.h5 of the DC-LDM at its start, 0 fine-tuning steps (row dcldm-start)")
    sub.add_argument("--lowlevel-samples", default=None,
                     help="samples.h5 of the DC-LDM started from the ridge latent, img2img (row dcldm-lowlevel)")
    sub.add_argument("--prior-samples", default=None,
                     help="samples.h5 of the DC-LDM through its prior in embedding space (row dcldm-prior)")
    sub.add_argument("--prior-lowlevel-samples", default=None,
                     help="samples.h5 of the DC-LDM through its embedding prior from the low-level start "
                          "(row dcldm-prior-lowlevel)")
    sub.add_argument("--shared-samples", default=None,
                     help="samples.h5 of the decoder shared by several subjects (row dcldm-shared)")
    sub.add_argument("--fewshot-samples", default=None,
                     help="samples.h5 of the shared decoder adapted to this new subject (row dcldm-fewshot)")
    sub.add_argument("--base", required=True, help="base generator folder (its VAE and class conditioner)")
    sub.add_argument("--classifier", default=None, help="domain classifier folder (evaluate.classifier auto/domain)")
    sub.add_argument("--out-dir", required=True)
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    _override_arguments(sub, base=False)

    sub = add("where", cmd_where, "print where a run's outputs are")
    sub.add_argument("--results", default="results")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        from mindvis.utils.io import set_threads

        set_threads(args.threads)
    try:
        args.handler(args)
    except MindvisError as err:
        print(f"mindvis: error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        # A full or read-only disk met outside mindvis's own writers (which name the file): still one line.
        from mindvis.utils.io import storage_error

        converted = storage_error(err, getattr(err, "filename", None))
        if converted is None:
            raise
        print(f"mindvis: error: {converted}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
