"""The four MRI modalities, the 15 missing-modality scenarios and every upstream mask format.

Canonical channel order everywhere in this project (tensors, ``.npy`` volumes, masks, scenario names):
FLAIR, T1ce, T1, T2. A method whose upstream code uses another order translates inside its own folder with
:func:`to_canonical` / :func:`from_canonical`; nothing outside a model ever sees a non-canonical order.

A *mask* is a tuple of four booleans (True = modality available); batched masks are ``(B, 4)`` bool tensors.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")
"""Canonical modality keys, in channel order."""

DISPLAY_NAMES: dict[str, str] = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}

BRATS2023_SUFFIXES: dict[str, str] = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}
"""File suffixes of BraTS 2023 (``<case>-t2f.nii.gz`` …); the label map is ``<case>-seg.nii.gz``."""

LEGACY_SUFFIXES: dict[str, str] = {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2"}
"""File suffixes of BraTS 2018–2021 (``<case>_flair.nii.gz`` …); the label map is ``<case>_seg.nii.gz``."""

# Channel orders used internally by the upstream code of each method.
METHOD_ORDERS: dict[str, tuple[str, ...]] = {
    "canonical": MODALITIES,
    "sfusion": ("t1ce", "t1", "t2", "flair"),
    "uhved": ("t1", "t1ce", "t2", "flair"),
    "m3ae": ("t1", "t1ce", "t2", "flair"),
    "shaspec": ("flair", "t1", "t1ce", "t2"),
    "mam": ("flair", "t1", "t1ce", "t2"),
}

Mask = tuple[bool, bool, bool, bool]


@dataclass(frozen=True)
class Scenario:
    """One non-empty subset of the four modalities.

    Attributes:
        index: position in the upstream test order (0-based).
        mask: availability in canonical order.
    """

    index: int
    mask: Mask

    @property
    def bits(self) -> str:
        """Bit string in canonical order, e.g. ``"1100"`` for FLAIR + T1ce."""
        return "".join("1" if m else "0" for m in self.mask)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, on in zip(MODALITIES, self.mask, strict=True) if on)

    @property
    def name(self) -> str:
        """Stable machine name, e.g. ``"flair+t1ce"``."""
        return "+".join(self.modalities)

    @property
    def display(self) -> str:
        """Readable name, e.g. ``"FLAIR + T1ce"``."""
        return " + ".join(DISPLAY_NAMES[m] for m in self.modalities)

    @property
    def upstream_label(self) -> str:
        """The label upstream's test scripts print (``flairt1ce``, ``t1c`` for T1ce alone)."""
        return "t1c" if self.modalities == ("t1ce",) else "".join(self.modalities)

    def tensor(self, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """The mask as a ``(batch, 4)`` bool tensor."""
        return torch.tensor([self.mask] * batch, dtype=torch.bool, device=device)


# Upstream test order: 0001, 0100, 0010, 1000, 0101, 0110, 1010, 0011, 1001, 1100, 1110, 1011,
# 1101, 0111, 1111 in FLAIR, T1ce, T1, T2 order.
_UPSTREAM_BITS = (
    "0001", "0100", "0010", "1000", "0101", "0110", "1010", "0011",
    "1001", "1100", "1110", "1011", "1101", "0111", "1111",
)  # fmt: skip

SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(i, tuple(c == "1" for c in bits))
    for i, bits in enumerate(_UPSTREAM_BITS)  # type: ignore[arg-type]
)
"""The 15 scenarios in the upstream test order."""

FULL: Scenario = SCENARIOS[-1]


def _check_mask(mask: Sequence[bool], source: str) -> Mask:
    if len(mask) != 4:
        raise ValueError(f"{source}: a modality mask needs 4 entries, got {len(mask)}")
    out = tuple(bool(m) for m in mask)
    if not any(out):
        raise ValueError(f"{source}: at least one modality must be available")
    return out  # type: ignore[return-value]


def scenario_for(mask: Sequence[bool]) -> Scenario:
    """The scenario whose canonical mask equals ``mask``."""
    key = _check_mask(mask, f"mask {list(mask)}")
    for s in SCENARIOS:
        if s.mask == key:
            return s
    raise AssertionError("unreachable: every non-empty mask is a scenario")


def to_canonical(mask: Sequence[bool], order: Sequence[str]) -> Mask:
    """Re-order a mask given in ``order`` (e.g. ``METHOD_ORDERS["shaspec"]``) to canonical order."""
    if sorted(order) != sorted(MODALITIES):
        raise ValueError(f"order {order} is not a permutation of {MODALITIES}")
    lookup = dict(zip(order, mask, strict=True))
    return tuple(bool(lookup[m]) for m in MODALITIES)  # type: ignore[return-value]


