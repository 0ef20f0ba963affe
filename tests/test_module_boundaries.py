"""Module boundaries: a method's model and its data pipeline share their array helpers through the method's
``preprocessing`` module instead of importing each other (neither at the top nor inside a function); shared flags
(``--preset``, ``--no_progress``), score keys and the case readers have one definition each."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from brats_core.apps.arguments import add_preset_arg
from brats_core.data import dataset as data
from brats_core.data import preprocessing
from brats_core.engine import evaluation, metrics
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

SHARED_FLAGS = {"--preset", "--no_progress", "--no-progress"}  # declared by one helper each


def _declared_flags(path: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in ``path`` that names one of :data:`SHARED_FLAGS`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and a.value in SHARED_FLAGS)
    return found


def test_preset_and_progress_flags_are_declared_once() -> None:
    """``--no_progress`` in ``utils/cli.py`` (every script), ``--preset`` in ``apps/arguments.py`` (method scripts)."""
    sources = [p for p in REPO.rglob("*.py") if not {".venv", "tests", "build"} & set(p.relative_to(REPO).parts)]
    declaring = {str(p.relative_to(REPO)): _declared_flags(p) for p in sources if _declared_flags(p)}
    assert declaring == {
        "brats_core/utils/cli.py": {"--no_progress"},
        "brats_core/apps/arguments.py": {"--preset"},
    }


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
    """``brats_core.data.dataset.load_case`` reads a preprocessed case; the raw NIfTI reader has its own name."""
    assert hasattr(data, "load_case") and not hasattr(preprocessing, "load_case")
    assert callable(preprocessing.read_case_images)


# ------------------------------------------------------------------------------------------------------ layering

LAYERS = {
    "brats_core.modalities": 0,
    "brats_core.labels": 0,
    "brats_core.utils": 1,
    "brats_core.data": 2,
    "brats_core.registry": 3,
    "brats_core.nn": 4,
    "brats_core.engine": 5,
    "brats_core.apps": 6,
}
"""The layers of ``brats_core``, lowest first: a module imports only from its own layer or a lower one."""


def layer(module: str) -> int | None:
    """The layer of a ``brats_core`` module (or of a name imported from one), None outside the package."""
    if module == "brats_core" or not module.startswith("brats_core."):
        return None
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def brats_core_modules() -> list[Path]:
    return sorted((REPO / "brats_core").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute_imports(path: Path, name: str | None = None) -> set[str]:
    """The modules ``path`` (module ``name``, default: from its place in the repository) imports anywhere, relative
    imports resolved against its package."""
    name = name or module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
    return found


def upward_imports(path: Path, name: str | None = None) -> set[str]:
    """The imports of ``path`` from a higher layer than its own."""
    own = layer(name or module_name(path))
    assert own is not None
    return {m for m in absolute_imports(path, name) if (layer(m) or 0) > own}


def test_every_module_has_a_layer() -> None:
    names = [module_name(p) for p in brats_core_modules()]
    assert len(names) > 30
    assert all(layer(n) is not None for n in names if n != "brats_core")


def test_absolute_imports_resolve_relative_ones() -> None:
    kernels = REPO / "brats_core" / "nn" / "ops" / "kernels.py"
    assert "brats_core.nn" in absolute_imports(kernels)  # ``from .. import triton_scan``
    assert "brats_core.nn.ops.chunked" in absolute_imports(kernels)


@pytest.mark.parametrize("path", brats_core_modules(), ids=lambda p: str(p.relative_to(REPO / "brats_core")))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    if module_name(path) == "brats_core":  # the package's __init__ imports nothing of its own
        assert not {m for m in absolute_imports(path) if m.startswith("brats_core")}
        return
    assert not upward_imports(path), f"{module_name(path)} imports {sorted(upward_imports(path))}"


def test_no_module_imports_a_method_package() -> None:
    """The core knows methods by name only (the registry imports them by string)."""
    methods = {"IMFuse", "mmFormer", "RobustSeg", "SFusion", "UHVED", "m3ae", "ShaSpec", "MaM"}
    offenders = {
        module_name(p): sorted(m for m in absolute_imports(p) if m.split(".")[0] in methods)
        for p in brats_core_modules()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_layer_check_catches_upward_imports(tmp_path: Path) -> None:
    """An import inside a function counts, and so does a relative one."""
    source = tmp_path / "bad.py"
    source.write_text("from . import io\ndef f():\n    from ...engine.training import Trainer\n")
    assert upward_imports(source, "brats_core.utils.bad") == set()  # ``...engine`` leaves the package: not resolved
    source.write_text("from .io import x\ndef f():\n    from ..engine.training import Trainer\n")
    assert upward_imports(source, "brats_core.utils.bad") == {"brats_core.engine.training"}


def test_readme_layout_names_every_package_and_module() -> None:
    """The README's Layout section matches the tree: each sub-package of ``brats_core`` and each of its modules."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    core = REPO / "brats_core"
    for path in sorted(core.rglob("*.py")):
        if path.name == "__init__.py" or "ops" in path.relative_to(core).parts:
            continue
        name = path.name if path.parent == core else path.stem
        # a whole word: ``io`` must not be found inside ``evaluation``
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", layout), (
            f"README Layout lacks {path.relative_to(core)}"
        )
    for package in sorted(p for p in core.iterdir() if (p / "__init__.py").is_file()):
        assert re.search(rf"(?<![\w]){package.name}/", layout), f"README Layout does not mention {package.name}/"
        assert package.name in {prefix.split(".")[1] for prefix in LAYERS if prefix.count(".") == 1}
