"""The 15-scenario evaluator: per-case rows, summary, resume, shards merging, encode-once equivalence, validation."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from toy import ToyModel, write_preprocessed

from brats_core.apps.arguments import add_eval_args, check_scenarios
from brats_core.data.dataset import load_case
from brats_core.engine import evaluation
from brats_core.engine.evaluation import EvalOptions, evaluate, format_table, segment, summarize, validate
from brats_core.engine.metrics import case_scores
from brats_core.modalities import SCENARIOS


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=2)
    return ToyModel().eval(), root, cases


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_evaluate_all_scenarios_and_summary(setup, tmp_path):
    model, root, cases = setup
    opts = EvalOptions(progress=False)
    summary = evaluate(model, root, cases, tmp_path / "out", options=opts)
    rows = _rows(tmp_path / "out" / "per_case_all.csv")
    assert len(rows) == 2 * 15 and {r["scenario"] for r in rows} == {s.name for s in SCENARIOS}
    assert [r["scenario"] for r in summary] == [s.name for s in SCENARIOS] + ["mean"]
    # each row equals a direct computation; the summary is the mean over cases, and the mean row over scenarios
    image, label = load_case(root, cases[1])
    pred = segment(model, torch.from_numpy(image), [SCENARIOS[4].mask], opts, torch.device("cpu"))[0].numpy()
    direct = case_scores(pred, label)
    row = next(r for r in rows if r["case"] == cases[1] and r["scenario"] == SCENARIOS[4].name)
    for k in ("WT", "TC", "ET", "ETpp", "HD95_WT"):
        assert float(row[k]) == pytest.approx(direct[k], abs=1e-6)
    s4 = summary[4]
    assert float(s4["WT"]) == pytest.approx(
        np.mean([float(r["WT"]) for r in rows if r["scenario"] == s4["scenario"]]), abs=1e-4
    )
    assert float(summary[-1]["ET"]) == pytest.approx(np.mean([float(r["ET"]) for r in summary[:-1]]), abs=1e-4)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())[-1]["scenario"] == "mean"
    assert "| FLAIR + T1ce |" in (tmp_path / "out" / "summary.md").read_text()
    assert "Mean" in format_table(summary)


def test_encode_once_equals_independent_passes(setup, tmp_path):
    model, root, cases = setup
    a = evaluate(model, root, cases[:1], tmp_path / "a", options=EvalOptions(progress=False, hd95=False))
    b = evaluate(
        model, root, cases[:1], tmp_path / "b", options=EvalOptions(progress=False, hd95=False, use_encode=False)
    )
    assert a == b


def test_scenario_batch_flag_reaches_the_evaluator(setup, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    options = EvalOptions.from_args(parser.parse_args(["--scenario_batch", "15", "--no_hd95"]))
    assert options.scenario_batch == 15 and EvalOptions.from_args(parser.parse_args([])).scenario_batch == 1
    with pytest.raises(SystemExit):
        check_scenarios(parser, parser.parse_args(["--scenario_batch", "0"]))
    model, root, cases = setup
    seen = []
    real = evaluation.predict_scenarios

    def spy(*args, **kwargs):
        seen.append(kwargs["scenario_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_scenarios", spy)
    options.progress = False
    batched = evaluate(model, root, cases[:1], tmp_path / "a", options=options)
    reference = evaluate(model, root, cases[:1], tmp_path / "b", options=EvalOptions(progress=False, hd95=False))
    assert seen == [15, 1]
    for got, want in zip(batched, reference, strict=True):
        assert got["scenario"] == want["scenario"]
        assert all(float(got[k]) == pytest.approx(float(want[k]), abs=1e-3) for k in ("WT", "TC", "ET"))


def test_resume_and_shards(setup, tmp_path, monkeypatch):
    model, root, cases = setup
    out = tmp_path / "out"
    opts = EvalOptions(progress=False, hd95=False)
    evaluate(model, root, cases, out, scenarios=SCENARIOS[:5], options=opts)
    evaluate(model, root, cases, out, scenarios=SCENARIOS[5:], options=opts)
    merged = summarize(out)
    assert len(merged) == 16 and merged[-1]["cases"] == "2"
    # a re-run finds every row done and calls the model no more
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a: calls.append(1))
    monkeypatch.setattr(model, "decode", lambda *a: calls.append(1))
    again = evaluate(model, root, cases, out, scenarios=SCENARIOS[:5], options=opts)
    assert calls == [] and again == merged


def test_results_of_another_model_or_settings_are_never_mixed(setup, tmp_path):
    model, root, cases = setup
    out = tmp_path / "out"
    opts = EvalOptions(progress=False, hd95=False)
    first = evaluate(model, root, cases, out, scenarios=SCENARIOS[:2], options=opts)
    record = json.loads((out / evaluation.RECORD_FILE).read_text())
    assert record["method"] == model.method_name and record["weights"] == evaluation.weights_digest(model)
    torch.manual_seed(1)
    other = ToyModel().eval()
    with pytest.raises(evaluation.ResultsMismatchError, match=r"out already holds results .*weights: .*--overwrite"):
        evaluate(other, root, cases, out, scenarios=SCENARIOS[:2], options=opts)
    with pytest.raises(evaluation.ResultsMismatchError, match=r"overlap: 0\.5 there, 0\.25 now"):
        evaluate(model, root, cases, out, scenarios=SCENARIOS[2:4], options=EvalOptions(progress=False, overlap=0.25))
    # other data, or another case list, is another evaluation too (their rows would be summarised together)
    import shutil

    shutil.copytree(root, tmp_path / "copy")  # a copy (e.g. on a node's scratch disk) is the same data
    assert evaluate(model, tmp_path / "copy", cases, out, scenarios=SCENARIOS[:2], options=opts) == first
    vol = tmp_path / "copy" / "vol" / f"{cases[0]}_vol.npy"
    np.save(vol, np.load(vol)[1:])  # another preprocessing (here: another crop) of the same case
    with pytest.raises(evaluation.ResultsMismatchError, match=r"data: 'preprocessing sha256 \w+' there, "):
        evaluate(model, tmp_path / "copy", cases, out, scenarios=SCENARIOS[:2], options=opts)
    with pytest.raises(evaluation.ResultsMismatchError, match=r"cases: '2 cases, sha256 \w+' there, '1 case, "):
        evaluate(model, root, cases[:1], out, scenarios=SCENARIOS[:2], options=opts)
    assert summarize(out) == first  # nothing was added by the refused runs
    # --overwrite replaces the folder's results: equal to a fresh evaluation of the other model
    replaced = evaluate(other, root, cases, out, scenarios=SCENARIOS[:1], options=opts, overwrite=True)
    assert replaced == evaluate(other, root, cases, tmp_path / "fresh", scenarios=SCENARIOS[:1], options=opts)
    assert [p.name for p in evaluation.result_files(out)] == [f"per_case_{SCENARIOS[0].bits}.csv"]


def test_overwrite_by_an_array_task_keeps_the_other_tasks_shards(setup, tmp_path):
    model, root, cases = setup
    out = tmp_path / "out"
    opts = EvalOptions(progress=False, hd95=False)
    first = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=opts)
    evaluate(model, root, cases, out, scenarios=SCENARIOS[1:2], options=opts)
    # the same evaluation re-run with --overwrite (e.g. every task of a SLURM array): only its own shard is redone
    evaluate(model, root, cases, out, scenarios=SCENARIOS[1:2], options=opts, overwrite=True)
    assert len(evaluation.result_files(out)) == 2 and summarize(out)[0] == first[0]
    # another window (ShaSpec's --input_size) is another evaluation, although the weights are the same
    with pytest.raises(evaluation.ResultsMismatchError, match="window: 16 there, 8 now"):
        resized = ToyModel().eval()
        resized.load_state_dict(model.state_dict())
        resized.config = type("Cfg", (), {"patch_size": 8})()
        evaluate(resized, root, cases, out, scenarios=SCENARIOS[2:3], options=opts)
    # a record of another version (a key more or less) still matches on the keys both have, and gains the new ones
    saved = json.loads((out / evaluation.RECORD_FILE).read_text())
    newer = {k: v for k, v in saved.items() if k != "hd95"} | {"future_setting": 1}
    evaluation.claim_results_folder(out, newer)
    assert json.loads((out / evaluation.RECORD_FILE).read_text()) == saved | {"future_setting": 1}


def test_cases_of_another_methods_pipeline_are_refused(setup, tmp_path):
    model, root, cases = setup
    meta = root / "meta" / f"{cases[1]}.json"
    meta.parent.mkdir(exist_ok=True)
    meta.write_text(json.dumps({"pipeline": "shaspec"}))  # as ShaSpec's (uncropped, otherwise normalised) cache
    expected = rf"case {cases[1]} was prepared by the shaspec pipeline, but {model.method_name} .*by preprocess\.py"
    with pytest.raises(ValueError, match=expected):
        evaluate(model, root, cases, tmp_path / "out", scenarios=SCENARIOS[:1], options=EvalOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_hd95_is_in_mm_of_the_source_grid(setup, tmp_path):
    model, root, cases = setup
    opts = EvalOptions(progress=False)
    one_mm = evaluate(model, root, cases[:1], tmp_path / "a", scenarios=SCENARIOS[14:], options=opts)
    meta = root / "meta" / f"{cases[0]}.json"
    meta.parent.mkdir(exist_ok=True)
    meta.write_text(json.dumps({"affine": np.diag([2.0, 2.0, 2.0, 1.0]).tolist()}))  # a 2 mm grid
    two_mm = evaluate(model, root, cases[:1], tmp_path / "b", scenarios=SCENARIOS[14:], options=opts)
    assert float(one_mm[0]["HD95_WT"]) > 0
    assert float(two_mm[0]["HD95_WT"]) == pytest.approx(2 * float(one_mm[0]["HD95_WT"]), abs=2e-4)
    assert two_mm[0]["WT"] == one_mm[0]["WT"]  # Dice does not depend on the voxel size


def test_summary_merges_only_the_evaluator_shards(setup, tmp_path):
    model, root, cases = setup
    out = tmp_path / "out"
    summary = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=EvalOptions(progress=False))
    # e.g. ShaSpec's upstream-style scoring in the same folder: other numbers, never merged into the summary
    evaluation.write_csv(out / "per_case_upstream.csv", ["case", "scenario", "WT"], [
        {"case": c, "scenario": SCENARIOS[0].name, "WT": "0.0"} for c in cases
    ])  # fmt: skip
    assert summarize(out) == summary


def test_validate_uses_each_case_mask(setup):
    model, root, cases = setup
    rows = [(cases[0], SCENARIOS[0].mask), (cases[1], SCENARIOS[14].mask)]
    model.train()
    scores = validate(model, root, rows, EvalOptions(progress=False), torch.device("cpu"))
    assert model.training  # mode restored
    assert scores["mean_dice"] == pytest.approx((scores["WT"] + scores["TC"] + scores["ET"]) / 3)
    model.eval()
    expected = []
    for case, mask in rows:
        image, label = load_case(root, case)
        pred = segment(model, torch.from_numpy(image), [mask], EvalOptions(), torch.device("cpu"))[0].numpy()
        expected.append(case_scores(pred, label, hd95=False)["WT"])
    assert scores["WT"] == pytest.approx(np.mean(expected))


def test_predictions_written_in_original_geometry(tmp_path):
    import nibabel as nib

    from brats_core.data.preprocessing import load_meta, output_paths, uncrop
    from brats_core.data.preprocessing import main as preprocess
    from brats_core.data.synthetic import write_synthetic_dataset

    (case,) = write_synthetic_dataset(tmp_path / "raw", 1, shape=(40, 44, 36), seed=5)
    assert preprocess(["--input-path", str(tmp_path / "raw"), "--output-path", str(tmp_path / "pre"),
                       "--patch_size", "32", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    torch.manual_seed(0)
    model = ToyModel().eval()
    out = tmp_path / "out"
    evaluate(model, tmp_path / "pre", [case], out, scenarios=SCENARIOS[:2],
             options=EvalOptions(progress=False, hd95=False), save_nifti=True)  # fmt: skip
    source = nib.load(tmp_path / "raw" / case / f"{case}-seg.nii.gz")
    for s in SCENARIOS[:2]:
        pred = nib.load(out / "predictions" / f"{case}_{s.bits}.nii.gz")
        assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
        data = np.asarray(pred.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2, 3}
        # the crop re-embedded: equal to the evaluator's label map inside the box, background outside
        image, _ = load_case(tmp_path / "pre", case)
        crop = segment(model, torch.from_numpy(image), [s.mask], EvalOptions(), torch.device("cpu"))[0].numpy()
        meta = load_meta(output_paths(tmp_path / "pre", case).meta)
        np.testing.assert_array_equal(data, uncrop(crop, meta))
        assert (data != 0).sum() == (crop != 0).sum() > 0
    # a finished evaluation re-run with --save_nifti writes the label maps it lacks; the rows stay one per scenario
    (out / "predictions" / f"{case}_{SCENARIOS[0].bits}.nii.gz").unlink()
    plain = tmp_path / "plain"
    evaluate(model, tmp_path / "pre", [case], plain, scenarios=SCENARIOS[:2], options=EvalOptions(progress=False))
    assert not (plain / "predictions").exists()
    again = evaluate(model, tmp_path / "pre", [case], plain, scenarios=SCENARIOS[:2],
                     options=EvalOptions(progress=False), save_nifti=True)  # fmt: skip
    assert sorted(p.name for p in (plain / "predictions").iterdir()) == [
        f"{case}_{s.bits}.nii.gz" for s in SCENARIOS[:2]
    ]
    assert len(_rows(evaluation.shard_file(plain, SCENARIOS[:2]))) == 2 and again[-1]["cases"] == "1"
