"""BraTS lesion-wise metrics (``--lesion_wise``): the official BraTS-evaluation package on hand-made label maps whose
values are worked out in the comments, and their way through the evaluator, its results folder and the report.

The package (Panoptica with BraTS-evaluation's ``gli`` config) defines, per region: lesions = 26-connected components
of the prediction and of the ground truth, matched one to one by maximum bipartite matching on Dice (any overlap);
lesion-wise Dice and HD95 = the mean over the MATCHED pairs. A missed (FN) or false-positive (FP) lesion therefore
leaves them unchanged as long as another lesion is matched (BraTS 2023's own script instead averaged over the GT
lesions and the FP ones, with Dice 0 / HD95 374 for the unmatched); with no matched lesion they are 0 and infinite
(reported as the penalty); with no lesion on either side NaN. HD95 is MedPy's: the 95th percentile (linear
interpolation) of the surface distances of both directions, surfaces = voxels with a 6-neighbour outside.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
from toy import ToyModel, write_preprocessed

from brats_core.apps import report
from brats_core.apps.arguments import add_eval_args
from brats_core.data.dataset import load_case
from brats_core.engine import evaluation, metrics
from brats_core.engine.evaluation import EvalOptions, evaluate, format_table, read_rows, segment, summarize
from brats_core.engine.metrics import HD95_EMPTY_PENALTY, LESION_WISE_KEYS, lesion_wise_scores
from brats_core.modalities import SCENARIOS
from brats_core.utils.cli import UsageError

REGIONS = ("WT", "TC", "ET")
SHAPE = (20, 8, 8)


def _labels(*boxes: tuple[int, int, int]) -> np.ndarray:
    """A ``SHAPE`` label map with ``label`` in x ∈ [x0, x1) and y, z ∈ [2, 6) for each ``(x0, x1, label)``."""
    out = np.zeros(SHAPE, np.uint8)
    for x0, x1, label in boxes:
        out[x0:x1, 2:6, 2:6] = label
    return out


def _same_in_every_region(scores: dict[str, float], metric: str) -> float:
    """With ET labels only, WT, TC and ET are the same masks: one value for all three."""
    values = {scores[f"{metric}_{r}"] for r in REGIONS}
    assert len(values) == 1, values
    return values.pop()


def test_a_missed_lesion_does_not_enter_the_mean_over_matched_lesions() -> None:
    # GT: two 4×4×4 ET lesions (x 2..5 and 12..15); prediction: the first half of the first one (x 2..3), 32 voxels.
    gt = _labels((2, 6, 3), (12, 16, 3))
    pred = _labels((2, 4, 3))
    s = lesion_wise_scores(pred, gt)
    assert [_same_in_every_region(s, f"LesionWise_{k}") for k in ("TP", "FP", "FN")] == [1, 0, 1]
    # The matched pair: Dice 2·32 / (32 + 64) = 2/3 (BraTS 2023's script: (2/3 + 0) / 2 = 1/3).
    assert _same_in_every_region(s, "LesionWise_Dice") == pytest.approx(2 / 3)
    # Its HD95. Prediction surface (all 32 voxels: 2 thick) → GT surface: 28 on it (0), the 4 at x = 3, y, z ∈ {3, 4}
    # inside the GT cube (1). GT surface (56 = 64 − 2³ interior) → prediction: x = 2 (16) and the x = 3 ring (12)
    # on it (0), the x = 4 ring (12) at 1, the x = 5 face (16) at 2. Sorted 88 distances: 56 × 0, 16 × 1, 16 × 2;
    # the 95th percentile at index 0.95 · 87 = 82.65 falls among the twos → 2.
    assert _same_in_every_region(s, "LesionWise_HD95") == pytest.approx(2.0)
    # F1 = TP / (TP + (FP + FN) / 2) = 1 / 1.5; global Dice = 2·32 / (32 + 128) = 0.4.
    assert _same_in_every_region(s, "LesionWise_F1") == pytest.approx(2 / 3)
    assert _same_in_every_region(s, "Global_Dice") == pytest.approx(0.4)


def test_a_false_positive_lesion_does_not_enter_the_mean_over_matched_lesions() -> None:
    # GT: one 4×4×4 lesion, found exactly; the prediction adds a 2×2×2 lesion at x 12..13, y, z 2..3, not touching.
    gt = _labels((2, 6, 3))
    pred = gt.copy()
    pred[12:14, 2:4, 2:4] = 3
    s = lesion_wise_scores(pred, gt)
    assert [_same_in_every_region(s, f"LesionWise_{k}") for k in ("TP", "FP", "FN")] == [1, 1, 0]
    # the matched pair is perfect: Dice 1, HD95 0 (BraTS 2023's script: (1 + 0) / 2 = 0.5 and (0 + 374) / 2 = 187)
    assert _same_in_every_region(s, "LesionWise_Dice") == 1.0
    assert _same_in_every_region(s, "LesionWise_HD95") == 0.0
    # global Dice = 2·64 / (72 + 64) = 128/136
    assert _same_in_every_region(s, "Global_Dice") == pytest.approx(128 / 136)


def test_two_lesions_merged_by_the_prediction_match_only_one() -> None:
    # GT: 4×4×4 lesions at x 2..5 and 12..15; prediction: one 14×4×4 bar over x 2..15 joining them (224 voxels).
    gt = _labels((2, 6, 3), (12, 16, 3))
    pred = _labels((2, 16, 3))
    s = lesion_wise_scores(pred, gt)
    # one predicted lesion, matched one to one with one of the two GT lesions; the other one is missed
    assert [_same_in_every_region(s, f"LesionWise_{k}") for k in ("TP", "FP", "FN")] == [1, 0, 1]
    # Dice with either GT lesion: 2·64 / (224 + 64) = 4/9 (the pairs are mirror images: same Dice and HD95).
    assert _same_in_every_region(s, "LesionWise_Dice") == pytest.approx(4 / 9)
    # HD95 of the pair (GT lesion x 2..5). Bar surface: 224 − 12·2·2 interior = 176 voxels; GT surface: 56.
    # Bar → GT: x = 2 face (16) and the rings at x = 3..5 (36) lie on the GT surface (0); the rings at x = 6..14
    # (12 each) are x − 5 = 1..9 from the GT's x = 5 face; the x = 15 face (16) is 10 away.
    # GT → bar: 52 on the bar's surface (0); the 4 inner voxels of the GT's x = 5 face are 1 from the bar's ring.
    # Sorted 232 distances: 104 × 0, 16 × 1, 12 × 2 … 12 × 9, 16 × 10 (indices 216..231); the 95th percentile at
    # index 0.95 · 231 = 219.45 → 10.
    assert _same_in_every_region(s, "LesionWise_HD95") == pytest.approx(10.0)


def test_no_match_gives_zero_and_the_penalty_and_no_lesion_gives_nan() -> None:
    gt = _labels((2, 6, 3), (12, 16, 3))
    empty = np.zeros(SHAPE, np.uint8)
    missed = lesion_wise_scores(empty, gt)  # both GT lesions missed
    assert _same_in_every_region(missed, "LesionWise_FN") == 2
    assert _same_in_every_region(missed, "LesionWise_Dice") == 0.0
    assert _same_in_every_region(missed, "LesionWise_HD95") == HD95_EMPTY_PENALTY  # infinite in Panoptica
    spurious = lesion_wise_scores(gt, empty)  # two false positives, nothing to find
    assert _same_in_every_region(spurious, "LesionWise_FP") == 2
    assert _same_in_every_region(spurious, "LesionWise_Dice") == 0.0
    assert _same_in_every_region(spurious, "LesionWise_HD95") == HD95_EMPTY_PENALTY
    # two lesions that do not overlap at all: no match either (1 FP, 1 FN)
    apart = lesion_wise_scores(_labels((12, 16, 3)), _labels((2, 6, 3)))
    assert [_same_in_every_region(apart, f"LesionWise_{k}") for k in ("TP", "FP", "FN")] == [0, 1, 1]
    assert _same_in_every_region(apart, "LesionWise_Dice") == 0.0
    nothing = lesion_wise_scores(empty, empty)
    assert all(math.isnan(nothing[k]) for k in LESION_WISE_KEYS)


def test_the_regions_group_the_labels() -> None:
    # GT: an edema (2) block x 2..7 with a necrotic core (1) at x 3..4 and an enhancing part (3) at x 5..6 — one
    # WT lesion of 6·16 = 96 voxels, one TC lesion (x 3..6, 64 voxels), one ET lesion (x 5..6, 32 voxels).
    gt = _labels((2, 8, 2), (3, 5, 1), (5, 7, 3))
    # Prediction: the same tumour, all of it labelled edema: WT perfect, no TC and no ET lesion predicted.
    pred = _labels((2, 8, 2))
    s = lesion_wise_scores(pred, gt)
    assert (s["LesionWise_Dice_WT"], s["LesionWise_HD95_WT"]) == (1.0, 0.0)
    for region in ("TC", "ET"):
        assert (s[f"LesionWise_Dice_{region}"], s[f"LesionWise_FN_{region}"]) == (0.0, 1)
        assert s[f"LesionWise_HD95_{region}"] == HD95_EMPTY_PENALTY
    # Without the enhancing part in either map, ET has no lesion on either side: NaN, while TC is still scored.
    s = lesion_wise_scores(pred, np.where(gt == 3, 1, gt))
    assert math.isnan(s["LesionWise_Dice_ET"]) and math.isnan(s["LesionWise_HD95_ET"])
    assert s["LesionWise_Dice_TC"] == 0.0


def test_hd95_uses_the_voxel_spacing() -> None:
    # The missed-lesion maps above with 2 mm along x: the 4 inner prediction voxels are still 1 mm (along y) from
    # the GT surface; the GT's x = 4 ring is 2 mm and its x = 5 face 4 mm from the prediction. Sorted: 56 × 0, 4 × 1,
    # 12 × 2, 16 × 4 (indices 72..87) → HD95 = 4 mm. Dice does not depend on the spacing.
    gt = _labels((2, 6, 3), (12, 16, 3))
    s = lesion_wise_scores(_labels((2, 4, 3)), gt, spacing=(2.0, 1.0, 1.0))
    assert _same_in_every_region(s, "LesionWise_HD95") == pytest.approx(4.0)
    assert _same_in_every_region(s, "LesionWise_Dice") == pytest.approx(2 / 3)


def test_background_around_the_maps_changes_nothing() -> None:
    # Why a case without a crop box may be scored on its crop: the crop only drops background, and neither the
    # lesions nor their surfaces change when background is added around them, even for lesions on the array border.
    gt = _labels((0, 4, 3), (12, 16, 3))
    pred = _labels((0, 3, 3), (10, 20, 3))
    cropped = lesion_wise_scores(pred, gt)
    padded = lesion_wise_scores(np.pad(pred, ((3, 5), (2, 0), (0, 4))), np.pad(gt, ((3, 5), (2, 0), (0, 4))))
    assert cropped == padded
    assert cropped["LesionWise_TP_ET"] == 2  # both pairs matched: the comparison covers real values


# ---------------------------------------------------------------------------------------------------------------------
# The evaluator


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def toy(tmp_path):
    """A toy model and two preprocessed toy cases without metadata (as upstream's preprocessing leaves them)."""
    torch.manual_seed(0)
    root = tmp_path / "data"
    return ToyModel().eval(), root, write_preprocessed(root, n=2)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]]:
    """Record the shapes and the spacing of every call of the package by the evaluator."""
    calls = []
    real = evaluation.lesion_wise_scores

    def spy(pred, gt, *, spacing):
        calls.append((pred.shape, gt.shape, tuple(spacing)))
        return real(pred, gt, spacing=spacing)

    monkeypatch.setattr(evaluation, "lesion_wise_scores", spy)
    return calls


