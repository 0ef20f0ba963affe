"""M3AE: upstream state-dict parity and parameter counts, the channel/axis translation, completion-image crops at
absolute positions (training and inference agree; ``--reference-quirks`` misaligns), pre-training token masks, the
modality-drop distribution, the own preprocessing, losses, checkpoint hand-over between the stages, the scripts'
flags, upstream scoring, and (slow) pretrain 2 steps → train 2 steps → test 15 scenarios through the scripts."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import shared_path

from brats_core.apps.scripts import model_from_checkpoint
from brats_core.data import synthetic
from brats_core.data.dataset import load_case
from brats_core.engine.evaluation import case_origin
from brats_core.engine.inference import predict_scenarios
from brats_core.modalities import MODALITIES, SCENARIOS
from brats_core.registry import build_method, config_dict, count_parameters, state_dict_listing
from m3ae import data as m3ae_data
from m3ae import preprocessing as m3ae_preprocessing
from m3ae import pretrain, test, train
from m3ae.model import M3AE, M3AEConfig, completion_array, model_to_resume, tokens_to_voxels
from m3ae.preprocessing import sample_modality_drop, sample_pretrain_tokens

SYN_SHAPE = (48, 48, 40)  # the tiny preset's image grid


def _tiny(seed: int = 0, **overrides) -> M3AE:
    torch.manual_seed(seed)
    return build_method("m3ae", "tiny", **overrides)  # type: ignore[return-value]


def _input(batch: int = 1, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed))


class _CapturedError(Exception):
    pass


def _native_input(model: M3AE, *args, **kwargs) -> torch.Tensor:
    """What the U-Net receives (upstream's frame) for ``model(*args, **kwargs)``; the U-Net itself is not run."""
    seen = []

    def capture(_module, inputs):
        seen.append(inputs[0].detach().clone())
        raise _CapturedError

    handle = model.unet.register_forward_pre_hook(capture)
    try:
        with torch.no_grad(), pytest.raises(_CapturedError):
            model(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0]


class _StubUNet(torch.nn.Module):
    """Stands in for the U-Net where only the inputs matter: zero logits of the right shape."""

    def forward(self, x: torch.Tensor):
        return x.new_zeros(x.shape[0], 3, *x.shape[2:]), [], []


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two synthetic cases run through M3AE's preprocessing."""
    root = tmp_path_factory.mktemp("m3ae")
    raw, cache = root / "raw", root / "cache"
    cases = synthetic.write_synthetic_dataset(raw, 2, shape=SYN_SHAPE)
    status = m3ae_data.preprocess_dataset(raw, cache, progress=False)
    assert status == {c: "written" for c in cases}
    return cache, cases


# ----------------------------------------------------------------------------------------------- paper-size structure


@pytest.mark.parametrize(
    ("preset", "overrides", "listing", "total"),
    [
        ("pretrain", {}, "m3ae_pretrain.txt", 40_416_228),
        ("paper", {}, "m3ae_finetune_ds.txt", 40_416_505),
        ("paper", {"deep_supervised": False}, None, 40_416_211),
    ],
)
def test_state_dict_and_parameter_counts_match_upstream(preset, overrides, listing, total) -> None:
    model = build_method("m3ae", preset, **overrides)
    assert count_parameters(model) == total
    assert model.limage.numel() == 35_712_000 and tuple(model.limage.shape) == (1, 4, 155, 240, 240)
    assert count_parameters(model.unet) == total - 35_712_000
    if listing is not None:
        assert state_dict_listing(model) == shared_path("spec", "state_dicts", listing).read_text().splitlines()


def test_config_validation_and_presets() -> None:
    assert M3AEConfig(pre_train=True).deep_supervised is False and M3AEConfig(pre_train=True).out_channels == 4
    paper = M3AEConfig()
    assert (paper.token_grid, paper.visible_tokens, paper.out_channels) == (8, 256, 3)
    assert M3AEConfig(image_shape=[10, 20, 30]).image_shape == (10, 20, 30)  # lists from JSON checkpoints
    for bad in ({"patch_size": 36}, {"init_channels": 12}, {"mask_patch": 24}, {"mask_ratio": 1.0}):
        with pytest.raises(ValueError):
            M3AEConfig(**bad)
    tiny = _tiny()
    assert tiny.config.image_shape == SYN_SHAPE and tuple(tiny.limage.shape) == (1, 4, 40, 48, 48)
    assert tiny.region_order == ("ET", "TC", "WT") and tiny.window_origin == "image"


# --------------------------------------------------------------------------------------- layout and input completion


def test_channels_and_axes_are_translated_to_upstreams_frame() -> None:
    model = _tiny().eval()
    x = _input(1, 32)[:, :, :, :, :24]  # X, Y, Z of different lengths (32, 32, 24): axis order is visible
    seen = _native_input(model, x, torch.ones(1, 4, dtype=torch.bool))
    # upstream: (B, 4, Z, Y, X), channels T1, T1ce, T2, FLAIR = canonical 2, 1, 3, 0
    torch.testing.assert_close(seen, x[:, [2, 1, 3, 0]].permute(0, 1, 4, 3, 2), atol=0, rtol=0)
    with torch.no_grad():
        out = model(x[..., :16, :8, :16], torch.ones(1, 4, dtype=torch.bool))
    assert out.shape == (1, 3, 16, 8, 16)  # back in canonical (X, Y, Z)


def test_missing_channels_take_the_completion_image_at_the_absolute_position() -> None:
    model = _tiny().eval()
    x = _input(2, 16)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])  # canonical FLAIR, T1ce, T1, T2
    origin = torch.tensor([[3, 5, 7], [30, 0, 20]])  # canonical X, Y, Z; sample 1 reaches beyond X = 48 and Z = 40
    seen = _native_input(model, x, mask, origin)
    limage = model.limage.detach()[0]  # (4, Z, Y, X), channels T1, T1ce, T2, FLAIR
    # sample 0: T1ce (native 1) missing → limage[1, z 7:23, y 5:21, x 3:19]
    torch.testing.assert_close(seen[0, 1], limage[1, 7:23, 5:21, 3:19], atol=0, rtol=0)
    # present channels untouched
    torch.testing.assert_close(seen[0, 0], x[0, 2].permute(2, 1, 0), atol=0, rtol=0)
    # sample 1: FLAIR (native 3) and T2 (native 2) missing; x 30:46 inside, z 20:36 inside, y 0:16
    torch.testing.assert_close(seen[1, 3], limage[3, 20:36, 0:16, 30:46], atol=0, rtol=0)
    far = _native_input(model, x[:1], mask[:1], torch.tensor([[40, 0, 30]]))  # x 40:56, z 30:46 leave the grid
    torch.testing.assert_close(far[0, 1, :10, :, :8], limage[1, 30:40, 0:16, 40:48], atol=0, rtol=0)
    assert far[0, 1, 10:].abs().sum() == 0 and far[0, 1, :, :, 8:].abs().sum() == 0


