"""The paper's comparison table and figures from the evaluation outputs of any number of runs.

    python report.py --run imfuse=runs/imfuse/test --run mmformer=runs/mmformer/test --out report/

Each ``--run`` is ``METHOD[:NAME]=PATH``: ``METHOD`` a registry name (``imfuse``, ``mmformer``, … — used for the
display name and the parameter count; any other word is accepted and shown as given), ``NAME`` an optional label
that tells several runs of one method apart, ``PATH`` a ``per_case_<tag>.csv`` written by
:func:`brats_core.evaluation.evaluate` or its output folder (every ``per_case_*.csv`` in it is merged, as
``summary.csv`` is). Outputs in ``--out``:

- ``table.md`` / ``table.csv`` / ``table.tex``: rows = the 15 scenarios in the paper's order with readable names, then
  the mean over scenarios; columns = runs × regions (Dice ×100 in Markdown/LaTeX, raw means in the CSV); the best
  value of each row and metric in bold; ``*`` marks a best value that is significantly better (paired Wilcoxon
  signed-rank test over cases, p < ``--alpha``) than every other run's;
- ``wilcoxon.csv`` / ``wilcoxon.md``: the paired test for every pair of runs, scenario and region;
- ``bars.png|pdf`` (per-scenario grouped bars per region), ``dice_vs_params.png|pdf`` (average Dice against the
  parameter count, a bubble chart like upstream's ``figs/finalplot.png``), and, with ``--datapath`` and saved
  predictions (``--save_nifti`` of the test scripts, or ``--predictions``), ``qualitative.png|pdf``;
- ``report.md``: all of it on one page.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cli import run_main
from .io import result_files, save_text
from .modalities import SCENARIOS, Scenario, parse_scenarios

log = logging.getLogger(__name__)

DICE_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
OPTIONAL_METRICS: tuple[str, ...] = ("ETpp", "HD95_WT", "HD95_TC", "HD95_ET")
LOWER_IS_BETTER: frozenset[str] = frozenset({"HD95_WT", "HD95_TC", "HD95_ET"})

# The architecture flags of the paper's configuration of each method, where they differ from the config defaults
# (IM-Fuse is evaluated with --mamba_skip --interleaved_tokenization, METHODS.md §1.3).
PAPER_OVERRIDES: dict[str, dict[str, Any]] = {"imfuse": {"mamba_skip": True, "interleaved_tokenization": True}}


@dataclasses.dataclass
class Run:
    """One evaluated run.

    Attributes:
        method: registry name (or any word for a method outside the registry).
        name: label in tables and figures.
        path: the per-case CSV or the evaluation folder it came from.
        scores: ``scores[scenario][metric][case]`` = value (NaN where the CSV cell was empty).
    """

    method: str
    name: str
    path: Path
    scores: dict[str, dict[str, dict[str, float]]]

    def metrics(self) -> list[str]:
        """Metrics with at least one finite value, in :data:`DICE_REGIONS` + :data:`OPTIONAL_METRICS` order."""
        found = {
            m for per in self.scores.values() for m, cases in per.items() if any(map(math.isfinite, cases.values()))
        }
        return [m for m in (*DICE_REGIONS, *OPTIONAL_METRICS) if m in found]

    def mean(self, scenario: str, metric: str) -> float:
        """Mean over cases (NaN cells skipped); NaN when the scenario or metric is absent."""
        values = [v for v in self.scores.get(scenario, {}).get(metric, {}).values() if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan


def display_name(method: str) -> str:
    """The registry's display name of ``method`` (e.g. ``IM-Fuse``), or ``method`` itself when not registered."""
    from .registry import method_info

    try:
        return method_info(method).display
    except KeyError:
        return method


def _read_per_case(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"case", "scenario"} <= set(rows[0]):
        raise ValueError(f"{path}: not a per-case CSV (needs 'case' and 'scenario' columns, has {list(rows[0])})")
    return rows


