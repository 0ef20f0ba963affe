"""ShaSpec: state-dict parity and parameter count at paper size, weight standardisation, the missing-
modality substitution, encode/decode, activation checkpointing, the data pipeline, the ``--mode`` parser, the
learning-rate schedule over the two runs, upstream scoring, and (slow) warm-up → random → 15-scenario eval through the
upstream script names."""

from __future__ import annotations

import collections
import csv
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MASKS, REPO, shared_path
from scipy import stats

from brats_core.engine.training import PolyLR, poly_lr
from brats_core.modalities import SCENARIOS, format_shaspec_mode, scenario_for
from brats_core.registry import OutputKind, build_method, count_parameters, state_dict_listing
from ShaSpec import eval as shaspec_eval
from ShaSpec import train_SS
from ShaSpec.data import label_to_shaspec_regions, mode_sampler, prepare_cache, random_mode_mask
from ShaSpec.model import ASPP, ShaSpec, WSConv3d
from ShaSpec.preprocessing import normalise_modality
from ShaSpec.scoring import dice_plus_one, region_scores, tile_starts, upstream_binarise

PAPER_PARAMETERS = 187_708_132


@pytest.fixture(scope="module")
def tiny() -> ShaSpec:
    torch.manual_seed(0)
    model = build_method("shaspec", "tiny")
    assert isinstance(model, ShaSpec)
    return model


def _input(batch: int = 1, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------- model


def test_paper_state_dict_parity_and_parameter_count() -> None:
    expected = shared_path("spec", "state_dicts", "shaspec.txt").read_text().splitlines()
    model = build_method("shaspec", "paper")  # built only: no forward at 80×160×160
    assert state_dict_listing(model) == expected
    assert count_parameters(model) == PAPER_PARAMETERS
    # upstream's per-part parameter counts
    enc = model.shared_enc
    assert count_parameters(enc) == 35_127_872 and count_parameters(enc.backbone) == 29_029_440
    assert count_parameters(enc.aspp) == 5_770_240 and count_parameters(enc.asppreduce) == 328_192
    assert count_parameters(model.shared_dec) == 8_528_800
    assert count_parameters(model.compos_layer) == 3_538_944 and count_parameters(model.dom_classifier) == 1_028
    assert model.output_kind == OutputKind.REGION_LOGITS and model.region_order == ("ET", "WT", "TC")
    assert model.patch_size == (160, 160, 80)  # canonical (X, Y, Z) window = upstream D,H,W 80,160,160


def test_weight_standardisation_gives_zero_mean_unit_variance_kernels() -> None:
    torch.manual_seed(0)
    conv = WSConv3d(6, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 3.0, 5).view(5, 1, 1, 1, 1)).add_(torch.arange(5.0).view(5, 1, 1, 1, 1))
    w = conv.effective_weight().detach().double().reshape(5, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=True), torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)
    # the forward convolves exactly that kernel (hand-standardised in numpy)
    raw = conv.weight.detach().numpy().reshape(5, -1).astype(np.float64)
    hand = (raw - raw.mean(1, keepdims=True)) / np.sqrt(raw.var(1, ddof=1, keepdims=True) + 1e-12)
    x = torch.randn(1, 6, 7, 7, 7)
    ref = F.conv3d(x, torch.from_numpy(hand).float().view_as(conv.weight), padding=1)
    torch.testing.assert_close(conv(x), ref, atol=1e-4, rtol=1e-4)
    off = WSConv3d(6, 5, 3, padding=1, bias=False, weight_std=False)
    assert off.effective_weight() is off.weight


def test_every_3d_conv_but_transposed_and_classifier_is_weight_standardised(tiny) -> None:
    plain = [n for n, m in tiny.named_modules() if type(m) is torch.nn.Conv3d]
    assert plain == ["shared_dec.cls_conv.0"]
    assert all(m.weight_std for m in tiny.modules() if isinstance(m, WSConv3d))


def test_missing_modalities_take_the_first_present_shared_feature_in_eval(tiny) -> None:
    tiny.eval()
    x = _input()
    mask = torch.tensor([[False, True, True, False]])  # T1ce + T1: ShaSpec order FLAIR,T1,T1ce,T2 → present 1, 2
    with torch.no_grad():
        default = tiny(x, mask)
        first = tiny(x, mask, substitute=torch.tensor([1]))  # T1 (ShaSpec index 1) comes first
        second = tiny(x, mask, substitute=torch.tensor([2]))
    torch.testing.assert_close(default, first, atol=0, rtol=0)
    assert not torch.allclose(default, second)
    with pytest.raises(ValueError, match="present modality"):
        tiny(x, mask, substitute=torch.tensor([0]))