def test_the_evaluator_scores_on_the_original_grid_with_the_source_spacing(tmp_path, monkeypatch):
    from brats_core.data.preprocessing import load_meta, output_paths, uncrop
    from brats_core.data.preprocessing import main as preprocess
    from brats_core.data.synthetic import write_synthetic_dataset

    (case,) = write_synthetic_dataset(tmp_path / "raw", 1, shape=(40, 44, 36), seed=5)
    assert preprocess(["--input-path", str(tmp_path / "raw"), "--output-path", str(tmp_path / "pre"),
                       "--patch_size", "32", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    meta_path = output_paths(tmp_path / "pre", case).meta
    meta = load_meta(meta_path)
    meta["affine"] = np.diag([-1.0, -1.0, 2.5, 1.0]).tolist()  # 2.5 mm slices: the spacing must reach the package
    meta_path.write_text(json.dumps(meta))
    assert tuple(meta["cropped_shape"]) != tuple(meta["original_shape"])  # a real crop
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    model = ToyModel().eval()
    options = EvalOptions(progress=False, hd95=False, lesion_wise=True)
    summary = evaluate(model, tmp_path / "pre", [case], tmp_path / "out", scenarios=SCENARIOS[13:], options=options)
    original = tuple(meta["original_shape"])
    assert calls == [(original, original, (1.0, 1.0, 2.5))] * 2
    rows = _rows(evaluation.shard_file(tmp_path / "out", SCENARIOS[13:]))
    image, label = load_case(tmp_path / "pre", case)
    for s, row in zip(SCENARIOS[13:], rows, strict=True):
        pred = segment(model, torch.from_numpy(image), [s.mask], options, torch.device("cpu"))[0].numpy()
        direct = metrics.lesion_wise_scores(uncrop(pred, meta), uncrop(label, meta), spacing=(1.0, 1.0, 2.5))
        expected = [direct[k] for k in LESION_WISE_KEYS]
        assert [float(row[k]) for k in LESION_WISE_KEYS] == pytest.approx(expected, abs=1e-6)  # 6 decimals
        assert row["HD95_WT"] == ""  # --no_hd95 still leaves the lesion-wise HD95
    assert all(k in summary[-1] for k in LESION_WISE_KEYS)
    table = format_table(summary).splitlines()
    assert "LesionWise_HD95_ET" in table[0] and len({len(line) for line in table}) == 1  # the columns line up


def test_cases_without_a_crop_box_are_scored_on_the_crop_with_a_warning(toy, tmp_path, monkeypatch, caplog):
    model, root, cases = toy
    calls = _spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="brats_core.engine.evaluation"):
        evaluate(model, root, cases, tmp_path / "out", scenarios=SCENARIOS[:1],
                 options=EvalOptions(progress=False, hd95=False, lesion_wise=True))  # fmt: skip
    assert calls == [((20, 22, 18), (20, 22, 18), (1.0, 1.0, 1.0))] * 2  # the crop, 1 mm
    warnings = [r.getMessage() for r in caplog.records if "lesion-wise" in r.getMessage()]
    assert len(warnings) == 1 and "on the preprocessed crop, not on the original" in warnings[0]  # once, not per case


def test_a_crop_box_that_does_not_fit_the_arrays_is_a_one_line_error(toy, tmp_path):
    from brats_core.data.preprocessing import MetadataError

    model, root, cases = toy
    (root / "meta").mkdir()
    box = {"original_shape": [30, 30, 30], "crop_box": [[0, 20], [0, 22], [0, 17]], "cropped_shape": [20, 22, 17]}
    (root / "meta" / f"{cases[0]}.json").write_text(json.dumps(box))
    with pytest.raises(MetadataError, match=rf"meta/{cases[0]}\.json: its crop box does not fit the case's arrays"):
        evaluate(model, root, cases, tmp_path / "out", scenarios=SCENARIOS[:1],
                 options=EvalOptions(progress=False, hd95=False, lesion_wise=True))  # fmt: skip


def test_lesion_wise_is_part_of_the_evaluation_identity(toy, tmp_path, monkeypatch):
    model, root, cases = toy
    out = tmp_path / "out"
    plain, lesion_wise = EvalOptions(progress=False, hd95=False), EvalOptions(progress=False, lesion_wise=True)
    first = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=plain)
    assert json.loads((out / evaluation.RECORD_FILE).read_text())["lesion_wise"] is False
    # rows without the lesion-wise scores are never mixed with rows that have them
    with pytest.raises(evaluation.ResultsMismatchError, match="lesion_wise: False there, True now"):
        evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=EvalOptions(progress=False, hd95=False,
                                                                                       lesion_wise=True))  # fmt: skip
    # a record of a version before --lesion_wise has no such key: its rows have no lesion-wise scores
    record = json.loads((out / evaluation.RECORD_FILE).read_text())
    (out / evaluation.RECORD_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "lesion_wise"}))
    with pytest.raises(evaluation.ResultsMismatchError, match="lesion_wise: False there, True now"):
        evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=EvalOptions(progress=False, hd95=False,
                                                                                       lesion_wise=True))  # fmt: skip
    assert evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=plain) == first
    assert json.loads((out / evaluation.RECORD_FILE).read_text()) == record  # the key added back
    # --overwrite starts the folder afresh with them; a re-run then resumes without computing anything
    with_lw = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=lesion_wise, overwrite=True)
    assert all(k in with_lw[0] for k in LESION_WISE_KEYS)
    calls = []
    monkeypatch.setattr(model, "decode", lambda *a: calls.append(1))
    monkeypatch.setattr(evaluation, "lesion_wise_scores", lambda *a, **k: calls.append(1))
    assert evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=lesion_wise) == with_lw
    assert calls == []