def load_run(method: str, path: str | Path, name: str | None = None) -> Run:
    """Read one run's per-case scores from a ``per_case_*.csv`` or an evaluation folder (all shards merged).

    Raises:
        FileNotFoundError: no per-case CSV at ``path``.
        ValueError: a file is not a per-case CSV, or names an unknown scenario.
    """
    path = Path(path)
    files = result_files(path) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: no per_case_*.csv found (run the method's test script with --savepath)")
    known = {s.name for s in SCENARIOS}
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for file in files:
        for row in _read_per_case(file):
            if row["scenario"] not in known:
                raise ValueError(f"{file}: unknown scenario {row['scenario']!r}")
            merged[(row["case"], row["scenario"])] = row
    if not merged:
        raise ValueError(f"{path}: the per-case CSV holds no rows (an evaluation that has not finished a case yet)")
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for (case, scenario), row in merged.items():
        per = scores.setdefault(scenario, {})
        for metric in (*DICE_REGIONS, *OPTIONAL_METRICS):
            cell = row.get(metric)
            per.setdefault(metric, {})[case] = float(cell) if cell not in (None, "") else math.nan
    return Run(method.lower(), name or display_name(method), path, scores)


def parse_run_spec(spec: str) -> tuple[str, str | None, str]:
    """``METHOD[:NAME]=PATH`` → (method, name or None, path)."""
    match = re.fullmatch(r"([^:=]+)(?::([^=]+))?=(.+)", spec)
    if not match:
        raise ValueError(f"--run {spec!r}: expected METHOD[:NAME]=PATH, e.g. imfuse=runs/imfuse/test")
    return match.group(1).strip(), (match.group(2) or "").strip() or None, match.group(3).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def wilcoxon_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value of ``a`` vs ``b`` (scipy; zero differences dropped).

    Returns 1.0 when every difference is zero and NaN with fewer than one non-zero pair.
    """
    from scipy.stats import wilcoxon

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return math.nan
    if not np.any(diff != 0):
        return 1.0
    return float(wilcoxon(diff).pvalue)


@dataclasses.dataclass(frozen=True)
class PairTest:
    a: str
    b: str
    scenario: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    pvalue: float


def paired_tests(runs: Sequence[Run], metrics: Sequence[str]) -> list[PairTest]:
    """Wilcoxon signed-rank test over the cases two runs share, for every pair of runs, scenario and metric."""
    out: list[PairTest] = []
    for i, ra in enumerate(runs):
        for rb in runs[i + 1 :]:
            for s in SCENARIOS:
                for metric in metrics:
                    ca = ra.scores.get(s.name, {}).get(metric, {})
                    cb = rb.scores.get(s.name, {}).get(metric, {})
                    cases = sorted(c for c in set(ca) & set(cb) if math.isfinite(ca[c]) and math.isfinite(cb[c]))
                    if not cases:
                        continue
                    va, vb = [ca[c] for c in cases], [cb[c] for c in cases]
                    out.append(
                        PairTest(
                            ra.name,
                            rb.name,
                            s.name,
                            metric,
                            len(cases),
                            float(np.mean(va)),
                            float(np.mean(vb)),
                            wilcoxon_pvalue(va, vb),
                        )
                    )
    return out


def coverage_warnings(runs: Sequence[Run]) -> list[str]:
    """What makes the runs' numbers incomparable: missing scenarios, scenarios scored on fewer cases than others,
    and runs scored on different cases (a failed array task or a test list that differs)."""
    out: list[str] = []
    case_sets = {r.name: {c for per in r.scores.values() for c in per.get("WT", {})} for r in runs}
    for r in runs:
        missing = [s.display for s in SCENARIOS if s.name not in r.scores]
        if missing:
            out.append(f"{r.name}: {len(missing)} of 15 scenarios missing ({', '.join(missing)})")
        counts = {len(per.get("WT", {})) for per in r.scores.values()}
        if len(counts) > 1:
            out.append(f"{r.name}: scenarios scored on {min(counts)} to {max(counts)} cases (an incomplete evaluation)")
    first = runs[0].name if runs else ""
    for r in runs[1:]:
        a, b = case_sets[first], case_sets[r.name]
        if a != b:
            out.append(
                f"{r.name}: {len(b)} cases, {first}: {len(a)} ({len(a & b)} in common); the paired tests use the "
                "common cases, the means each run's own"
            )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Table


@dataclasses.dataclass
class Table:
    """The comparison table: ``values[row][col]`` with rows = scenario names + ``mean`` and cols = (run, metric)."""

    rows: list[str]
    columns: list[tuple[str, str]]
    values: dict[str, dict[tuple[str, str], float]]
    best: dict[str, set[tuple[str, str]]]
    significant: dict[str, set[tuple[str, str]]]
    mean_over: int = len(SCENARIOS)  # scenarios the mean row averages (those every run has)

    def row_label(self, row: str) -> str:
        if row == "mean":
            return "Mean" if self.mean_over == len(SCENARIOS) else f"Mean ({self.mean_over} scenarios)"
        return next(s.display for s in SCENARIOS if s.name == row)


def build_table(
    runs: Sequence[Run],
    metrics: Sequence[str],
    tests: Sequence[PairTest] = (),
    alpha: float = 0.05,
    layout: str = "metric",
) -> Table:
    """Means per scenario (15 rows in the paper's order) and the mean over scenarios, best per row and metric.

    Args:
        layout: ``"metric"`` (columns grouped by region: WT of every run, then TC …) or ``"run"`` (grouped by run).
    """
    if layout == "metric":
        columns = [(r.name, m) for m in metrics for r in runs]
    elif layout == "run":
        columns = [(r.name, m) for r in runs for m in metrics]
    else:
        raise ValueError(f"layout must be 'metric' or 'run', got {layout!r}")
    by_name = {r.name: r for r in runs}
    rows = [s.name for s in SCENARIOS] + ["mean"]
    values: dict[str, dict[tuple[str, str], float]] = {}
    for s in SCENARIOS:
        values[s.name] = {(n, m): by_name[n].mean(s.name, m) for n, m in columns}
    # mean over scenarios (upstream's "Avg scores"), over the scenarios EVERY run has, so that the means compare
    shared = [s.name for s in SCENARIOS if all(s.name in r.scores for r in runs)]
    values["mean"] = {}
    for col in columns:
        finite = [values[name][col] for name in shared if math.isfinite(values[name][col])]
        values["mean"][col] = float(np.mean(finite)) if finite else math.nan
    lookup = {(t.a, t.b, t.scenario, t.metric): t.pvalue for t in tests}
    best: dict[str, set[tuple[str, str]]] = {}
    significant: dict[str, set[tuple[str, str]]] = {}
    for row in rows:
        best[row], significant[row] = set(), set()
        for metric in metrics:
            cells = [(col, values[row][col]) for col in columns if col[1] == metric and math.isfinite(values[row][col])]
            if len(cells) < 2:
                continue
            pick = min if metric in LOWER_IS_BETTER else max
            top = pick(v for _, v in cells)
            winners = [col for col, v in cells if v == top]
            best[row].update(winners)
            if row == "mean" or len(winners) != 1:
                continue
            win = winners[0][0]
            pvals = [
                lookup.get((win, col[0], row, metric), lookup.get((col[0], win, row, metric), math.nan))
                for col, _ in cells
                if col[0] != win
            ]
            if pvals and all(p < alpha for p in pvals):
                significant[row].add(winners[0])
    return Table(rows, columns, values, best, significant, len(shared))


def _fmt(value: float, metric: str, scale: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if metric in LOWER_IS_BETTER else f"{value * scale:.2f}"


def _header_label(metric: str) -> str:
    return metric.replace("_", " ")


def table_markdown(table: Table, scale: float = 100.0) -> str:
    """Markdown: best values in bold, ``*`` = significantly better than every other run (see :func:`build_table`)."""
    head = ["Scenario"] + [f"{name} {_header_label(m)}" for name, m in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = []
        for col in table.columns:
            text = _fmt(table.values[row][col], col[1], scale)
            if col in table.best[row]:
                text = f"**{text}**"
            if col in table.significant[row]:
                text += "\\*"
            cells.append(text)
        label = table.row_label(row)
        lines.append(f"| {f'**{label}**' if row == 'mean' else label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


def table_latex(table: Table, scale: float = 100.0) -> str:
    """A ``tabular`` with a two-line header (run, metric); best values in ``\\textbf``."""
    cols = "l" + "r" * len(table.columns)
    names = " & ".join(_latex_escape(n) for n, _ in table.columns)
    metrics = " & ".join(_latex_escape(_header_label(m)) for _, m in table.columns)
    lines = [
        f"\\begin{{tabular}}{{{cols}}}",
        "\\hline",
        f" & {names} \\\\",
        f"Scenario & {metrics} \\\\",
        "\\hline",
    ]
    for row in table.rows:
        if row == "mean":
            lines.append("\\hline")
        cells = []
        for col in table.columns:
            text = _fmt(table.values[row][col], col[1], scale).replace("–", "--")
            if col in table.best[row]:
                text = f"\\textbf{{{text}}}"
            if col in table.significant[row]:
                text += "$^*$"
            cells.append(text)
        lines.append(f"{_latex_escape(table.row_label(row))} & " + " & ".join(cells) + " \\\\")
    lines += ["\\hline", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def table_csv(table: Table, path: Path) -> None:
    """Raw means (Dice as fractions, HD95 in mm), one column per (run, metric), plus an ``is_best`` marker column."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scenario", "display", *(f"{n}|{m}" for n, m in table.columns), "best"])
        for row in table.rows:
            values = ["" if not math.isfinite(v) else f"{v:.6f}" for v in (table.values[row][c] for c in table.columns)]
            best = ";".join(f"{n}|{m}" for n, m in table.columns if (n, m) in table.best[row])
            writer.writerow([row, table.row_label(row), *values, best])