def test_training_substitute_is_a_random_present_modality(tiny) -> None:
    tiny.train()
    torch.manual_seed(0)
    x = _input(2)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])  # FLAIR+T1 / T2
    seen = collections.Counter()
    for _ in range(12):
        out = tiny(x, mask)
        assert out.logits.shape == (2, 3, 32, 32, 32) and out.domain_logits.shape == (2, 4, 4)
        assert out.shared.shape[:3] == (2, 4, 32)
        seen[int(out.substitute[0])] += 1
        assert int(out.substitute[1]) == 3  # T2 is ShaSpec index 3
    assert set(seen) == {0, 1}  # FLAIR and T1 are ShaSpec indices 0 and 1, both drawn
    tiny.eval()


def test_encode_decode_equals_forward_for_all_scenarios(tiny) -> None:
    tiny.eval()
    x = _input(2, seed=4)
    with torch.no_grad():
        features = tiny.encode(x)
        for s in SCENARIOS:
            mask = s.tensor(2)
            torch.testing.assert_close(tiny.decode(features, mask), tiny(x, mask), atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_identical_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from ShaSpec import model as shaspec_model

    calls: list[int] = []
    real = shaspec_model.checkpoint
    monkeypatch.setattr(shaspec_model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads, counts = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_method("shaspec", "tiny", activation_checkpointing=checkpointing).train()
        x, mask = _input(1, seed=2), torch.tensor([MASKS[1]])
        out = model(x, mask, substitute=torch.tensor([0]))
        loss, _ = train_SS.shaspec_loss(out, (torch.rand(1, 3, 32, 32, 32, generator=torch.Generator()) > 0.8).float())
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        counts.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # every stem, stage, ASPP and decoder stage is recomputed with the flag, nothing without it
    assert counts[0] == 0 and counts[1] >= 10


def test_aspp_pooling_quirk_is_an_input_independent_constant() -> None:
    torch.manual_seed(0)
    quirk, fixed = ASPP(8, True, pool_quirk=True).eval(), ASPP(8, True, pool_quirk=False).eval()
    with torch.no_grad():
        for m in (quirk, fixed):
            m.branch5_norm.bias.uniform_(-1, 1)
        a, b = torch.randn(1, 8, 2, 3, 3), torch.randn(1, 8, 2, 3, 3) * 4
        torch.testing.assert_close(quirk._pooled(a), quirk._pooled(b))
        expected = F.leaky_relu(quirk.branch5_norm.bias, 0.01).view(1, 8, 1, 1, 1)
        torch.testing.assert_close(quirk._pooled(a), expected)
        assert not torch.allclose(fixed._pooled(a), fixed._pooled(b))


def test_aspp_pooling_quirk_trains_at_batch_two_and_leaves_parameters_unchanged() -> None:
    # the quirk once applied an in-place LeakyReLU to a view of branch5_norm.bias: autograd and batches > 1 raised,
    # and a batch-1 forward without autograd overwrote the bias with LeakyReLU(bias)
    torch.manual_seed(0)
    aspp = ASPP(8, True, pool_quirk=True)
    with torch.no_grad():
        aspp.branch5_norm.bias.uniform_(-1, -0.5)  # negative: LeakyReLU changes every entry
    before = {k: v.clone() for k, v in aspp.state_dict().items()}
    out = aspp(torch.randn(2, 8, 4, 4, 4, requires_grad=True))
    out.square().mean().backward()
    assert aspp.branch5_norm.bias.grad is not None and torch.isfinite(aspp.branch5_norm.bias.grad).all()
    with torch.no_grad():
        aspp.eval()(torch.randn(1, 8, 4, 4, 4))
    for key, value in aspp.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_config_rejects_sizes_the_encoder_cannot_stride() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        build_method("shaspec", "tiny", patch_depth=40)


# ---------------------------------------------------------------------------------------------------------- data


def test_normalisation_clips_zscores_and_zeroes_background() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((20, 20, 20), dtype=np.float32)
    image[2:18, 2:18, 2:18] = rng.integers(100, 200, size=(16, 16, 16))
    image[5, 5, 5] = 5000.0  # a lone outlier: its bin holds < 50 voxels, so it is clipped
    out = normalise_modality(image)
    fg = image != 0
    assert np.all(out[~fg] == 0)
    assert abs(out[fg].mean()) < 1e-5 and abs(out[fg].std() - 1) < 1e-4
    # hand: histogram with int(max) bins; clip to the lower edge of the last bin with ≥ 50 voxels
    counts, edges = np.histogram(image, bins=5000)
    level = edges[np.flatnonzero(counts >= 50)[-1]]
    clipped = np.minimum(image, level)[fg]
    np.testing.assert_allclose(out[fg], (clipped - clipped.mean()) / (clipped.std() + 1e-7), atol=1e-5)
    assert out[5, 5, 5] == out[fg].max() and out[5, 5, 5] < 2.0


def test_predict_preprocessing_is_shaspecs_normalisation(tiny) -> None:
    rng = np.random.default_rng(1)
    raw = np.zeros((12, 12, 10), dtype=np.float32)
    raw[2:10, 2:10, 2:8] = rng.integers(50, 90, size=(8, 8, 6))
    vol, meta = tiny.preprocess({"t1": raw, "flair": raw * 2})
    assert vol.shape == (12, 12, 10, 4) and meta["available"] == ["flair", "t1"]
    np.testing.assert_array_equal(vol[..., 2], normalise_modality(raw))  # T1 is canonical channel 2
    np.testing.assert_array_equal(vol[..., 0], normalise_modality(raw * 2))
    assert not vol[..., 1].any() and not vol[..., 3].any()  # T1ce and T2 absent: zero
    assert meta["crop_box"] == [[0, 12], [0, 12], [0, 10]] and meta["cropped_shape"] == [12, 12, 10]


def test_regions_are_in_head_order_et_wt_tc() -> None:
    label = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(label_to_shaspec_regions(label), [[0, 0, 0, 1], [0, 1, 1, 1], [0, 1, 0, 1]])


def test_random_mode_distribution() -> None:
    rng = np.random.default_rng(0)
    n = 24_000
    counts = collections.Counter(random_mode_mask(rng) for _ in range(n))
    masks = [s.mask for s in SCENARIOS]
    assert set(counts) == set(masks)
    # k ~ U{1..4}, then a uniform k-subset: singles 1/16, pairs 1/24, triples 1/16, all four 1/4
    expected = np.array([{1: 1 / 16, 2: 1 / 24, 3: 1 / 16, 4: 1 / 4}[sum(m)] for m in masks]) * n
    observed = np.array([counts[m] for m in masks])
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert mode_sampler("0,1,2,3")(rng) == (True, True, True, True)
    assert mode_sampler("0,2")(rng) == (True, True, False, False)  # FLAIR + T1ce in canonical order


# ---------------------------------------------------------------------------------------------------------- CLI


def test_mode_parser_covers_the_15_readme_strings() -> None:
    scenarios = [shaspec_eval.parse_modes(m)[0] for m in shaspec_eval.README_MODES]
    assert sorted(s.index for s in scenarios) == list(range(15))  # each of the 15 scenarios exactly once
    native = ("flair", "t1", "t1ce", "t2")
    for text, s in zip(shaspec_eval.README_MODES, scenarios, strict=True):
        assert set(s.modalities) == {native[int(i)] for i in text.split(",")}
        assert format_shaspec_mode(s.mask) == text
    assert shaspec_eval.parse_modes("0,1")[0].name == "flair+t1"
    assert shaspec_eval.parse_modes("2")[0].name == "t1ce"
    assert shaspec_eval.parse_modes("1,2,3")[0].name == "t1ce+t1+t2"
    assert shaspec_eval.parse_modes("all") == list(SCENARIOS)
    assert [s.name for s in shaspec_eval.parse_modes("3;0,1")] == ["t2", "flair+t1"]
    # validation-list masks: canonical lists (default), ShaSpec's boolean order (FLAIR, T1, T1ce, T2), index strings
    assert train_SS.parse_mask_cell("[True, True, False, False]") == (True, True, False, False)
    assert train_SS.parse_mask_cell("[True, True, False, False]", "shaspec") == (True, False, True, False)
    assert train_SS.parse_mask_cell("0,1") == (True, False, True, False)
    for bad in ("", "4", "0,0", "a"):
        with pytest.raises(ValueError):
            shaspec_eval.parse_modes(bad)


def test_unsorted_mode_warns_that_the_substitute_differs_from_upstream(caplog) -> None:
    with caplog.at_level("WARNING", logger="ShaSpec.eval"):
        assert shaspec_eval.parse_modes("2,0")[0].name == "flair+t1ce"
    assert "first present one in ShaSpec order (0); upstream took the first listed (2)" in caplog.text
    caplog.clear()
    shaspec_eval.parse_modes("0,2")
    assert caplog.text == ""


def test_input_size_sets_the_window_of_a_built_model(tiny, capsys) -> None:
    parser = train_SS.build_parser()
    train_SS.apply_input_size(parser, tiny, "32,64,64")
    assert (tiny.config.patch_depth, tiny.config.patch_size) == (32, 64)
    for bad, reason in (("a,b,c", "integers"), ("24,64,64", "multiple of 16"), ("32,64,32", "must be equal")):
        with pytest.raises(SystemExit):
            train_SS.apply_input_size(parser, tiny, bad)
        assert reason in capsys.readouterr().err


def test_learning_rate_schedule_over_the_two_runs() -> None:
    lr0, warm_steps, total = 1e-2, 245_000, 406_000
    warm = [poly_lr(lr0, i, warm_steps) for i in range(0, warm_steps + 5000, 997)]
    assert warm[0] == lr0 and all(a >= b for a, b in itertools.pairwise(warm))
    assert poly_lr(lr0, warm_steps, warm_steps) == 0.0
    best = 240_000  # reload best.pth of iteration 240,000: the global counter continues at 240,001
    for i in (best + 1, 300_000, total - 1):
        assert poly_lr(lr0, i, total) == pytest.approx(lr0 * (1 - i / total) ** 0.9, rel=1e-12)
    for i in (total, total + 1, total + 10**6):  # upstream: a negative base to the 0.9 → complex LR
        lr = poly_lr(lr0, i, total)
        assert isinstance(lr, float) and math.isfinite(lr) and lr == 0.0
    assert train_SS.validation_iterations(True, warm_steps)[-3:] == [235_000, 240_000, 245_000]
    train_iters = train_SS.validation_iterations(False, total)
    assert train_iters[:3] == [110_000, 120_000, 130_000] and 140_000 not in train_iters
    assert train_iters[-3:] == [380_000, 390_000, 406_000]
    assert train_SS.validation_iterations(True, 2) == [2]


def test_loss_matches_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.6).float()
    shared = torch.randn(2, 4, 5, 1, 1, 1)
    domain = torch.randn(2, 4, 4)
    out = train_SS.ShaSpecOutput(logits, shared, domain, torch.zeros(2, dtype=torch.long))
    loss, parts = train_SS.shaspec_loss(out, target)
    s = torch.sigmoid(logits)
    dice = torch.stack(
        [1 - 2 * (s[b, r] * target[b, r]).sum() / (s[b, r].sum() + target[b, r].sum() + 1)
         for b in range(2) for r in range(3)]
    ).mean()  # fmt: skip
    bce = sum(F.binary_cross_entropy_with_logits(logits[:, r], target[:, r]) for r in range(3))
    l1 = sum((shared[:, a] - shared[:, b]).abs().mean() for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)))
    ce = F.cross_entropy(domain.reshape(8, 4), torch.tensor([0, 1, 2, 3] * 2))
    torch.testing.assert_close(loss, dice + bce + 0.1 * l1 + 0.02 * ce)
    assert parts["shared"] == pytest.approx(float(l1))