def test_per_case_files_of_older_versions_stay_readable(toy, tmp_path, monkeypatch):
    model, root, cases = toy
    out = tmp_path / "out"
    opts = EvalOptions(progress=False, hd95=False)
    first = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=opts)
    # rewrite the folder as an older version left it: no lesion-wise columns, no lesion_wise key in the record
    shard = evaluation.shard_file(out, SCENARIOS[:1])
    old_header = [c for c in evaluation.PER_CASE_HEADER if c not in LESION_WISE_KEYS]
    evaluation.write_csv(shard, old_header, _rows(shard))
    record = json.loads((out / evaluation.RECORD_FILE).read_text())
    (out / evaluation.RECORD_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "lesion_wise"}))
    assert next(csv.reader(shard.open())) == old_header
    assert len(read_rows(shard, SCENARIOS[:1])) == 2
    assert summarize(out) == first
    run = report.load_run("toy", out)
    assert "LesionWise_Dice_WT" not in run.metrics() and "WT" in run.metrics()
    # the same evaluation resumes: the old rows are kept (not computed again) and written under the new header
    calls = []
    real = model.decode
    monkeypatch.setattr(model, "decode", lambda *a: calls.append(1) or real(*a))
    evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=opts)
    assert calls == []
    summary = evaluate(model, root, cases, out, scenarios=SCENARIOS[:2], options=opts)  # another shard
    assert calls and summary[0] == first[0]
    assert next(csv.reader(evaluation.shard_file(out, SCENARIOS[:2]).open())) == list(evaluation.PER_CASE_HEADER)


