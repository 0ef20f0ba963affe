"""The paper's evaluation protocol for any registered model (METHODS.md §0.9).

Every test case × every selected scenario: sliding window (window = patch, overlap 0.5, uniform blending), argmax
(or nested regions for sigmoid methods), per-case Dice WT/TC/ET on the preprocessed crop (ε = 1e-8, empty/empty =
1), ETpp (ET < 500 voxels dropped), plus HD95. Outputs in ``out_dir``:

- ``per_case_<tag>.csv``: one row per (case, scenario); ``<tag>`` is ``all`` or the selected scenarios' bits, so
  array jobs over scenario subsets can share a folder; finished rows are skipped when re-run;
- ``summary.csv`` / ``summary.md`` / ``summary.json``: 15 rows (upstream order) + mean, merged over all shards;
- optionally ``predictions/<case>_<bits>.nii.gz`` in the original image geometry (from the preprocessing meta);
- ``evaluation.json``: what produced the rows (method, a digest of the weights, the settings that change the numbers,
  the case list and a digest of the cases' preprocessing).
  Rows are only ever added by the same model and settings: another evaluation into the folder stops with the
  differences named, unless ``overwrite`` clears the folder's results first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .cli import UsageError
from .data import check_cases, load_case
from .inference import outputs_to_labels, predict_scenarios
from .io import RECORD_FILE, atomic_path, load_json, result_files, save_json, save_text
from .metrics import case_scores
from .modalities import SCENARIOS, Mask, Scenario
from .registry import SegModel, output_config

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("WT", "TC", "ET", "ETpp", "HD95_WT", "HD95_TC", "HD95_ET")
DICE_KEYS: tuple[str, ...] = ("WT", "TC", "ET", "ETpp")


@dataclass
class EvalOptions:
    overlap: float = 0.5
    blend: str | None = "uniform"  # None: the model's own (SegModel.default_blend)
    tta: bool = False
    sw_batch_size: int = 1
    amp: bool = False
    use_encode: bool = True
    hd95: bool = True
    etpp_threshold: int = 500
    progress: bool = True
    scenario_batch: int = 1  # masks decoded per call (see inference.predict_scenarios); 1 = bit-exact protocol

    @classmethod
    def from_args(cls, args: object) -> EvalOptions:
        """From the flags of ``cli.add_eval_args`` (+ ``--amp``)."""
        return cls(
            overlap=args.overlap, blend=args.blend, tta=args.tta, sw_batch_size=args.sw_batch_size,
            amp=getattr(args, "amp", False), use_encode=not args.no_encode_once, hd95=not args.no_hd95,
            progress=not getattr(args, "no_progress", False), scenario_batch=getattr(args, "scenario_batch", 1),
        )  # fmt: skip


def segment(
    model: SegModel,
    image: torch.Tensor,
    masks: Sequence[Mask],
    options: EvalOptions,
    device: torch.device,
    origin: Sequence[int] | None = None,
) -> torch.Tensor:
    """Label maps of one volume under several scenarios.

    Args:
        model: eval-mode model.
        image: ``(4, H, W, D)`` float32.
        masks: canonical masks, one per output.
        origin: the crop's position in the original image grid, for position-aware models (see
            :func:`case_origin` and ``inference.predict_scenarios``).

    Returns:
        ``(S, H, W, D)`` uint8 BraTS labels on the CPU.
    """
    x = image.unsqueeze(0).to(device)
    blended = predict_scenarios(
        model, x, masks, overlap=options.overlap, blend=options.blend or model.default_blend,
        sw_batch_size=options.sw_batch_size, tta=options.tta, amp=options.amp, use_encode=options.use_encode,
        origin=origin, scenario_batch=options.scenario_batch,
    )  # fmt: skip
    return torch.stack(
        [outputs_to_labels(b, model.output_kind, model.region_order).to(torch.uint8).cpu() for b in blended]
    )


def window_origin(model: SegModel, meta: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """Lower corner of a case's crop box in the original image grid, for models with ``window_origin == "image"``.

    Position-aware models (``window_origin`` not None, e.g. M3AE, whose learned completion image is indexed by
    absolute position) get each window's start from ``inference.predict_scenarios``: ``"image"`` asks for positions
    in the original grid (from the preprocessing metadata ``meta``), ``"crop"`` for positions relative to the
    preprocessed crop (None is returned). Other models: None.
    """
    if getattr(model, "window_origin", None) != "image":
        return None
    box = meta["crop_box"]
    return (int(box[0][0]), int(box[1][0]), int(box[2][0]))


def case_origin(model: SegModel, root: str | Path, case: str) -> tuple[int, int, int] | None:
    """:func:`window_origin` of a preprocessed case, read from ``<root>/meta/<case>.json`` when the model needs it."""
    if getattr(model, "window_origin", None) != "image":
        return None
    path = Path(root) / "meta" / f"{case}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {model.method_name} needs each case's crop box in the original image grid "
            f"(written by the preprocessing into <datapath>/meta/)"
        )
    with path.open() as f:
        return window_origin(model, json.load(f))


def case_spacing(root: str | Path, case: str) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes (the source NIfTI's, from ``<root>/meta/<case>.json``; 1 mm without
    one). Every pipeline keeps the NIfTI axis order, so HD95 comes out in mm whatever the grid."""
    path = Path(root) / "meta" / f"{case}.json"
    affine = load_json(path).get("affine") if path.is_file() else None
    if affine is None:
        return (1.0, 1.0, 1.0)
    x, y, z = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return (float(x), float(y), float(z))


