"""Faults of the evaluator's results folders and of the test scripts' inputs (issue #16): every result row comes
from the evaluation its folder's record names, damaged results are redone or refused before any work, and wrong
inputs stop the test scripts with one line before anything is written."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch
from toy import ToyModel, write_preprocessed

from brats_core.engine import evaluation
from brats_core.engine.evaluation import EvalOptions, evaluate, shard_file, summarize
from brats_core.modalities import SCENARIOS, format_bool_list
from brats_core.registry import build_method, config_dict
from brats_core.utils.checkpoint import save_checkpoint
from brats_core.utils.cli import run_main
from IMFuse import test as imfuse_test

OPTIONS = EvalOptions(progress=False, hd95=False)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    return root, write_preprocessed(root, n=2)


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _scores(rows):
    """The rows without their timing column, keyed by (case, scenario)."""
    return {(r["case"], r["scenario"]): {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def _toy(seed):
    torch.manual_seed(seed)
    return ToyModel().eval()


# ---------------------------------------------------------------------------------------------------------------------
# Fault 1: an evaluation folder belongs to one evaluation, also under concurrency


def _race_worker(seed, root, cases, out, scenarios, locks, start, claim, results):
    """One evaluation process. ``claim`` holds each process at its first record write until the other arrives too
    (or 3 s passed), as a slow shared file system would: both have looked for a record and found none. Without
    ``locks`` it runs as on a file system without ``flock``."""
    if not locks:
        evaluation.fcntl = None
    real = evaluation.save_json
    waiting = [claim]

    def slow_save_json(path, obj):
        if waiting:
            # broken after 3 s when the other process is held off by the folder's lock: go on alone
            with contextlib.suppress(threading.BrokenBarrierError):
                waiting.pop().wait(timeout=3)
        return real(path, obj)

    evaluation.save_json = slow_save_json
    model = _toy(seed)
    start.wait(timeout=120)
    try:
        evaluate(model, root, cases, out, scenarios=[SCENARIOS[i] for i in scenarios], options=OPTIONS)
        results.put((seed, scenarios, "finished", ""))
    except evaluation.ResultsMismatchError as err:
        results.put((seed, scenarios, "refused", str(err)))


def _race(tmp_path, root, cases, jobs, locks=True):
    """Run ``jobs`` = [(seed, scenario indices)] as simultaneous processes into one folder; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    start, claim, results = ctx.Barrier(len(jobs)), ctx.Barrier(len(jobs)), ctx.Queue()
    out = tmp_path / "out"
    procs = [
        ctx.Process(target=_race_worker, args=(seed, root, cases, out, scenarios, locks, start, claim, results))
        for seed, scenarios in jobs
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out, outcomes


@pytest.mark.parametrize("locks", [True, False], ids=["flock", "no flock"])
def test_two_evaluations_racing_into_one_folder_one_is_refused(data, tmp_path, locks):
    root, cases = data
    out, outcomes = _race(tmp_path, root, cases, [(0, [0, 1]), (1, [0, 1])], locks)
    assert sorted(o[2] for o in outcomes) == ["finished", "refused"]
    (winner,) = [o[0] for o in outcomes if o[2] == "finished"]
    (message,) = [o[3] for o in outcomes if o[2] == "refused"]
    assert "\n" not in message and str(out) in message and "--overwrite" in message
    # the record names the winner's weights, and every row is the winner's (equal to a fresh evaluation of it)
    model = _toy(winner)
    assert json.loads((out / evaluation.RECORD_FILE).read_text())["weights"] == evaluation.weights_digest(model)
    evaluate(model, root, cases, tmp_path / "fresh", scenarios=SCENARIOS[:2], options=OPTIONS)
    shard = shard_file(out, SCENARIOS[:2])
    assert _scores(_rows(shard)) == _scores(_rows(shard_file(tmp_path / "fresh", SCENARIOS[:2])))
    assert [p.name for p in evaluation.result_files(out)] == [shard.name]


def test_concurrent_shards_of_one_evaluation_both_finish(data, tmp_path):
    root, cases = data
    out, outcomes = _race(tmp_path, root, cases, [(0, [0]), (0, [1])])
    assert [o[2] for o in outcomes] == ["finished", "finished"]
    summary = summarize(out)
    assert [r["scenario"] for r in summary] == [SCENARIOS[0].name, SCENARIOS[1].name, "mean"]
    assert all(r["cases"] == "2" for r in summary)
    record = json.loads((out / evaluation.RECORD_FILE).read_text())
    assert record["weights"] == evaluation.weights_digest(_toy(0))


def test_rows_are_not_written_into_a_folder_another_evaluation_took_over(data, tmp_path, monkeypatch):
    """Another evaluation replaces the folder's results (``--overwrite``) while this one runs: this one stops
    before its next write, and the folder holds the other's rows only."""
    root, cases = data
    out = tmp_path / "out"
    mine, other = _toy(0), _toy(1)
    real = evaluation.segment
    segmented = []

    def segment_then_overwrite(model, *args, **kwargs):
        segmented.append(model)
        if model is mine and len(segmented) == 2:  # this run's second case: the other evaluation runs meanwhile
            evaluate(other, root, cases, out, scenarios=SCENARIOS[:1], options=OPTIONS, overwrite=True)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "segment", segment_then_overwrite)
    with pytest.raises(evaluation.ResultsMismatchError, match="--overwrite") as refused:
        evaluate(mine, root, cases, out, scenarios=SCENARIOS[:1], options=OPTIONS)
    assert "\n" not in str(refused.value)
    assert json.loads((out / evaluation.RECORD_FILE).read_text())["weights"] == evaluation.weights_digest(other)
    evaluate(other, root, cases, tmp_path / "fresh", scenarios=SCENARIOS[:1], options=OPTIONS)
    shard = shard_file(out, SCENARIOS[:1])
    assert _scores(_rows(shard)) == _scores(_rows(shard_file(tmp_path / "fresh", SCENARIOS[:1])))


