"""Checkpoints: atomic save, ``weights_only`` load, upstream DataParallel checkpoints, ``.safetensors``, strict loading.

Our format (``format = "brats-mm/1"``): ``state_dict`` (unwrapped model), ``method``, ``config`` (model config
dict), ``args`` (resolved command-line arguments), ``epoch`` (last finished epoch, 0-based; −1 before the first),
``step_in_epoch`` (optimiser steps already taken in the next epoch, for mid-epoch resume), ``global_step``,
``best_score``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``. Upstream's files are dicts with ``epoch``,
``state_dict`` (``module.``-prefixed keys), ``optim_dict`` and ``val_Dice_best``; both load here.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brats_core.utils.io import atomic_path

FORMAT = "brats-mm/1"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a ``weights_only``-loadable form (tensors and plain types)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    # a checkpoint loaded with map_location="cuda" brings the states on the GPU; the setters take CPU byte tensors
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove a DataParallel ``module.`` (or ``_orig_mod.``) prefix when every key carries it."""
    out = dict(state_dict)
    for p in (prefix, "_orig_mod."):
        if out and all(k.startswith(p) for k in out):
            out = {k[len(p) :]: v for k, v in out.items()}
    return out


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (empty, truncated, not a PyTorch checkpoint) or holds another model."""


class StateDictMismatchError(RuntimeError):
    """A checkpoint does not fit the model: names the missing, unexpected and mis-shaped keys."""


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load strictly, with an error that lists what differs (never a silent ``strict=False``)."""
    state_dict = strip_prefix(state_dict)
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def listing(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f"\n    … and {len(items) - 8} more" if len(items) > 8 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:8]) + more

        raise StateDictMismatchError(
            f"{source} does not match the model {type(unwrap(model)).__name__} "
            f"(wrong method or architecture flags?):"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
        )
    unwrap(model).load_state_dict(state_dict, strict=True)


def save_checkpoint(path: str | Path, model: nn.Module, **fields: Any) -> None:
    """Save the unwrapped model's state dict plus ``fields`` (see the module docstring) atomically."""
    atomic_torch_save({"format": FORMAT, "state_dict": unwrap(model).state_dict(), **fields}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code); ``.safetensors`` files are accepted.

    Returns:
        A dict with at least ``state_dict`` (prefix stripped); ``method``/``config`` when recorded. Upstream's keys
        are mapped: ``optim_dict`` → ``optimizer``, ``val_Dice_best`` → ``best_score``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(map_location))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            ckpt: dict[str, Any] = {"state_dict": state}
            for key in ("method", "config", "args"):
                if key in meta:
                    ckpt[key] = json.loads(meta[key])
        except (SafetensorError, ValueError, OSError) as err:
            raise CheckpointError(
                f"cannot load checkpoint {path} ({_size_hint(path, 'not a .safetensors file, or damaged')}): "
                f"{_reason(err)}"
            ) from err
    else:
        ckpt = safe_torch_load(path, map_location)
        if (
            isinstance(ckpt, Mapping)
            and "state_dict" not in ckpt
            and ckpt
            and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        ):
            ckpt = {"state_dict": dict(ckpt)}  # a bare state dict
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
            raise CheckpointError(f"{path} is not a model checkpoint (no 'state_dict' entry of tensors)")
        ckpt = dict(ckpt)
        if "optim_dict" in ckpt and "optimizer" not in ckpt:
            ckpt["optimizer"] = ckpt.pop("optim_dict")
        if "val_Dice_best" in ckpt and "best_score" not in ckpt:
            ckpt["best_score"] = float(ckpt.pop("val_Dice_best"))
    ckpt["state_dict"] = strip_prefix(ckpt["state_dict"])
    ckpt.setdefault("format", "upstream")
    return ckpt


def safe_torch_load(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    allowed: Sequence[Any] = (),
    what: str = "checkpoint",
) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only, never code; every failure names the file.

    Args:
        path: the file.
        map_location: where the tensors go.
        allowed: extra globals the weights-only unpickler may build (``torch.serialization.safe_globals`` entries),
            e.g. the numpy scalars in nnU-Net's training log; never anything that runs code.
        what: what the file is, for the message ("nnU-Net checkpoint").

    Raises:
        CheckpointError: the file is empty, truncated, not a PyTorch file, or holds other Python objects (refused).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types; name the file in every case
        reason = _reason(err)
        damaged = "not a PyTorch checkpoint, or truncated"
        hint = "refused" if reason.startswith(_UNSAFE) else _size_hint(path, damaged)
        raise CheckpointError(f"cannot load {what} {path} ({hint}): {reason}") from err


def _size_hint(path: Path, otherwise: str) -> str:
    return "empty file" if path.stat().st_size == 0 else otherwise


_UNSAFE = "it holds Python objects other than tensors and plain values"


def _reason(err: BaseException) -> str:
    """The first line of a loader's error, without advice to load unsafely.

    torch's weights-only error suggests re-running with ``weights_only=False``, which would run whatever code the
    file carries: this project never does that, so the advice is replaced by what the file holds.
    """
    text = str(err).strip()
    # torch puts its weights_only preamble before every unpickling error; only a forbidden GLOBAL means the file holds
    # objects that could run code (garbage bytes read as "Unsupported operand")
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"{_UNSAFE} ({found[1]}), which are never unpickled here because they can run code; use a checkpoint "
            "written by this project or upstream's training scripts"
        )
    if "Weights only load failed" in text:
        detail = re.search(r"(Unsupported operand[^\n.]*|invalid load key[^\n]*)", text)
        return f"UnpicklingError: {detail[1] if detail else 'not a pickle of tensors'}"
    first = re.split(r"(?<=\.) |\n", text)[0] if text else ""  # the first sentence
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def export_safetensors(ckpt_path: str | Path, out_path: str | Path) -> None:
    """Write a checkpoint's weights as ``.safetensors`` with method/config/args in the metadata."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    meta = {k: json.dumps(ckpt[k]) for k in ("method", "config", "args") if k in ckpt}
    state = {k: v.contiguous() for k, v in ckpt["state_dict"].items()}
    save_file(state, str(out_path), metadata=meta)
