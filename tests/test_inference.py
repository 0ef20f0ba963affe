"""Sliding-window positions and exact reconstruction, the encode-once scenario path, TTA and label conversion."""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from torch import nn

from brats_core.engine.inference import (
    FLIP_DIMS,
    gaussian_importance,
    outputs_to_labels,
    outputs_to_probabilities,
    predict_scenarios,
    repeat_batch,
    sliding_window,
    window_starts,
)
from brats_core.modalities import SCENARIOS
from brats_core.registry import OutputKind, SegModel


@pytest.mark.parametrize(
    ("dim", "patch", "overlap", "expected"),
    [
        (155, 128, 0.5, [0, 27]),  # ceil(27/64) = 1 start, then 155 − 128
        (240, 128, 0.5, [0, 64, 112]),  # ceil(112/64) = 2
        (128, 128, 0.5, [0]),  # dim == patch
        (129, 128, 0.5, [0, 1]),
        (150, 80, 0.5, [0, 40, 70]),  # RobustSeg: ceil(70/40) = 2
        (200, 112, 0.5, [0, 56, 88]),  # U-HVED: ceil(88/56) = 2
        (37, 16, 0.5, [0, 8, 16, 21]),  # ceil(21/8) = 3
        (40, 15, 0.5, [0, 7, 14, 21, 25]),  # odd patch: stride 7.5 → count ceil(25/7.5) = 4, starts k·int(7.5)
        (64, 16, 0.0, [0, 16, 32, 48]),  # no overlap: ceil(48/16) = 3, last start 48 not repeated
        (64, 32, 0.75, [0, 8, 16, 24, 32]),
    ],
)
def test_window_starts_table(dim: int, patch: int, overlap: float, expected: list[int]) -> None:
    assert window_starts(dim, patch, overlap) == expected


def test_window_starts_cover_every_voxel_without_duplicates() -> None:
    for patch in (5, 8, 15, 16):
        for dim in range(patch, 3 * patch + 2):
            starts = window_starts(dim, patch)
            assert starts == sorted(set(starts))
            covered = set().union(*(range(s, s + patch) for s in starts))
            assert covered == set(range(dim))


@pytest.mark.parametrize(("dim", "patch", "overlap"), [(10, 16, 0.5), (20, 16, 1.0), (20, 1, 0.5), (20, 0, 0.5)])
def test_window_starts_rejects_bad_arguments(dim: int, patch: int, overlap: float) -> None:
    with pytest.raises(ValueError):
        window_starts(dim, patch, overlap)


def affine(w: torch.Tensor) -> torch.Tensor:
    """A point-wise window function: whatever the blending, the blended output must be exactly 2x + 1."""
    return w * 2 + 1


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch"),
    [((37, 41, 35), 16), ((16, 16, 16), 16), ((33, 20, 26), (16, 8, 12)), ((10, 20, 7), 16), ((5, 5, 5), (8, 4, 6))],
)
def test_pointwise_function_is_reconstructed_exactly(shape: tuple[int, ...], patch, blend: str) -> None:
    x = torch.randn(1, 3, *shape)
    out = sliding_window(affine, x, patch, blend=blend)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, affine(x), rtol=1e-6, atol=1e-5)


def test_small_volume_is_padded_with_the_channel_minimum_and_cropped_back() -> None:
    x = torch.randn(1, 2, 10, 20, 7)
    seen: list[torch.Tensor] = []

    def record(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.clone())
        return w[:, :1]

    out = sliding_window(record, x, 16)
    assert out.shape == (1, 1, 10, 20, 7)
    torch.testing.assert_close(out, x[:, :1])
    window = seen[0]  # the first window starts at 0 on every axis
    assert window.shape == (1, 2, 16, 16, 16)
    torch.testing.assert_close(window[:, :, :10, :16, :7], x[:, :, :, :16, :])
    for c in range(2):
        assert torch.all(window[0, c, 10:] == x[0, c].min())
        assert torch.all(window[0, c, :, :, 7:] == x[0, c].min())


def first_voxel(w: torch.Tensor) -> torch.Tensor:
    """Each window's output is constant: the value of its first voxel."""
    return w[:, :, :1, :1, :1].expand_as(w)


