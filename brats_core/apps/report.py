"""The paper's comparison table and figures from the evaluation outputs of any number of runs.

    python report.py --run imfuse=runs/imfuse/test --run mmformer=runs/mmformer/test --out report/

Each ``--run`` is ``METHOD[:NAME]=PATH``: ``METHOD`` a registry name (``imfuse``, ``mmformer``, … — used for the
display name and, without an evaluation record, the parameter count; any other word is accepted and shown as given),
``NAME`` an optional label that tells several runs of one method apart, ``PATH`` a ``per_case_<tag>.csv`` written by
:func:`brats_core.engine.evaluation.evaluate` or its output folder (every ``per_case_*.csv`` in it is merged, as
``summary.csv`` is). Outputs in ``--out``:

- ``table.md`` / ``table.csv`` / ``table.tex``: rows = the 15 scenarios in the paper's order with readable names, then
  the mean over scenarios; columns = runs × regions (Dice ×100 in Markdown/LaTeX, raw means in the CSV); the best
  value of each row and metric in bold; ``*`` marks a best value that is significantly better (paired Wilcoxon
  signed-rank test over cases, p < ``--alpha``) than every other run's. The CSV holds the bounds of a case-level
  bootstrap 95 % confidence interval of every cell (``RUN|METRIC|low`` / ``|high``); ``--paper_reference`` adds a
  ``paper`` column per run whose mean row is the published average Dice of its method (:data:`PAPER_REFERENCE`);
- ``wilcoxon.csv`` / ``wilcoxon.md``: the paired test for every pair of runs, scenario and region, with the smallest
  p the test can reach with that many cases;
- ``shapley.csv`` / ``marginal.csv`` / ``shapley.png|pdf``: what each modality is worth: its exact Shapley value in
  the game of the four modalities whose value v(S) is the score of scenario S (v(∅) = 0), per case and averaged, and
  the gain of adding each modality to each subset;
- ``bars.png|pdf`` (per-scenario grouped bars per region with 95 % intervals), ``dice_vs_params.png|pdf`` (average
  Dice against the parameter count of each evaluated model, beside the published values, like upstream's
  ``figs/finalplot.png``), and, with ``--datapath`` and saved predictions (``--save_nifti`` of the test scripts, or
  ``--predictions``), ``qualitative.png|pdf``;
- ``report.md``: all of it on one page, the intervals included.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from brats_core.engine.evaluation import DamagedResultsError, read_rows
from brats_core.engine.metrics import LESION_WISE_KEYS
from brats_core.modalities import DISPLAY_NAMES, MODALITIES, SCENARIOS, Scenario, parse_scenarios
from brats_core.utils.cli import UsageError, run_main
from brats_core.utils.io import RECORD_FILE, atomic_path, load_json, result_files, save_text

log = logging.getLogger(__name__)

DICE_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
# the lesion-wise columns of evaluations run with --lesion_wise (absent from other and older folders)
OPTIONAL_METRICS: tuple[str, ...] = ("ETpp", "HD95_WT", "HD95_TC", "HD95_ET", *LESION_WISE_KEYS)
LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"HD95_WT", "HD95_TC", "HD95_ET", *(k for k in LESION_WISE_KEYS if k.startswith("LesionWise_HD95"))}
)

# The architecture flags of the paper's configuration of each method, where they differ from the config defaults
# (IM-Fuse is evaluated with --mamba_skip --interleaved_tokenization).
PAPER_OVERRIDES: dict[str, dict[str, Any]] = {"imfuse": {"mamba_skip": True, "interleaved_tokenization": True}}

DEFAULT_RESAMPLES = 10_000
"""Bootstrap resamples of the confidence intervals (``--bootstrap``)."""


@dataclasses.dataclass(frozen=True)
class PaperResult:
    """A method's published result: average Dice (fraction; over the 15 scenarios and WT, TC, ET) and parameters."""

    display: str
    dice: float
    params_m: float
    approximate: bool = False  # the parameter count is published as "about"


PAPER_SOURCE = "the figure `figs/finalplot.png` of the upstream IM-Fuse repository (AImageLab-zip/IM-Fuse)"
"""Where :data:`PAPER_REFERENCE` comes from."""

# Read off the figure figs/finalplot.png of the upstream IM-Fuse repository (github.com/AImageLab-zip/IM-Fuse), which
# plots the published average Dice of the eight methods against their parameter counts (U-HVED: "about 1.3 M").
PAPER_REFERENCE: dict[str, PaperResult] = {
    "imfuse": PaperResult("IM-Fuse", 0.833, 64.0),
    "mmformer": PaperResult("mmFormer", 0.828, 36.0),
    "m3ae": PaperResult("M3AE", 0.826, 40.6),
    "mam": PaperResult("MaM", 0.817, 67.3),
    "sfusion": PaperResult("SFusion", 0.804, 41.2),
    "shaspec": PaperResult("ShaSpec", 0.803, 187.7),
    "robustseg": PaperResult("RobustSeg", 0.792, 42.0),
    "uhved": PaperResult("U-HVED", 0.723, 1.3, approximate=True),
}


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
    from brats_core.registry import method_info

    try:
        return method_info(method).display
    except KeyError:
        return method