def test_completion_follows_flips_for_test_time_augmentation() -> None:
    model = _tiny().eval()
    x = _input(1, 16)
    mask = torch.tensor([[False, True, False, True]])
    origin = torch.tensor([[4, 9, 2]])
    plain = model.complete(x, mask, origin)
    for dims in [(2,), (3, 4), (2, 3, 4)]:
        flipped = model.complete(x.flip(dims), mask, origin, flip=dims)
        torch.testing.assert_close(flipped, plain.flip([6 - d for d in dims]), atol=0, rtol=0)


def test_missing_content_is_replaced_even_when_not_finite() -> None:
    model = _tiny().eval()
    x = _input(1, 32)
    mask = torch.tensor([[True, True, False, True]])
    bad = x.clone()
    bad[:, 2] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(model(bad, mask), model(x, mask), atol=0, rtol=0)


def test_train_outputs_deep_supervision_and_style() -> None:
    model = _tiny().train()
    out = model(_input(2, 32), torch.ones(2, 4, dtype=torch.bool))
    assert [tuple(t.shape) for t in out.outputs] == [(2, 3, 32, 32, 32)] * 3
    assert [tuple(s.shape) for s in out.style] == [(2, 32, 8, 8, 8), (2, 64, 4, 4, 4), (2, 64, 4, 4, 4)]
    pre = build_method("m3ae", "tiny_pretrain").train()
    out = pre(_input(1, 32), torch.ones(1, 4, dtype=torch.bool))
    assert len(out.outputs) == 1 and out.outputs[0].shape == (1, 4, 32, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 4, 36, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        model(_input(1, 32), torch.ones(1, 4))


# ------------------------------------------------------------------------------------------ masking and drop sampling


def test_pretrain_token_masks_keep_exactly_256_tokens_of_kept_modalities() -> None:
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(400):
        tokens = sample_pretrain_tokens(rng, grid=8, visible=256, mdp=3)
        assert tokens.shape == (4, 8, 8, 8) and tokens.sum() == 256
        per_modality = tokens.reshape(4, -1).sum(1)
        kept = per_modality > 0
        counts[int(4 - kept.sum())] += 1
        # with one modality left, 256 of its 512 tokens are visible; with four, 256 of 2048
        assert per_modality.max() <= 512
    # every number of dropped modalities 0..3 occurs (a modality could also keep 0 tokens by chance, so it can look
    # dropped; the exact drop law is tested on sample_modality_drop below)
    assert set(counts) == {0, 1, 2, 3}
    voxels = tokens_to_voxels(torch.from_numpy(tokens)[None], 128)
    assert voxels.shape == (1, 4, 128, 128, 128) and int(voxels.sum()) == 256 * 16**3
    # each token is one 16³ cube
    c, i, j, k = (int(v) for v in np.argwhere(tokens)[0])
    assert bool(voxels[0, c, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16, 16 * k : 16 * k + 16].all())


def test_pretrain_dropped_modalities_have_no_visible_token() -> None:
    for seed in range(200):
        kept = sample_modality_drop(np.random.default_rng(seed), 3)
        tokens = sample_pretrain_tokens(np.random.default_rng(seed), grid=8, visible=256, mdp=3)
        for c in range(4):
            if not kept[c]:
                assert not tokens[c].any()


def test_modality_drop_distribution() -> None:
    rng = np.random.default_rng(2024)
    n = 48_000
    freq = Counter(sample_modality_drop(rng, 3) for _ in range(n))
    assert len(freq) == 15 and all(any(m) for m in freq)
    for scenario in SCENARIOS:
        k = sum(scenario.mask)
        expected = {4: 1 / 4, 3: 1 / 16, 2: 1 / 24, 1: 1 / 16}[k]
        observed = freq[scenario.mask] / n
        assert abs(observed - expected) < 4.5 * np.sqrt(expected * (1 - expected) / n), scenario.name
    never = Counter(sample_modality_drop(rng, 0) for _ in range(100))
    assert never == {(True, True, True, True): 100}  # upstream's default mdp 0: nothing is ever dropped


# ---------------------------------------------------------------------------------------------------- own pipeline


def test_normalisation_by_hand() -> None:
    image = np.zeros((4, 5, 6), dtype=np.float32)
    image[1:3, 1:4, 1:5] = np.arange(1, 25, dtype=np.float32).reshape(2, 3, 4)
    out = m3ae_preprocessing.normalise_modality(image)
    lo, hi = np.percentile(np.arange(1, 25), [1, 99])
    expected = (np.clip(image, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert out.min() == 0 and out.max() == pytest.approx(1.0) and out[0, 0, 0] == 0


def test_bounding_box_by_hand() -> None:
    images = np.zeros((4, 10, 12, 8), dtype=np.float32)
    images[2, 0, 5, 3] = 1.0
    images[0, 6, 9, 5] = 2.0
    # [max(0, min − 1), max + 1): x 0..6 → [0, 7), y 5..9 → [4, 10), z 3..5 → [2, 6)
    assert m3ae_preprocessing.bounding_box(images) == ((0, 7), (4, 10), (2, 6))


def test_cache_layout_and_resume(cache) -> None:
    root, cases = cache
    meta = json.loads((root / "meta" / f"{cases[0]}.json").read_text())
    assert meta["pipeline"] == "m3ae" and meta["original_shape"] == list(SYN_SHAPE)
    image, label = load_case(root, cases[0])
    (x0, x1), (y0, y1), (z0, z1) = meta["crop_box"]
    assert image.shape == (4, x1 - x0, y1 - y0, z1 - z0) and label.shape == image.shape[1:]
    assert image.min() == 0 and image.max() <= 1 and np.unique(label).tolist() == [0, 1, 2, 3]
    raw = root.parent / "raw"
    assert m3ae_data.preprocess_dataset(raw, root, progress=False) == {c: "skipped" for c in cases}
    with pytest.raises(FileNotFoundError, match="M3AE cache"):
        m3ae_data.ensure_cache(root.parent / "elsewhere", cases, None)


def test_window_start_rules() -> None:
    rng = np.random.default_rng(0)
    starts = {m3ae_data.window_start(10, 60, 240, 32, rng) for _ in range(2000)}
    assert starts == set(range(10, 29))  # inside a box at least a window long
    starts = {m3ae_data.window_start(10, 30, 40, 32, rng) for _ in range(2000)}
    assert starts == set(range(0, 9))  # contains [10, 30) and stays inside the grid [0, 40)
    window = m3ae_data.read_window(np.ones((4, 4, 4, 1)), (2, 2, 2), (0, 0, 0), 4)
    assert window.sum() == 8 and window[2:, 2:, 2:].all()


def test_finetune_copies_share_augmentation(cache) -> None:
    root, cases = cache
    model = _tiny()
    full = m3ae_data.FinetuneDataset(root, cases, 32, completion_array(model), copies=2, mdp=0)
    item = full[(0, 7)]
    assert item["image"].shape == (2, 4, 32, 32, 32) and bool(item["mask"].all())
    torch.testing.assert_close(item["image"][0], item["image"][1], atol=0, rtol=0)
    # the intensity factors vary per axial slice (upstream augments (Z, Y, X) arrays), not per sagittal one
    const = m3ae_data.FinetuneDataset(root, cases, 32, completion_array(model), copies=1, mdp=0)
    const.window = lambda index, rng: (
        np.ones((32, 32, 32, 4), np.float32),
        np.zeros((32,) * 3, np.int64),
        np.zeros(3, np.int64),
    )
    image = const[(0, 3)]["image"][0, 0].numpy()  # (X, Y, Z) of one channel, flips included
    assert np.allclose(image, image[:1, :1, :]) and np.unique(image[0, 0, :]).size == 32
    drop = m3ae_data.FinetuneDataset(root, cases, 32, completion_array(model), copies=3, mdp=3)
    for seed in range(6):
        item = drop[(1, seed)]
        both = item["mask"].all(0)
        torch.testing.assert_close(item["image"][0][both], item["image"][1][both], atol=0, rtol=0)


# ---------------------------------------------------------------------- completion crops: training vs inference frame


def _window_inside_crop(ds: m3ae_data.FinetuneDataset, box, crop_shape):
    for seed in range(500):
        image, _, origin = ds.window(0, np.random.default_rng(seed))
        rel = [int(o) - lo for o, (lo, _) in zip(origin, box, strict=True)]
        if all(r >= 0 and r + 32 <= n for r, n in zip(rel, crop_shape, strict=True)) and any(rel):
            return image, origin, rel
    raise AssertionError("no training window inside the crop")


def test_completion_crop_agrees_between_training_and_inference(cache) -> None:
    root, cases = cache
    model = _tiny().eval()
    completion = completion_array(model)
    ds = m3ae_data.FinetuneDataset(root, cases[:1], 32, completion)
    box = m3ae_data.case_box(root, cases[0])
    volume, _ = load_case(root, cases[0])
    assert any(lo > 0 for lo, _ in box)  # the crop does not start at the grid corner: a misalignment would show
    train_image, origin, rel = _window_inside_crop(ds, box, volume.shape[1:])
    mask = (True, False, True, False)  # FLAIR and T1 kept
    # training: the dataset fills dropped channels from the completion image at the window's grid position
    fill = m3ae_data.read_window(completion, (0, 0, 0), origin.tolist(), 32)
    train_completed = np.where(np.asarray(mask), train_image, fill)
    # inference: the same region of the cached crop, at the grid position the shared evaluator passes
    assert case_origin(model, root, cases[0]) == tuple(lo for lo, _ in box)
    window = torch.from_numpy(volume[:, rel[0] : rel[0] + 32, rel[1] : rel[1] + 32, rel[2] : rel[2] + 32])[None]
    np.testing.assert_array_equal(window[0].permute(1, 2, 3, 0).numpy(), train_image)
    start = torch.tensor([[lo + r for (lo, _), r in zip(box, rel, strict=True)]])
    torch.testing.assert_close(start[0], torch.from_numpy(origin))
    inferred = model.complete(window, torch.tensor([mask]), start)  # upstream frame
    expected = torch.from_numpy(train_completed).permute(3, 0, 1, 2)[[2, 1, 3, 0]].permute(0, 3, 2, 1)
    torch.testing.assert_close(inferred[0], expected, atol=0, rtol=0)
    # --reference-quirks: crop-relative positions, i.e. limage cropped at the window start inside the crop
    model.window_origin = "crop"
    assert case_origin(model, root, cases[0]) is None
    quirk = model.complete(window, torch.tensor([mask]), torch.tensor([rel]))
    assert not torch.equal(quirk, inferred)
    torch.testing.assert_close(quirk[:, [0, 3]], inferred[:, [0, 3]], atol=0, rtol=0)  # present T1 and FLAIR


def test_sliding_window_passes_absolute_or_crop_relative_origins(cache) -> None:
    root, cases = cache
    model = _tiny().eval()
    model.unet = _StubUNet()  # only the completion crops are observed here
    volume, _ = load_case(root, cases[0])
    lower = case_origin(model, root, cases[0])
    calls: list[torch.Tensor] = []
    original = model.completion

    def spy(origin, size, batch, flip=()):
        calls.append(torch.as_tensor(origin).clone())
        return original(origin, size, batch, flip)

    model.completion = spy  # type: ignore[method-assign]
    x = torch.from_numpy(volume)[None]
    masks = [(True, False, True, True)]
    predict_scenarios(model, x, masks, origin=lower)
    absolute = torch.cat(calls)
    calls.clear()
    predict_scenarios(model, x, masks, origin=None)
    relative = torch.cat(calls)
    assert len(absolute) > 1
    torch.testing.assert_close(absolute - relative, torch.tensor([lower] * len(absolute)))
    assert relative.min() == 0 and (relative.max(0).values + 32 >= torch.tensor(volume.shape[1:])).all()


# ----------------------------------------------------------------------------------------- losses and stage hand-over


def test_edice_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    target = torch.rand(2, 3, 4, 4, 4, generator=g) > 0.6
    s, y = torch.sigmoid(logits), target.float()
    expected = 0.0
    for c in range(3):
        dice = (2 * (s[:, c] * y[:, c]).sum() + 1) / ((s[:, c] ** 2).sum() + (y[:, c] ** 2).sum() + 1)
        bce = torch.nn.functional.binary_cross_entropy(s[:, c], y[:, c])
        expected += (0.7 * (1 - dice) + 0.3 * bce) / 3
    assert float(train.edice(logits, target)) == pytest.approx(float(expected), rel=1e-5)


def test_region_targets_order() -> None:
    label = torch.tensor([[0, 1, 2, 3]])
    regions = train.region_targets(label)  # ET, TC, WT
    assert regions[0].int().tolist() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]


def test_finetune_loss_consistency_terms() -> None:
    model = _tiny().train()
    torch.manual_seed(0)
    x = torch.rand(1, 2, 4, 16, 16, 16)
    batch = {"image": x, "label": torch.randint(0, 4, (1, 16, 16, 16)), "origin": torch.tensor([[1, 2, 3]])}
    loss, scalars = train.FinetuneLoss(weight_kl=0.1)(model, batch, 0)
    with torch.no_grad():
        out = model(x[0], torch.ones(2, 4, dtype=torch.bool))
    target = train.region_targets(batch["label"]).expand(2, -1, -1, -1, -1)
    seg = sum(train.edice(o, target) for o in out.outputs)
    cons = torch.nn.functional.mse_loss(out.outputs[0][0], out.outputs[0][1])
    assert float(loss.detach()) == pytest.approx(float(seg + 0.1 * cons), rel=1e-5)
    assert scalars["consistency"] == pytest.approx(float(cons), rel=1e-5)
    # 2 copies, upstream's style[feature_level + 1] of [c2d, c3d, c4d, out4]: feature_level 1 → c4d
    _, scalars = train.FinetuneLoss(feature_level=1)(model, batch, 0)
    c4d = out.style[2]
    assert scalars["consistency"] == pytest.approx(float(torch.nn.functional.mse_loss(c4d[0], c4d[1])), rel=1e-5)
    three = {**batch, "image": torch.rand(1, 3, 4, 16, 16, 16)}
    _, scalars = train.FinetuneLoss(feature_level=1)(model, three, 0)
    with torch.no_grad():
        style = model(three["image"][0], torch.ones(3, 4, dtype=torch.bool)).style[1]
    pairs = sum(torch.nn.functional.mse_loss(style[i], style[j]) for i, j in itertools.combinations(range(3), 2))
    assert scalars["consistency"] == pytest.approx(float(pairs / 6), rel=1e-5)
    with pytest.raises(ValueError, match="2 or 3 copies"):
        train.FinetuneLoss()(model, {**batch, "image": x[:, :1]}, 0)


def test_pretrain_loss_by_hand() -> None:
    model = build_method("m3ae", "tiny_pretrain").train()
    x = torch.rand(2, 4, 32, 32, 32)
    tokens = torch.from_numpy(np.stack([sample_pretrain_tokens(np.random.default_rng(s), 4, 32) for s in (1, 2)]))
    batch = {"image": x, "tokens": tokens, "origin": torch.tensor([[0, 0, 0], [16, 16, 8]])}
    loss, _ = pretrain.PretrainLoss()(model, batch, 0)
    with torch.no_grad():
        recon = model(x, tokens_to_voxels(tokens, 32), batch["origin"]).outputs[0]
    reg = (model.limage - model.limage.mean(dim=(2, 3, 4), keepdim=True)).pow(2).sum().sqrt()
    expected = ((recon - x) ** 2).mean() + 0.005 * reg
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert model.limage.grad is not None and model.limage.grad.abs().sum() > 0  # masked voxels come from limage


def test_load_pretrained_keeps_everything_but_the_head(tmp_path) -> None:
    pre = build_method("m3ae", "tiny_pretrain")
    torch.save({"epoch": 599, "state_dict": {f"module.{k}": v for k, v in pre.state_dict().items()}}, tmp_path / "p")
    assert train.pretrained_architecture(tmp_path / "p") == {"init_channels": 8, "image_shape": SYN_SHAPE}
    model = _tiny(seed=5)
    head = model.unet.up1conv.weight.detach().clone()
    train.load_pretrained(model, tmp_path / "p")
    for k, v in pre.state_dict().items():
        if not k.startswith("unet.up1conv."):
            assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.unet.up1conv.weight, head)
    other = _tiny(init_channels=16)
    with pytest.raises(ValueError, match="shape mismatches"):
        train.load_pretrained(other, tmp_path / "p")


def test_resume_rebuilds_the_model_of_upstream_and_our_checkpoints(tmp_path) -> None:
    from brats_core.utils.checkpoint import load_state_dict_strict, save_checkpoint

    pre = build_method("m3ae", "tiny_pretrain")
    upstream = {"epoch": 9, "state_dict": {f"module.{k}": v for k, v in pre.state_dict().items()}}
    torch.save(upstream, tmp_path / "model_1last.pth.tar")  # upstream stores no config
    model = model_to_resume(tmp_path / "model_1last.pth.tar")
    assert model.config.pre_train and model.config.init_channels == 8 and model.config.image_shape == SYN_SHAPE
    load_state_dict_strict(model, upstream["state_dict"])
    save_checkpoint(tmp_path / "ours.pth", pre, method="m3ae", config=config_dict(pre))
    assert model_to_resume(tmp_path / "ours.pth").config == pre.config


def test_upstream_checkpoint_loads_for_testing(tmp_path) -> None:
    model = _tiny(seed=2)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 299, "state_dict": state}, tmp_path / "model_1model_best_299.pth.tar")
    arch = test.infer_architecture(model.state_dict())
    assert arch == {"init_channels": 8, "pre_train": False, "deep_supervised": True, "image_shape": SYN_SHAPE}
    loaded, _ = model_from_checkpoint(tmp_path / "model_1model_best_299.pth.tar", "m3ae", {}, test.infer_architecture)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ------------------------------------------------------------------------------------ scripts and upstream scoring