# ---------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def raw_cases(tmp_path_factory):
    """Two synthetic BraTS cases (NIfTI) and a training list."""
    from brats_core.data import synthetic

    root = tmp_path_factory.mktemp("shaspec_raw")
    cases = synthetic.write_synthetic_dataset(root / "raw", 2, shape=(40, 40, 32))
    (root / "raw" / "train.csv").write_text("case\n" + "".join(f"{c}\n" for c in cases))
    return root


def _train_argv(root, snapshot, *extra: str) -> list[str]:
    return ["--data_dir", str(root / "raw"), "--train_list", "train.csv", "--preset", "tiny", "--device", "cpu",
            "--workers", "0", "--cache_dir", str(root / "cache"), "--snapshot_dir", str(snapshot), "--num_steps", "3",
            "--learning_rate", "1e-2", "--val_pred_every", "2", "--train_only", "--random_mirror", "--no_progress",
            *extra]  # fmt: skip


class _KilledError(Exception):
    """Stands in for a run killed at iteration 2, after its snapshot of iteration 1."""


def _kill_at_2(iteration: int, lr: float) -> None:
    if iteration == 2:
        raise _KilledError


def test_continue_reproduces_an_uninterrupted_run_also_from_earlier_snapshots(raw_cases, tmp_path) -> None:
    from brats_core.apps.scripts import model_from_checkpoint
    from brats_core.utils.checkpoint import load_checkpoint

    full = tmp_path / "full"
    assert train_SS.main(_train_argv(raw_cases, full)) == 0
    part = tmp_path / "part"
    with pytest.raises(_KilledError):
        train_SS.main(_train_argv(raw_cases, part), on_step=_kill_at_2)
    assert load_checkpoint(part / "last.pth")["iter"] == 1 and not (part / "final.pth").exists()
    # a snapshot as earlier versions wrote it: no scheduler state, no global step
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    saved = torch.load(part / "last.pth", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k not in ("scheduler", "global_step")}, earlier / "last.pth")
    expected = load_checkpoint(full / "final.pth")["state_dict"]
    for snapshot in (part, earlier):
        steps: list[tuple[int, float]] = []
        argv = _train_argv(raw_cases, snapshot, "--continue", str(snapshot / "last.pth"))
        assert train_SS.main(argv, on_step=lambda i, lr, steps=steps: steps.append((i, lr))) == 0
        assert steps == [(2, pytest.approx(1e-2 * (1 - 2 / 3) ** 0.9, rel=1e-12))]  # poly at global iteration 2
        final = load_checkpoint(snapshot / "final.pth")
        assert final["iter"] == 2 and final["method"] == "shaspec"
        for key, value in expected.items():
            assert torch.equal(final["state_dict"][key], value), key
        model_from_checkpoint(snapshot / "final.pth", "shaspec", {})  # what eval.py loads


