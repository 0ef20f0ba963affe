"""Sliding-window inference and the encode-once / decode-per-scenario evaluation path.

The paper protocol is :func:`sliding_window` with window = training patch, overlap 0.5 and uniform blending (sum of
window outputs divided by the number of windows covering each voxel), followed by :func:`outputs_to_labels`.
Gaussian blending and flip test-time augmentation are extras that change the numbers and are off by default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_core.labels import LABEL_NAMES, REGION_NAMES, regions_to_labels
from brats_core.modalities import masks_tensor
from brats_core.registry import OutputKind, SegModel
from brats_core.utils.device import amp_context

Patch = int | Sequence[int]
BLENDS: tuple[str, ...] = ("uniform", "gaussian")
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0  # σ = patch/8 per axis, as nnU-Net
# The 8 combinations of flipping the three spatial axes of a (B, C, X, Y, Z) tensor; () is the identity.
FLIP_DIMS: tuple[tuple[int, ...], ...] = tuple(dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r))


def window_starts(dim: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start indices of the sliding windows along one axis, as upstream's ``predict.py``.

    With ``stride = patch·(1 − overlap)``: starts ``k·int(stride)`` for ``k = 0 .. ceil((dim − patch)/stride) − 1``,
    then a final ``dim − patch`` so that the last window touches the border; ``dim == patch`` gives ``[0]``.

    Args:
        dim: volume size along the axis (≥ ``patch``; smaller volumes are padded by the caller).
        patch: window size along the axis.
        overlap: fraction of the window shared by neighbours, in [0, 1).

    Returns:
        increasing start indices, e.g. ``window_starts(240, 128) == [0, 64, 112]``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if patch < 1 or dim < patch:
        raise ValueError(f"need 1 <= patch <= dim, got patch {patch} and dim {dim} (pad the volume first)")
    stride = patch * (1.0 - overlap)
    if int(stride) < 1:
        raise ValueError(f"patch {patch} with overlap {overlap} gives a stride below one voxel")
    count = math.ceil((dim - patch) / stride)
    return [k * int(stride) for k in range(count)] + [dim - patch]


def gaussian_importance(patch: Patch, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> torch.Tensor:
    """Gaussian window weights for blending, maximum 1 at the window centre.

    Unlike nnU-Net's filtered delta (centre ``p//2``, truncated at 4σ, zeros clamped) this is the analytic Gaussian
    centred at ``(p − 1)/2``: symmetric, so flipping a window leaves its weights unchanged, and positive everywhere.

    Args:
        patch: window size, int or 3-tuple.
        sigma_scale: σ as a fraction of the window size along each axis.

    Returns:
        float32 ``(p0, p1, p2)``.
    """
    profiles = []
    for size in _as_triple(patch):
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        profiles.append(torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return (weights / weights.max()).float()


class _Blender:
    """Window positions of a (padded) volume and float32 accumulators for ``n_outputs`` blended outputs.

    A volume smaller than the window along an axis is padded at the end with its per-channel minimum — for z-scored
    MRI the background value, since raw intensities are ≥ 0 — and the result is cropped back to the input size.
    """

    def __init__(self, x: torch.Tensor, patch: Patch, overlap: float, blend: str, n_outputs: int) -> None:
        if x.dim() != 5 or x.shape[0] != 1:
            raise ValueError(f"x must be (1, C, D, H, W), got shape {tuple(x.shape)}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.patch = _as_triple(patch)
        self.shape = tuple(x.shape[2:])
        padded = tuple(max(d, p) for d, p in zip(self.shape, self.patch, strict=True))
        if padded != self.shape:
            fill = x.amin(dim=(2, 3, 4), keepdim=True)
            self.x = fill.expand(*x.shape[:2], *padded).clone()
            self.x[(..., *(slice(0, d) for d in self.shape))] = x
        else:
            self.x = x
        self.positions = [
            tuple(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True))
            for starts in itertools.product(
                *(window_starts(d, p, overlap) for d, p in zip(padded, self.patch, strict=True))
            )
        ]
        # None = uniform: outputs are added as they are, exactly upstream's sum / count.
        self.weight = gaussian_importance(self.patch).to(x.device) if blend == "gaussian" else None
        self.norm = torch.zeros(padded, dtype=torch.float32, device=x.device)
        for pos in self.positions:
            self.norm[pos] += 1.0 if self.weight is None else self.weight
        self.n_outputs = n_outputs
        self.acc: torch.Tensor | None = None

    def batches(self, batch_size: int, progress: bool) -> Iterator[tuple[torch.Tensor, list[tuple[slice, ...]]]]:
        """Windows ``(b, C, p0, p1, p2)`` with their positions, ``b ≤ batch_size``."""
        if batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {batch_size}")
        chunks = [self.positions[i : i + batch_size] for i in range(0, len(self.positions), batch_size)]
        for chunk in tqdm(chunks, desc="sliding window", unit="batch", disable=not progress, leave=False):
            yield torch.cat([self.x[(..., *pos)] for pos in chunk]), chunk

    def add(self, index: int, outputs: torch.Tensor, positions: list[tuple[slice, ...]], scale: float = 1.0) -> None:
        """Accumulate window outputs ``(b, K, p0, p1, p2)`` into output ``index``, multiplied by ``scale``."""
        if outputs.shape[0] != len(positions) or tuple(outputs.shape[2:]) != self.patch:
            raise ValueError(
                f"window function returned {tuple(outputs.shape)} for {len(positions)} windows of {self.patch}"
            )
        if self.acc is None:
            self.acc = torch.zeros(
                (self.n_outputs, outputs.shape[1], *self.norm.shape), dtype=torch.float32, device=self.norm.device
            )
        elif outputs.shape[1] != self.acc.shape[1]:
            raise ValueError(f"window function returned {outputs.shape[1]} channels, expected {self.acc.shape[1]}")
        outputs = outputs.to(device=self.acc.device, dtype=torch.float32)
        if scale != 1.0:
            outputs = outputs * scale
        if self.weight is not None:
            outputs = outputs * self.weight
        for out, pos in zip(outputs, positions, strict=True):
            self.acc[(index, slice(None), *pos)] += out

    def result(self) -> torch.Tensor:
        """Blended outputs ``(n_outputs, K, D, H, W)`` cropped to the input size."""
        if self.acc is None:
            raise RuntimeError("no window output was accumulated")
        crop = (..., *(slice(0, d) for d in self.shape))
        return (self.acc / self.norm)[crop]


def sliding_window(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    patch: Patch,
    *,
    overlap: float = 0.5,
    blend: str = "uniform",
    sw_batch_size: int = 1,
    out_channels: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping windows of ``x`` and blend the window outputs into one volume.

    Runs under ``torch.no_grad()``; accumulates in float32 on ``x``'s device.

    Args:
        fn: maps a window batch ``(b, C, p0, p1, p2)`` to outputs ``(b, K, p0, p1, p2)``.
        x: volume ``(1, C, D, H, W)``; padded with its per-channel minimum where smaller than the window.
        patch: window size, int or 3-tuple.
        overlap: window overlap per axis (0.5: stride = patch/2), see :func:`window_starts`.
        blend: ``"uniform"`` (sum / count, upstream) or ``"gaussian"`` (weights of :func:`gaussian_importance`).
        sw_batch_size: windows per call of ``fn``.
        out_channels: K, checked against ``fn``'s output when given.
        progress: show a progress bar.

    Returns:
        float32 ``(1, K, D, H, W)``.
    """
    blender = _Blender(x, patch, overlap, blend, n_outputs=1)
    with torch.no_grad():
        for windows, positions in blender.batches(sw_batch_size, progress):
            outputs = fn(windows)
            if out_channels is not None and outputs.shape[1] != out_channels:
                raise ValueError(f"fn returned {outputs.shape[1]} channels, expected out_channels={out_channels}")
            blender.add(0, outputs, positions)
    return blender.result()