def test_uniform_blending_is_sum_over_count_by_hand() -> None:
    # Axis 0 has 24 voxels, patch 16: windows start at 0 and 8 (ceil(8/8) = 1, then 24 − 16). With x = index along
    # axis 0 the windows output the constants 0 and 8, so voxels 0..7 → 0, 8..15 → (0 + 8)/2 = 4, 16..23 → 8.
    x = torch.arange(24.0)[None, None, :, None, None].expand(1, 1, 24, 16, 16)
    out = sliding_window(first_voxel, x, 16)[0, 0, :, 0, 0]
    assert out.tolist() == [0.0] * 8 + [4.0] * 8 + [8.0] * 8


def test_gaussian_blending_by_hand() -> None:
    # Same two windows with Gaussian weights: outside the overlap only one window counts (0 and 8); inside it
    # voxel i gets 8·g(i − 15.5)/(g(i − 7.5) + g(i − 15.5)): increasing, and symmetric about 11.5, so voxels
    # 11 and 12 (equal distance from both centres, mirrored) sum to 8.
    x = torch.arange(24.0)[None, None, :, None, None].expand(1, 1, 24, 16, 16)
    out = sliding_window(first_voxel, x, 16, blend="gaussian")[0, 0, :, 0, 0]
    assert out[:8].tolist() == [0.0] * 8 and out[16:].tolist() == [8.0] * 8
    assert torch.all(out[8:16].diff() > 0)
    assert (out[11] + out[12]).item() == pytest.approx(8.0, abs=1e-5)


def test_gaussian_importance_map() -> None:
    weights = gaussian_importance((16, 8, 7))
    assert weights.shape == (16, 8, 7) and weights.max().item() == pytest.approx(1.0)
    assert torch.all(weights > 0)
    assert weights[7, 3, 3] == weights.max() and weights[8, 4, 3] == weights.max()  # centre (7.5, 3.5, 3)
    for dims in FLIP_DIMS:
        flip = tuple(d - 2 for d in dims)
        assert torch.equal(weights.flip(flip) if flip else weights, weights)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_sw_batch_size_does_not_change_the_result(blend: str) -> None:
    x = torch.randn(1, 2, 25, 19, 17)
    reference = sliding_window(affine, x, 8, blend=blend)
    for batch in (2, 3, 7, 1000):
        assert torch.equal(sliding_window(affine, x, 8, blend=blend, sw_batch_size=batch), reference)


def test_sliding_window_rejects_bad_inputs() -> None:
    x = torch.randn(1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="blend"):
        sliding_window(affine, x, 8, blend="triangle")
    with pytest.raises(ValueError, match=r"\(1, C, D, H, W\)"):
        sliding_window(affine, torch.randn(2, 2, 16, 16, 16), 8)
    with pytest.raises(ValueError, match="out_channels"):
        sliding_window(affine, x, 8, out_channels=5)
    with pytest.raises(ValueError, match="windows"):
        sliding_window(lambda w: w[:, :, :4], x, 8)


class ToyModel(SegModel):
    """Per-modality 1×1×1 encoders (mask-independent features), a mask-dependent fusion and a 1×1×1 head.

    Output k at a voxel = head(Σ over available modalities of enc_m(x_m)) plus a ramp along the first window axis
    when ``ramp`` is set (a model that is NOT flip-equivariant).
    """

    output_kind = OutputKind.LOGITS

    def __init__(self, patch_size: int = 8, ramp: bool = False) -> None:
        super().__init__(SimpleNamespace(patch_size=patch_size))
        self.enc = nn.Conv3d(4, 4 * 3, 1, groups=4)
        self.head = nn.Conv3d(3, 4, 1)
        self.ramp = ramp
        self.encode_calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return self.enc(x).unflatten(1, (4, 3))  # (b, modality, feature, ...)

    def decode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fused = (features * mask[:, :, None, None, None, None]).sum(dim=1)
        out = self.head(fused)
        if self.ramp:
            out = out + torch.arange(out.shape[2], dtype=out.dtype)[None, None, :, None, None]
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), mask)


class ToyModelWithoutEncode(SegModel):
    """The same network seen only through ``forward``."""

    output_kind = OutputKind.LOGITS

    def __init__(self, inner: ToyModel) -> None:
        super().__init__(inner.config)
        self.inner = inner

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(x, mask)


MASKS = torch.tensor([s.mask for s in SCENARIOS])


def _toy(**kwargs) -> ToyModel:
    torch.manual_seed(0)
    return ToyModel(**kwargs).eval()


