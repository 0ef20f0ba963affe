"""The comparison report: table values, scenario order and names, bolding, paired tests, figures, CLI."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from brats_core import report
from brats_core.evaluation import PER_CASE_HEADER
from brats_core.modalities import SCENARIOS

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


def test_qualitative_panel_from_saved_predictions(tmp_path: Path) -> None:
    from brats_core.data import load_case
    from brats_core.preprocessing import load_meta, output_paths, uncrop, write_label_original_geometry
    from brats_core.preprocessing import main as preprocess_main
    from brats_core.synthetic import write_synthetic_dataset

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
    report.make_report(
        runs,
        tmp_path / "out",
        count_params=False,
        datapath=pre,
        panel_scenarios=[SCENARIOS[0], full],
        prediction_dirs={"beta": tmp_path / "bp"},
    )
    png = tmp_path / "out" / "qualitative.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert (tmp_path / "out" / "qualitative.pdf").stat().st_size > 1000


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
        with pytest.raises(SystemExit):
            report.main(["--run", f"alpha={pa}", "--out", str(tmp_path / "never"), "--no_param_count", *extra])
        assert "--" + extra[0][2:] in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        report.main(["--run", f"alpha={pa}", "--out", str(tmp_path / "a_file"), "--no_param_count"])
    assert "exists and is not a folder" in capsys.readouterr().err
