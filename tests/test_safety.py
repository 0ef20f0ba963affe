"""Repository-wide loading rules, checked on the syntax tree of every Python file of the repository (virtual
environments, hidden folders, ``runs/``, ``build/``, ``dist/``, ``data/`` and egg-info excluded):

- every ``torch.load`` (also ``from torch import load``, ``torch.serialization.load``, aliases) passes
  ``weights_only=True``, so a checkpoint can never run code;
- nothing unpickles: no ``pickle.load``/``loads``/``Unpickler`` (nor ``_pickle``, ``cPickle``, ``dill``,
  ``cloudpickle``), no ``np.load`` with ``allow_pickle`` other than ``False``;
- no string a user can see (messages, help texts, module docstrings, which scripts print as ``--help``) advises
  ``weights_only=False``. Function and class docstrings (developer documentation, never printed) and comments may
  name it, e.g. to explain why the project never does it.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED_FOLDERS = {"runs", "build", "dist", "data", "__pycache__", "node_modules"}
TORCH_LOADERS = {"torch.load", "torch.serialization.load"}
UNPICKLERS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    for name in ("load", "loads", "Unpickler")
}
NUMPY_LOADERS = {"numpy.load"}
UNSAFE_ADVICE = re.compile(r"weights_only\s*=\s*False")


def python_files(root: Path = REPO) -> Iterator[Path]:
    """The repository's own ``.py`` files, sorted, without the excluded folders."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS and not d.endswith(".egg-info")
        )
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".py"))


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name → the module or object it was imported as (``np`` → ``numpy``, ``load`` → ``torch.load``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:  # `import torch.serialization` binds `torch`
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified_name(func: ast.expr, names: dict[str, str]) -> str | None:
    """``np.load`` → ``numpy.load`` through the imports; None for calls on anything but a dotted name."""
    attributes: list[str] = []
    while isinstance(func, ast.Attribute):
        attributes.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([names.get(func.id, func.id), *reversed(attributes)])


def _keyword(call: ast.Call, name: str, position: int | None = None) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return None


def _is_constant(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def load_violations(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: problem`` for every unsafe loading call in ``source``."""
    tree = ast.parse(source, filename)
    names = _imported_names(tree)
    found = []
    for call in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset)):
        name = _qualified_name(call.func, names)
        unpacked = any(kw.arg is None for kw in call.keywords)  # **kwargs could carry anything
        where = f"{filename}:{call.lineno}"
        if name in TORCH_LOADERS and (unpacked or not _is_constant(_keyword(call, "weights_only"), True)):
            found.append(f"{where}: {name}(...) without weights_only=True")
        elif name in UNPICKLERS:
            found.append(f"{where}: {name}(...) unpickles")
        elif name in NUMPY_LOADERS:
            allow = _keyword(call, "allow_pickle", position=2)
            if unpacked or (allow is not None and not _is_constant(allow, False)):
                found.append(f"{where}: {name}(...) may unpickle (allow_pickle must be False)")
    return found


def advice_violations(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: text`` for every string other than a function or class docstring that names weights_only=False."""
    tree = ast.parse(source, filename)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    return [
        f"{filename}:{node.lineno}: {node.value.strip()[:80]!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and UNSAFE_ADVICE.search(node.value)
    ]


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    files = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in python_files()}
    assert "brats_core/utils/checkpoint.py" in files and "MaM/train.py" in files and "tests/test_safety.py" in files
    assert not any(name.startswith((".venv", "runs/")) for name in files)
    return files


def test_every_torch_load_is_weights_only_and_nothing_unpickles(sources: dict[str, str]) -> None:
    found = [v for name, text in sources.items() for v in load_violations(text, name)]
    assert found == [], "unsafe loading:\n" + "\n".join(found)
    # the scan does see the loaders (it is not vacuous): the project's own checkpoint reader calls torch.load
    assert "torch.load" in sources["brats_core/utils/checkpoint.py"]


def test_no_message_advises_unsafe_loading(sources: dict[str, str]) -> None:
    found = [
        v for name, text in sources.items() if name != "tests/test_safety.py" for v in advice_violations(text, name)
    ]
    assert found == [], "strings advising weights_only=False:\n" + "\n".join(found)


def test_the_checks_catch_unsafe_code() -> None:
    bad = """
import pickle as pk
import numpy as np
import torch
import torch.serialization
from torch import load as tload
from pickle import loads

torch.load("a.pth")
torch.load("a.pth", weights_only=False)
torch.load("a.pth", weights_only=flag)
torch.load("a.pth", **kw)
torch.serialization.load("a.pth")
tload("a.pth")
pk.load(f)
loads(b"")
pk.Unpickler(f).load()
np.load("a.npy", allow_pickle=True)
np.load("a.npy", None, True)
"""
    found = load_violations(bad)
    assert [int(v.split(":")[1]) for v in found] == list(range(9, 20))
    good = """
import numpy as np
import torch
from torch import load

torch.load("a.pth", map_location="cpu", weights_only=True)
load("a.pth", weights_only=True)
np.load("a.npy")
np.load("a.npy", mmap_mode="r", allow_pickle=False)
json.load(f)
model.load_state_dict(state)
"""
    assert load_violations(good) == []
    message = '''
"""Run with ``torch.load(weights_only=False)`` to load it."""
def reason():
    """torch's error suggests weights_only=False, which this project never does."""
    return f"{path}: re-run with weights_only = False"
'''
    assert [v.split(":")[1] for v in advice_violations(message)] == ["2", "5"]