def test_lesion_wise_cells_are_validated(tmp_path, caplog):
    path = tmp_path / "per_case_all.csv"
    base = {"case": "C-1", "scenario": SCENARIOS[0].name, "bits": SCENARIOS[0].bits, "WT": "0.5", "TC": "0.5",
            "ET": "0.5", "ETpp": "0.5", "seconds": "1.0"}  # fmt: skip
    full = dict.fromkeys(LESION_WISE_KEYS, "0.5")
    cells = [
        {},  # computed without --lesion_wise
        full | {"LesionWise_Dice_ET": "nan", "LesionWise_HD95_ET": "nan"},  # no ET lesion on either side
        full | {"LesionWise_HD95_TC": "373.128664"},
        full | {"LesionWise_Dice_WT": "1.5"},  # not a Dice score
        full | {"LesionWise_HD95_ET": "-1"},  # not a distance
        full | {"LesionWise_Dice_TC": "abc"},
        full | {"LesionWise_Dice_TC": ""},  # cut short
    ]
    rows = [base | {"case": f"C-{i}"} | c for i, c in enumerate(cells)]
    evaluation.write_csv(path, evaluation.PER_CASE_HEADER, rows)
    with caplog.at_level(logging.WARNING, logger="brats_core.engine.evaluation"):
        assert [r["case"] for r in read_rows(path)] == ["C-0", "C-1", "C-2", "C-6"]
    assert "LesionWise_Dice_WT '1.5' is not a Dice score" in caplog.text
    assert "LesionWise_HD95_ET '-1' is not a distance" in caplog.text
    # an evaluation with --lesion_wise computes again the rows that lack any of them
    assert [r["case"] for r in read_rows(path, lesion_wise=True)] == ["C-1", "C-2"]
    assert "no LesionWise_Dice_TC" in caplog.text
    # the summary skips NaN (no lesion on either side) in its means, as the package's own parser does
    summary = summarize(tmp_path)
    assert summary[0]["LesionWise_Dice_ET"] == "0.5000"  # the mean of C-2, C-6 (C-0: empty, C-1: nan)
    assert summary[0]["LesionWise_HD95_TC"] == f"{(0.5 * 2 + 373.128664) / 3:.4f}"


