"""Experiment configuration: one YAML per experiment, validated by one schema.

The schema is ``workflow/schemas/config.schema.yaml`` (the package carries it as
``mindvis/config.schema.yaml``, a link to the same file). Snakemake validates
with it in ``workflow/rules/common.smk``; the command line validates with it
here. Defaults come from the schema, so a config only states what differs.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

from mindvis.errors import MindvisError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def load_schema():
    """The config JSON Schema as a dict (a copy: callers may change it)."""
    return copy.deepcopy(_parsed_schema())


@functools.lru_cache(maxsize=1)
def _parsed_schema():
    # Parsed once per process: the schema is some 1,600 lines, and validate() runs per config.
    with open(SCHEMA_PATH) as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {seen[key] + 1}); YAML would keep "
                                "only the last", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def fill_defaults(config, schema):
    """Return a copy of ``config`` with every missing key set to its schema default."""
    config = copy.deepcopy(config)
    for key, sub_schema in schema.get("properties", {}).items():
        if key not in config and "default" in sub_schema:
            config[key] = copy.deepcopy(sub_schema["default"])
        if sub_schema.get("type") == "object" and isinstance(config.get(key), dict):
            config[key] = fill_defaults(config[key], sub_schema)
    return config


def _describe(error):
    """One line for a jsonschema error: the key path and what is allowed."""
    path = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    validator = error.validator
    if validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in error.schema.get("properties", {})]
        where = f"{path}." if path != "<top level>" else ""
        return f"{where}{extra[0] if extra else '?'}", f"unknown key; allowed keys here: {', '.join(allowed)}"
    if validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return path, f"{error.instance!r} is not allowed; allowed values: {allowed}"
    if validator == "type":
        return path, f"{error.instance!r} is not of type {error.validator_value}"
    description = error.schema.get("description", "")
    return path, f"{error.message}" + (f" ({description.strip()})" if description else "")


def validate(config, path="<config>"):
    """Validate a config dict and fill defaults.

    Parameters
    ----------
    config : dict
        The parsed YAML.
    path : str or Path
        The file it came from, named in errors.

    Returns
    -------
    dict
        The config with all defaults filled in.

    Raises
    ------
    MindvisError
        On the first invalid key, naming the key, the file and what is allowed.
    """
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise MindvisError(f"the config must be a YAML mapping of keys to values, found a {type(config).__name__}",
                           path=path, fix="write one 'key: value' per line, e.g. 'seed: 0' (see configs/default.yaml).")
    schema = load_schema()
    config = fill_defaults(config, schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(config),
        key=lambda err: (len(list(err.absolute_path)), list(map(str, err.absolute_path))),
    )
    if errors:
        key, what = _describe(errors[0])
        raise MindvisError(what, path=path, key=key,
                           fix=f"see {SCHEMA_PATH.name} (workflow/schemas/) for every key, its type and default.")
    _check_consistency(config, path)
    return config


def _check_consistency(config, path):
    sim = config["simulate"]
    if sim["isi_max"] < sim["isi_min"]:
        raise MindvisError(f"isi_max ({sim['isi_max']}) is below isi_min ({sim['isi_min']})",
                           path=path, key="simulate.isi_max", fix="make isi_max >= isi_min.")
    start, end = config["preprocess"]["lag_window"]
    if end <= start:
        raise MindvisError(f"the window end ({end}) must come after its start ({start})",
                           path=path, key="preprocess.lag_window", fix="give [start, end] with end > start.")
    settings = config["finetune"]
    if settings["train_runs"] and settings["train_fraction"] < 1.0:
        raise MindvisError(f"finetune.train_runs ({settings['train_runs']}) and finetune.train_fraction "
                           f"({settings['train_fraction']}) both pick the training share", path=path,
                           key="finetune.train_runs", fix="set one: train_runs null, or train_fraction 1.")
    if settings["shared"] or settings["new_subject"]:
        try:
            decoded = subjects(config)
        except MindvisError:
            decoded = None  # reported where the subjects are read
        if decoded is not None:
            if settings["new_subject"] and settings["new_subject"] not in decoded:
                raise MindvisError(f"finetune.new_subject {settings['new_subject']} is not a decoded subject "
                                   f"({', '.join(decoded)})", path=path, key="finetune.new_subject",
                                   fix="name one of the subjects, or set it to null.")
            if len(shared_subjects(config)) < 1:
                raise MindvisError("no subject is left for the shared decoder", path=path, key="finetune.shared",
                                   fix="decode at least two subjects, or set finetune.shared false.")
    data = config["data"]
    classifier = config["evaluate"]["classifier"]
    if (data["source"] == "simulated" and sim["category_model"] == "deepnet"
            and classifier == sim["feature_network"]):
        # A decoder would be scored by the very features the simulated higher visual cortex carries.
        others = [name for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
                  if name != classifier]
        raise MindvisError(f"the simulated cortex reads {classifier}'s layers and evaluate.classifier is "
                           f"{classifier} too", path=path, key="evaluate.classifier",
                           fix=f"score with another classifier (auto or domain), or simulate with "
                               f"simulate.feature_network: {others[0]}.")
    if data["source"] == "bids":
        if not data["bids_dir"]:
            raise MindvisError("data.source is bids but no BIDS folder is given", path=path, key="data.bids_dir",
                               fix="set data.bids_dir to the root of your BIDS data set.")
        if config["preprocess"]["roi"] == "simulation":
            raise MindvisError("the 'simulation' ROI exists only for simulated data", path=path, key="preprocess.roi",
                               fix="set preprocess.roi to a NIfTI mask on your BOLD grid.")


def _yaml_problem(err):
    """One line for a YAML syntax error: where it is and what the parser expected."""
    mark = getattr(err, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(getattr(err, "problem", None) or err).split())
    return " ".join(part for part in ("not valid YAML", where) if part) + f": {what}"


def load_config(path):
    """Read, validate and default-fill an experiment YAML.

    Raises
    ------
    MindvisError
        When the file is missing, unreadable, not YAML, or breaks the schema.
    """
    path = Path(path)
    if not path.exists():
        raise MindvisError("config file not found", path=path,
                           fix="pass an existing YAML, e.g. configs/default.yaml.")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.load(handle, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise MindvisError(_yaml_problem(err), path=path,
                           fix="correct the YAML there (indentation with spaces, closing brackets and quotes).") \
            from None
    except UnicodeDecodeError as err:
        raise MindvisError(f"not UTF-8 text (byte {err.start})", path=path,
                           fix="save the config as UTF-8 text.") from None
    except OSError as err:
        raise MindvisError(f"cannot be read ({err.strerror or err})", path=path,
                           fix="pass the YAML file itself, e.g. configs/default.yaml.") from None
    return validate(raw, path)


def subjects(config):
    """The subjects decoded in this experiment (``sub-XX`` labels)."""
    if config.get("subjects"):
        return list(config["subjects"])
    if config["data"]["source"] != "simulated":
        raise MindvisError(f"data.source is {config['data']['source']} but no subjects are listed", key="subjects",
                           fix="list the subjects to decode in the config, e.g. subjects: [sub-01, sub-02].")
    return [f"sub-{i:02d}" for i in range(1, config["simulate"]["n_subjects"] + 1)]


def shared_subjects(config):
    """The subjects of the decoder shared by several subjects (finetune_shared): every decoded subject but
    ``finetune.new_subject``; none when neither ``finetune.shared`` nor ``finetune.new_subject`` is set."""
    settings = config["finetune"]
    if not (settings.get("shared") or settings.get("new_subject")):
        return []
    released = set((settings.get("released") or {}).keys())
    return [s for s in subjects(config) if s != settings.get("new_subject") and s not in released]


def embedding_prior_wanted(config):
    """Whether the decoders get a prior in embedding space (``finetune.embedding_prior``) and its rows are drawn:
    with an image prior mindvis built whose corpus holds images apart from the stimuli (``ldm.base`` bundled, or
    embedded with ``ldm.conditioning: image`` on ``ldm.corpus`` or on a simulated stimulus file's pool), or any base
    whose corpus the config names (``finetune.embedding_prior_corpus``). Never for a prior folder of unknown corpus
    (Stable Diffusion), a class-conditioned base, or a prior trained on a real data set's stimulus images alone
    (``ldm.corpus: stimuli``): its validation stimuli repeat the training images, so once they are kept out, its
    bank could be empty."""
    settings, ldm = config["finetune"], config["ldm"]
    base = str(ldm["base"])
    own_corpus = ldm.get("corpus", "stimuli") != "stimuli" or config["data"]["source"] == "simulated"
    image_prior = base == "bundled" or (base == "embedded" and ldm.get("conditioning", "image") == "image"
                                        and own_corpus)
    return bool(settings.get("embedding_prior")) and (
        image_prior or settings.get("embedding_prior_corpus", "auto") != "auto")


def rest_subjects(config):
    """The simulated resting-state subjects used only for SC-MBM pretraining (none for real data)."""
    if config["data"]["source"] != "simulated":
        return []
    return [f"sub-rest{i:02d}" for i in range(1, config["simulate"]["n_rest_subjects"] + 1)]


def dump_config(config, path):
    """Write a resolved config as YAML (atomically)."""
    from mindvis.utils.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))


def section_settings(config, name):
    """A config section with the schema's defaults filled in (``config`` may hold only part of it).

    Parameters
    ----------
    config : dict
        An experiment config, resolved or not.
    name : str
        Top-level section, e.g. ``"classifier"`` or ``"evaluate"``.

    Returns
    -------
    dict
    """
    return fill_defaults(dict(config.get(name) or {}), load_schema()["properties"][name])