def load_run(method: str, path: str | Path, name: str | None = None) -> Run:
    """Read one run's per-case scores from a ``per_case_*.csv`` or an evaluation folder (all shards merged).

    Damaged rows (e.g. cut short by a full disk) are left out with a warning naming the file and line.

    Raises:
        FileNotFoundError: no per-case CSV at ``path``.
        ValueError: a file is not the evaluator's per-case CSV (``DamagedResultsError``), or holds no rows.
    """
    path = Path(path)
    files = result_files(path) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: no per_case_*.csv found (run the method's test script with --savepath)")
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for file in files:
        try:
            rows = read_rows(file, damaged="left out of the report")
        except DamagedResultsError as err:
            raise ValueError(f"{err.path}: not a per-case CSV of the evaluator ({err.problem})") from err
        for row in rows:
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


def min_attainable_p(n: int) -> float:
    """The smallest two-sided p of the exact signed-rank test over ``n`` non-zero differences: 2 / 2^n (every
    difference of one sign is the most extreme of the 2^n equally likely sign patterns, at either tail)."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2**n)


def cases_needed(alpha: float) -> int:
    """The fewest non-zero paired differences with which the exact signed-rank test can reach p < ``alpha``."""
    n = 1
    while min_attainable_p(n) >= alpha:
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class PairTest:
    """The paired test of runs ``a`` and ``b`` on one scenario and metric over their ``n`` common cases, of which
    ``nonzero`` differ (the others do not count in the signed-rank test)."""

    a: str
    b: str
    scenario: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    pvalue: float
    nonzero: int = 0


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
                            int(np.count_nonzero(np.subtract(va, vb))),
                        )
                    )
    return out


def _p_text(p: float) -> str:
    return f"{p:.3g}"


def min_p_notes(tests: Sequence[PairTest], alpha: float) -> tuple[str, list[str]]:
    """What the number of cases allows: a sentence on the smallest attainable p, and warnings where it is not below
    ``alpha`` (then no difference can be called significant, however large). Empty without tests."""
    counts = [t.nonzero for t in tests if t.nonzero > 0]
    if not counts:
        return "", []
    lo, hi = min(counts), max(counts)

    def floor(n: int) -> str:
        return f"2/2^{n} = {_p_text(min_attainable_p(n))}"

    here = f"n = {lo}: {floor(lo)}" if lo == hi else f"n = {lo} to {hi}: from {floor(lo)} down to {floor(hi)}"
    statement = (
        "The smallest attainable p of the exact two-sided signed-rank test with n non-zero paired differences is "
        f"2/2^n (every difference of one sign); here {here}."
    )
    needed = cases_needed(alpha)
    if min_attainable_p(hi) >= alpha:
        return statement, [
            f"with at most {hi} non-zero paired differences per test, p cannot fall below "
            f"{_p_text(min_attainable_p(hi))} ≥ alpha = {alpha}: no difference in this report can be significant, "
            f"however large; at least {needed} cases (with non-zero differences) are needed"
        ]
    short = [n for n in counts if min_attainable_p(n) >= alpha]
    if short:
        return statement, [
            f"{len(short)} of {len(counts)} tests have at most {max(short)} non-zero paired differences: their p "
            f"cannot fall below {_p_text(min_attainable_p(max(short)))} ≥ alpha = {alpha} (at least {needed} are "
            "needed)"
        ]
    return statement, []


def bootstrap_weights(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """How often each of ``n`` cases is drawn in each of ``resamples`` resamples with replacement: ``(resamples, n)``
    counts, each row summing to ``n``; the same for the same ``(n, resamples, seed)``."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)


def bootstrap_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of every column of ``values`` ``(n, k)`` (NaN = missing, skipped) in every resample of
    ``weights`` ``(B, n)``: ``(B, k)``, NaN where a resample drew no finite value of the column."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(finite, values, 0.0)) / (weights @ finite)


def percentile_bounds(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval over axis 0 of bootstrap ``samples`` (NaN skipped; NaN for all-NaN columns)."""
    tail = 100.0 * (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its bound is NaN, said by the NaN
        low, high = np.nanpercentile(samples, [tail, 100.0 - tail], axis=0)
    return low, high


def bootstrap_interval(
    values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Case-level bootstrap percentile interval of the mean of each column of ``values`` ``(n,)`` or ``(n, k)``
    (rows = cases resampled with replacement; NaN = missing). Returns (low, high), each of shape ``values.shape[1:]``.
    """
    values = np.asarray(values, dtype=float)
    flat = values.reshape(len(values), -1)
    low, high = percentile_bounds(bootstrap_means(flat, bootstrap_weights(len(flat), resamples, seed)), level)
    return low.reshape(values.shape[1:]), high.reshape(values.shape[1:])


def _nanmean_columns(samples: np.ndarray) -> np.ndarray:
    """Row means of ``samples`` ``(B, k)`` over the finite entries (NaN where none is)."""
    finite = np.isfinite(samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, samples, 0.0).sum(axis=1) / finite.sum(axis=1)


def case_matrix(run: Run, metric: str) -> tuple[list[str], np.ndarray]:
    """The run's cases (sorted) and their scores ``(cases, 15 scenarios)`` in the paper's order (NaN = not scored)."""
    cases = sorted({c for per in run.scores.values() for c, v in per.get(metric, {}).items() if math.isfinite(v)})
    matrix = np.full((len(cases), len(SCENARIOS)), math.nan)
    for j, s in enumerate(SCENARIOS):
        column = run.scores.get(s.name, {}).get(metric, {})
        for i, case in enumerate(cases):
            matrix[i, j] = column.get(case, math.nan)
    return cases, matrix


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
# What each modality is worth: the four modalities as players of a cooperative game, v(S) = the score of scenario S


def coalition(modalities: Iterable[str]) -> int:
    """Index of a set of modalities in a game vector: bit i set for ``MODALITIES[i]`` (FLAIR 1, T1ce 2, T1 4, T2 8)."""
    return sum(1 << MODALITIES.index(m) for m in set(modalities))


def game_vector(scores: Mapping[str, float]) -> np.ndarray:
    """The ``(16,)`` game of one case: ``v[coalition(S)]`` = the score of scenario S (scenario name → score);
    v(∅) = 0 (no modality, no segmentation); NaN for a scenario not in ``scores``."""
    game = np.full(1 << len(MODALITIES), math.nan)
    game[0] = 0.0
    for s in SCENARIOS:
        game[coalition(s.modalities)] = scores.get(s.name, math.nan)
    return game


def _players(game: np.ndarray) -> int:
    k = int(game.shape[-1]).bit_length() - 1
    if game.shape[-1] != 1 << k:
        raise ValueError(f"a game vector has 2^k entries (one per coalition), got {game.shape[-1]}")
    return k


def shapley_values(game: np.ndarray) -> np.ndarray:
    """Exact Shapley values of the players of ``game`` ``(..., 2^k)`` (indexed as :func:`coalition`): ``(..., k)``.

    phi_i = sum over the coalitions S without i of |S|! (k - 1 - |S|)! / k! · (v(S ∪ {i}) - v(S)); they sum to
    v(all) - v(∅) (efficiency).
    """
    game = np.asarray(game, dtype=float)
    k = _players(game)
    out = np.zeros((*game.shape[:-1], k))
    for i in range(k):
        bit = 1 << i
        for s in range(1 << k):
            if s & bit:
                continue
            size = s.bit_count()
            weight = math.factorial(size) * math.factorial(k - 1 - size) / math.factorial(k)
            out[..., i] += weight * (game[..., s | bit] - game[..., s])
    return out


def marginal_gains(game: np.ndarray) -> np.ndarray:
    """v(S ∪ {i}) - v(S) for every player i and coalition S of ``game`` ``(..., 2^k)``: ``(..., k, 2^k)``, NaN where
    S already holds i."""
    game = np.asarray(game, dtype=float)
    k = _players(game)
    out = np.full((*game.shape[:-1], k, 1 << k), math.nan)
    for i in range(k):
        bit = 1 << i
        for s in range(1 << k):
            if not s & bit:
                out[..., i, s] = game[..., s | bit] - game[..., s]
    return out


def subset_display(index: int) -> str:
    """``"FLAIR + T1ce"`` for a coalition index, ``"none"`` for the empty one."""
    names = [DISPLAY_NAMES[m] for i, m in enumerate(MODALITIES) if index >> i & 1]
    return " + ".join(names) or "none"


@dataclasses.dataclass
class ModalityWorth:
    """The Shapley values of the four modalities (canonical order) for one run and metric.

    Attributes:
        cases: the cases scored in all 15 scenarios (the others have no complete game).
        per_case: ``(cases, 4)`` Shapley values of each case.
        mean: ``(4,)`` their mean (the Shapley values of the mean game); ``low``/``high`` its 95 % bootstrap bounds.
        gains: ``(4, 16)`` mean gain of adding modality i to coalition S (NaN where S holds i).
        full: the mean full-modality score over ``cases`` (= ``mean.sum()``).
    """

    run: str
    metric: str
    cases: list[str]
    per_case: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    gains: np.ndarray
    full: float


def modality_worth(run: Run, metric: str, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> ModalityWorth | None:
    """Shapley values of the modalities per case and averaged (None when no case is scored in all 15 scenarios)."""
    cases, matrix = case_matrix(run, metric)
    complete = np.all(np.isfinite(matrix), axis=1)
    if not complete.any():
        return None
    games = np.zeros((int(complete.sum()), 1 << len(MODALITIES)))
    for j, s in enumerate(SCENARIOS):
        games[:, coalition(s.modalities)] = matrix[complete, j]
    per_case = shapley_values(games)
    nan = np.full(len(MODALITIES), math.nan)
    low, high = bootstrap_interval(per_case, resamples, seed) if resamples > 0 else (nan, nan.copy())
    return ModalityWorth(
        run.name,
        metric,
        [c for c, ok in zip(cases, complete, strict=True) if ok],
        per_case,
        per_case.mean(axis=0),
        low,
        high,
        marginal_gains(games).mean(axis=0),
        float(games[:, -1].mean()),
    )


def _interval_text(value: float, low: float, high: float, scale: float = 100.0) -> str:
    if not math.isfinite(value):
        return "–"
    text = f"{value * scale:.2f}"
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low * scale:.2f}, {high * scale:.2f}]"
    return text


def worth_markdown(worth: Sequence[ModalityWorth]) -> str:
    """Rows = modalities (+ their sum and the number of cases), columns = run × metric: Shapley value × 100 and its
    95 % interval."""
    if not worth:
        return "(no run is scored in all 15 scenarios: no Shapley values)\n"
    head = ["Modality"] + [f"{w.run} {_header_label(w.metric)}" for w in worth]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(worth)]
    for i, m in enumerate(MODALITIES):
        cells = [_interval_text(w.mean[i], w.low[i], w.high[i]) for w in worth]
        lines.append(f"| {DISPLAY_NAMES[m]} | " + " | ".join(cells) + " |")
    lines.append("| Sum = all four modalities | " + " | ".join(f"{w.mean.sum() * 100:.2f}" for w in worth) + " |")
    lines.append("| cases | " + " | ".join(str(len(w.cases)) for w in worth) + " |")
    return "\n".join(lines) + "\n"