def test_the_flags_reach_the_evaluator():
    import argparse

    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    assert EvalOptions.from_args(parser.parse_args(["--lesion_wise"])).lesion_wise is True
    assert EvalOptions.from_args(parser.parse_args([])).lesion_wise is False
    from brats_core.apps.scripts import build_test_parser  # IMFuse, mmFormer, RobustSeg, SFusion, U-HVED

    args = build_test_parser("t", "d").parse_args(["--datapath", "d", "--resume", "c", "--lesion_wise"])
    assert EvalOptions.from_args(args).lesion_wise is True
    from MaM import test as mam_test
    from ShaSpec import eval as shaspec_eval

    assert shaspec_eval.build_parser().parse_args(["--restore_from", "c", "--lesion_wise"]).lesion_wise is True
    assert mam_test.build_parser().parse_args(["-o", "o", "--lesion_wise"]).lesion_wise is True


def test_shaspec_passes_the_flag_to_the_shared_evaluator(tmp_path, monkeypatch):
    from brats_core.registry import build_method
    from ShaSpec import eval as shaspec_eval

    seen = []
    monkeypatch.setattr(shaspec_eval, "load_for_test", lambda *a: build_method("shaspec", "tiny"))
    monkeypatch.setattr(shaspec_eval, "resolve_list", lambda *a: tmp_path / "test.csv")
    monkeypatch.setattr(shaspec_eval, "read_test_list", lambda *a: ["C-1"])
    monkeypatch.setattr(shaspec_eval, "prepare_cache", lambda *a: ["C-1"])
    monkeypatch.setattr(shaspec_eval, "evaluate", lambda *a, **k: seen.append(a[5]) or [])
    for flags, expected in (([], False), (["--lesion_wise"], True)):
        assert shaspec_eval.main(["--restore_from", "c.pth", "--savepath", str(tmp_path), *flags]) == 0
        assert seen.pop().lesion_wise is expected


