"""The comparison report: table values, scenario order and names, bolding, paired tests, figures, CLI."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from brats_core.apps import report
from brats_core.engine.evaluation import PER_CASE_HEADER
from brats_core.modalities import SCENARIOS
from brats_core.utils.cli import run_main

CASES = [f"C{i}" for i in range(8)]


def _write_per_case(path: Path, values: dict[tuple[str, str], dict[str, float]]) -> None:
    """A per-case CSV as the evaluator writes it (``values[(case, scenario)][metric]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = {s.name: s.bits for s in SCENARIOS}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PER_CASE_HEADER), extrasaction="ignore")
        writer.writeheader()
        for (case, scenario), metrics in values.items():
            writer.writerow(
                {"case": case, "scenario": scenario, "bits": bits[scenario], "seconds": "0.10"}
                | {k: f"{v:.6f}" for k, v in metrics.items()}
            )


@pytest.fixture
def two_methods(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """Two fake methods over 8 cases × 15 scenarios: ``beta`` = ``alpha`` − 0.05 on WT everywhere (every case
    differs in the same direction), random otherwise."""
    rng = np.random.default_rng(0)
    a: dict[tuple[str, str], dict[str, float]] = {}
    b: dict[tuple[str, str], dict[str, float]] = {}
    for case, s in itertools.product(CASES, SCENARIOS):
        wt = float(rng.uniform(0.6, 0.9))
        a[(case, s.name)] = {"WT": wt, "TC": float(rng.uniform(0, 1)), "ET": float(rng.uniform(0, 1))}
        b[(case, s.name)] = {
            "WT": wt - 0.05 - 0.001 * CASES.index(case),
            "TC": float(rng.uniform(0, 1)),
            "ET": float(rng.uniform(0, 1)),
        }
    _write_per_case(tmp_path / "alpha" / "per_case_all.csv", a)
    _write_per_case(tmp_path / "beta" / "per_case_all.csv", b)
    return tmp_path / "alpha", tmp_path / "beta", a, b


def _runs(pa: Path, pb: Path) -> list[report.Run]:
    return [report.load_run("alpha", pa), report.load_run("beta", pb)]


def test_table_values_are_hand_computed_means(two_methods, tmp_path: Path) -> None:
    pa, pb, a, b = two_methods
    result = report.make_report(_runs(pa, pb), tmp_path / "out", figures=False, count_params=False)
    with (tmp_path / "out" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["scenario"] for r in rows] == [s.name for s in SCENARIOS] + ["mean"]
    scenario_means = {"alpha": {}, "beta": {}}
    for name, values in (("alpha", a), ("beta", b)):
        for s in SCENARIOS:
            for m in ("WT", "TC", "ET"):
                expected = sum(values[(c, s.name)][m] for c in CASES) / len(CASES)
                scenario_means[name].setdefault(m, []).append(expected)
                assert float(rows[s.index][f"{name}|{m}"]) == pytest.approx(expected, abs=2e-6)
    for name in ("alpha", "beta"):
        for m in ("WT", "TC", "ET"):
            assert float(rows[-1][f"{name}|{m}"]) == pytest.approx(sum(scenario_means[name][m]) / 15, abs=2e-6)
    assert result.table.columns[:2] == [("alpha", "WT"), ("beta", "WT")]  # grouped by metric by default


def test_markdown_order_names_bold_and_significance(two_methods, tmp_path: Path) -> None:
    pa, pb, a, _ = two_methods
    report.make_report(_runs(pa, pb), tmp_path / "out", figures=False, count_params=False)
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    body = [line.split(" | ") for line in lines[2:]]
    labels = [cells[0].lstrip("| ") for cells in body]
    assert labels[0] == "T2" and labels[9] == "FLAIR + T1ce" and labels[14] == "FLAIR + T1ce + T1 + T2"
    assert labels == [s.display for s in SCENARIOS] + ["**Mean**"]
    header = lines[0].strip("| ").split(" | ")
    assert header[:3] == ["Scenario", "alpha WT", "beta WT"]
    for cells in body:
        alpha_wt, beta_wt = cells[1], cells[2]
        # alpha is better on WT in every case: bold, and significant (p = 2/2^8 < 0.05) except in the mean row
        assert alpha_wt.startswith("**") and not beta_wt.startswith("**")
        assert alpha_wt.endswith("\\*") == (cells[0] != "| **Mean**")
        tc_a, tc_b = (float(c.strip("*\\ |")) for c in (cells[3], cells[4]))
        assert cells[3].startswith("**") == (tc_a >= tc_b) and cells[4].startswith("**") == (tc_b >= tc_a)
    # Dice ×100 with two decimals
    mean_wt = sum(a[(c, SCENARIOS[0].name)]["WT"] for c in CASES) / len(CASES)
    assert body[0][1] == f"**{mean_wt * 100:.2f}**\\*"
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert "\\textbf{" in tex and "FLAIR + T1ce &" in tex and tex.count("\\\\") == 2 + 16


def _exact_wilcoxon(diffs: list[float]) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = {d: r for r, d in enumerate(sorted(diffs, key=abs), start=1)}
    t_obs = sum(ranks[d] for d in diffs if d > 0)
    n = len(diffs)
    totals = [
        sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
        for signs in itertools.product((0, 1), repeat=n)
    ]
    low = sum(t <= t_obs for t in totals) / len(totals)
    high = sum(t >= t_obs for t in totals) / len(totals)
    return min(1.0, 2 * min(low, high))


def test_wilcoxon_matches_exact_enumeration(tmp_path: Path) -> None:
    diffs = [0.05, -0.01, 0.03, 0.07, 0.02, 0.11]
    expected = _exact_wilcoxon(diffs)
    assert expected == pytest.approx(4 / 64)  # the negative-rank sum is 1: {} or {1} at either tail
    base = [0.5, 0.6, 0.7, 0.55, 0.65, 0.75]
    assert report.wilcoxon_pvalue([x + d for x, d in zip(base, diffs, strict=True)], base) == pytest.approx(expected)
    assert report.wilcoxon_pvalue(base, base) == 1.0
    diffs2 = [0.2, -0.15, 0.04, -0.3, 0.12]
    assert report.wilcoxon_pvalue(diffs2, [0.0] * 5) == pytest.approx(_exact_wilcoxon(diffs2))
    # the same test from per-case CSVs of two runs, on one scenario
    s = SCENARIOS[3]
    vals_a = {(f"K{i}", s.name): {"WT": base[i] + diffs[i], "TC": 0.5, "ET": 0.5} for i in range(6)}
    vals_b = {(f"K{i}", s.name): {"WT": base[i], "TC": 0.5, "ET": 0.5} for i in range(6)}
    _write_per_case(tmp_path / "a.csv", vals_a)
    _write_per_case(tmp_path / "b.csv", vals_b)
    runs = [report.load_run("a", tmp_path / "a.csv"), report.load_run("b", tmp_path / "b.csv")]
    tests = {(t.scenario, t.metric): t for t in report.paired_tests(runs, ["WT", "TC"])}
    assert tests[(s.name, "WT")].pvalue == pytest.approx(expected) and tests[(s.name, "WT")].n == 6
    assert tests[(s.name, "TC")].pvalue == 1.0
    assert len(tests) == 2  # only the scenario both runs have


def test_figures_written_and_non_empty(two_methods, tmp_path: Path) -> None:
    pa, pb, _, _ = two_methods
    out = tmp_path / "out"
    report.make_report(_runs(pa, pb), out, params={"alpha": 47_000_000, "beta": 1_250_000}, count_params=False)
    for stem in ("bars", "dice_vs_params"):
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "alpha 47.00 M" in text and "![Dice per scenario](bars.png)" in text


def test_qualitative_panel_from_saved_predictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from brats_core.data.dataset import load_case
    from brats_core.data.preprocessing import load_meta, output_paths, uncrop, write_label_original_geometry
    from brats_core.data.preprocessing import main as preprocess_main
    from brats_core.data.synthetic import write_synthetic_dataset

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    (case,) = write_synthetic_dataset(raw, 1, (40, 36, 34), seed=3)
    assert (
        preprocess_main(
            [
                "--input-path",
                str(raw),
                "--output-path",
                str(pre),
                "--patch_size",
                "32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    _, label = load_case(pre, case)
    meta = load_meta(output_paths(pre, case).meta)
    # a NIfTI in the original geometry (what --save_nifti writes) comes back as the crop
    preds = tmp_path / "alpha" / "predictions"
    preds.mkdir(parents=True)
    full = SCENARIOS[-1]
    write_label_original_geometry(label.astype(np.uint8), pre, case, preds / f"{case}_{full.bits}.nii.gz")
    np.testing.assert_array_equal(report.load_prediction_crop(preds / f"{case}_{full.bits}.nii.gz", pre, case), label)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="neither the original"):
        report.load_prediction_crop(bad, pre, case)
    assert uncrop(label, meta).shape == tuple(meta["original_shape"])
    values = {(case, s.name): {"WT": 0.5, "TC": 0.5, "ET": 0.5} for s in SCENARIOS}
    _write_per_case(tmp_path / "alpha" / "per_case_all.csv", values)
    np.save(tmp_path / "beta_preds.npy", np.zeros_like(label, dtype=np.uint8))
    (tmp_path / "bp").mkdir()
    np.save(tmp_path / "bp" / f"{case}_{SCENARIOS[0].bits}.npy", np.zeros_like(label, dtype=np.uint8))
    _write_per_case(tmp_path / "beta" / "per_case_all.csv", values)
    runs = [report.load_run("alpha", tmp_path / "alpha"), report.load_run("beta", tmp_path / "beta")]
    figures = _captured_figures(monkeypatch)
    t1ce_t1 = next(s for s in SCENARIOS if s.modalities == ("t1ce", "t1"))
    report.make_report(
        runs,
        tmp_path / "out",
        count_params=False,
        datapath=pre,
        panel_scenarios=[SCENARIOS[0], t1ce_t1, full],
        prediction_dirs={"beta": tmp_path / "bp"},
    )
    png = tmp_path / "out" / "qualitative.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert (tmp_path / "out" / "qualitative.pdf").stat().st_size > 1000
    # each row is labelled with its scenario and underlay; the underlay is a modality of that scenario (T2 alone:
    # T2; T1ce + T1: T1ce; all four: FLAIR), in every column; column titles only above the first row
    image, _ = load_case(pre, case)
    axes = np.array(figures["qualitative"].axes).reshape(3, 3)
    z = int(np.argmax((label > 0).sum(axis=(0, 1))))
    for row, (scenario, channel, name) in enumerate(
        [(SCENARIOS[0], 3, "T2"), (t1ce_t1, 1, "T1ce"), (full, 0, "FLAIR")]
    ):
        assert axes[row, 0].get_ylabel() == f"{scenario.display}\n(underlay: {name})"
        for ax in axes[row]:
            if ax.images:
                np.testing.assert_array_equal(ax.images[0].get_array(), image[channel, ..., z].T)
        assert [ax.get_title() for ax in axes[row]] == (["ground truth", "alpha", "beta"] if row == 0 else [""] * 3)
    assert report.underlay_modality(t1ce_t1) == "t1ce" and report.underlay_modality(SCENARIOS[0]) == "t2"


def test_load_run_merges_shards_and_rejects_bad_input(tmp_path: Path) -> None:
    s1, s2 = SCENARIOS[0], SCENARIOS[9]
    _write_per_case(tmp_path / "run" / f"per_case_{s1.bits}.csv", {("A", s1.name): {"WT": 0.2, "TC": 0.3, "ET": 0.4}})
    _write_per_case(tmp_path / "run" / f"per_case_{s2.bits}.csv", {("A", s2.name): {"WT": 0.6, "TC": 0.7, "ET": 0.8}})
    run = report.load_run("imfuse", tmp_path / "run")
    assert run.name == "IM-Fuse"  # the registry's display name
    assert run.mean(s1.name, "WT") == pytest.approx(0.2) and run.mean(s2.name, "ET") == pytest.approx(0.8)
    assert math.isnan(run.mean(SCENARIOS[5].name, "WT"))
    assert run.metrics() == ["WT", "TC", "ET"]
    assert report.parse_run_spec("imfuse:ours=runs/x") == ("imfuse", "ours", "runs/x")
    assert report.parse_run_spec("mmformer=a=b") == ("mmformer", None, "a=b")
    with pytest.raises(ValueError, match="METHOD"):
        report.parse_run_spec("no-path")
    with pytest.raises(FileNotFoundError, match="per_case"):
        report.load_run("imfuse", tmp_path / "empty")
    _write_per_case(tmp_path / "started" / "per_case_all.csv", {})  # header only: no case finished yet
    with pytest.raises(ValueError, match="holds no rows"):
        report.load_run("imfuse", tmp_path / "started")
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not a per-case CSV"):
        report.load_run("imfuse", tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unique"):
        report.make_report([run, run], tmp_path / "o", figures=False, count_params=False)


def test_cli_and_paper_parameter_counts(two_methods, tmp_path: Path, capsys) -> None:
    import torch

    from brats_core.registry import build_method, count_parameters

    pa, pb, _, _ = two_methods
    out = tmp_path / "cli"
    argv = [
        "--run",
        f"alpha={pa}",
        "--run",
        f"beta:B2={pb / 'per_case_all.csv'}",
        "--out",
        str(out),
        "--no_figures",
        "--no_param_count",
        "--layout",
        "run",
        "--metrics",
        "WT,ET",
    ]
    assert report.main(argv) == 0
    header = (out / "table.md").read_text().splitlines()[0]
    assert header == "| Scenario | alpha WT | alpha ET | B2 WT | B2 ET |"
    assert "FLAIR + T1ce" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main(["--run", f"alpha={pa}", "--metrics", "XX", "--out", str(out)])
    # counted on the meta device, equal to a real build; the paper configuration of IM-Fuse has its Mamba skips
    torch.manual_seed(0)
    assert report.paper_parameter_count("uhved") == count_parameters(build_method("uhved", "paper"))
    assert report.paper_parameter_count("not-a-method") is None


def test_incomplete_runs_are_flagged_and_means_compare_like_with_like(two_methods, tmp_path: Path, capsys) -> None:
    pa, _, a, _ = two_methods
    partial = {k: v for k, v in a.items() if k[1] in (SCENARIOS[0].name, SCENARIOS[14].name) and k[0] != "C7"}
    _write_per_case(tmp_path / "partial" / f"per_case_{SCENARIOS[0].bits}-{SCENARIOS[14].bits}.csv", partial)
    # an upstream-style scoring file in the same folder is not one of the evaluator's shards: never read
    (tmp_path / "partial" / "per_case_upstream.csv").write_text("case,scenario,mode,WT\nC0,t2,3,0.0\n")
    runs = [report.load_run("alpha", pa), report.load_run("alpha", tmp_path / "partial", "part")]
    assert runs[1].mean(SCENARIOS[0].name, "WT") == pytest.approx(np.mean([a[(c, "t2")]["WT"] for c in CASES[:7]]))
    warnings = report.coverage_warnings(runs)
    assert warnings == [
        "part: 13 of 15 scenarios missing (" + ", ".join(s.display for s in SCENARIOS[1:14]) + ")",
        "part: 7 cases, alpha: 8 (7 in common); the paired tests use the common cases, the means each run's own",
    ]
    result = report.make_report(runs, tmp_path / "out", figures=False, count_params=False)
    # the mean row averages the 2 scenarios both runs have, for both runs
    assert result.table.row_label("mean") == "Mean (2 scenarios)" and result.table.mean_over == 2
    shared = (SCENARIOS[0].name, SCENARIOS[14].name)
    assert result.table.values["mean"][("alpha", "WT")] == pytest.approx(
        np.mean([np.mean([a[(c, s)]["WT"] for c in CASES]) for s in shared])
    )
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Incomplete or unequal evaluations:**" in text and "| **Mean (2 scenarios)** |" in text
    # bad --case / --datapath: a usage error before anything is written
    for extra in (["--case", "nosuch"], ["--datapath", str(tmp_path / "nowhere")]):
        argv = ["--run", f"alpha={pa}", "--out", str(tmp_path / "never"), "--no_param_count", *extra]
        assert run_main(lambda argv=argv: report.main(argv)) == 2
        err = capsys.readouterr().err
        assert "--" + extra[0][2:] in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        report.main(["--run", f"alpha={pa}", "--out", str(tmp_path / "a_file"), "--no_param_count"])
    assert "exists and is not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# What each modality is worth (Shapley values), bootstrap intervals, the smallest attainable p, parameter counts,
# the paper's values and the figures' content


def _captured_figures(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Keep every figure the report saves (stem → Figure), to inspect its labels, ticks and limits."""
    figures: dict = {}
    original = report._save

    def save(fig, out, stem):
        figures[stem] = fig
        return original(fig, out, stem)

    monkeypatch.setattr(report, "_save", save)
    return figures


def _game(flair: float, t1ce: float, t1: float, t2: float) -> dict[str, float]:
    """Scenario name → Dice of the game v(S) = flair·[FLAIR or T2 in S] + t1ce·[T1ce in S] + t1·[T1 in S] + t2·[T2 in S]
    (FLAIR and T2 substitutes for ``flair``, the rest additive)."""
    out = {}
    for s in SCENARIOS:
        m = set(s.modalities)
        value = flair * bool(m & {"flair", "t2"}) + t1ce * ("t1ce" in m) + t1 * ("t1" in m) + t2 * ("t2" in m)
        out[s.name] = value
    return out


def test_shapley_values_hand_computed() -> None:
    # additive game v(S) = sum of a_i over S: every modality is worth exactly its own a_i
    a = {"flair": 0.3, "t1ce": 0.2, "t1": 0.1, "t2": 0.25}
    additive = report.game_vector({s.name: sum(a[m] for m in s.modalities) for s in SCENARIOS})
    assert additive.shape == (16,) and additive[0] == 0.0
    np.testing.assert_allclose(report.shapley_values(additive), [0.3, 0.2, 0.1, 0.25], atol=1e-12)
    # substitutes: v(S) = 0.8 when FLAIR or T2 is in S, + 0.1 when T1ce is. Adding FLAIR raises v only to a subset S
    # without T2 (and without FLAIR): S ⊆ {T1ce, T1}, i.e. |S| = 0 (1 subset, weight 0!3!/4! = 1/4), |S| = 1
    # (2 subsets, weight 1!2!/4! = 1/12 each), |S| = 2 (1 subset, weight 2!1!/4! = 1/12), each time by 0.8:
    # phi_FLAIR = 0.8 · (1/4 + 2/12 + 1/12) = 0.8 · 1/2 = 0.4; by symmetry phi_T2 = 0.4; T1ce adds 0.1 to every
    # subset (weights over all subsets without it sum to 1): phi_T1ce = 0.1; T1 adds nothing: phi_T1 = 0.
    substitutes = report.game_vector(_game(0.8, 0.1, 0.0, 0.0))
    phi = report.shapley_values(substitutes)
    np.testing.assert_allclose(phi, [0.4, 0.1, 0.0, 0.4], atol=1e-12)
    assert phi.sum() == pytest.approx(substitutes[report.coalition(("flair", "t1ce", "t1", "t2"))])  # efficiency
    # complements: v = 1 only with FLAIR and T1ce together; FLAIR raises v only to S ∋ T1ce, S ∌ FLAIR:
    # {T1ce} (1/12), {T1ce, T1} and {T1ce, T2} (1/12 each), {T1ce, T1, T2} (1/4): 3/12 + 1/4 = 1/2 each
    complements = report.game_vector({s.name: float({"flair", "t1ce"} <= set(s.modalities)) for s in SCENARIOS})
    np.testing.assert_allclose(report.shapley_values(complements), [0.5, 0.5, 0.0, 0.0], atol=1e-12)
    # efficiency on random games, several at once (per case: leading axes)
    rng = np.random.default_rng(1)
    games = rng.uniform(0, 1, (5, 16))
    games[:, 0] = 0.0
    np.testing.assert_allclose(report.shapley_values(games).sum(axis=-1), games[:, 15], atol=1e-12)
    # the gain of adding a modality to a subset: FLAIR to {} = 0.8, to {T2} = 0, to {T1ce} = 0.9 - 0.1 = 0.8
    gains = report.marginal_gains(substitutes)
    flair, t1ce, t2 = 0, 1, 3
    assert gains.shape == (4, 16)
    assert gains[flair, 0] == pytest.approx(0.8) and gains[flair, report.coalition(["t2"])] == pytest.approx(0.0)
    assert gains[flair, report.coalition(["t1ce"])] == pytest.approx(0.8)
    assert gains[t1ce, report.coalition(["flair", "t2"])] == pytest.approx(0.1)
    assert math.isnan(gains[t2, report.coalition(["t2"])])  # T2 is already in {T2}


def test_modality_worth_per_case_averaged_and_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = ["K0", "K1", "K2", "K3"]
    # alpha: case k is the substitutes game of the test above plus an additive T1 worth 0.02·k:
    # phi = (0.4, 0.1, 0.02·k, 0.4) per case, averaged (0.4, 0.1, 0.03, 0.4), summing to 0.93 = full-modality mean
    alpha = {}
    for k, case in enumerate(cases):
        for scenario, v in _game(0.8, 0.1, 0.02 * k, 0.0).items():
            alpha[(case, scenario)] = {"WT": v, "TC": v / 2, "ET": v / 4}
    # beta: additive a = (0.3, 0.2, 0.1, 0.25) in every case: phi = a
    a = {"flair": 0.3, "t1ce": 0.2, "t1": 0.1, "t2": 0.25}
    beta = {
        (case, s.name): dict.fromkeys(("WT", "TC", "ET"), sum(a[m] for m in s.modalities))
        for case in cases
        for s in SCENARIOS
    }
    _write_per_case(tmp_path / "alpha" / "per_case_all.csv", alpha)
    _write_per_case(tmp_path / "beta" / "per_case_all.csv", beta)
    figures = _captured_figures(monkeypatch)
    runs = [report.load_run("alpha", tmp_path / "alpha"), report.load_run("beta", tmp_path / "beta")]
    out = tmp_path / "out"
    result = report.make_report(runs, out, count_params=False, resamples=200)
    worth = {(w.run, w.metric): w for w in result.worth}
    np.testing.assert_allclose(worth[("alpha", "WT")].mean, [0.4, 0.1, 0.03, 0.4], atol=1e-9)
    np.testing.assert_allclose(worth[("alpha", "TC")].mean, [0.2, 0.05, 0.015, 0.2], atol=1e-9)
    np.testing.assert_allclose(worth[("alpha", "WT")].per_case[:, 2], [0.0, 0.02, 0.04, 0.06], atol=1e-9)
    np.testing.assert_allclose(worth[("beta", "ET")].mean, [0.3, 0.2, 0.1, 0.25], atol=1e-9)
    # efficiency: the four values sum to the full-modality score (the table's last scenario row)
    for (name, metric), w in worth.items():
        assert w.mean.sum() == pytest.approx(result.table.values[SCENARIOS[-1].name][(name, metric)], abs=1e-9)
    with (out / "shapley.csv").open() as f:
        rows = list(csv.DictReader(f))
    mean_row = next(r for r in rows if (r["run"], r["metric"], r["case"]) == ("alpha", "WT", "mean"))
    assert [float(mean_row[m]) for m in ("FLAIR", "T1ce", "T1", "T2")] == pytest.approx([0.4, 0.1, 0.03, 0.4])
    assert float(mean_row["sum"]) == pytest.approx(0.93) and float(mean_row["full_modality"]) == pytest.approx(0.93)
    assert float(mean_row["T1|low"]) <= 0.03 <= float(mean_row["T1|high"])
    k2 = next(r for r in rows if (r["run"], r["metric"], r["case"]) == ("alpha", "WT", "K2"))
    assert float(k2["T1"]) == pytest.approx(0.04) and float(k2["sum"]) == pytest.approx(0.94)
    with (out / "marginal.csv").open() as f:
        gains = {(r["run"], r["metric"], r["modality"], r["subset"]): float(r["gain"]) for r in csv.DictReader(f)}
    assert gains[("alpha", "WT", "FLAIR", "none")] == pytest.approx(0.8)
    assert gains[("alpha", "WT", "FLAIR", "T2")] == pytest.approx(0.0)
    assert gains[("alpha", "WT", "T1", "FLAIR + T1ce")] == pytest.approx(0.03)
    assert len(gains) == 2 * 3 * 4 * 8  # runs × regions × modalities × subsets without the modality
    text = (out / "report.md").read_text()
    assert "## What each modality is worth" in text and "![Shapley values](shapley.png)" in text
    assert "| FLAIR | 40.00 [" in text  # alpha WT is the first column
    assert (out / "shapley.png").stat().st_size > 5000
    # the figure: one panel per region, modalities on the x axis, one bar group per run
    fig = figures["shapley"]
    assert len(fig.axes) == 3
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["FLAIR", "T1ce", "T1", "T2"]


def test_bootstrap_intervals_hand_computed() -> None:
    # two cases a, b: a resample holds a twice (p 1/4), both (1/2) or b twice (1/4): the 2.5 % and 97.5 %
    # percentiles of the resampled mean are a and b
    low, high = report.bootstrap_interval(np.array([[0.2], [0.6]]), resamples=10_000, seed=0)
    assert low[0] == pytest.approx(0.2) and high[0] == pytest.approx(0.6)
    # three cases 0, 0, 1: the resampled mean is k/3 with k ~ Binomial(3, 1/3): P(k = 0) = 8/27 > 2.5 %, so the
    # lower bound is 0; P(k = 3) = 1/27 = 3.7 % > 2.5 %, so the upper bound is 1
    low, high = report.bootstrap_interval(np.array([0.0, 0.0, 1.0]), resamples=10_000, seed=3)
    assert float(low) == 0.0 and float(high) == 1.0
    # NaN cells are missing values (a case not scored in that column); one case: a degenerate interval
    low, high = report.bootstrap_interval(np.array([[0.5, np.nan], [0.5, 0.7]]), resamples=500, seed=0)
    assert low.tolist() == pytest.approx([0.5, 0.7]) and high.tolist() == pytest.approx([0.5, 0.7])
    # seeded: the same draws each time; the counts of a resample sum to the number of cases
    w = report.bootstrap_weights(5, 100, seed=7)
    assert w.shape == (100, 5) and np.all(w.sum(axis=1) == 5)
    np.testing.assert_array_equal(w, report.bootstrap_weights(5, 100, seed=7))


def test_table_csv_and_report_hold_bootstrap_bounds(tmp_path: Path) -> None:
    # two cases: every bound is hand-computable (see the test above): [min, max] of the two cases' values per
    # scenario, and [min, max] of the two cases' averages over the 15 scenarios for the mean row
    x = {s.name: 0.5 + 0.01 * s.index for s in SCENARIOS}
    y = {s.name: 0.9 - 0.02 * s.index for s in SCENARIOS}
    values = {}
    for s in SCENARIOS:
        values[("X", s.name)] = {"WT": x[s.name], "TC": 0.4, "ET": 0.3}
        values[("Y", s.name)] = {"WT": y[s.name], "TC": 0.4, "ET": 0.5}
    _write_per_case(tmp_path / "run" / "per_case_all.csv", values)
    out = tmp_path / "out"
    assert (
        report.main(["--run", f"alpha={tmp_path / 'run'}", "--out", str(out), "--no_figures", "--bootstrap", "4000"])
        == 0
    )
    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    for s in SCENARIOS:
        row = rows[s.index]
        lo, hi = sorted((x[s.name], y[s.name]))
        assert float(row["alpha|WT|low"]) == pytest.approx(lo, abs=2e-6)
        assert float(row["alpha|WT|high"]) == pytest.approx(hi, abs=2e-6)
        assert float(row["alpha|TC|low"]) == pytest.approx(0.4) and float(row["alpha|TC|high"]) == pytest.approx(0.4)
    avg_x, avg_y = np.mean(list(x.values())), np.mean(list(y.values()))
    assert float(rows[-1]["alpha|WT|low"]) == pytest.approx(min(avg_x, avg_y), abs=2e-6)
    assert float(rows[-1]["alpha|WT|high"]) == pytest.approx(max(avg_x, avg_y), abs=2e-6)
    # report.md shows them beside each value (Dice ×100)
    text = (out / "report.md").read_text()
    t2 = SCENARIOS[0].name
    mean_t2 = (x[t2] + y[t2]) / 2
    assert f"{mean_t2 * 100:.2f} [{x[t2] * 100:.2f}, {y[t2] * 100:.2f}]" in text
    assert "95 % bootstrap confidence interval" in text and "4000 resamples" in text
    # seeded: the same files again; --bootstrap 0 writes no bounds
    first = (out / "table.csv").read_text()
    assert (
        report.main(["--run", f"alpha={tmp_path / 'run'}", "--out", str(out), "--no_figures", "--bootstrap", "4000"])
        == 0
    )
    assert (out / "table.csv").read_text() == first
    assert (
        report.main(["--run", f"alpha={tmp_path / 'run'}", "--out", str(out), "--no_figures", "--bootstrap", "0"]) == 0
    )
    assert "|low" not in (out / "table.csv").read_text().splitlines()[0]
    with pytest.raises(SystemExit):
        report.main(["--run", f"alpha={tmp_path / 'run'}", "--out", str(tmp_path / "never"), "--bootstrap", "-5"])
    assert not (tmp_path / "never").exists()


def test_wilcoxon_states_the_smallest_attainable_p(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert report.min_attainable_p(4) == pytest.approx(2 / 2**4) == 0.125
    assert report.min_attainable_p(8) == pytest.approx(2 / 256) and report.min_attainable_p(1) == 1.0
    assert report.cases_needed(0.05) == 6  # 2/2^5 = 0.0625 ≥ 0.05 > 2/2^6 = 0.03125
    # four cases, alpha better in every one: the exact test's p is its floor, 2/2^4 = 0.125 — never below 0.05
    values_a, values_b = {}, {}
    for i, s in itertools.product(range(4), SCENARIOS):
        values_a[(f"K{i}", s.name)] = {"WT": 0.8 + 0.01 * i, "TC": 0.5, "ET": 0.5}
        values_b[(f"K{i}", s.name)] = {"WT": 0.7, "TC": 0.5, "ET": 0.5}
    _write_per_case(tmp_path / "a" / "per_case_all.csv", values_a)
    _write_per_case(tmp_path / "b" / "per_case_all.csv", values_b)
    runs = [report.load_run("a", tmp_path / "a"), report.load_run("b", tmp_path / "b")]
    result = report.make_report(runs, tmp_path / "out", figures=False, count_params=False, resamples=100)
    wt = [t for t in result.tests if t.metric == "WT"]
    assert all(t.pvalue == pytest.approx(0.125) and t.nonzero == 4 for t in wt)
    for name in ("wilcoxon.md", "report.md"):
        text = (tmp_path / "out" / name).read_text()
        assert "smallest attainable p" in text and "2/2^4 = 0.125" in text
        assert "**Warning:**" in text and "cannot fall below 0.125" in text and "at least 6 cases" in text
    assert any("cannot fall below 0.125" in r.getMessage() for r in caplog.records)
    with (tmp_path / "out" / "wilcoxon.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["nonzero"] == "4" and float(row["min_p"]) == pytest.approx(0.125)


def test_no_min_p_warning_when_alpha_is_attainable(two_methods, tmp_path: Path) -> None:
    pa, pb, _, _ = two_methods
    report.make_report(_runs(pa, pb), tmp_path / "out", figures=False, count_params=False, resamples=100)
    text = (tmp_path / "out" / "wilcoxon.md").read_text()
    assert "2/2^8 = 0.00781" in text and "**Warning:**" not in text


def _record(folder: Path, method: str, config: dict, **extra: object) -> None:
    """An ``evaluation.json`` as the evaluator writes it (the keys the report reads)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps({"method": method, "config": config, **extra}))


def test_parameter_counts_come_from_the_evaluation_record(
    two_methods, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from brats_core.registry import build_method, count_parameters, output_config

    pa, pb, _, _ = two_methods
    # the demo's checkpoint: IM-Fuse at the tiny preset with the paper's flags, not the paper preset (47.34 M)
    tiny = build_method("imfuse", "tiny", mamba_skip=True, interleaved_tokenization=True)
    expected = count_parameters(tiny)
    assert expected < 5_000_000
    _record(pa, "imfuse", json.loads(json.dumps(output_config(tiny))))
    runs = [report.load_run("imfuse", pa), report.load_run("uhved", pb)]
    counts = report.parameter_counts(runs)
    assert counts["IM-Fuse"].count == expected and counts["IM-Fuse"].source == "record"
    # no record: the registry's paper preset, said so
    assert counts["U-HVED"].count == report.paper_parameter_count("uhved") and counts["U-HVED"].source == "paper"
    # a count the record stores is used as it is; --params overrides everything; a record of an unregistered
    # method has no count (never the paper preset of the name given on the command line)
    _record(pb, "uhved", {}, parameters=1234)
    assert report.parameter_counts(runs, build=False)["U-HVED"].count == 1234
    assert report.parameter_counts(runs, {"U-HVED": 99})["U-HVED"].source == "given"
    _record(pb, "", {})
    assert "U-HVED" not in report.parameter_counts(runs)
    (pb / "evaluation.json").unlink()
    figures = _captured_figures(monkeypatch)
    out = tmp_path / "out"
    report.make_report(runs, out, resamples=100)
    legend = [t.get_text() for t in figures["dice_vs_params"].axes[0].get_legend().get_texts()]
    assert f"IM-Fuse ({expected / 1e6:.2f} M)" in legend
    assert any(t.startswith("U-HVED (") and "paper preset" in t for t in legend)
    text = (out / "report.md").read_text()
    assert f"IM-Fuse {expected / 1e6:.2f} M (the evaluated model, from its evaluation.json)" in text
    assert "U-HVED" in text and "(paper preset: no evaluation.json)" in text


def test_dice_vs_params_ticks_limits_and_paper_markers(two_methods, tmp_path: Path, monkeypatch) -> None:
    pa, pb, _, _ = two_methods
    figures = _captured_figures(monkeypatch)
    runs = _runs(pa, pb)
    result = report.make_report(
        runs[:1], tmp_path / "out", params={"alpha": 2_320_000}, count_params=False, resamples=100
    )
    ax = figures["dice_vs_params"].axes[0]
    figures["dice_vs_params"].canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and all(float(t) > 0 for t in ticks)  # plain numbers in millions, no 3×10¹
    assert all(t.get_text() == "" for t in ax.get_xticklabels(minor=True))
    # one run: the y range is not blown up around it (at least 20 Dice points), and holds every point
    avg = 100 * np.mean([result.table.values["mean"][("alpha", r)] for r in ("WT", "TC", "ET")])
    low, high = ax.get_ylim()
    assert high - low >= 20 and low <= avg <= high and low <= 72.3 and high >= 83.3 and low >= 0 and high <= 100
    # the eight published methods as "paper" markers; no size encoding (every marker the same size)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    paper = [t for t in legend if "paper" in t]
    assert len(paper) == 8 and "IM-Fuse, paper (64.0 M, 83.3)" in paper and "U-HVED, paper (≈1.3 M, 72.3)" in paper
    sizes = {float(s) for c in ax.collections if hasattr(c, "get_sizes") for s in c.get_sizes()}
    assert len(sizes) <= 2  # runs and paper markers: one size each
    text = (tmp_path / "out" / "report.md").read_text()
    assert "AImageLab-zip/IM-Fuse" in text and "figs/finalplot.png" in text


def test_paper_reference_column(two_methods, tmp_path: Path) -> None:
    pa, pb, _, _ = two_methods
    runs = [report.load_run("imfuse", pa), report.load_run("alpha", pb)]
    report.make_report(runs, tmp_path / "out", figures=False, count_params=False, resamples=100, paper_reference=True)
    with (tmp_path / "out" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["IM-Fuse|paper"]) == pytest.approx(0.833)
    assert all(r["IM-Fuse|paper"] == "" for r in rows[:-1]) and rows[-1]["alpha|paper"] == ""
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[0].endswith("| IM-Fuse paper | alpha paper |") and table[-1].endswith("| 83.3 | – |")
    assert "Scenario & WT & WT & TC & TC & ET & ET & paper & paper" in (tmp_path / "out" / "table.tex").read_text()
    report.make_report(runs, tmp_path / "plain", figures=False, count_params=False, resamples=100)
    assert "paper" not in (tmp_path / "plain" / "table.csv").read_text().splitlines()[0]


def test_bars_show_intervals_and_case_counts(two_methods, tmp_path: Path, monkeypatch) -> None:
    pa, pb, _, _ = two_methods
    figures = _captured_figures(monkeypatch)
    result = report.make_report(_runs(pa, pb), tmp_path / "out", count_params=False, resamples=500)
    fig = figures["bars"]
    ax = fig.axes[0]
    bars = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert len(bars) == 2 and all(c.errorbar is not None for c in bars)
    # the error bar of the first bar spans the table's bounds of that cell
    segments = bars[0].errorbar.lines[2][0].get_segments()
    t2 = SCENARIOS[0].name
    assert segments[0][0][1] == pytest.approx(result.table.low[t2][("alpha", "WT")])
    assert segments[0][1][1] == pytest.approx(result.table.high[t2][("alpha", "WT")])
    legend = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []
    legend += [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    assert "alpha (n = 8 cases)" in legend
