"""The model contract shared by all eight methods, and the registry that builds them by name.

Every method's ``model.py`` defines a config dataclass (paper defaults, with at least ``patch_size``) and a model
class derived from :class:`SegModel`, registered with :func:`register`::

    @register("imfuse", config=IMFuseConfig, presets={"tiny": {"patch_size": 32, ...}}, display="IM-Fuse")
    class IMFuse(SegModel): ...

``model(x, mask)`` takes ``x`` ``(B, 4, D, H, W)`` float32 in canonical channel order and ``mask`` ``(B, 4)`` bool.
In eval mode it returns what the method's upstream blends in its sliding window, declared by ``output_kind``; in
train mode it returns whatever its own loss needs. A model may also implement ``encode(x)`` / ``decode(features,
mask)`` (with ``decode(encode(x), mask) == model(x, mask)`` in eval mode), which lets the evaluator encode each
window once and decode all 15 scenarios.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

# Method name → module that registers it. Every one must import: a method that fails to import is an error, never
# silently left out of list_methods() (and so out of the contract tests).
METHOD_MODULES: dict[str, str] = {
    "imfuse": "IMFuse.model",
    "mmformer": "mmFormer.model",
    "robustseg": "RobustSeg.model",
    "sfusion": "SFusion.model",
    "uhved": "UHVED.model",
    "m3ae": "m3ae.model",
    "shaspec": "ShaSpec.model",
    "mam": "MaM.model",
}


class OutputKind(str, Enum):
    """What a model returns in eval mode, i.e. what the sliding window blends."""

    PROBABILITIES = "probabilities"  # (B, 4, ...) softmax over BraTS labels 0..3
    LOGITS = "logits"  # (B, 4, ...) class logits (blended as logits, then argmax)
    REGION_LOGITS = "region_logits"  # (B, 3, ...) sigmoid logits of regions, channel order = model.region_order


class SegModel(nn.Module):
    """Base class of every method's network: holds its config and declares its eval output."""

    output_kind: ClassVar[OutputKind] = OutputKind.PROBABILITIES
    region_order: ClassVar[tuple[str, ...]] = ("WT", "TC", "ET")
    method_name: ClassVar[str] = ""
    # Position-aware models (M3AE's completion image is indexed by absolute voxel position) set "image" (window
    # starts in the original grid) or "crop" (in the preprocessed crop); the sliding window then calls
    # model(w, m, origin=..., flip=...) (see inference.predict_scenarios).
    window_origin: ClassVar[str | None] = None
    # Sliding-window blending of its upstream's inference ("uniform" for the paper protocol, "gaussian" for MaM's
    # nnU-Net); predict.py uses it unless --blend says otherwise.
    default_blend: ClassVar[str] = "uniform"
    # The "pipeline" recorded in the metadata of the preprocessed cases it was trained on (None: the shared
    # preprocess.py, which records none); the evaluator refuses cases of another pipeline.
    data_pipeline: ClassVar[str | None] = None
    # True when some scenarios leave parameters without a gradient (a missing modality's encoder is skipped, a
    # completion image only fills missing channels): DDP must then look for unused parameters in every step.
    mask_dependent_parameters: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def patch_size(self) -> int:
        """Side of the cubic training patch, which is also the sliding-window size."""
        return int(self.config.patch_size)

    def preprocess(self, images: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        """Preprocess a new case exactly as this method's training data (used by ``predict.py``).

        The default is the shared pipeline (:func:`brats_core.data.preprocessing.preprocess_arrays`: brain crop of at
        least one patch, z-score inside the brain); methods with their own normalisation override it.

        Args:
            images: modality key -> ``(X, Y, Z)``, any non-empty subset.

        Returns:
            ``(vol float32 (H, W, D, 4) canonical with zero channels for absent modalities, meta)``; ``meta`` holds at
            least ``original_shape``, ``crop_box`` (half-open ``[[lo, hi]] * 3``), ``cropped_shape`` and
            ``available``.
        """
        from brats_core.data.preprocessing import preprocess_arrays

        vol, _, meta = preprocess_arrays(images, patch_size=self.patch_size)
        return vol, meta

    def unused_parameter_names(self) -> list[str]:
        """Parameters that never receive a gradient in the training forward (upstream's dead parameters, kept for
        state-dict compatibility); the contract test checks that every other parameter gets one."""
        return []

    @property
    def supports_encode(self) -> bool:
        """True when the model implements ``encode``/``decode`` (encode-once, decode-15 evaluation)."""
        return callable(getattr(self, "encode", None)) and callable(getattr(self, "decode", None))


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    model_cls: type[SegModel]
    config_cls: type
    presets: dict[str, dict[str, Any]]
    display: str
    # "module:function" reading checkpoints that other tools wrote for this method (MaM: nnU-Net's), see
    # checkpoint_readers().
    checkpoint_reader: str | None = None


_REGISTRY: dict[str, MethodInfo] = {}


def register(
    name: str,
    *,
    config: type,
    presets: dict[str, dict[str, Any]] | None = None,
    display: str | None = None,
    checkpoint_reader: str | None = None,
) -> Callable[[type[SegModel]], type[SegModel]]:
    """Class decorator that registers a model under ``name`` (presets: ``"paper"`` = config defaults, plus extras).

    ``checkpoint_reader`` (``"module:function"``, imported only when needed) opens checkpoints that were not written
    by this project's training scripts, for ``predict.py``: ``function(path, device, options)`` returns an object
    with ``model`` (the :class:`SegModel`) and ``predict(images, probabilities, spacing) -> Prediction``, or None
    when the file is not of its kind.
    """

    def deco(cls: type[SegModel]) -> type[SegModel]:
        if not dataclasses.is_dataclass(config) or "patch_size" not in {f.name for f in dataclasses.fields(config)}:
            raise TypeError(f"{name}: config {config.__name__} must be a dataclass with a patch_size field")
        existing = _REGISTRY.get(name)
        if existing is not None and _where(existing.model_cls) != _where(cls):
            raise ValueError(f"method {name!r} is registered twice: {_where(existing.model_cls)} and {_where(cls)}")
        cls.method_name = name
        _REGISTRY[name] = MethodInfo(
            name, cls, config, {"paper": {}, **(presets or {})}, display or name, checkpoint_reader
        )
        return cls

    return deco


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_method(name: str) -> None:
    """Import the module that registers ``name``; its import errors surface, naming the method."""
    module = METHOD_MODULES.get(name)
    if module is None or name in _REGISTRY:
        return
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"method {name!r}: cannot import {module} ({type(err).__name__}: {err})") from err
    if name not in _REGISTRY:
        raise ImportError(f"method {name!r}: {module} imported but registered nothing under that name")