def test_scheduler_steps_per_iteration_as_poly_lr() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = PolyLR(opt, 7, decimals=None)
    rates = []
    for _ in range(9):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == [poly_lr(1e-2, i, 7) for i in range(9)] and rates[-2:] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------- scoring


def test_upstream_tiles_and_dice_plus_one() -> None:
    assert tile_starts(155, 80) == [0, 54, 75]  # stride ceil(80·2/3) = 54, last tile clamped
    assert tile_starts(240, 160) == [0, 80]  # stride 107
    assert tile_starts(80, 80) == [0] and tile_starts(60, 80) == [0]
    empty = np.zeros(10)
    assert dice_plus_one(empty, empty) == 0.0  # upstream: empty/empty scores 0 (shared protocol: 1)
    p, g = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    assert dice_plus_one(p, g) == pytest.approx(2 / 4)
    probs = torch.tensor([[0.5, 0.51], [0.2, 0.9], [0.0, 1.0]])
    np.testing.assert_array_equal(upstream_binarise(probs).numpy(), [[0, 1], [0, 1], [0, 1]])
    scores = region_scores(np.array([[0, 1], [1, 1], [0, 1]]), np.array([2, 3]))
    assert scores == {"ET": pytest.approx(2 / 3), "WT": pytest.approx(4 / 5), "TC": pytest.approx(2 / 3)}


