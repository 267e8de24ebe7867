# Configuration, validation and input functions shared by all rules.
# All of the workflow's Python lives here; rules stay declarative.

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))


envvars:
    "PATH",


# Jobs call the `mindvis` of the environment running Snakemake, so a virtualenv
# works without being activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

from mindvis.config import dump_config, rest_subjects, subjects, validate as validate_config
from mindvis.errors import MindvisError

_CONFIG_SOURCES = ", ".join(str(path) for path in workflow.configfiles) or "<--config>"
try:
    config = validate_config(config, path=_CONFIG_SOURCES)
except MindvisError as error:
    raise WorkflowError(f"invalid configuration: {error}")

SUBJECTS = subjects(config)
REST_SUBJECTS = rest_subjects(config)
RESOLVED_CONFIG = "results/config.yaml"
BIDS = "results/bids"
STIMULI = f"{BIDS}/stimuli/stimuli.h5"


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


def decode_targets():
    """Files the `decode` target asks for (extended as stages are added)."""
    targets = [STIMULI, f"{BIDS}/dataset_description.json"]
    targets += [simulation_manifest(subject) for subject in SUBJECTS + REST_SUBJECTS]
    return targets