def tests_markdown(tests: Sequence[PairTest], alpha: float) -> str:
    """One line per pair of runs and metric: the scenarios where the difference is significant, and all p-values."""
    if not tests:
        return "(fewer than two runs: no paired tests)\n"
    lines = [
        f"Paired Wilcoxon signed-rank test over the cases both runs were scored on (two-sided); p < {alpha} in bold.",
        "",
        "| A | B | metric | " + " | ".join(s.display for s in SCENARIOS) + " |",
        "|---|---|---|" + "---:|" * len(SCENARIOS),
    ]
    groups: dict[tuple[str, str, str], dict[str, PairTest]] = {}
    for t in tests:
        groups.setdefault((t.a, t.b, t.metric), {})[t.scenario] = t
    for (a, b, metric), per in groups.items():
        cells = []
        for s in SCENARIOS:
            t = per.get(s.name)
            if t is None or not math.isfinite(t.pvalue):
                cells.append("–")
                continue
            text = f"{t.pvalue:.3g}"
            cells.append(f"**{text}**" if t.pvalue < alpha else text)
        lines.append(f"| {a} | {b} | {_header_label(metric)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tests_csv(tests: Sequence[PairTest], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "scenario", "metric", "n", "mean_a", "mean_b", "pvalue"])
        for t in tests:
            writer.writerow(
                [t.a, t.b, t.scenario, t.metric, t.n, f"{t.mean_a:.6f}", f"{t.mean_b:.6f}", f"{t.pvalue:.6g}"]
            )


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts


def paper_parameter_count(method: str) -> int | None:
    """Parameters of ``method`` at the paper preset (plus :data:`PAPER_OVERRIDES`), without running a forward.

    The model is first built on the ``meta`` device (no memory, no initialisation cost); a model whose constructor
    needs real tensors is built on the CPU instead. None when the method is not registered.
    """
    import torch

    from .registry import build_method, count_parameters, method_info

    try:
        method_info(method)
    except KeyError:
        return None
    overrides = PAPER_OVERRIDES.get(method, {})
    try:
        with torch.device("meta"):
            model = build_method(method, "paper", **overrides)
    except Exception as err:  # any failure on meta tensors: build for real
        log.info("%s: meta-device build failed (%s); building on the CPU to count parameters", method, err)
        model = build_method(method, "paper", **overrides)
    count = count_parameters(model)
    del model
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def _save(fig: Any, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150 if p.suffix == ".png" else None, bbox_inches="tight")
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(table: Table, runs: Sequence[Run], regions: Sequence[str], out: Path) -> list[Path]:
    """One panel per region: the 15 scenarios on the x axis, one bar per run (mean Dice over cases)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(regions),
        1,
        figsize=(min(20.0, 10.0 + 0.8 * len(runs)), 2.8 * len(regions)),
        squeeze=False,
    )
    x = np.arange(len(SCENARIOS))
    width = 0.8 / max(1, len(runs))
    for ax, region in zip(axes[:, 0], regions, strict=True):
        for k, run in enumerate(runs):
            ys = [table.values[s.name].get((run.name, region), math.nan) for s in SCENARIOS]
            ax.bar(x + (k - (len(runs) - 1) / 2) * width, np.nan_to_num(ys, nan=0.0), width, label=run.name)
        ax.set_ylabel(f"{region} Dice")
        ax.set_ylim(0, 1)
        ax.set_xticks(x)
        ax.set_xticklabels([s.display for s in SCENARIOS], rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(8, len(runs)), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout()
    paths = _save(fig, out, "bars")
    plt.close(fig)
    return paths


def plot_dice_vs_params(
    table: Table, runs: Sequence[Run], params: Mapping[str, int], regions: Sequence[str], out: Path
) -> list[Path] | None:
    """Bubble chart: x = parameters (millions, log scale), y = Dice averaged over regions and scenarios, bubble area
    ∝ parameters. Runs without a parameter count are left out (None when none has one)."""
    points = []
    for run in runs:
        n = params.get(run.name)
        dice = [table.values["mean"].get((run.name, r), math.nan) for r in regions]
        if n and all(math.isfinite(d) for d in dice):
            points.append((run.name, n / 1e6, float(np.mean(dice))))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = np.array([p[1] for p in points])
    scaled = 60 + 1400 * sizes / sizes.max()
    for (name, m, d), area in zip(points, scaled, strict=True):
        ax.scatter([m], [d], s=area, alpha=0.55, edgecolors="k", linewidths=0.5)
        # label above the bubble (radius in points = sqrt(area / pi)) so that neighbouring labels do not overlap it
        offset = float(np.sqrt(area / np.pi)) + 2
        ax.annotate(
            f"{name} ({m:.2f} M)",
            (m, d),
            xytext=(0, offset),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel(f"average Dice ({', '.join(regions)}; {table.mean_over} scenarios)")
    ax.grid(alpha=0.3)
    ys = [p[2] for p in points]
    pad = max(0.02, (max(ys) - min(ys)) * 0.3)
    ax.set_ylim(max(0.0, min(ys) - pad), min(1.0, max(ys) + pad))
    ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
    fig.tight_layout()
    paths = _save(fig, out, "dice_vs_params")
    plt.close(fig)
    return paths


_LABEL_COLOURS = {1: (1.0, 0.15, 0.15), 2: (0.15, 0.85, 0.15), 3: (1.0, 0.9, 0.1)}  # NCR red, ED green, ET yellow


def _overlay(ax: Any, image: np.ndarray, label: np.ndarray | None, title: str) -> None:
    ax.imshow(image.T, cmap="gray", origin="lower")
    if label is not None:
        rgba = np.zeros((*label.T.shape, 4))
        for value, colour in _LABEL_COLOURS.items():
            rgba[np.asarray(label.T) == value] = (*colour, 0.5)
        ax.imshow(rgba, origin="lower")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def load_prediction_crop(path: Path, datapath: Path, case: str) -> np.ndarray:
    """A saved label map as an array on the preprocessed crop of ``case``.

    NIfTI files written by ``--save_nifti`` are in the original geometry and are cropped with the case's
    ``meta/<case>.json``; ``.npy`` files and NIfTI files already of the crop's shape are used as they are.
    """
    from .io import load_nifti
    from .preprocessing import load_meta, output_paths

    array = np.load(path) if path.suffix == ".npy" else load_nifti(path, dtype=None)[0]
    meta = load_meta(output_paths(datapath, case).meta)
    if tuple(array.shape) == tuple(meta["cropped_shape"]):
        return np.asarray(array)
    if tuple(array.shape) != tuple(meta["original_shape"]):
        raise ValueError(
            f"{path}: shape {array.shape} is neither the original {tuple(meta['original_shape'])} nor the crop "
            f"{tuple(meta['cropped_shape'])} of case {case}"
        )
    return np.asarray(array[tuple(slice(int(lo), int(hi)) for lo, hi in meta["crop_box"])])


def find_prediction(folder: Path, case: str, scenario: Scenario) -> Path | None:
    """``<folder>/<case>_<bits>.nii.gz`` (or ``.nii``/``.npy``), the names the evaluator's ``--save_nifti`` writes."""
    for suffix in (".nii.gz", ".nii", ".npy"):
        path = folder / f"{case}_{scenario.bits}{suffix}"
        if path.is_file():
            return path
    return None


def plot_qualitative(
    datapath: Path,
    case: str,
    scenarios: Sequence[Scenario],
    prediction_dirs: Mapping[str, Path],
    out: Path,
    slice_index: int | None = None,
) -> list[Path] | None:
    """Axial slices of one case: per scenario row, FLAIR with the ground truth, then each run's prediction.

    The slice is the one with the largest tumour area in the ground truth unless ``slice_index`` is given. Runs
    without saved predictions for the case are left out; None when none has any.
    """
    from .data import load_case

    image, label = load_case(datapath, case)
    if label is None:
        raise FileNotFoundError(f"{datapath}: case {case} has no label map for the qualitative panel")
    z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if slice_index is None else slice_index
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, folder in prediction_dirs.items():
        for s in scenarios:
            path = find_prediction(folder, case, s)
            if path is not None:
                preds.setdefault(name, {})[s.name] = load_prediction_crop(path, datapath, case)[..., z]
    if not preds:
        return None
    plt = _pyplot()
    names = list(preds)
    fig, axes = plt.subplots(
        len(scenarios), 1 + len(names), figsize=(1.9 * (1 + len(names)), 1.9 * len(scenarios)), squeeze=False
    )
    flair = image[0, ..., z]
    for i, s in enumerate(scenarios):
        _overlay(axes[i, 0], flair, label[..., z], f"{s.display}\nFLAIR + ground truth")
        for j, name in enumerate(names, start=1):
            pred = preds[name].get(s.name)
            if pred is None:
                axes[i, j].axis("off")
                continue
            _overlay(axes[i, j], flair, pred, name)
    fig.suptitle(f"{case}, axial slice {z} (red NCR, green ED, yellow ET)", fontsize=8)
    fig.tight_layout()
    paths = _save(fig, out, "qualitative")
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


@dataclasses.dataclass
class ReportResult:
    table: Table
    tests: list[PairTest]
    files: list[Path]


def make_report(
    runs: Sequence[Run],
    out: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    params: Mapping[str, int] | None = None,
    alpha: float = 0.05,
    layout: str = "metric",
    figures: bool = True,
    datapath: str | Path | None = None,
    case: str | None = None,
    panel_scenarios: Sequence[Scenario] | None = None,
    prediction_dirs: Mapping[str, Path] | None = None,
    count_params: bool = True,
) -> ReportResult:
    """Write the table, the paired tests, the figures and ``report.md`` for ``runs`` into ``out``.

    Args:
        metrics: table columns per run; default: WT, TC, ET plus ETpp and HD95 when every run has them.
        params: parameter count per run name, overriding the registry count at the paper preset.
        prediction_dirs: run name → folder of saved predictions (default: ``<run folder>/predictions``).
        count_params: count parameters of registered methods for the bubble chart.
    """
    if not runs:
        raise ValueError("no runs to report")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}: give NAME in METHOD:NAME=PATH")
    if datapath is not None and not Path(datapath).is_dir():
        raise FileNotFoundError(f"--datapath {datapath}: no such folder (the preprocessed data, for the panel)")
    known_cases = {c for r in runs for per in r.scores.values() for c in per.get("WT", {})}
    if case is not None and case not in known_cases:
        raise ValueError(f"--case {case}: not among the runs' cases (e.g. {', '.join(sorted(known_cases)[:3])})")
    warnings = coverage_warnings(runs)
    for text in warnings:
        log.warning("%s", text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if metrics is None:
        common = set.intersection(*(set(r.metrics()) for r in runs))
        metrics = [m for m in (*DICE_REGIONS, *OPTIONAL_METRICS) if m in common]
    tests = paired_tests(runs, metrics)
    table = build_table(runs, metrics, tests, alpha, layout)
    files = [out / "table.md", out / "table.csv", out / "table.tex", out / "wilcoxon.csv", out / "wilcoxon.md"]
    save_text(files[0], table_markdown(table))
    table_csv(table, files[1])
    save_text(files[2], table_latex(table))
    tests_csv(tests, files[3])
    save_text(files[4], tests_markdown(tests, alpha))
    counts: dict[str, int] = {}
    for run in runs:
        n = (params or {}).get(run.name) or (params or {}).get(run.method)
        if n is None and count_params:
            n = paper_parameter_count(run.method)
        if n:
            counts[run.name] = int(n)
    figure_lines: list[str] = []
    if figures:
        regions = [m for m in DICE_REGIONS if m in metrics]
        made = plot_bars(table, runs, regions, out)
        figure_lines.append("![Dice per scenario](bars.png)")
        bubble = plot_dice_vs_params(table, runs, counts, regions, out)
        if bubble:
            made += bubble
            figure_lines.append("![Average Dice vs parameters](dice_vs_params.png)")
        if datapath is not None:
            dirs = dict(prediction_dirs or {})
            for run in runs:
                default = (run.path if run.path.is_dir() else run.path.parent) / "predictions"
                dirs.setdefault(run.name, default)
            chosen_case = case or _first_case(runs)
            panel = plot_qualitative(
                Path(datapath),
                chosen_case,
                panel_scenarios or _default_panel(),
                {k: v for k, v in dirs.items() if v.is_dir()},
                out,
            )
            if panel:
                made += panel
                figure_lines.append("![Qualitative comparison](qualitative.png)")
            else:
                log.warning(
                    "no saved predictions for case %s: no qualitative panel (test with --save_nifti)", chosen_case
                )
        files += made
    lines = [
        "# Comparison",
        "",
        "Runs: " + ", ".join(f"{r.name} (`{r.path}`)" for r in runs),
        "",
        f"Dice ×100 (mean over cases), HD95 in mm; best per row and metric in bold; \\* = significantly better than "
        f"every other run (paired Wilcoxon signed-rank over cases, p < {alpha}).",
        "",
        table_markdown(table),
    ]
    if warnings:
        lines += ["**Incomplete or unequal evaluations:**", "", *(f"- {w}" for w in warnings), ""]
    if counts:
        lines += [
            "Parameters (paper configuration): " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()),
            "",
        ]
    lines += ["## Paired tests", "", tests_markdown(tests, alpha), *figure_lines]
    save_text(out / "report.md", "\n".join(lines) + "\n")
    files.append(out / "report.md")
    return ReportResult(table, tests, files)


