"""The ``mindvis`` command line: one sub-command per workflow stage.

Snakemake rules call these; each sub-command validates the config with the
project schema, caps threads, and calls one function of the package, so every
stage can also be run (and tested) without Snakemake. Imports are lazy: a
sub-command pays only for the libraries it uses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from mindvis.errors import MindvisError


def _call(target, *args, **kwargs):
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)


def _config(args):
    from mindvis.config import load_config

    return load_config(args.config)


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
          bids_dir=args.bids_dir, subject=args.subject)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