def test_encode_once_path_equals_separate_passes() -> None:
    model = _toy()
    x = torch.randn(1, 4, 13, 11, 9)  # starts [0, 4, 5] × [0, 3] × [0, 1]: 12 windows of 8³
    encoded = predict_scenarios(model, x, MASKS, sw_batch_size=3)
    assert encoded.shape == (15, 4, 13, 11, 9) and encoded.dtype == torch.float32
    assert model.encode_calls == 4  # 12/3 window batches, each encoded once for all 15 scenarios
    model.encode_calls = 0
    per_mask = predict_scenarios(model, x, MASKS, sw_batch_size=3, use_encode=False)
    assert model.encode_calls == 4 * 15  # forward() encodes again for every scenario
    assert torch.equal(per_mask, encoded)
    forward_only = predict_scenarios(ToyModelWithoutEncode(model).eval(), x, MASKS, sw_batch_size=3)
    assert torch.equal(forward_only, encoded)
    for s, mask in enumerate(MASKS):
        separate = sliding_window(lambda w, m=mask: model(w, m.expand(w.shape[0], 4)), x, 8, sw_batch_size=3)
        torch.testing.assert_close(encoded[s], separate[0], rtol=0, atol=0)


class _Pair(NamedTuple):
    a: torch.Tensor
    b: list[torch.Tensor]


def test_repeat_batch_copies_every_tensor_copy_major() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    nested = {"x": [t, (t[:, :1],)], "p": _Pair(t, [t]), "n": 7}
    out = repeat_batch(nested, 3)
    assert torch.equal(out["x"][0], torch.cat([t, t, t])) and isinstance(out["x"][1], tuple)
    assert out["x"][1][0].shape == (6, 1) and isinstance(out["p"], _Pair) and out["p"].b[0].shape == (6, 3)
    assert out["n"] == 7 and repeat_batch(nested, 1) is nested