def list_methods() -> list[str]:
    """Names of all methods, in the order of :data:`METHOD_MODULES` (then any registered elsewhere)."""
    for name in METHOD_MODULES:
        _import_method(name)
    return [n for n in METHOD_MODULES if n in _REGISTRY] + sorted(set(_REGISTRY) - set(METHOD_MODULES))


def method_info(name: str) -> MethodInfo:
    key = name.lower()
    _import_method(key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(list_methods()) or 'none'}")
    return _REGISTRY[key]


def checkpoint_readers() -> list[tuple[str, Callable[..., Any]]]:
    """``(method, reader)`` for every method that reads foreign checkpoints (see :func:`register`)."""
    readers = []
    for name in list_methods():
        spec = _REGISTRY[name].checkpoint_reader
        if spec:
            module, _, function = spec.partition(":")
            readers.append((name, getattr(importlib.import_module(module), function)))
    return readers


def make_config(name: str, preset: str = "paper", **overrides: Any) -> Any:
    """The config dataclass of ``name`` with a preset and keyword overrides applied (unknown keys rejected)."""
    info = method_info(name)
    if preset not in info.presets:
        raise KeyError(f"{name}: unknown preset {preset!r}; available: {', '.join(info.presets)}")
    values = {**info.presets[preset], **overrides}
    known = {f.name for f in dataclasses.fields(info.config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{name}: unknown config field(s) {unknown}; known: {sorted(known)}")
    return info.config_cls(**values)


def build_method(name: str, preset: str = "paper", **overrides: Any) -> SegModel:
    """Build a registered model, e.g. ``build_method("imfuse", "tiny", mamba_skip=True)``."""
    info = method_info(name)
    return info.model_cls(make_config(name, preset, **overrides))


RUNTIME_FIELD = {"runtime": True}
"""``dataclasses.field(metadata=RUNTIME_FIELD)`` marks a config field that may change between sessions of one trained
model (a kernel backend, activation checkpointing): :func:`config_mismatch` ignores it and :func:`build_from_config`
leaves it at its default."""

RUNTIME_OUTPUT_FIELD = {"runtime": True, "changes_outputs": True}
"""A runtime field that changes what the same weights output (RobustSeg's reference-quirk inference dropout): part
of :func:`output_config`."""


def build_from_config(name: str, config: dict[str, Any]) -> SegModel:
    """Rebuild a model from the config dict stored in a checkpoint (see ``brats_core.utils.checkpoint``).

    Runtime fields (:data:`RUNTIME_FIELD`) take their defaults: they describe the session that trained the model (a
    kernel backend, activation checkpointing, a reference quirk of evaluation), not the trained function, and the
    script that rebuilds the model sets them from its own flags.
    """
    info = method_info(name)
    fields = dataclasses.fields(info.config_cls)
    unknown = sorted(set(config) - {f.name for f in fields})
    if unknown:
        raise TypeError(f"{name}: unknown config field(s) {unknown}; known: {sorted(f.name for f in fields)}")
    known = {f.name for f in fields if not f.metadata.get("runtime")}
    return info.model_cls(info.config_cls(**{k: v for k, v in config.items() if k in known}))


def config_dict(model: SegModel) -> dict[str, Any]:
    """The model's config as a plain dict (stored in checkpoints)."""
    return dataclasses.asdict(model.config)


def config_mismatch(model: SegModel, saved: Mapping[str, Any]) -> list[str]:
    """One line per architecture field of ``model.config`` whose value in ``saved`` (a checkpoint's config) differs;
    fields missing from ``saved`` and runtime fields are not compared."""

    def plain(value: Any) -> Any:  # tuples and lists compare equal, as after a JSON round trip
        return json.loads(json.dumps(value, default=str))

    return [
        f"{f.name}: {saved[f.name]!r} in the checkpoint, {getattr(model.config, f.name)!r} now"
        for f in dataclasses.fields(model.config)
        if not f.metadata.get("runtime")
        and f.name in saved
        and plain(saved[f.name]) != plain(getattr(model.config, f.name))
    ]


def output_config(model: SegModel) -> dict[str, Any]:
    """The config fields that decide what ``model``'s weights output: all but the output-neutral runtime fields."""
    if not dataclasses.is_dataclass(model.config):
        return {}
    return {
        f.name: getattr(model.config, f.name)
        for f in dataclasses.fields(model.config)
        if not f.metadata.get("runtime") or f.metadata.get("changes_outputs")
    }


def count_parameters(module: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def state_dict_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every state-dict entry in order (what the parity tests compare with upstream's)."""
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def state_dict_listing(module: nn.Module) -> list[str]:
    """The state dict as a listing: one ``key [d0,d1,...]`` line per entry, in order (the format of the reference
    listings of upstream's state dicts that the parity tests read)."""
    return [f"{k} [{','.join(map(str, shape))}]" for k, shape in state_dict_shapes(module)]