def validate(
    model: SegModel, root: str | Path, rows: Sequence[tuple[str, Mask]], options: EvalOptions, device: torch.device
) -> dict[str, float]:
    """Mean scores over cases, each under its own split-file mask (upstream's validation during training).

    Returns:
        ``WT, TC, ET, ETpp`` means and ``mean_dice`` = (WT + TC + ET) / 3, the best-checkpoint criterion.
    """
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {k: [] for k in DICE_KEYS}
    try:
        for case, mask in tqdm(rows, desc="validation", disable=not options.progress, leave=False):
            image, label = load_case(root, case)
            origin = case_origin(model, root, case)
            pred = segment(model, torch.from_numpy(image), [mask], options, device, origin)[0].numpy()
            s = case_scores(pred, label, etpp_threshold=options.etpp_threshold, hd95=False)
            for k in DICE_KEYS:
                scores[k].append(s[k])
    finally:
        model.train(was_training)
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["mean_dice"] = (out["WT"] + out["TC"] + out["ET"]) / 3
    return out


def shard_file(out: Path, scenarios: Sequence[Scenario]) -> Path:
    """``per_case_all.csv`` for the 15 scenarios, else ``per_case_<bits>-<bits>….csv`` (array jobs share a folder)."""
    tag = "all" if len(scenarios) == len(SCENARIOS) else "-".join(s.bits for s in scenarios)
    return out / f"per_case_{tag}.csv"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Write ``rows`` (columns ``header``; other keys ignored) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes and bytes): identifies the weights that produced results."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ResultsMismatchError(ValueError):
    """An output folder already holds results of another model or other settings."""


def claim_results_folder(
    out: Path, identity: Mapping[str, Any], overwrite: bool = False, shard: Path | None = None
) -> None:
    """Make sure the rows in ``out`` all come from the evaluation ``identity`` describes (JSON-able: method,
    weights digest, settings that change the numbers).

    The first evaluation writes ``evaluation.json``; a later one with another identity raises
    :class:`ResultsMismatchError` naming the differences (keys only one side has are not compared, so records of
    older versions stay valid, and gain the keys they lacked). ``overwrite`` replaces results: those of another
    identity entirely (per-case shards, summaries, saved label maps, the record); with the same identity only
    ``shard``, the caller's own, so that the other tasks of a SLURM array keep theirs. A folder with results but no
    record is adopted with a warning.
    """
    out.mkdir(parents=True, exist_ok=True)
    record = out / RECORD_FILE
    identity = json.loads(json.dumps(identity, default=str))
    saved = load_json(record) if record.is_file() else None
    diff = [
        f"{k}: {saved[k]!r} there, {identity[k]!r} now"
        for k in sorted(set(saved or {}) & set(identity))
        if saved is not None and saved[k] != identity[k]
    ]
    if overwrite and saved is not None and not diff:
        if shard is not None:
            shard.unlink(missing_ok=True)
        return
    if overwrite:
        predictions = out / "predictions"
        stale = [*result_files(out), record, *(out / f"summary.{ext}" for ext in ("csv", "md", "json"))]
        stale += sorted(predictions.glob("*_[01][01][01][01].nii.gz")) if predictions.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
    elif diff:
        raise ResultsMismatchError(
            f"{out} already holds results of another evaluation ({'; '.join(diff)}): choose another --savepath, "
            "or pass --overwrite to replace them"
        )
    elif saved is not None:
        if set(identity) - set(saved):  # a record of an older version: add what it lacked, now that it matches
            save_json(record, saved | identity)
        return
    elif result_files(out):
        log.warning("%s holds results without a %s record: assuming they come from this model", out, RECORD_FILE)
    save_json(record, identity)