# ---------------------------------------------------------------------------------------------------------------------
# Fault 2: rows are validated when read; damaged files are refused before any work


def _count_segments(monkeypatch):
    calls = []
    real = evaluation.segment

    def spy(model, image, masks, *args, **kwargs):
        calls.extend(masks)
        return real(model, image, masks, *args, **kwargs)

    monkeypatch.setattr(evaluation, "segment", spy)
    return calls


def test_a_truncated_row_is_redone(data, tmp_path, monkeypatch, caplog):
    root, cases = data
    out = tmp_path / "out"
    model = _toy(0)
    first = evaluate(model, root, cases[:1], out, options=OPTIONS)
    per_case = out / "per_case_all.csv"
    original = _rows(per_case)
    good = per_case.read_text().splitlines(keepends=True)
    damaged_line = next(i for i, line in enumerate(good) if ",t1+t2," in line)
    per_case.write_text("".join(good[:damaged_line]) + f"{cases[0]},t1+t2,00,,,\n" + "".join(good[damaged_line + 1 :]))
    calls = _count_segments(monkeypatch)
    again = evaluate(model, root, cases[:1], out, options=OPTIONS)
    assert calls == [next(s.mask for s in SCENARIOS if s.name == "t1+t2")]  # that row alone is computed again
    assert again == first and "nan" not in json.dumps(again)
    assert _scores(_rows(per_case)) == _scores(original)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(per_case) in m and f"line {damaged_line + 1}" in m for m in warned)


