"""Module boundaries: a method's model and its data pipeline share their array helpers through the method's
``preprocessing`` module instead of importing each other (neither at the top nor inside a function); shared flags
(``--preset``, ``--no_progress``), score keys and the case readers have one definition each."""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from brats_core import data, evaluation, metrics, preprocessing
from brats_core.cli import add_preset_arg
from brats_core.registry import method_info
from m3ae.common import model_sizes, pretrain_preset

OWN_PIPELINES = ("ShaSpec", "m3ae")  # the methods with their own data module beside the model


def imported_modules(path: Path) -> set[str]:
    """Every module that ``path`` imports anywhere (function bodies included), relative imports resolved."""
    package = path.parent.name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # ``from .x import y`` / ``from . import x`` inside the method's package
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_imported_modules_resolves_relative_and_nested_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    source = pkg / "mod.py"
    source.write_text("import os\nfrom .data import x\ndef f():\n    from pkg import model\n")
    found = imported_modules(source)
    assert {"os", "pkg.data", "pkg.model"} <= found
    assert "pkg.mod" not in found


@pytest.mark.parametrize("method", OWN_PIPELINES)
def test_model_and_data_do_not_import_each_other(method: str) -> None:
    model, data = REPO / method / "model.py", REPO / method / "data.py"
    assert f"{method}.data" not in imported_modules(model)
    assert f"{method}.model" not in imported_modules(data)
    # the helpers both need live in the method's preprocessing module
    assert f"{method}.preprocessing" in imported_modules(model) & imported_modules(data)


@pytest.mark.parametrize(("load", "absent"), [("data", "model"), ("model", "data")])
def test_loading_one_side_leaves_the_other_unloaded(load: str, absent: str) -> None:
    """In a fresh interpreter, importing every own-pipeline ``<method>.<load>`` loads no ``<method>.<absent>``."""
    code = (
        "import importlib, sys\n"
        f"for m in {OWN_PIPELINES!r}:\n"
        f"    importlib.import_module(m + '.{load}')\n"
        f"print(sorted(m + '.{absent}' for m in {OWN_PIPELINES!r} if m + '.{absent}' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- one definition per name

SHARED_FLAGS = {"--preset", "--no_progress", "--no-progress"}  # declared by brats_core.cli helpers only


def _declared_flags(path: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in ``path`` that names one of :data:`SHARED_FLAGS`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and a.value in SHARED_FLAGS)
    return found


def test_preset_and_progress_flags_are_declared_only_in_cli() -> None:
    sources = [p for p in REPO.rglob("*.py") if not {".venv", "tests", "build"} & set(p.relative_to(REPO).parts)]
    assert REPO / "brats_core" / "cli.py" in sources
    declaring = {str(p.relative_to(REPO)) for p in sources if _declared_flags(p)}
    assert declaring == {"brats_core/cli.py"}


# training script, its build_parser, registry method; m3ae offers its sizes (its stage-1 presets are pretrain.py's)
TRAIN_SCRIPTS = [
    ("IMFuse.train_poly", "imfuse"),
    ("mmFormer.train", "mmformer"),
    ("RobustSeg.train_robustseg", "robustseg"),
    ("SFusion.train_sfusion", "sfusion"),
    ("UHVED.train_uhved", "uhved"),
    ("ShaSpec.train_SS", "shaspec"),
    ("m3ae.pretrain", "m3ae"),
    ("m3ae.train", "m3ae"),
]


@pytest.mark.parametrize(("module", "method"), TRAIN_SCRIPTS)
def test_preset_choices_come_from_the_registry(module: str, method: str) -> None:
    parser = importlib.import_module(module).build_parser()
    (action,) = [a for a in parser._actions if "--preset" in a.option_strings]
    expected = model_sizes() if method == "m3ae" else list(method_info(method).presets)
    assert list(action.choices) == expected and action.default == "paper"


def test_m3ae_sizes_leave_out_the_stage1_presets() -> None:
    assert model_sizes() == ["paper", "tiny"]
    assert {pretrain_preset(s) for s in model_sizes()} == set(method_info("m3ae").presets) - set(model_sizes())


def test_add_preset_arg_refuses_choices_the_registry_lacks() -> None:
    with pytest.raises(ValueError, match="huge"):
        add_preset_arg(argparse.ArgumentParser(), "uhved", ["paper", "huge"])


def test_evaluation_columns_are_the_metrics_score_keys() -> None:
    assert not hasattr(evaluation, "METRICS")
    assert evaluation.PER_CASE_HEADER[3 : 3 + len(metrics.SCORE_KEYS)] == metrics.SCORE_KEYS


def test_one_load_case() -> None:
    """``brats_core.data.load_case`` reads a preprocessed case; the raw NIfTI reader has its own name."""
    assert hasattr(data, "load_case") and not hasattr(preprocessing, "load_case")
    assert callable(preprocessing.read_case_images)