def _first_case(runs: Sequence[Run]) -> str:
    cases = sorted({c for r in runs for per in r.scores.values() for c in per.get("WT", {})})
    if not cases:
        raise ValueError("the runs hold no cases")
    return cases[0]


def _default_panel() -> list[Scenario]:
    return parse_scenarios("t2,flair+t1ce,t1ce+t1+t2,flair+t1ce+t1+t2")


def _mapping(items: Sequence[str], flag: str, cast: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        out[key.strip()] = cast(float(value)) if cast is int else cast(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="METHOD[:NAME]=PATH",
        help="a run: registry method, optional label, per-case CSV or evaluation folder (repeatable)",
    )
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument(
        "--metrics", default=None, help="comma list of columns per run (default: WT,TC,ET + ETpp/HD95 when present)"
    )
    p.add_argument("--layout", default="metric", choices=["metric", "run"], help="group columns by metric or by run")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="NAME=N",
        help="parameter count of a run (name or method), overriding the registry's paper-preset count",
    )
    p.add_argument("--no_param_count", action="store_true", help="do not build models to count parameters")
    p.add_argument("--no_figures", action="store_true")
    p.add_argument("--datapath", default=None, help="preprocessed data, for the qualitative panel")
    p.add_argument("--case", default=None, help="case of the qualitative panel (default: the first test case)")
    p.add_argument(
        "--panel_scenarios",
        default="t2,flair+t1ce,t1ce+t1+t2,flair+t1ce+t1+t2",
        help="scenarios (rows) of the qualitative panel",
    )
    p.add_argument(
        "--predictions",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="saved predictions of a run (default: <run folder>/predictions)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    try:
        runs = []
        for spec in args.run:
            method, name, path = parse_run_spec(spec)
            runs.append(load_run(method, path, name))
        params = _mapping(args.params, "--params", int)
        preds = {k: Path(v) for k, v in _mapping(args.predictions, "--predictions", str).items()}
        panel = parse_scenarios(args.panel_scenarios)
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        unknown = sorted(set(metrics or []) - {*DICE_REGIONS, *OPTIONAL_METRICS})
        if unknown:
            parser.error(f"--metrics: unknown {unknown}; known: {', '.join((*DICE_REGIONS, *OPTIONAL_METRICS))}")
        result = make_report(
            runs,
            args.out,
            metrics=metrics,
            params=params,
            alpha=args.alpha,
            layout=args.layout,
            figures=not args.no_figures,
            datapath=args.datapath,
            case=args.case,
            panel_scenarios=panel,
            prediction_dirs=preds,
            count_params=not args.no_param_count,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(table_markdown(result.table))
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