def predict_scenarios(
    model: SegModel,
    x: torch.Tensor,
    masks: torch.Tensor | Sequence[Sequence[bool]],
    *,
    patch: Patch | None = None,
    overlap: float = 0.5,
    blend: str = "uniform",
    sw_batch_size: int = 1,
    tta: bool = False,
    amp: bool = False,
    use_encode: bool = True,
    progress: bool = False,
    origin: Sequence[int] | None = None,
    scenario_batch: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Blended eval outputs of ``model`` on one volume for each of S missing-modality masks.

    With ``use_encode`` and a model that supports it, every window batch is encoded ONCE and decoded for each mask
    (``decode(encode(w), m) == model(w, m)``), otherwise ``model(w, m)`` is called per mask; both give the same
    result as S separate :func:`sliding_window` passes. Runs under ``torch.inference_mode()`` on the model's device.

    Args:
        model: a :class:`SegModel` in eval mode (raises if it is training; its mode is never changed here).
        x: volume ``(1, 4, D, H, W)`` in canonical channel order.
        masks: ``(S, 4)`` bool (canonical order, True = available), or a sequence of S masks.
        patch: window size; ``model.patch_size`` when None.
        overlap: window overlap, see :func:`window_starts`.
        blend: ``"uniform"`` or ``"gaussian"``.
        sw_batch_size: windows per forward pass.
        tta: average over the 8 flips of the three spatial axes (flip window, predict, flip back).
        amp: autocast on CUDA with training's rule (:func:`brats_core.utils.device.amp_dtype`: bf16 where supported,
            else fp16); ignored on CPU.
        use_encode: use the encode-once path when the model supports it.
        progress: show a progress bar.
        origin: voxel position of ``x[..., 0, 0, 0]`` in the original image grid (the crop box's lower corner), for
            position-aware models, i.e. those with a ``window_origin`` attribute that is not None (M3AE's learned
            completion image is indexed by absolute position). They are called as ``model(w, m, origin=o,
            flip=dims)`` with ``o`` the ``(b, 3)`` int64 start of each window (``origin`` + window start; the
            window start alone when ``origin`` is None) and ``dims`` the flipped axes of ``w`` (TTA); the
            encode-once path is not used for them.
        scenario_batch: masks decoded together: the features of a window batch (or the windows themselves without
            the encode-once path) are repeated along the batch axis, one copy per mask, and go through ``decode``
            (or the model) in one call. Faster where the decoder dominates (``benchmarks/RESULTS.md``), but batched
            convolutions may sum in another order, so outputs can differ from one mask at a time by float rounding
            (about 1e-5 measured), which can flip an argmax; 1, the default, keeps the paper protocol's results bit
            for bit.
        autocast_dtype: with ``amp``, this dtype instead of the shared rule's (upstream's fp16 for M3AE's
            ``--reference-quirks``).

    Returns:
        float32 ``(S, K, D, H, W)`` on the model's device, in ``model.output_kind`` (see :func:`outputs_to_labels`).
    """
    if model.training:
        raise RuntimeError("predict_scenarios needs the model in eval mode: call model.eval() first")
    device = _module_device(model, x.device)
    if isinstance(masks, torch.Tensor):
        mask_rows = masks.to(device=device, dtype=torch.bool)
    else:
        mask_rows = masks_tensor(masks, device=device)
    if mask_rows.dim() != 2 or mask_rows.shape[1] != 4 or mask_rows.shape[0] == 0:
        raise ValueError(f"masks must be (S, 4) with S >= 1, got shape {tuple(mask_rows.shape)}")
    if not bool(mask_rows.any(dim=1).all()):
        raise ValueError("every mask needs at least one available modality")
    positional = getattr(model, "window_origin", None) is not None
    encode = use_encode and model.supports_encode and not positional
    offset = [int(o) for o in origin] if origin is not None else [0, 0, 0]
    if len(offset) != 3:
        raise ValueError(f"origin must hold 3 voxel indices, got {origin!r}")
    if scenario_batch < 1:
        raise ValueError(f"scenario_batch must be >= 1, got {scenario_batch}")
    groups = [range(i, min(i + scenario_batch, len(mask_rows))) for i in range(0, len(mask_rows), scenario_batch)]
    flips = FLIP_DIMS if tta else ((),)
    autocast = amp_context(device, amp, autocast_dtype)
    window = patch if patch is not None else model.patch_size
    with torch.inference_mode():
        blender = _Blender(x.to(device), window, overlap, blend, len(mask_rows))
        for windows, positions in blender.batches(sw_batch_size, progress):
            b = windows.shape[0]
            starts = torch.tensor(
                [[sl.start + o for sl, o in zip(pos, offset, strict=True)] for pos in positions], device=device
            )
            for dims in flips:
                inputs = windows.flip(dims) if dims else windows
                with autocast:
                    features = model.encode(inputs) if encode else None
                    for group in groups:
                        k = len(group)  # masks of this call; inputs and masks are mask-major: k blocks of b
                        masks_k = mask_rows[group.start : group.stop].repeat_interleave(b, dim=0)
                        if encode:
                            outputs = model.decode(repeat_batch(features, k), masks_k)
                        else:
                            extra = {"origin": starts.repeat(k, 1), "flip": dims} if positional else {}
                            outputs = model(repeat_batch(inputs, k), masks_k, **extra)
                        for j, index in enumerate(group):
                            out = outputs[j * b : (j + 1) * b]
                            blender.add(index, out.flip(dims) if dims else out, positions, 1.0 / len(flips))
        return blender.result()


def repeat_batch(obj: Any, k: int) -> Any:
    """``k`` copies of every tensor of a (nested) batch along dim 0, copy-major: ``(B, ...)`` → ``(k·B, ...)``.

    Lists, tuples, named tuples and dicts (what ``encode`` returns) keep their structure; ``k == 1`` returns ``obj``.
    """
    if k == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(k, *([1] * (obj.dim() - 1)))
    if isinstance(obj, dict):
        return {key: repeat_batch(value, k) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(repeat_batch(value, k) for value in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(repeat_batch(value, k) for value in obj)
    return obj


def outputs_to_labels(
    blended: torch.Tensor, kind: OutputKind | str, region_order: Sequence[str] = REGION_NAMES
) -> torch.Tensor:
    """Turn blended model outputs into a BraTS label map.

    Args:
        blended: ``(K, ...)``: class probabilities or logits (K = 4), or region logits (K = len(region_order)).
        kind: what ``blended`` holds (``model.output_kind``).
        region_order: channel order of region logits (``model.region_order``).

    Returns:
        int64 labels ``(...)``: argmax over classes, or per region ``logit > 0`` (sigmoid > 0.5) resolved with the
        nesting rule of :func:`brats_core.labels.regions_to_labels`.
    """
    kind = OutputKind(kind)
    if kind is OutputKind.REGION_LOGITS:
        if blended.shape[0] != len(region_order):
            raise ValueError(f"{blended.shape[0]} region channels do not match region_order {tuple(region_order)}")
        return regions_to_labels(blended > 0, tuple(region_order))
    return blended.argmax(dim=0)


def outputs_to_probabilities(
    blended: torch.Tensor, kind: OutputKind | str, region_order: Sequence[str] = REGION_NAMES
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Per-voxel probabilities of blended model outputs, in the method's own terms.

    Args:
        blended: ``(K, ...)`` as for :func:`outputs_to_labels`.
        kind: what ``blended`` holds (``model.output_kind``).
        region_order: channel order of region logits.

    Returns:
        ``(probabilities, channel names)``: class methods give ``(4, ...)`` class probabilities (logits through a
        softmax; blended probabilities as they are) named ``background, NCR, ED, ET``; region methods give ``(3, ...)``
        sigmoid probabilities reordered to ``WT, TC, ET``.
    """
    kind = OutputKind(kind)
    if kind is OutputKind.REGION_LOGITS:
        order = tuple(region_order)
        return torch.sigmoid(blended[[order.index(r) for r in REGION_NAMES]]), REGION_NAMES
    names = tuple(LABEL_NAMES[i] for i in sorted(LABEL_NAMES))
    return (torch.softmax(blended, dim=0) if kind is OutputKind.LOGITS else blended), names


def _as_triple(patch: Patch) -> tuple[int, int, int]:
    values = (patch,) * 3 if isinstance(patch, int | np.integer) else tuple(patch)
    if len(values) != 3 or any(int(v) < 1 for v in values):
        raise ValueError(f"patch must be a positive int or three positive ints, got {patch!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _module_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Device of the module's first parameter or buffer; ``default`` for a module without any."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return default