@contextmanager
def results_folder_errors() -> Iterator[None]:
    """Turn a :class:`ResultsMismatchError` into a one-line command-line error (exit status 2), not a traceback."""
    try:
        yield
    except ResultsMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def check_pipeline(model: SegModel, root: str | Path, cases: Sequence[str]) -> None:
    """Refuse cases preprocessed by another method's pipeline (other normalisation and crop: wrong numbers).

    Raises:
        UsageError: naming the first such case, its pipeline and the one ``model`` needs.
    """
    from .preprocessing import output_paths

    for case in cases:
        meta = output_paths(root, case).meta
        found = load_json(meta).get("pipeline") if meta.is_file() else None
        if found != model.data_pipeline:

            def name(p: str | None) -> str:
                return f"the {p} pipeline" if p else "preprocess.py"

            raise UsageError(
                f"{meta}: case {case} was prepared by {name(found)}, but {model.method_name} is evaluated on data "
                f"prepared by {name(model.data_pipeline)}: point --datapath at that folder"
            )


def case_list_identity(cases: Sequence[str]) -> str:
    """``"N cases, sha256 …"`` of a case list (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(cases)).encode()).hexdigest()[:16]
    return f"{len(cases)} case" + "s" * (len(cases) != 1) + f", sha256 {digest}"


def data_identity(root: str | Path, cases: Sequence[str]) -> dict[str, str]:
    """The data an evaluation scores: the case list, and a digest of how its cases were preprocessed (their
    metadata without source paths; the volume sizes where there is none), so that moving or copying the data folder
    keeps the identity while another preprocessing of the same cases does not."""
    from .preprocessing import output_paths

    h = hashlib.sha256()
    for case in sorted(cases):
        paths = output_paths(root, case)
        if paths.meta.is_file():
            meta = {k: v for k, v in load_json(paths.meta).items() if k != "source_files"}
            h.update(json.dumps(meta, sort_keys=True).encode())
        else:  # e.g. folders preprocessed by the upstream code
            h.update(f"{case} {paths.vol.stat().st_size if paths.vol.is_file() else -1}".encode())
    return {"data": f"preprocessing sha256 {h.hexdigest()[:16]}", "cases": case_list_identity(cases)}


def evaluation_identity(
    model: SegModel, options: EvalOptions, root: str | Path, cases: Sequence[str]
) -> dict[str, Any]:
    """What makes two evaluations' rows comparable: the method and weights, the data and cases, and the settings
    that change numbers."""
    return {
        **data_identity(root, cases),
        "method": model.method_name,
        "weights": weights_digest(model),
        # the window is not part of the weights (ShaSpec's --input_size), and runtime fields such as RobustSeg's
        # inference dropout change the outputs of the same weights
        "window": model.patch_size,
        "config": output_config(model),
        "overlap": options.overlap,
        "blend": options.blend or model.default_blend,
        "tta": options.tta,
        "amp": options.amp,
        # batched decoding, and batches of windows, round differently (not bit-exact)
        "scenario_batch": options.scenario_batch > 1,
        "sw_batch": options.sw_batch_size > 1,
        "etpp_threshold": options.etpp_threshold,
        "hd95": options.hd95,
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file; none when it does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


PER_CASE_HEADER = ("case", "scenario", "bits", *METRICS, "seconds")


def evaluate(
    model: SegModel,
    root: str | Path,
    cases: Sequence[str],
    out_dir: str | Path,
    scenarios: Sequence[Scenario] = SCENARIOS,
    options: EvalOptions | None = None,
    device: torch.device | str = "cpu",
    save_nifti: bool = False,
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """Score ``cases`` under every scenario; resumable and shard-friendly (see the module docstring).

    ``overwrite`` discards the results already in ``out_dir``; without it, results of another model or other
    settings there stop the run (:class:`ResultsMismatchError`).

    Returns:
        The summary rows (also written to ``summary.*``).
    """
    options = options or EvalOptions()
    device = torch.device(device)
    out = Path(out_dir)
    check_cases(root, cases)
    check_pipeline(model, root, cases)
    per_case = shard_file(out, scenarios)
    claim_results_folder(out, evaluation_identity(model, options, root, cases), overwrite, per_case)
    rows = read_rows(per_case)
    done = {(r["case"], r["scenario"]) for r in rows}
    predictions = out / "predictions"

    def needed(case: str, s: Scenario) -> bool:
        # a finished row is redone when --save_nifti asks for a label map it did not write (an earlier run without)
        return (case, s.name) not in done or (save_nifti and not (predictions / _prediction_name(case, s)).is_file())

    model.eval()
    for case in tqdm(cases, desc="cases", disable=not options.progress):
        todo = [s for s in scenarios if needed(case, s)]
        if not todo:
            continue
        redone = {s.name for s in todo}
        rows = [r for r in rows if not (r["case"] == case and r["scenario"] in redone)]
        t0 = time.time()
        image, label = load_case(root, case)
        origin = case_origin(model, root, case)
        spacing = case_spacing(root, case)
        preds = segment(model, torch.from_numpy(image), [s.mask for s in todo], options, device, origin)
        seconds = (time.time() - t0) / len(todo)
        for s, pred in zip(todo, preds, strict=True):
            scores = case_scores(
                pred.numpy(), label, etpp_threshold=options.etpp_threshold, spacing=spacing, hd95=options.hd95
            )
            rows.append(
                {
                    "case": case,
                    "scenario": s.name,
                    "bits": s.bits,
                    "seconds": f"{seconds:.2f}",
                    **{k: f"{scores[k]:.6f}" for k in METRICS if not math.isnan(scores.get(k, math.nan))},
                }
            )
            if save_nifti:
                _save_prediction(root, case, s, pred.numpy(), predictions)
        write_csv(per_case, PER_CASE_HEADER, rows)
    return summarize(out)


def _save_prediction(root: str | Path, case: str, scenario: Scenario, pred: np.ndarray, out: Path) -> None:
    """Write one label map in the original geometry of the case (uncropped; source affine and header)."""
    from .preprocessing import write_label_original_geometry

    out.mkdir(parents=True, exist_ok=True)
    write_label_original_geometry(pred, root, case, out / _prediction_name(case, scenario))


def _prediction_name(case: str, scenario: Scenario) -> str:
    return f"{case}_{scenario.bits}.nii.gz"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(out_dir: str | Path) -> list[dict[str, str]]:
    """Merge every ``per_case_*.csv`` in ``out_dir`` into ``summary.csv``, ``summary.md`` and ``summary.json``.

    Rows: the scenarios present, in upstream order, each the mean over its cases, then ``mean`` over scenarios.
    """
    out = Path(out_dir)
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for path in result_files(out):
        for r in read_rows(path):
            merged[(r["case"], r["scenario"])] = r
    by_scenario: dict[str, list[dict[str, str]]] = {}
    for r in merged.values():
        by_scenario.setdefault(r["scenario"], []).append(r)
    metrics = [m for m in METRICS if any(r.get(m) not in (None, "") for r in merged.values())]
    summary: list[dict[str, str]] = []
    for s in SCENARIOS:
        if s.name not in by_scenario:
            continue
        rs = by_scenario[s.name]
        summary.append(
            {
                "scenario": s.name,
                "display": s.display,
                "bits": s.bits,
                "cases": str(len(rs)),
                **{m: f"{_mean([float(r[m]) for r in rs if r.get(m)]):.4f}" for m in metrics},
            }
        )
    if summary:
        summary.append(
            {
                "scenario": "mean",
                "display": "Mean",
                "bits": "",
                "cases": str(len({c for c, _ in merged})),
                **{m: f"{_mean([float(r[m]) for r in summary]):.4f}" for m in metrics},
            }
        )
    header = ("scenario", "display", "bits", "cases", *metrics)
    write_csv(out / "summary.csv", header, summary)
    md = ["| Scenario | Cases | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    md += [f"| {r['display']} | {r['cases']} | " + " | ".join(r[m] for m in metrics) + " |" for r in summary]
    save_text(out / "summary.md", "\n".join(md) + "\n")
    save_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_table(summary: Sequence[Mapping[str, str]]) -> str:
    """The summary as a fixed-width text table for the terminal."""
    if not summary:
        return "(no results)"
    metrics = [k for k in METRICS if k in summary[0]]
    lines = [f"{'scenario':<26}" + "".join(f"{m:>9}" for m in metrics)]
    lines += [f"{r['display']:<26}" + "".join(f"{float(r[m]):>9.4f}" for m in metrics) for r in summary]
    return "\n".join(lines)