@pytest.mark.parametrize("use_encode", [True, False])
@pytest.mark.parametrize("scenario_batch", [4, 15])
def test_scenario_batches_decode_several_masks_per_call(use_encode: bool, scenario_batch: int) -> None:
    model = _toy()
    x = torch.randn(1, 4, 13, 11, 9)  # 12 windows of 8³, in window batches of 3
    one = predict_scenarios(model, x, MASKS, sw_batch_size=3, use_encode=use_encode)
    calls: list[tuple[int, ...]] = []
    target = model.decode if use_encode else model.forward

    def spy(inputs: object, mask: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(mask.shape))
        return target(inputs, mask)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "decode" if use_encode else "forward", spy)
        batched = predict_scenarios(
            model, x, MASKS, sw_batch_size=3, use_encode=use_encode, scenario_batch=scenario_batch
        )
    groups = [min(scenario_batch, 15 - i) for i in range(0, 15, scenario_batch)]
    assert calls == [(k * 3, 4) for _ in range(4) for k in groups]  # per window batch: ceil(15 / k) calls
    torch.testing.assert_close(batched, one, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scenario_batch"):
        predict_scenarios(model, x, MASKS, scenario_batch=0)


def test_predict_scenarios_accepts_mask_sequences_patch_override_and_gaussian() -> None:
    model = _toy()
    x = torch.randn(1, 4, 12, 10, 9)
    masks = [s.mask for s in SCENARIOS[:3]]
    out = predict_scenarios(model, x, masks, patch=(8, 6, 4), blend="gaussian")
    for s, mask in enumerate(masks):
        expected = model(x, torch.tensor([mask]))  # 1×1×1 network: the full-volume pass is the reference
        torch.testing.assert_close(out[s], expected[0], rtol=1e-5, atol=1e-5)


def test_predict_scenarios_small_volume_is_padded() -> None:
    model = _toy()
    x = torch.randn(1, 4, 5, 8, 3)
    out = predict_scenarios(model, x, MASKS[-1:])
    torch.testing.assert_close(out[0], model(x, MASKS[-1:])[0], rtol=1e-5, atol=1e-5)


def test_tta_with_a_flip_equivariant_model_changes_nothing() -> None:
    model = _toy()
    x = torch.randn(1, 4, 13, 9, 10)
    plain = predict_scenarios(model, x, MASKS[:4])
    torch.testing.assert_close(predict_scenarios(model, x, MASKS[:4], tta=True), plain, rtol=1e-5, atol=1e-5)


def test_tta_averages_the_eight_flips_by_hand() -> None:
    # The ramp adds i (0..7) along the first window axis. Half of the 8 flips reverse that axis (7 − i), so the
    # TTA average adds (i + 7 − i)/2 = 3.5 everywhere, while without TTA the ramp survives.
    model = _toy(ramp=True)
    x = torch.randn(1, 4, 8, 8, 8)
    flat = _toy()
    flat_out = predict_scenarios(flat, x, MASKS[-1:])
    tta_out = predict_scenarios(model, x, MASKS[-1:], tta=True)
    torch.testing.assert_close(tta_out, flat_out + 3.5, rtol=1e-5, atol=1e-5)
    ramp = torch.arange(8.0)[:, None, None].expand(8, 8, 8)
    plain = predict_scenarios(model, x, MASKS[-1:])
    torch.testing.assert_close(plain - flat_out, ramp.expand_as(plain), rtol=1e-5, atol=1e-5)


def test_predict_scenarios_requires_eval_mode_and_keeps_it() -> None:
    model = _toy()
    x = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(RuntimeError, match="eval"):
        predict_scenarios(model.train(), x, MASKS)
    assert model.training  # not silently switched
    model.eval()
    predict_scenarios(model, x, MASKS, amp=True)  # amp is a no-op on CPU
    assert not model.training
    torch.testing.assert_close(predict_scenarios(model, x, MASKS, amp=True), predict_scenarios(model, x, MASKS))


def test_predict_scenarios_rejects_bad_masks() -> None:
    model = _toy()
    x = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError):
        predict_scenarios(model, x, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        predict_scenarios(model, x, [(False, False, False, False)])
    with pytest.raises(ValueError, match="at least one"):
        predict_scenarios(model, x, torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("kind", [OutputKind.PROBABILITIES, OutputKind.LOGITS, "logits"])
def test_outputs_to_labels_argmax(kind) -> None:
    blended = torch.tensor([[0.7, 0.1, 0.1, 0.2], [0.1, 0.6, 0.1, 0.2], [0.1, 0.2, 0.5, 0.2], [0.1, 0.1, 0.3, 0.4]])
    labels = outputs_to_labels(blended, kind)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]


# Region logits per voxel in WT, TC, ET order → label by the nesting rule ET ⊂ TC ⊂ WT:
REGION_CASES = [
    ((-1.0, -1.0, -1.0), 0),  # nothing
    ((2.0, -1.0, -1.0), 2),  # WT only → ED
    ((2.0, 3.0, -1.0), 1),  # WT and TC → NCR
    ((2.0, 3.0, 4.0), 3),  # all → ET
    ((-1.0, -1.0, 4.0), 3),  # ET outside the predicted WT still counts as ET
    ((-1.0, 3.0, -1.0), 1),  # TC outside WT → NCR
    ((0.0, 0.0, 0.0), 0),  # logit 0 is sigmoid 0.5, not > 0.5
    ((1e-6, 0.0, 0.0), 2),
]


def test_outputs_to_labels_regions() -> None:
    logits = torch.tensor([case for case, _ in REGION_CASES]).T  # (3, N) in WT, TC, ET order
    expected = [label for _, label in REGION_CASES]
    labels = outputs_to_labels(logits, OutputKind.REGION_LOGITS)
    assert labels.dtype == torch.int64 and labels.tolist() == expected
    # M3AE's head order ET, TC, WT: reversed channels, same labels.
    assert outputs_to_labels(logits.flip(0), "region_logits", ("ET", "TC", "WT")).tolist() == expected
    with pytest.raises(ValueError, match="region"):
        outputs_to_labels(logits[:2], OutputKind.REGION_LOGITS)


def test_outputs_to_probabilities() -> None:
    """Logits → softmax, probabilities unchanged, region logits → sigmoid reordered to WT, TC, ET."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 3, 3, generator=g)
    probs, names = outputs_to_probabilities(logits, OutputKind.LOGITS)
    assert names == ("background", "NCR", "ED", "ET")
    torch.testing.assert_close(probs, torch.exp(logits) / torch.exp(logits).sum(0))
    same, _ = outputs_to_probabilities(probs, OutputKind.PROBABILITIES)
    assert same is probs
    regions = torch.randn(3, 3, 3, 3, generator=g)  # channel order ET, TC, WT (as M3AE's head)
    out, names = outputs_to_probabilities(regions, OutputKind.REGION_LOGITS, ("ET", "TC", "WT"))
    assert names == ("WT", "TC", "ET")
    torch.testing.assert_close(out, 1 / (1 + torch.exp(-regions.flip(0))))