@pytest.mark.parametrize("script", ["shaspec", "m3ae"])
def test_upstream_scoring_refuses_lesion_wise(script, tmp_path, capsys):
    from m3ae import test as m3ae_test
    from ShaSpec import eval as shaspec_eval

    main, argv = {
        "shaspec": (shaspec_eval.main, ["--restore_from", str(tmp_path / "c.pth")]),
        "m3ae": (m3ae_test.main, ["--datapath", str(tmp_path), "--checkpoint", str(tmp_path / "c.pth")]),
    }[script]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--reference-quirks", "--lesion_wise", "--savepath", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "--lesion_wise belongs to the shared protocol" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def without_the_package(monkeypatch):
    metrics._lesion_evaluator.cache_clear()
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # makes `import brats_evaluation` fail
    yield
    metrics._lesion_evaluator.cache_clear()


def test_a_missing_package_stops_before_any_output(toy, tmp_path, without_the_package):
    model, root, cases = toy
    with pytest.raises(UsageError, match=r"^--lesion_wise: lesion-wise metrics need .*pip install BraTS-evaluation"):
        evaluate(model, root, cases, tmp_path / "out", options=EvalOptions(progress=False, lesion_wise=True))
    assert not (tmp_path / "out").exists()
    from MaM import test as mam_test

    with pytest.raises(UsageError, match="--lesion_wise: "):  # before the checkpoint is looked for
        mam_test.main(["-o", str(tmp_path / "mam"), "--checkpoint-path", str(tmp_path / "none.pth"), "--lesion_wise"])
    assert not (tmp_path / "mam").exists()


def test_the_report_reads_the_lesion_wise_columns(toy, tmp_path):
    model, root, cases = toy
    a = tmp_path / "a"
    evaluate(model, root, cases, a, scenarios=SCENARIOS[:2], options=EvalOptions(progress=False, lesion_wise=True))
    run = report.load_run("toy", a)
    assert [m for m in run.metrics() if m.startswith("LesionWise")] == list(LESION_WISE_KEYS)
    rows = {(r["case"], r["scenario"]): r for r in _rows(evaluation.shard_file(a, SCENARIOS[:2]))}
    case, scenario = cases[1], SCENARIOS[1].name
    assert run.scores[scenario]["LesionWise_HD95_TC"][case] == float(rows[(case, scenario)]["LesionWise_HD95_TC"])
    # two hand-made runs: the lower lesion-wise HD95 and the higher lesion-wise Dice are the best ones
    scores_a = {s.name: {"WT": {"c": 0.8}, "LesionWise_Dice_WT": {"c": 0.5}, "LesionWise_HD95_WT": {"c": 5.0}}
                for s in SCENARIOS}  # fmt: skip
    scores_b = {s.name: {"WT": {"c": 0.7}, "LesionWise_Dice_WT": {"c": 0.6}, "LesionWise_HD95_WT": {"c": 9.0}}
                for s in SCENARIOS}  # fmt: skip
    runs = [report.Run("toy", "A", a, scores_a), report.Run("toy", "B", a, scores_b)]
    result = report.make_report(runs, tmp_path / "report", figures=False, count_params=False, resamples=0)
    assert ("A", "LesionWise_HD95_WT") in result.table.columns
    assert result.table.best["mean"] >= {("A", "WT"), ("B", "LesionWise_Dice_WT"), ("A", "LesionWise_HD95_WT")}
    assert "A LesionWise HD95 WT" in (tmp_path / "report" / "table.md").read_text()