DAMAGE = {
    "garbage bytes": ("per_case_all.csv", lambda p: p.write_bytes(b"\xff\xfe\x00garbage\x81\n")),
    "wrong header": ("per_case_all.csv", lambda p: p.write_text("patient,mode,score\nA,1,0.5\n")),
    "a folder in its place": ("per_case_all.csv", lambda p: p.mkdir()),
    "invalid record": (evaluation.RECORD_FILE, lambda p: p.write_text('{"method": "toy", "weights"')),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_results_file_is_refused_before_any_work(data, tmp_path, monkeypatch, damage):
    root, cases = data
    out = tmp_path / "out"
    model = _toy(0)
    evaluate(model, root, cases[:1], out, options=OPTIONS)
    name, spoil = DAMAGE[damage]
    target = out / name
    target.unlink()
    spoil(target)
    before = target.read_bytes() if target.is_file() else None
    calls = _count_segments(monkeypatch)
    with pytest.raises(evaluation.ResultsMismatchError) as refused:
        evaluate(model, root, cases[:1], out, options=OPTIONS)
    message = str(refused.value)
    assert "\n" not in message and str(target) in message and "--overwrite" in message
    assert calls == []  # detected before any scenario was computed
    assert (target.read_bytes() if target.is_file() else None) == before  # and left as it was
    # --overwrite starts afresh and gives the numbers of a fresh evaluation
    redone = evaluate(model, root, cases[:1], out, options=OPTIONS, overwrite=True)
    assert redone == evaluate(model, root, cases[:1], tmp_path / "fresh", options=OPTIONS)


def test_summarize_skips_damaged_files_and_rows(data, tmp_path, caplog):
    root, cases = data
    out = tmp_path / "out"
    model = _toy(0)
    good = evaluate(model, root, cases, out, scenarios=SCENARIOS[:1], options=OPTIONS)
    (out / f"per_case_{SCENARIOS[1].bits}.csv").write_bytes(b"\xff\xfe garbage\n")
    (out / f"per_case_{SCENARIOS[2].bits}.csv").mkdir()
    shard = out / f"per_case_{SCENARIOS[3].bits}.csv"
    shard.write_text(",".join(evaluation.PER_CASE_HEADER) + f"\n{cases[0]},{SCENARIOS[3].name},10\n")
    assert summarize(out) == good
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(f"per_case_{SCENARIOS[i].bits}.csv" in warned for i in (1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Faults 3-6: the test scripts' inputs


@pytest.fixture
def script_inputs(tmp_path):
    """A preprocessed folder with a test list, and a tiny IM-Fuse checkpoint of ours."""
    root = tmp_path / "data"
    cases = write_preprocessed(root, n=1, shape=(32, 32, 32))
    (root / "splits").mkdir()
    (root / "splits" / "test15splits.csv").write_text(
        "case,mask\n" + "".join(f'{c},"{format_bool_list((True,) * 4)}"\n' for c in cases)
    )
    torch.manual_seed(0)
    model = build_method("imfuse", "tiny")
    save_checkpoint(tmp_path / "imfuse.pth", model, method="imfuse", config=config_dict(model))
    return root, tmp_path / "imfuse.pth"


def _run_test_script(datapath, checkpoint, savepath, *extra):
    argv = ["--datapath", str(datapath), "--resume", str(checkpoint), "--savepath", str(savepath), "--scenarios",
            "1111", "--device", "cpu", "--no_hd95", "--no_progress", *extra]  # fmt: skip
    return run_main(lambda: imfuse_test.main(argv))


def _one_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def test_a_refused_evaluation_is_one_line_through_the_script(script_inputs, tmp_path, capsys):
    root, checkpoint = script_inputs
    out = tmp_path / "eval"
    out.mkdir()
    (out / evaluation.RECORD_FILE).write_text("not json")
    assert _run_test_script(root, checkpoint, out) == 2
    line = _one_line(capsys)
    assert str(out / evaluation.RECORD_FILE) in line and "--overwrite" in line
    assert (out / evaluation.RECORD_FILE).read_text() == "not json"
    assert evaluation.result_files(out) == []


@pytest.mark.parametrize("content", ["", "case,mask\n"], ids=["zero bytes", "header only"])
def test_an_empty_test_list_is_one_line_and_writes_nothing(script_inputs, tmp_path, capsys, content):
    root, checkpoint = script_inputs
    test_list = tmp_path / "empty.csv"
    test_list.write_text(content)
    out = tmp_path / "eval"
    assert _run_test_script(root, checkpoint, out, "--test_file", str(test_list)) == 2
    assert str(test_list) in _one_line(capsys)
    assert not out.exists()
    assert test_list.read_text() == content


def test_a_wrong_datapath_is_named_for_what_it_is(script_inputs, tmp_path, capsys):
    from brats_core.data.synthetic import write_synthetic_dataset

    _, checkpoint = script_inputs
    out = tmp_path / "eval"
    assert _run_test_script(tmp_path / "dta", checkpoint, out) == 2
    line = _one_line(capsys)
    assert str(tmp_path / "dta") in line and "does not exist" in line and "split" not in line
    raw = tmp_path / "raw"
    write_synthetic_dataset(raw, 1, shape=(16, 16, 16), seed=0)
    assert _run_test_script(raw, checkpoint, out) == 2
    line = _one_line(capsys)
    assert str(raw) in line and "not preprocessed" in line and "preprocess.py" in line and "split" not in line
    assert not out.exists()


def test_another_methods_checkpoint_names_its_test_script(script_inputs, tmp_path, capsys):
    root, _ = script_inputs
    model = build_method("mmformer", "tiny")
    save_checkpoint(tmp_path / "mmformer.pth", model, method="mmformer", config=config_dict(model))
    out = tmp_path / "eval"
    assert _run_test_script(root, tmp_path / "mmformer.pth", out) == 2
    line = _one_line(capsys)
    assert str(tmp_path / "mmformer.pth") in line and "mmFormer/test.py" in line
    assert not out.exists()


def test_imfuse_architecture_flags_have_help():
    actions = {a.dest: a for a in imfuse_test.build_parser()._actions}
    for dest in ("interleaved_tokenization", "mamba_skip", "first_skip"):
        assert actions[dest].help and "checkpoint" in actions[dest].help


def test_every_method_has_its_test_script_named():
    from brats_core.apps.scripts import TEST_SCRIPTS
    from brats_core.registry import METHOD_MODULES

    repo = Path(__file__).resolve().parents[1]
    assert set(TEST_SCRIPTS) == set(METHOD_MODULES)
    assert all((repo / script).is_file() for script in TEST_SCRIPTS.values())


def test_temporaries_of_a_killed_evaluation_are_removed(data, tmp_path):
    import os
    import subprocess
    import sys

    from brats_core.utils.io import _HOST, TMP_MARKER

    root, cases = data
    out = tmp_path / "out"
    evaluate(_toy(0), root, cases[:1], out, options=OPTIONS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = out / f".per_case_all.csv{TMP_MARKER}{_HOST}-{int(dead.stdout)}-0123abcd.csv"
    live = out / f".summary.csv{TMP_MARKER}{_HOST}-{os.getpid()}-0123abcd.csv"
    claim = out / f".{evaluation.RECORD_FILE}{TMP_MARKER}{_HOST}-{int(dead.stdout)}-0123abcd.json"  # a staged record
    for path, text in ((leftover, "case,scen"), (live, "x"), (claim, "{}")):
        path.write_text(text)
    evaluate(_toy(0), root, cases[:1], out, options=OPTIONS)
    assert not leftover.exists() and not claim.exists() and live.exists()


def test_damaged_case_metadata_is_one_line_naming_it(script_inputs, tmp_path, capsys):
    root, checkpoint = script_inputs
    (case,) = [p.name.removesuffix("_vol.npy") for p in (root / "vol").glob("*_vol.npy")]
    meta = root / "meta" / f"{case}.json"
    meta.parent.mkdir(exist_ok=True)
    meta.write_text('{"case": "cut')
    assert _run_test_script(root, checkpoint, tmp_path / "out") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert str(meta) in line and "preprocess.py --overwrite --cases" in line and "Traceback" not in err


def test_the_record_names_the_autocast_dtype_so_fp16_and_bf16_rows_never_mix(data, monkeypatch):
    # --amp autocasts to bf16 on GPUs that support it, else fp16: rows of the two must not share a folder
    root, cases = data
    model = _toy(0)
    amp = EvalOptions(progress=False, hd95=False, amp=True)
    assert evaluation.evaluation_identity(model, amp, root, cases, "cpu")["amp"] is False  # no autocast on CPU
    for supported, name in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert evaluation.evaluation_identity(model, amp, root, cases, "cuda")["amp"] == name