def from_canonical(mask: Sequence[bool], order: Sequence[str]) -> tuple[bool, ...]:
    """Re-order a canonical mask to ``order``."""
    lookup = dict(zip(MODALITIES, mask, strict=True))
    return tuple(bool(lookup[m]) for m in order)


def permutation(order: Sequence[str]) -> list[int]:
    """Canonical channel indices in ``order``: ``x[:, permutation(order)]`` re-orders canonical channels."""
    return [MODALITIES.index(m) for m in order]


def parse_bool_list(text: str, order: Sequence[str] = MODALITIES) -> Mask:
    """Parse upstream's CSV mask, a Python-literal list of four booleans, e.g. ``"[False, True, True, False]"``.

    Args:
        text: the CSV cell.
        order: the modality order of the file (canonical for IM-Fuse, mmFormer and RobustSeg lists).
    """
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"not a boolean list: {text!r}") from err
    if not isinstance(value, list | tuple) or not all(isinstance(v, bool) for v in value):
        raise ValueError(f"not a boolean list: {text!r}")
    _check_mask([True] * len(value), repr(text))  # length first, so the message is about the length
    return _check_mask(to_canonical(value, order), repr(text))


def format_bool_list(mask: Sequence[bool]) -> str:
    """Inverse of :func:`parse_bool_list` in canonical order: ``"[True, False, False, True]"``."""
    return "[" + ", ".join(str(bool(m)) for m in mask) + "]"


def parse_shaspec_mode(text: str) -> Mask:
    """Parse ShaSpec's ``--mode`` string: comma-separated PRESENT indices in FLAIR, T1, T1ce, T2 order (``"0,1,3"``)."""
    try:
        idx = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as err:
        raise ValueError(f"ShaSpec mode {text!r}: expected comma-separated indices 0..3") from err
    if not idx or any(i < 0 or i > 3 for i in idx) or len(set(idx)) != len(idx):
        raise ValueError(f"ShaSpec mode {text!r}: expected distinct indices 0..3, at least one")
    present = [i in idx for i in range(4)]
    return _check_mask(to_canonical(present, METHOD_ORDERS["shaspec"]), f"ShaSpec mode {text!r}")


def format_shaspec_mode(mask: Sequence[bool]) -> str:
    """Inverse of :func:`parse_shaspec_mode`."""
    native = from_canonical(mask, METHOD_ORDERS["shaspec"])
    return ",".join(str(i) for i, on in enumerate(native) if on)


def parse_mam_bits(text: str) -> Mask:
    """Parse MaM's bit string ``m1m2m3m4`` in FLAIR, T1, T1ce, T2 order (``"0101"``: T1 and T2)."""
    if len(text) != 4 or set(text) - {"0", "1"}:
        raise ValueError(f"MaM bit string {text!r}: expected 4 characters of 0/1")
    return _check_mask(to_canonical([c == "1" for c in text], METHOD_ORDERS["mam"]), f"MaM bits {text!r}")


def parse_mam_mask(values: Sequence[str]) -> Mask:
    """MaM's ``-mask`` flag (``1,1,0,1`` or ``1 1 0 1`` or ``1101``; FLAIR, T1, T1ce, T2) → canonical mask."""
    return parse_mam_bits("".join(v.strip() for value in values for v in value.replace(",", " ").split()))


def format_mam_bits(mask: Sequence[bool]) -> str:
    return "".join("1" if m else "0" for m in from_canonical(mask, METHOD_ORDERS["mam"]))


def parse_scenarios(spec: str | Iterable[str] | None) -> list[Scenario]:
    """Select scenarios from a user string.

    Accepts ``"all"``/None (all 15), or a comma-separated list whose items are scenario names (``flair+t1ce``),
    canonical bit strings (``1100``) or 1-based upstream indices (``1``..``15``).
    """
    if spec is None:
        return list(SCENARIOS)
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if items == ["all"]:
        return list(SCENARIOS)
    by_key = {s.name: s for s in SCENARIOS} | {s.bits: s for s in SCENARIOS}
    by_key |= {str(s.index + 1): s for s in SCENARIOS} | {s.upstream_label: s for s in SCENARIOS}
    out: list[Scenario] = []
    for item in items:
        key = item.lower()
        if key not in by_key:
            raise ValueError(
                f"unknown scenario {item!r}: use 'all', names like 'flair+t1ce', bit strings like '1100' "
                f"(FLAIR, T1ce, T1, T2) or indices 1-15"
            )
        if by_key[key] not in out:
            out.append(by_key[key])
    return out


def masks_tensor(
    masks: Sequence[Sequence[bool]] | np.ndarray, device: torch.device | str | None = None
) -> torch.Tensor:
    """Stack masks into a ``(B, 4)`` bool tensor, checking each is non-empty."""
    rows = [_check_mask(m, f"mask #{i}") for i, m in enumerate(masks)]
    return torch.tensor(rows, dtype=torch.bool, device=device)
