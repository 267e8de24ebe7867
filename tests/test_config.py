"""The config schema: defaults, clear errors, and the CLI's use of it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mindvis.config import SCHEMA_PATH, fill_defaults, load_config, load_schema, subjects, validate
from mindvis.errors import MindvisError

ROOT = Path(__file__).resolve().parents[1]


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        if sub.get("type") == "object":
            yield from _walk(sub, f"{path}{key}.")


def test_package_schema_is_the_workflow_schema():
    assert SCHEMA_PATH.resolve() == (ROOT / "workflow/schemas/config.schema.yaml").resolve()


def test_every_key_has_description_and_default():
    missing = [key for key, sub in _walk(load_schema()) if "description" not in sub or "default" not in sub]
    assert missing == []


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    config = load_config(ROOT / "configs" / name)
    assert config["seed"] >= 0


def test_defaults_fill_nested_sections():
    config = validate({"simulate": {"n_subjects": 2}})
    assert config["simulate"]["n_subjects"] == 2
    assert config["simulate"]["tr"] == load_schema()["properties"]["simulate"]["properties"]["tr"]["default"]
    assert subjects(config) == ["sub-01", "sub-02"]
    assert fill_defaults({}, load_schema())["stimuli"]["image_size"] == 32


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"simulate": {"n_subject": 3}}, "simulate.n_subject", "unknown key"),
        ({"preprocess": {"method": "lss"}}, "preprocess.method", "glm_lss"),
        ({"seed": "zero"}, "seed", "not of type"),
        ({"simulate": {"isi_min": 4.0, "isi_max": 2.0}}, "simulate.isi_max", "isi_min"),
        ({"subjects": ["01"]}, "subjects.0", "does not match"),
        ({"finetune": {"train_runs": 1, "train_fraction": 0.5}}, "finetune.train_runs", "both pick"),
        ({"finetune": {"train_runs": 0}}, "finetune.train_runs", "minimum"),
    ],
)
def test_invalid_config_names_key_and_file(tmp_path, raw, key, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MindvisError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and words in message


def test_cli_reports_error_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stimuli:\n  channels: 2\n")
    result = subprocess.run([sys.executable, "-m", "mindvis.cli", "check-config", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stimuli.channels" in lines[0] and "allowed values: 1, 3" in lines[0]


def test_missing_config_file(tmp_path):
    with pytest.raises(MindvisError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_cli_sub_command_names_a_function_that_exists():
    """The command line dispatches by "module:function" strings, which neither import-linter nor an import sees."""
    import importlib
    import re

    from mindvis import cli

    targets = re.findall(r'_call\("([\w.]+):(\w+)"', Path(cli.__file__).read_text())
    assert len(targets) >= 15
    for module, function in targets:
        assert callable(getattr(importlib.import_module(module), function)), f"{module}:{function}"