def _subsets_without(i: int) -> list[int]:
    """Coalitions without player i, smallest first."""
    return sorted((s for s in range(1 << len(MODALITIES)) if not s >> i & 1), key=lambda s: (s.bit_count(), s))


def marginal_markdown(worth: Sequence[ModalityWorth]) -> str:
    """Rows = (modality added, subset it is added to), columns = run × metric: the mean gain × 100."""
    if not worth:
        return ""
    head = ["Adding", "to"] + [f"{w.run} {_header_label(w.metric)}" for w in worth]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(worth)]
    for i, m in enumerate(MODALITIES):
        for s in _subsets_without(i):
            cells = [f"{w.gains[i, s] * 100:+.2f}" for w in worth]
            lines.append(f"| {DISPLAY_NAMES[m]} | {subset_display(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    save_text(path, buffer.getvalue())


def _num(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ""


def worth_csv(worth: Sequence[ModalityWorth], path: Path) -> None:
    """One row per run, metric and case (and ``case = mean``, with the 95 % bounds): the four Shapley values, their
    sum and the full-modality score."""
    names = [DISPLAY_NAMES[m] for m in MODALITIES]
    header = ["run", "metric", "case", *(f"{n}{part}" for n in names for part in ("", "|low", "|high"))]
    rows = []
    for w in worth:
        per_case = zip(w.cases, w.per_case, strict=True)
        for case, phi in [*per_case, ("mean", w.mean)]:
            bounds = (w.low, w.high) if case == "mean" else (np.full(4, np.nan), np.full(4, np.nan))
            cells = [_num(v) for i in range(len(names)) for v in (phi[i], bounds[0][i], bounds[1][i])]
            full = w.full if case == "mean" else phi.sum()  # efficiency: a case's values sum to its full score
            rows.append([w.run, w.metric, case, *cells, _num(phi.sum()), _num(full)])
    _save_csv(path, [*header, "sum", "full_modality"], rows)


def marginal_csv(worth: Sequence[ModalityWorth], path: Path) -> None:
    """One row per run, metric, modality and subset without it: the mean gain of adding the modality."""
    rows = [
        [w.run, w.metric, DISPLAY_NAMES[m], subset_display(s), _num(w.gains[i, s]), len(w.cases)]
        for w in worth
        for i, m in enumerate(MODALITIES)
        for s in _subsets_without(i)
    ]
    _save_csv(path, ["run", "metric", "modality", "subset", "gain", "cases"], rows)


# ---------------------------------------------------------------------------------------------------------------------
# Table

PAPER_COLUMN = "paper"
"""The metric name of the ``--paper_reference`` column (the published average Dice, in the mean row only)."""


@dataclasses.dataclass
class Table:
    """The comparison table: ``values[row][col]`` with rows = scenario names + ``mean`` and cols = (run, metric).

    ``low``/``high`` hold the 95 % bootstrap bounds of each cell (absent without resampling); ``average`` the Dice
    of each run averaged over the Dice regions of the mean row, with its bounds (value, low, high).
    """

    rows: list[str]
    columns: list[tuple[str, str]]
    values: dict[str, dict[tuple[str, str], float]]
    best: dict[str, set[tuple[str, str]]]
    significant: dict[str, set[tuple[str, str]]]
    mean_over: int = len(SCENARIOS)  # scenarios the mean row averages (those every run has)
    low: dict[str, dict[tuple[str, str], float]] = dataclasses.field(default_factory=dict)
    high: dict[str, dict[tuple[str, str], float]] = dataclasses.field(default_factory=dict)
    average: dict[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
    resamples: int = 0

    def row_label(self, row: str) -> str:
        if row == "mean":
            return "Mean" if self.mean_over == len(SCENARIOS) else f"Mean ({self.mean_over} scenarios)"
        return next(s.display for s in SCENARIOS if s.name == row)

    def bounds(self, row: str, col: tuple[str, str]) -> tuple[float, float]:
        """The 95 % interval of a cell, (NaN, NaN) where there is none."""
        return self.low.get(row, {}).get(col, math.nan), self.high.get(row, {}).get(col, math.nan)


def build_table(
    runs: Sequence[Run],
    metrics: Sequence[str],
    tests: Sequence[PairTest] = (),
    alpha: float = 0.05,
    layout: str = "metric",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    paper: Mapping[str, float] | None = None,
) -> Table:
    """Means per scenario (15 rows in the paper's order) and the mean over scenarios, best per row and metric, and
    case-level bootstrap 95 % intervals of every cell.

    Args:
        layout: ``"metric"`` (columns grouped by region: WT of every run, then TC …) or ``"run"`` (grouped by run).
        resamples: bootstrap resamples (0: no intervals). Each run's cases are resampled with replacement, the same
            draw for every scenario of a resample, so that the mean row's interval is that of the mean over scenarios.
        seed: seed of the resampling (the same cases get the same draws in every run and metric).
        paper: run name → a published average Dice, shown in a ``paper`` column of the mean row.
    """
    if layout == "metric":
        columns = [(r.name, m) for m in metrics for r in runs]
        columns += [(r.name, PAPER_COLUMN) for r in runs] if paper is not None else []
    elif layout == "run":
        extra = [PAPER_COLUMN] if paper is not None else []
        columns = [(r.name, m) for r in runs for m in [*metrics, *extra]]
    else:
        raise ValueError(f"layout must be 'metric' or 'run', got {layout!r}")
    by_name = {r.name: r for r in runs}
    rows = [s.name for s in SCENARIOS] + ["mean"]
    measured = [col for col in columns if col[1] != PAPER_COLUMN]
    values: dict[str, dict[tuple[str, str], float]] = {}
    for s in SCENARIOS:
        values[s.name] = {(n, m): by_name[n].mean(s.name, m) for n, m in measured}
    # mean over scenarios (upstream's "Avg scores"), over the scenarios EVERY run has, so that the means compare
    shared = [s.name for s in SCENARIOS if all(s.name in r.scores for r in runs)]
    values["mean"] = {}
    for col in measured:
        finite = [values[name][col] for name in shared if math.isfinite(values[name][col])]
        values["mean"][col] = float(np.mean(finite)) if finite else math.nan
    for name, _ in (col for col in columns if col[1] == PAPER_COLUMN):
        for row in rows:
            values[row][(name, PAPER_COLUMN)] = math.nan
        values["mean"][(name, PAPER_COLUMN)] = (paper or {}).get(name, math.nan)
    low, high, replicas = _bootstrap_cells(by_name, measured, shared, resamples, seed)
    regions = [m for m in DICE_REGIONS if m in metrics]
    average: dict[str, tuple[float, float, float]] = {}
    for run in runs:
        if not regions:
            break
        point = float(np.mean([values["mean"][(run.name, r)] for r in regions]))
        lo = hi = math.nan
        if all((run.name, r) in replicas for r in regions):
            lo, hi = (float(v) for v in percentile_bounds(np.mean([replicas[(run.name, r)] for r in regions], axis=0)))
        average[run.name] = (point, lo, hi)
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
    return Table(rows, columns, values, best, significant, len(shared), low, high, average, resamples)


def _bootstrap_cells(
    by_name: Mapping[str, Run], columns: Sequence[tuple[str, str]], shared: Sequence[str], resamples: int, seed: int
) -> tuple[dict, dict, dict[tuple[str, str], np.ndarray]]:
    """Bounds of every cell and mean-row cell (``low[row][col]``, ``high[row][col]``) and the mean row's resampled
    values per column ``(resamples,)``; all empty when ``resamples`` is 0."""
    low: dict[str, dict[tuple[str, str], float]] = {}
    high: dict[str, dict[tuple[str, str], float]] = {}
    replicas: dict[tuple[str, str], np.ndarray] = {}
    if resamples <= 0:
        return low, high, replicas
    weights: dict[int, np.ndarray] = {}
    shared_columns = [s.index for s in SCENARIOS if s.name in shared]
    for col in columns:
        cases, matrix = case_matrix(by_name[col[0]], col[1])
        if not cases:
            continue
        if len(cases) not in weights:
            weights[len(cases)] = bootstrap_weights(len(cases), resamples, seed)
        samples = bootstrap_means(matrix, weights[len(cases)])  # (resamples, 15 scenarios)
        lo, hi = percentile_bounds(samples)
        for s in SCENARIOS:
            low.setdefault(s.name, {})[col] = float(lo[s.index])
            high.setdefault(s.name, {})[col] = float(hi[s.index])
        replicas[col] = _nanmean_columns(samples[:, shared_columns])
        mean_lo, mean_hi = percentile_bounds(replicas[col])
        low.setdefault("mean", {})[col], high.setdefault("mean", {})[col] = float(mean_lo), float(mean_hi)
    return low, high, replicas


def _fmt(value: float, metric: str, scale: float) -> str:
    if not math.isfinite(value):
        return "–"
    if metric == PAPER_COLUMN:  # published with one decimal
        return f"{value * scale:.1f}"
    return f"{value:.2f}" if metric in LOWER_IS_BETTER else f"{value * scale:.2f}"


def _header_label(metric: str) -> str:
    return metric.replace("_", " ")


def table_markdown(table: Table, scale: float = 100.0, intervals: bool = False) -> str:
    """Markdown: best values in bold, ``*`` = significantly better than every other run (see :func:`build_table`);
    ``intervals`` adds each cell's 95 % bootstrap interval in brackets."""
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
            lo, hi = table.bounds(row, col)
            if intervals and math.isfinite(lo) and math.isfinite(hi):
                text += f" [{_fmt(lo, col[1], scale)}, {_fmt(hi, col[1], scale)}]"
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
    """Raw means (Dice as fractions, HD95 in mm), one column per (run, metric) followed by its 95 % bootstrap bounds
    (``|low``, ``|high``; with resampling only), plus a ``best`` marker column."""
    header = ["scenario", "display"]
    for name, m in table.columns:
        header.append(f"{name}|{m}")
        if table.resamples > 0 and m != PAPER_COLUMN:
            header += [f"{name}|{m}|low", f"{name}|{m}|high"]
    rows = []
    for row in table.rows:
        cells = [row, table.row_label(row)]
        for col in table.columns:
            cells.append(_num(table.values[row][col]))
            if table.resamples > 0 and col[1] != PAPER_COLUMN:
                cells += [_num(v) for v in table.bounds(row, col)]
        cells.append(";".join(f"{n}|{m}" for n, m in table.columns if (n, m) in table.best[row]))
        rows.append(cells)
    _save_csv(path, [*header, "best"], rows)


def tests_markdown(tests: Sequence[PairTest], alpha: float) -> str:
    """The smallest attainable p (and a warning where it is not below ``alpha``), then one line per pair of runs and
    metric: the p-values of every scenario, those below ``alpha`` in bold."""
    if not tests:
        return "(fewer than two runs: no paired tests)\n"
    statement, notes = min_p_notes(tests, alpha)
    lines = [
        f"Paired Wilcoxon signed-rank test over the cases both runs were scored on (two-sided); p < {alpha} in bold.",
        "",
        *([statement, ""] if statement else []),
        *(line for n in notes for line in (f"**Warning:** {n}.", "")),
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
    """One row per test; ``min_p`` = the smallest p attainable with its ``nonzero`` differences."""
    rows = [
        [
            t.a,
            t.b,
            t.scenario,
            t.metric,
            t.n,
            t.nonzero,
            f"{t.mean_a:.6f}",
            f"{t.mean_b:.6f}",
            f"{t.pvalue:.6g}",
            f"{min_attainable_p(t.nonzero):.6g}",
        ]
        for t in tests
    ]
    _save_csv(path, ["a", "b", "scenario", "metric", "n", "nonzero", "mean_a", "mean_b", "pvalue", "min_p"], rows)


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """A run's parameter count and where it comes from: ``"record"`` (the evaluated model, rebuilt from the method
    and config of its ``evaluation.json``, or the count stored there), ``"given"`` (``--params``) or ``"paper"`` (the
    registry's paper preset, only for a run without an evaluation record)."""

    count: int
    source: str

    def describe(self) -> str:
        """Where the count comes from, for ``report.md``."""
        return {
            "record": "the evaluated model, from its evaluation.json",
            "given": "given with --params",
            "paper": "paper preset: no evaluation.json",
        }[self.source]

    def label(self, name: str) -> str:
        """The figure label: ``IM-Fuse (2.32 M)``, the source named unless it is the evaluated model."""
        extra = "" if self.source == "record" else f", {self.describe()}"
        return f"{name} ({self.count / 1e6:.2f} M{extra})"


def _count_built(build: Callable[[], Any], what: str) -> int:
    """Parameters of the model ``build()`` makes, built on the ``meta`` device (no memory, no initialisation cost);
    a model whose constructor needs real tensors is built on the CPU instead."""
    import torch

    from brats_core.registry import count_parameters

    try:
        with torch.device("meta"):
            model = build()
    except Exception as err:  # any failure on meta tensors: build for real
        log.info("%s: meta-device build failed (%s); building on the CPU to count parameters", what, err)
        model = build()
    count = count_parameters(model)
    del model
    return count


def paper_parameter_count(method: str) -> int | None:
    """Parameters of ``method`` at the paper preset (plus :data:`PAPER_OVERRIDES`), without running a forward.

    None when the method is not registered.
    """
    from brats_core.registry import build_method, method_info

    try:
        method_info(method)
    except KeyError:
        return None
    overrides = PAPER_OVERRIDES.get(method, {})
    return _count_built(lambda: build_method(method, "paper", **overrides), method)


def evaluation_record(run: Run) -> tuple[Path, dict[str, Any]] | None:
    """The ``evaluation.json`` beside the run's per-case CSVs (what produced them), or None when there is none.

    Raises:
        ValueError: the file is not a JSON object.
    """
    path = (run.path if run.path.is_dir() else run.path.parent) / RECORD_FILE
    if not path.is_file():
        return None
    record = load_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not an evaluation record (a JSON object); remove it or re-run the evaluation")
    return path, record


def record_parameter_count(path: Path, record: Mapping[str, Any], build: bool = True) -> int | None:
    """The parameters of the model an evaluation record describes: the count it stores (``parameters``), else the
    model rebuilt from its ``method`` and ``config`` (:func:`brats_core.registry.build_from_config`) when ``build``.
    None when the record names no registered method or its config cannot be built (said in the log)."""
    from brats_core.registry import build_from_config, method_info

    stored = record.get("parameters")
    if isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
        return stored
    method, config = str(record.get("method") or ""), record.get("config")
    try:
        method_info(method)
    except KeyError:
        log.info("%s: the evaluated model %r is not a registered method: no parameter count", path, method)
        return None
    if not build:
        return None
    if not isinstance(config, dict):
        log.warning("%s: no model config in the record: no parameter count (re-run the evaluation)", path)
        return None
    try:
        return _count_built(lambda: build_from_config(method, config), f"{path} ({method})")
    except Exception as err:  # a config of another version of the method: no count rather than a wrong one
        log.warning("%s: cannot build %s from the recorded config (%s): no parameter count", path, method, err)
        return None


def parameter_counts(
    runs: Sequence[Run], params: Mapping[str, int] | None = None, build: bool = True
) -> dict[str, ParamCount]:
    """The parameter count of each run (by name) that has one.

    ``params`` (run name or method → count) comes first; then the evaluated model described by the run's
    ``evaluation.json``; the registry's paper preset of the run's method only for a run without a record. ``build``
    False builds no model (counts stored in records and ``params`` only).
    """
    out: dict[str, ParamCount] = {}
    for run in runs:
        given = (params or {}).get(run.name) or (params or {}).get(run.method)
        if given:
            out[run.name] = ParamCount(int(given), "given")
            continue
        found = evaluation_record(run)
        count = record_parameter_count(*found, build=build) if found else None
        if count:
            out[run.name] = ParamCount(count, "record")
        elif found is None and build:
            paper = paper_parameter_count(run.method)
            if paper:
                out[run.name] = ParamCount(paper, "paper")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def _save(fig: Any, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=p.suffix[1:], dpi=150 if p.suffix == ".png" else None, bbox_inches="tight")
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _case_count(run: Run, metric: str) -> str:
    """``n = 8 cases`` (``n = 7–8 cases`` when scenarios were scored on different numbers of cases)."""
    counts = [sum(map(math.isfinite, per.get(metric, {}).values())) for per in run.scores.values()]
    lo, hi = min(counts, default=0), max(counts, default=0)
    return f"n = {lo} cases" if lo == hi else f"n = {lo}–{hi} cases"


def _interval_note(resamples: int) -> str:
    if resamples <= 0:
        return "no intervals (--bootstrap 0)"
    return f"error bars: 95 % bootstrap CI of the mean ({resamples} resamples of the cases)"


def _yerr(values: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> np.ndarray:
    """``(2, n)`` distances below and above each value (0 where there is no interval)."""
    v, lo, hi = (np.asarray(x, dtype=float) for x in (values, lows, highs))
    return np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0)


def _method_colours() -> dict[str, Any]:
    """One colour per published method, shared by its runs and its paper marker."""
    colours = _pyplot().get_cmap("tab10").colors
    return {m: colours[i % len(colours)] for i, m in enumerate(PAPER_REFERENCE)}


def _run_colours(runs: Sequence[Run]) -> dict[str, Any]:
    """Run name → colour, the same in every figure: its method's colour for the first run of a published method,
    the colours no method uses (then any) for the others."""
    method_colour = _method_colours()
    colours = _pyplot().get_cmap("tab10").colors
    spare = iter([c for c in colours if c not in method_colour.values()] + list(colours) * len(runs))
    out: dict[str, Any] = {}
    for run in runs:
        colour = method_colour.get(run.method)
        out[run.name] = colour if colour is not None and colour not in out.values() else next(spare)
    return out


def bars_figure(table: Table, runs: Sequence[Run], regions: Sequence[str]) -> Any:
    """One panel per region: the 15 scenarios on the x axis, one bar per run (mean Dice over cases) with its 95 %
    bootstrap interval; the legend gives each run's number of cases."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(regions),
        1,
        figsize=(min(20.0, 10.0 + 0.8 * len(runs)), 2.8 * len(regions)),
        squeeze=False,
    )
    x = np.arange(len(SCENARIOS))
    width = 0.8 / max(1, len(runs))
    colours = _run_colours(runs)
    for ax, region in zip(axes[:, 0], regions, strict=True):
        for k, run in enumerate(runs):
            col = (run.name, region)
            ys = [table.values[s.name].get(col, math.nan) for s in SCENARIOS]
            bounds = [table.bounds(s.name, col) for s in SCENARIOS]
            yerr = _yerr(ys, [b[0] for b in bounds], [b[1] for b in bounds]) if table.resamples > 0 else None
            ax.bar(
                x + (k - (len(runs) - 1) / 2) * width,
                np.nan_to_num(ys, nan=0.0),
                width,
                yerr=yerr,
                capsize=1.5,
                error_kw={"elinewidth": 0.7, "capthick": 0.7},
                color=colours[run.name],
                label=f"{run.name} ({_case_count(run, region)})",
            )
        ax.set_ylabel(f"{region} Dice")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels([s.display for s in SCENARIOS], rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(4, len(runs)), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.02))
    axes[-1, 0].set_xlabel(f"available modalities (mean over the test cases; {_interval_note(table.resamples)})")
    fig.tight_layout()
    return fig


def plot_bars(table: Table, runs: Sequence[Run], regions: Sequence[str], out: Path) -> list[Path]:
    """``bars.png|pdf`` (see :func:`bars_figure`)."""
    fig = bars_figure(table, runs, regions)
    paths = _save(fig, out, "bars")
    _pyplot().close(fig)
    return paths


def _dice_limits(values: Sequence[float], min_span: float = 20.0) -> tuple[float, float]:
    """y-limits (Dice × 100) holding ``values`` with a margin, at least ``min_span`` wide, on multiples of 5 in
    [0, 100]: a single run's interval of a point or two must not fill the axis."""
    lo, hi = min(values) - 3.0, max(values) + 3.0
    if hi - lo < min_span:
        centre = (hi + lo) / 2
        lo, hi = centre - min_span / 2, centre + min_span / 2
    lo, hi = max(0.0, math.floor(lo / 5) * 5), min(100.0, math.ceil(hi / 5) * 5)
    if hi - lo < min_span:  # clipped at 0 or 100: widen on the other side
        lo, hi = (lo, min(100.0, lo + min_span)) if lo == 0.0 else (max(0.0, hi - min_span), hi)
    return lo, hi


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between ``lo`` and ``hi`` (for a log axis in millions)."""
    candidates = [m * 10.0**e for e in range(-3, 5) for m in (1, 2, 5)]
    return [t for t in candidates if lo <= t <= hi]


def dice_vs_params_figure(
    table: Table, runs: Sequence[Run], counts: Mapping[str, ParamCount], regions: Sequence[str]
) -> Any | None:
    """Average Dice × 100 (over ``regions`` and the mean row's scenarios, with its 95 % interval) against the
    parameter count (millions, log scale) of each run that has one (filled circles), beside the published values of
    the eight methods (:data:`PAPER_REFERENCE`, hollow diamonds); one marker size for all (the x axis is the count).
    None when no run has a count."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    points = []
    for run in runs:
        count = counts.get(run.name)
        value, lo, hi = table.average.get(run.name, (math.nan, math.nan, math.nan))
        if count and math.isfinite(value):
            points.append((run, count, 100 * value, 100 * lo, 100 * hi))
    if not points:
        return None
    plt = _pyplot()
    method_colour, run_colour = _method_colours(), _run_colours([p[0] for p in points])
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    ys: list[float] = []
    xs: list[float] = []
    for run, count, y, lo, hi in points:
        colour = run_colour[run.name]
        m = count.count / 1e6
        if math.isfinite(lo) and math.isfinite(hi):
            ax.errorbar([m], [y], yerr=_yerr([y], [lo], [hi]), fmt="none", ecolor=colour, capsize=3, lw=1)
            ys += [lo, hi]
        ax.scatter([m], [y], s=60, color=colour, edgecolors="k", linewidths=0.5, label=count.label(run.name), zorder=3)
        xs.append(m)
        ys.append(y)
    for method, ref in PAPER_REFERENCE.items():
        about = "≈" if ref.approximate else ""
        ax.scatter(
            [ref.params_m],
            [100 * ref.dice],
            s=45,
            marker="D",
            facecolors="none",
            edgecolors=[method_colour[method]],
            linewidths=1.2,
            label=f"{ref.display}, paper ({about}{ref.params_m:.1f} M, {100 * ref.dice:.1f})",
            zorder=2,
        )
        xs.append(ref.params_m)
        ys.append(100 * ref.dice)
    ax.set_xscale("log")
    x_lo, x_hi = min(xs) / 1.6, max(xs) * 1.6
    ax.set_xlim(x_lo, x_hi)
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(x_lo, x_hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(*_dice_limits(ys))
    ax.set_xlabel("parameters (millions, log scale)")
    over = f"{table.mean_over} scenarios" + ("" if table.mean_over == len(SCENARIOS) else ", the paper: 15")
    ax.set_ylabel(f"average Dice × 100 ({', '.join(regions)}; {over})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        title="filled: this report (95 % CI)\nhollow: paper (finalplot.png)",
        title_fontsize=7,
    )
    fig.tight_layout()
    return fig


def plot_dice_vs_params(
    table: Table, runs: Sequence[Run], counts: Mapping[str, ParamCount], regions: Sequence[str], out: Path
) -> list[Path] | None:
    """``dice_vs_params.png|pdf`` (see :func:`dice_vs_params_figure`); None when no run has a parameter count."""
    fig = dice_vs_params_figure(table, runs, counts, regions)
    if fig is None:
        return None
    paths = _save(fig, out, "dice_vs_params")
    _pyplot().close(fig)
    return paths


def worth_figure(worth: Sequence[ModalityWorth], runs: Sequence[Run]) -> Any:
    """One panel per metric: the four modalities on the x axis, one bar per run (Shapley value × 100, 95 % CI)."""
    plt = _pyplot()
    colours = _run_colours(runs)
    metrics = list(dict.fromkeys(w.metric for w in worth))
    names = list(dict.fromkeys(w.run for w in worth))
    lookup = {(w.run, w.metric): w for w in worth}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.8, 3.4), squeeze=False, sharey=True)
    x = np.arange(len(MODALITIES))
    width = 0.8 / max(1, len(names))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, name in enumerate(names):
            w = lookup.get((name, metric))
            if w is None:
                continue
            finite = bool(np.all(np.isfinite(w.low)))
            ax.bar(
                x + (k - (len(names) - 1) / 2) * width,
                100 * w.mean,
                width,
                yerr=100 * _yerr(w.mean, w.low, w.high) if finite else None,
                capsize=2,
                error_kw={"elinewidth": 0.7},
                color=colours.get(name),
                label=f"{name} (sum {100 * w.mean.sum():.1f}, n = {len(w.cases)})",
            )
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels([DISPLAY_NAMES[m] for m in MODALITIES])
        ax.set_title(f"{_header_label(metric)} Dice", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("Shapley value (Dice × 100)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="sum = all four modalities")
    intervals = any(np.all(np.isfinite(w.low)) for w in worth)
    fig.suptitle(
        "What each modality is worth: exact Shapley values" + (", 95 % bootstrap CI" if intervals else ""), fontsize=9
    )
    fig.tight_layout()
    return fig


def plot_worth(worth: Sequence[ModalityWorth], runs: Sequence[Run], out: Path) -> list[Path]:
    """``shapley.png|pdf`` (see :func:`worth_figure`)."""
    fig = worth_figure(worth, runs)
    paths = _save(fig, out, "shapley")
    _pyplot().close(fig)
    return paths


_LABEL_COLOURS = {1: (1.0, 0.15, 0.15), 2: (0.15, 0.85, 0.15), 3: (1.0, 0.9, 0.1)}  # NCR red, ED green, ET yellow

# The panel's underlay: the first of these the scenario has. FLAIR shows the whole tumour with its oedema, T1ce the
# enhancing rim; a scenario without them gets T2 (oedema bright) before T1.
UNDERLAY_PREFERENCE: tuple[str, ...] = ("flair", "t1ce", "t2", "t1")


def underlay_modality(scenario: Scenario) -> str:
    """The modality shown under the label maps of ``scenario``'s row: one the model was given."""
    return next(m for m in UNDERLAY_PREFERENCE if m in scenario.modalities)


def _bare(ax: Any) -> None:
    """No ticks and no frame, but the axes stay on so that the first column's row label shows."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _overlay(ax: Any, image: np.ndarray, label: np.ndarray | None) -> None:
    ax.imshow(image.T, cmap="gray", origin="lower")
    if label is not None:
        rgba = np.zeros((*label.T.shape, 4))
        for value, colour in _LABEL_COLOURS.items():
            rgba[np.asarray(label.T) == value] = (*colour, 0.5)
        ax.imshow(rgba, origin="lower")
    _bare(ax)


def load_prediction_crop(path: Path, datapath: Path, case: str) -> np.ndarray:
    """A saved label map as an array on the preprocessed crop of ``case``.

    NIfTI files written by ``--save_nifti`` are in the original geometry and are cropped with the case's
    ``meta/<case>.json``; ``.npy`` files and NIfTI files already of the crop's shape are used as they are.
    """
    from brats_core.data.preprocessing import load_meta, output_paths
    from brats_core.utils.io import load_nifti

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


def qualitative_figure(
    image: np.ndarray,
    label: np.ndarray,
    z: int,
    scenarios: Sequence[Scenario],
    preds: Mapping[str, Mapping[str, np.ndarray]],
    case: str,
) -> Any:
    """Rows = scenarios (labelled with the scenario and its underlay), columns = the ground truth, then each run.

    Args:
        image: ``(4, H, W, D)`` in canonical channel order; label ``(H, W, D)``; z the axial slice shown.
        preds: run name → scenario name → ``(H, W)`` label slice (absent: an empty panel).
    """
    plt = _pyplot()
    names = list(preds)
    fig, axes = plt.subplots(
        len(scenarios), 1 + len(names), figsize=(1.9 * (1 + len(names)) + 0.4, 1.9 * len(scenarios)), squeeze=False
    )
    for i, s in enumerate(scenarios):
        modality = underlay_modality(s)
        underlay = image[MODALITIES.index(modality), ..., z]
        _overlay(axes[i, 0], underlay, label[..., z])
        axes[i, 0].set_ylabel(f"{s.display}\n(underlay: {DISPLAY_NAMES[modality]})", fontsize=7)
        for j, name in enumerate(names, start=1):
            pred = preds[name].get(s.name)
            if pred is None:
                _bare(axes[i, j])
                axes[i, j].text(0.5, 0.5, "no prediction", ha="center", va="center", fontsize=6, color="0.5")
            else:
                _overlay(axes[i, j], underlay, pred)
    for j, title in enumerate(["ground truth", *names]):
        axes[0, j].set_title(title, fontsize=7)
    fig.suptitle(f"{case}, axial slice {z} (red NCR, green ED, yellow ET)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_qualitative(
    datapath: Path,
    case: str,
    scenarios: Sequence[Scenario],
    prediction_dirs: Mapping[str, Path],
    out: Path,
    slice_index: int | None = None,
) -> list[Path] | None:
    """Axial slices of one case: per scenario row, the ground truth and each run's prediction on a modality that
    scenario has (see :func:`qualitative_figure`).

    The slice is the one with the largest tumour area in the ground truth unless ``slice_index`` is given. Runs
    without saved predictions for the case are left out; None when none has any.
    """
    from brats_core.data.dataset import load_case

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
    fig = qualitative_figure(image, label, z, scenarios, preds, case)
    paths = _save(fig, out, "qualitative")
    _pyplot().close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


@dataclasses.dataclass
class ReportResult:
    table: Table
    tests: list[PairTest]
    files: list[Path]
    worth: list[ModalityWorth] = dataclasses.field(default_factory=list)
    counts: dict[str, ParamCount] = dataclasses.field(default_factory=dict)


def paper_lines(table: Table, runs: Sequence[Run], counts: Mapping[str, ParamCount]) -> list[str]:
    """``report.md``'s comparison with the published values: each run's average Dice and parameters beside its
    method's, and the source."""
    lines = [
        "| Run | average Dice [95 % CI] | parameters | paper: average Dice | paper: parameters |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        value, lo, hi = table.average.get(run.name, (math.nan, math.nan, math.nan))
        count = counts.get(run.name)
        ref = PAPER_REFERENCE.get(run.method)
        cells = [
            _interval_text(value, lo, hi),
            f"{count.count / 1e6:.2f} M" if count else "–",
            f"{100 * ref.dice:.1f}" if ref else "–",
            f"{'about ' if ref.approximate else ''}{ref.params_m:.1f} M" if ref else "–",
        ]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    over = "" if table.mean_over == len(SCENARIOS) else f" (here over {table.mean_over} scenarios only)"
    lines += [
        "",
        f"Average Dice × 100 over WT, TC and ET and the mean row's scenarios{over}. The paper's values (average over "
        f"the 15 scenarios; {', '.join(f'{r.display} {100 * r.dice:.1f}' for r in PAPER_REFERENCE.values())}) and "
        f"parameter counts are those published in {PAPER_SOURCE}; they are the hollow markers of the "
        "Dice-vs-parameters figure.",
        "",
    ]
    if counts:
        lines += [
            "Parameters: " + ", ".join(f"{k} {c.count / 1e6:.2f} M ({c.describe()})" for k, c in counts.items()),
            "",
        ]
    return lines


def _check_report_inputs(runs: Sequence[Run], resamples: int, datapath: str | Path | None, case: str | None) -> None:
    """Refuse, before anything is written, what :func:`make_report` cannot do (ValueError / FileNotFoundError)."""
    if not runs:
        raise ValueError("no runs to report")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}: give NAME in METHOD:NAME=PATH")
    if resamples < 0:
        raise ValueError(f"--bootstrap {resamples}: the number of resamples is 0 (no intervals) or more")
    if datapath is not None and not Path(datapath).is_dir():
        raise FileNotFoundError(f"--datapath {datapath}: no such folder (the preprocessed data, for the panel)")
    known_cases = {c for r in runs for per in r.scores.values() for c in per.get("WT", {})}
    if case is not None and case not in known_cases:
        raise ValueError(f"--case {case}: not among the runs' cases (e.g. {', '.join(sorted(known_cases)[:3])})")


def _make_figures(
    table: Table,
    runs: Sequence[Run],
    metrics: Sequence[str],
    counts: Mapping[str, Any],
    worth: Sequence[Any],
    out: Path,
    datapath: str | Path | None,
    case: str | None,
    panel_scenarios: Sequence[Scenario] | None,
    prediction_dirs: Mapping[str, Path] | None,
) -> tuple[list[Path], list[str]]:
    """Write the figures; returns the files and the Markdown lines that show them in ``report.md``."""
    regions = [m for m in DICE_REGIONS if m in metrics]
    made = plot_bars(table, runs, regions, out)
    figure_lines = ["![Dice per scenario](bars.png)"]
    bubble = plot_dice_vs_params(table, runs, counts, regions, out)
    if bubble:
        made += bubble
        figure_lines.append("![Average Dice vs parameters](dice_vs_params.png)")
    if worth:
        made += plot_worth(worth, runs, out)
    if datapath is None:
        return made, figure_lines
    given = dict(prediction_dirs or {})
    # the panel's columns in the runs' order
    dirs = {
        run.name: given.pop(run.name, (run.path if run.path.is_dir() else run.path.parent) / "predictions")
        for run in runs
    } | given
    chosen_case = case or _first_case(runs)
    panel = plot_qualitative(
        Path(datapath), chosen_case, panel_scenarios or _default_panel(), {k: v for k, v in dirs.items() if v.is_dir()},
        out,
    )  # fmt: skip
    if panel:
        made += panel
        figure_lines.append("![Qualitative comparison](qualitative.png)")
    else:
        log.warning("no saved predictions for case %s: no qualitative panel (test with --save_nifti)", chosen_case)
    return made, figure_lines


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
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    paper_reference: bool = False,
) -> ReportResult:
    """Write the table, the paired tests, the modalities' Shapley values, the figures and ``report.md`` for ``runs``
    into ``out``.

    Args:
        metrics: table columns per run; default: WT, TC, ET plus ETpp, HD95 and the lesion-wise metrics when every
            run has them.
        params: parameter count per run name or method, overriding the count of the evaluated model.
        prediction_dirs: run name → folder of saved predictions (default: ``<run folder>/predictions``).
        count_params: build models to count parameters (from each run's ``evaluation.json``, else the paper preset);
            counts stored in the records are read either way.
        resamples: bootstrap resamples of the 95 % intervals (0: none); seed: their seed.
        paper_reference: add the ``paper`` column (published average Dice) to the table's mean row.
    """
    _check_report_inputs(runs, resamples, datapath, case)
    warnings_ = coverage_warnings(runs)
    for text in warnings_:
        log.warning("%s", text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if metrics is None:
        common = set.intersection(*(set(r.metrics()) for r in runs))
        metrics = [m for m in (*DICE_REGIONS, *OPTIONAL_METRICS) if m in common]
    tests = paired_tests(runs, metrics)
    for note in min_p_notes(tests, alpha)[1]:
        log.warning("paired tests: %s", note)
    paper = {r.name: PAPER_REFERENCE[r.method].dice for r in runs if r.method in PAPER_REFERENCE}
    table = build_table(
        runs, metrics, tests, alpha, layout, resamples=resamples, seed=seed, paper=paper if paper_reference else None
    )
    worth_metrics = [m for m in metrics if m not in LOWER_IS_BETTER]
    worth = [w for r in runs for m in worth_metrics if (w := modality_worth(r, m, resamples, seed)) is not None]
    no_worth = [r.name for r in runs if not any(w.run == r.name for w in worth)]
    files = [out / "table.md", out / "table.csv", out / "table.tex", out / "wilcoxon.csv", out / "wilcoxon.md"]
    save_text(files[0], table_markdown(table))
    table_csv(table, files[1])
    save_text(files[2], table_latex(table))
    tests_csv(tests, files[3])
    save_text(files[4], tests_markdown(tests, alpha))
    files += [out / "shapley.csv", out / "marginal.csv"]
    worth_csv(worth, files[-2])
    marginal_csv(worth, files[-1])
    counts = parameter_counts(runs, params, count_params)
    figure_lines: list[str] = []
    if figures:
        made, figure_lines = _make_figures(
            table, runs, metrics, counts, worth, out, datapath, case, panel_scenarios, prediction_dirs
        )
        files += made
    if resamples > 0:
        interval = (
            f"in brackets its 95 % bootstrap confidence interval (the cases resampled with replacement, {resamples} "
            f"resamples, seed {seed}; the mean row resamples the cases once for all scenarios)"
        )
    else:
        interval = "no confidence intervals (--bootstrap 0)"
    lines = [
        "# Comparison",
        "",
        "Runs: " + ", ".join(f"{r.name} (`{r.path}`, {_case_count(r, 'WT')})" for r in runs),
        "",
        f"Dice ×100 (mean over cases), HD95 in mm; {interval}; best per row and metric in bold; \\* = significantly "
        f"better than every other run (paired Wilcoxon signed-rank over cases, p < {alpha}).",
        "",
        table_markdown(table, intervals=True),
    ]
    if warnings_:
        lines += ["**Incomplete or unequal evaluations:**", "", *(f"- {w}" for w in warnings_), ""]
    lines += ["## Beside the paper", "", *paper_lines(table, runs, counts)]
    lines += [
        "## What each modality is worth",
        "",
        "The four modalities as the players of a game whose value v(S) is the Dice of scenario S (v(∅) = 0): the "
        "exact Shapley value of a modality, phi_i = sum over the subsets S without it of "
        "|S|! (3 - |S|)! / 4! · (v(S ∪ {i}) - v(S)), is its average contribution over all orders of adding the "
        "modalities; the four sum to the full-modality Dice. Computed per case (over the cases scored in all 15 "
        "scenarios) and averaged; × 100, in brackets the 95 % bootstrap interval. Per case in `shapley.csv`.",
        "",
        worth_markdown(worth),
    ]
    if no_worth:
        lines += [f"Not scored in all 15 scenarios (no Shapley values): {', '.join(no_worth)}.", ""]
    if worth:
        lines += [
            "The gain (Dice × 100) of adding each modality to each subset of the others (`marginal.csv`):",
            "",
            marginal_markdown(worth),
        ]
        if figures:
            lines += ["![Shapley values](shapley.png)", ""]
    lines += ["## Paired tests", "", tests_markdown(tests, alpha), *figure_lines]
    save_text(out / "report.md", "\n".join(lines) + "\n")
    files.append(out / "report.md")
    return ReportResult(table, tests, files, worth, counts)


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
        "--metrics",
        default=None,
        help="comma list of columns per run (default: WT,TC,ET + ETpp, HD95 and the lesion-wise columns where every "
        "run has them)",
    )
    p.add_argument("--layout", default="metric", choices=["metric", "run"], help="group columns by metric or by run")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help=f"bootstrap resamples of the 95%% confidence intervals (default: {DEFAULT_RESAMPLES}; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    p.add_argument(
        "--paper_reference",
        action="store_true",
        help="add a 'paper' column with the published average Dice of each run's method to the mean row",
    )
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="NAME=N",
        help="parameter count of a run (name or method), overriding the count of the evaluated model",
    )
    p.add_argument(
        "--no_param_count",
        action="store_true",
        help="do not build models to count parameters (counts stored in evaluation.json are still read)",
    )
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
    if args.bootstrap < 0:
        parser.error(f"--bootstrap {args.bootstrap}: give 0 (no intervals) or a number of resamples")
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
            resamples=args.bootstrap,
            seed=args.seed,
            paper_reference=args.paper_reference,
        )
    except ValueError as err:  # a damaged or foreign results file: one line (run_main), no usage block
        raise UsageError(str(err)) from err
    print(table_markdown(result.table))
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