# ---------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_warm_up_then_random_then_eval_15_scenarios(tmp_path) -> None:
    from brats_core.data import synthetic
    from brats_core.utils.checkpoint import load_checkpoint

    raw = tmp_path / "raw"
    cases = synthetic.write_synthetic_dataset(raw, 3, shape=(40, 40, 32))
    # upstream lists hold absolute cluster paths: the case folder is then looked up under --data_dir
    (raw / "train.csv").write_text("case\n" + "".join(f"/cluster/grana_neuro/BraTS2023/{c}\n" for c in cases[:2]))
    (raw / "val.csv").write_text(f'case,mask\n{cases[2]},"[True, False, True, False]"\n')
    (raw / "test.csv").write_text(f"case\n{cases[2]}\n")
    common = ["--data_dir", str(raw), "--train_list", "train.csv", "--val_list", "val.csv", "--preset", "tiny",
              "--device", "cpu", "--workers", "0", "--cache_dir", str(tmp_path / "cache"), "--learning_rate", "1e-2",
              "--random_mirror", "--random_scale"]  # fmt: skip
    steps: list[tuple[int, float]] = []
    record = lambda i, lr: steps.append((i, lr))  # noqa: E731
    warm = ["--snapshot_dir", str(tmp_path / "warm"), "--num_steps", "2", "--warm_up", "--mode", "0,1,2,3"]
    assert train_SS.main([*common, *warm], on_step=record) == 0
    best = load_checkpoint(tmp_path / "warm" / "best.pth")
    assert best["method"] == "shaspec" and best["iter"] == 1 and math.isfinite(best["best_score"])
    rand = ["--snapshot_dir", str(tmp_path / "rand"), "--num_steps", "4", "--mode", "random",
            "--reload_from_checkpoint", "--reload_path", str(tmp_path / "warm" / "best.pth")]  # fmt: skip
    assert train_SS.main([*common, *rand], on_step=record) == 0
    # as upstream, the reload keeps the warm-up's best score: the random run's best is never below it
    assert load_checkpoint(tmp_path / "rand" / "last.pth")["best_score"] >= best["best_score"]
    # one global counter: warm-up 0, 1 of a 2-step schedule, then 2, 3 of the 4-step schedule, nothing beyond
    assert [i for i, _ in steps] == [0, 1, 2, 3]
    expected = [1e-2, 1e-2 * 0.5**0.9, 1e-2 * 0.5**0.9, 1e-2 * 0.25**0.9]
    assert [lr for _, lr in steps] == pytest.approx(expected, rel=1e-12)
    final = load_checkpoint(tmp_path / "rand" / "final.pth")
    assert final["iter"] == 3 and final["config"]["patch_size"] == 32
    again: list[tuple[int, float]] = []  # a reload of a finished run does nothing (the LR never goes invalid)
    done = ["--snapshot_dir", str(tmp_path / "rand"), "--num_steps", "4", "--mode", "random",
            "--reload_from_checkpoint", "--reload_path", str(tmp_path / "rand" / "final.pth")]  # fmt: skip
    assert train_SS.main([*common, *done], on_step=lambda i, lr: again.append((i, lr))) == 0
    assert again == []
    # a new run never replaces another run's snapshots: continue it (--continue) or start afresh (--overwrite)
    with pytest.raises(SystemExit) as exit_info:
        train_SS.main([*common, *warm])
    assert exit_info.value.code == 2 and load_checkpoint(tmp_path / "warm" / "best.pth")["iter"] == 1
    with pytest.raises(SystemExit):  # the stage-2 command again: a restart from the warm-up, not a continuation
        train_SS.main([*common, *rand])
    assert load_checkpoint(tmp_path / "rand" / "last.pth")["iter"] == 3
    # a cache written by another pipeline (here: relabelled as preprocess.py's) is never reused
    meta = tmp_path / "cache" / "meta" / f"{cases[0]}.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "pipeline"}))
    with pytest.raises(ValueError, match=r"prepared by preprocess\.py, not ShaSpec's"):
        prepare_cache(raw, [cases[0]], tmp_path / "cache")
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"pipeline": "shaspec"}))

    out, quirks = tmp_path / "outputs", tmp_path / "outputs_upstream"
    ev = ["--data_dir", str(raw), "--data_list", "test.csv", "--restore_from", str(tmp_path / "rand" / "final.pth"),
          "--mode", "all", "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--no_progress",
          "--no_hd95"]  # fmt: skip
    assert shaspec_eval.main([*ev, "--savepath", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["scenario"] for r in rows] == [s.name for s in SCENARIOS] + ["mean"]
    assert sorted(p.name for p in out.glob("*_output2.txt")) == sorted(
        f"{m}_output2.txt" for m in shaspec_eval.README_MODES
    )
    assert shaspec_eval.main([*ev, "--savepath", str(quirks), "--reference-quirks"]) == 0
    with (quirks / "summary_upstream.csv").open() as f:
        upstream = list(csv.DictReader(f))
    assert len(upstream) == 16 and upstream[-1]["scenario"] == "mean"
    one = scenario_for((True, False, True, False))  # --mode 0,1 = FLAIR + T1
    assert (quirks / "0,1_output2.txt").read_text().startswith("Average score: ")
    assert any(r["scenario"] == one.name and r["mode"] == "0,1" for r in upstream)

    for script in ("ShaSpec/train_SS.py", "ShaSpec/eval.py"):  # the upstream script names run as files
        done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0 and "--mode" in done.stdout