def test_script_flags_accept_the_upstream_commands(tmp_path, capsys) -> None:
    pre = pretrain.build_parser().parse_args(
        "--datapath d --exp_name m3ae_pretrain --batch_size 2 --mdp 3 --dataset brats23 --mask_ratio 0.875 "
        "--lr 0.0003".split()
    )
    assert (pre.batch_size, pre.mdp, pre.mask_ratio, pre.lr, pre.epochs, pre.limage_lr) == (
        2,
        3,
        0.875,
        3e-4,
        600,
        5e-3,
    )
    assert pre.weight_decay == 0 and pre.val == 50 and pre.seed == 999
    ft = train.build_parser().parse_args(
        "--datapath d --pretrained p.pth --batch_size 2 --lr 0.0003 --model_type cnnnet --seed 999 --weight_kl 0.1 "
        "--feature_level 2 --epochs 300 --mdp 3 --wd 0.0001 --deep_supervised --patch_shape 128 "
        "--exp_name m3ae_train -j 3".split()
    )
    assert (ft.weight_kl, ft.feature_level, ft.weight_decay, ft.deep_supervised, ft.patch_shape) == (
        0.1, 2, 1e-4, True, 128,
    )  # fmt: skip
    assert ft.workers == 3
    defaults = train.build_parser().parse_args(["--datapath", "d", "--pretrained", "p"])
    assert (defaults.mdp, defaults.batch_size, defaults.weight_decay, defaults.weight_kl) == (3, 2, 1e-5, 1.0)
    assert not defaults.compile and train.build_parser().parse_args(["--datapath", "d", "--pretrained", "p",
                                                                     "--compile"]).compile  # fmt: skip
    assert pretrain.build_parser().parse_args(["--datapath", "d", "--compile"]).compile
    args = test.build_parser().parse_args(["--datapath", "d", "--checkpoint", "runs/m3ae_train/best.pth"])
    assert args.checkpoint == "runs/m3ae_train/best.pth" and args.reference_quirks is False
    with pytest.raises(SystemExit):
        test.build_parser().parse_args(["--datapath", "d"])  # --checkpoint is required
    with pytest.raises(SystemExit):
        train.main(["--datapath", "d", "--savepath", "s"])  # neither --pretrained nor --resume
    # upstream variants that are not re-implemented: the defaults pass, other values are refused before any work
    assert train.build_parser().parse_args(["--datapath", "d", "--pretrained", "p", "--part", "0.5"]).part == 0.5
    for flag in (["--part", "0.5"], ["--use_weight"], ["--semi_proportion", "0.3"], ["--start_epoch", "10"]):
        with pytest.raises(SystemExit):
            train.main(["--datapath", "d", "--savepath", str(tmp_path / "s"), "--pretrained", "p", *flag])
        assert f"{flag[0]} " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--datapath", "d", "--savepath", str(tmp_path / "s"), "--start-epoch", "5"])
    assert "--start_epoch 5: upstream's variant" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_upstream_scoring_helpers() -> None:
    empty, some = np.zeros((3, 3), bool), np.eye(3, dtype=bool)
    assert test.upstream_dice(empty, empty) == 1.0 and test.upstream_dice(some, empty) == 0.0
    half = some.copy()
    half[0, 0] = False
    assert test.upstream_dice(half, some) == pytest.approx(2 * 2 / 5)
    listed = test.upstream_scenarios()
    # upstream's list is read as T1, T1ce, T2, FLAIR: entry 1 (0001) is FLAIR, entry 4 (1000) T1
    assert listed[0] == ("[False, False, False, True]", next(s for s in SCENARIOS if s.modalities == ("flair",)))
    assert listed[3][1].modalities == ("t1",) and listed[1][1].modalities == ("t1ce",)
    assert sorted(s.name for _, s in listed) == sorted(s.name for s in SCENARIOS)
    assert MODALITIES == ("flair", "t1ce", "t1", "t2")


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_pretrain_train_test_through_the_scripts(tmp_path, monkeypatch) -> None:
    from brats_core.data import splits
    from brats_core.utils.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)  # upstream's runs/<exp_name> layout lands in the temporary folder
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    cases = synthetic.write_synthetic_dataset(raw, 10, shape=SYN_SHAPE)
    splits.generate(cases).write(tmp_path / "splits")
    common = ["--datapath", str(cache), "--split_dir", str(tmp_path / "splits"), "--workers", "0", "--device", "cpu"]
    common += ["--no_progress", "--raw_path", str(raw)]
    pre_args = ["--preset", "tiny", "--exp_name", "m3ae_pretrain", "--batch_size", "2", "--mdp", "3", "--epochs", "1"]
    pre_args += ["--iter_per_epoch", "2", "--val", "1", "--mask_ratio", "0.875", "--lr", "0.0003"]
    assert pretrain.main([*common, *pre_args]) == 0
    pre = load_checkpoint(tmp_path / "runs" / "m3ae_pretrain" / "model_last.pth")
    assert pre["config"]["pre_train"] and pre["global_step"] == 2
    assert (tmp_path / "runs" / "m3ae_pretrain" / "model_1model_best_0.pth").is_file()
    ft_args = ["--preset", "tiny", "--pretrained", "runs/m3ae_pretrain/model_last.pth", "--batch_size", "2"]
    ft_args += ["--weight_kl", "0.1", "--feature_level", "2", "--epochs", "1", "--iter_per_epoch", "2", "--mdp", "3"]
    ft_args += ["--wd", "0.0001", "--deep_supervised", "--exp_name", "m3ae_train", "--debug"]
    assert train.main([*common, *ft_args]) == 0
    ft = load_checkpoint(tmp_path / "runs" / "m3ae_train" / "model_last.pth")
    assert not ft["config"]["pre_train"] and ft["config"]["deep_supervised"] and ft["global_step"] == 2
    # the completion image is frozen: identical to the pre-trained one
    assert torch.equal(ft["state_dict"]["limage"], pre["state_dict"]["limage"])
    assert (tmp_path / "runs" / "m3ae_train" / "best.pth").is_file()
    # continue the run for a second epoch: architecture and frozen completion image come from the checkpoint
    resume = ["--resume", "runs/m3ae_train/model_last.pth", "--epochs", "2", "--iter_per_epoch", "2"]
    assert train.main([*common, "--exp_name", "m3ae_train", "--batch_size", "2", *resume]) == 0
    ft = load_checkpoint(tmp_path / "runs" / "m3ae_train" / "model_last.pth")
    assert ft["global_step"] == 4 and torch.equal(ft["state_dict"]["limage"], pre["state_dict"]["limage"])
    assert test.main([*common, "--checkpoint", "runs/m3ae_train/best.pth", "--no_hd95"]) == 0
    rows = json.loads((tmp_path / "runs" / "m3ae_train" / "model_1" / "summary.json").read_text())
    assert len(rows) == 16 and rows[-1]["scenario"] == "mean"
    assert [r["scenario"] for r in rows[:15]] == [s.name for s in SCENARIOS]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("WT", "TC", "ET", "ETpp"))
    quirks = tmp_path / "quirks"
    quirk_args = ["--checkpoint", "runs/m3ae_train/best.pth", "--reference-quirks", "--savepath", str(quirks)]
    assert test.main([*common, *quirk_args]) == 0
    lines = (quirks / "test_final.txt").read_text().splitlines()
    assert len(lines) == 16 and lines[0].startswith("Performance missing scenario = [False, False, False, True]")
    assert lines[-1].startswith("Overall Averages: WT = ")


def test_predict_warns_when_the_completion_image_does_not_fit_the_grid(caplog) -> None:
    model = _tiny()
    rng = np.random.default_rng(0)

    def images(shape):
        brain = np.zeros(shape, np.float32)
        brain[4:-4, 4:-4, 4:-4] = rng.uniform(1, 2, size=[n - 8 for n in shape])
        return {"t1ce": brain, "t2": brain * 2}

    with caplog.at_level("WARNING", logger="m3ae.model"):
        model.preprocess(images(SYN_SHAPE))
        assert caplog.text == ""  # the training grid: the completion image lines up
        model.preprocess(images((60, 56, 44)))
    assert "learnt on the 48×48×40 grid" in caplog.text and "this case's grid is 60×56×44" in caplog.text
