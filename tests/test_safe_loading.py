"""No code loads a file through unrestricted pickle: a static check over the project's Python files and notebooks.

Flags ``torch.load`` without ``weights_only=True``, any ``pickle`` / ``dill`` / ``cloudpickle`` /
``joblib`` load, ``pandas.read_pickle``, and ``np.load`` with ``allow_pickle`` not literally False.
Calls are matched on the parsed syntax tree (an import alias such as ``import torch as t`` is
followed), so a comment or a docstring that names ``torch.load`` is not a call.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["mindvis", "benchmarks", "workflow", "tests", "notebooks"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}


def _python_sources():
    """(path, Python source) of every .py file and every notebook's code cells (magics dropped)."""
    import json

    for entry in CHECKED:
        for path in sorted((ROOT / entry).rglob("*")):
            if ".venv" in path.parts or ".ipynb_checkpoints" in path.parts:
                continue
            if path.suffix == ".py":
                yield path, path.read_text(encoding="utf-8")
            elif path.suffix == ".ipynb":
                cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
                code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
                lines = [line for text in code for line in text.splitlines() if not line.lstrip().startswith(("%", "!"))]
                yield path, "\n".join(lines)


def _keyword(call, name):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source, filename="<source>"):
    """(line, text) of every unrestricted-pickle load in a Python source."""
    tree = ast.parse(source, filename=filename)
    aliases = {}  # local name -> module or module.attr it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def qualified(func):
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        parts.append(aliases.get(func.id, func.id))
        return ".".join(reversed(parts))

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = qualified(node.func)
        if name is None:
            continue
        module, _, attr = name.rpartition(".")
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif module.split(".")[0] in PICKLE_MODULES and attr in ("load", "loads", "Unpickler"):
            found.append((node.lineno, f"{name}"))
        elif name in ("pandas.read_pickle", "pd.read_pickle"):
            found.append((node.lineno, name))
        elif name in ("numpy.load", "np.load"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, "np.load with allow_pickle"))
    return found


@pytest.mark.parametrize("source, expected", [
    ("import torch\ntorch.load('x')", ["torch.load without weights_only=True"]),
    ("import torch\ntorch.load('x', weights_only=False)", ["torch.load without weights_only=True"]),
    ("import torch as t\nt.load('x')", ["torch.load without weights_only=True"]),
    ("from torch import load\nload('x')", ["torch.load without weights_only=True"]),
    ("import torch\ntorch.load('x', map_location='cpu', weights_only=True)", []),
    ("import pickle\npickle.load(open('x', 'rb'))", ["pickle.load"]),
    ("import pickle as p\np.loads(b'')", ["pickle.loads"]),
    ("import numpy as np\nnp.load('x', allow_pickle=True)", ["np.load with allow_pickle"]),
    ("import numpy as np\nnp.load('x', allow_pickle=False)\nnp.load('y')", []),
    ("import pandas as pd\npd.read_pickle('x')", ["pandas.read_pickle"]),
    ("'''torch.load(x) in a docstring'''\n# pickle.load(f) in a comment", []),
])
def test_the_checker_finds_unsafe_loads_and_only_those(source, expected):
    assert [text for _, text in unsafe_loads(source)] == expected


def test_no_shipped_code_loads_through_unrestricted_pickle():
    problems = []
    files = list(_python_sources())
    assert len(files) > 50 and any(path.suffix == ".ipynb" for path, _ in files)  # it reads the project
    for path, source in files:
        for line, text in unsafe_loads(source, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not problems, "unrestricted pickle loads:\n" + "\n".join(problems)
