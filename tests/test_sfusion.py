"""SFusion: upstream state-dict parity and parameter counts (paper size, meta device), no lazy layers, the reference
DUpsampling permute/reshape order, the positional table, the T1ce/T1/T2/FLAIR content order, per-sample masks and
the first-sample quirk, the shared loss composition on hand-made outputs, forward/backward on 32³, missing-modality
invariance, the scripts' flags, and (slow) a two-step train + 15-scenario test through the scripts."""

from __future__ import annotations

import csv
import math
import shlex

import numpy as np
import pytest
import torch
from conftest import MASKS, shared_path
from torch import nn

from brats_core.apps.scripts import select_val_epochs
from brats_core.data import splits
from brats_core.data.preprocessing import main as preprocess
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.nn.losses import RMBTSLoss, dice_loss, kl_divergence, one_hot, reconstruction_l1, softmax_weighted_loss
from brats_core.registry import OutputKind, build_method, count_parameters, state_dict_listing, state_dict_shapes
from brats_core.utils.checkpoint import load_checkpoint
from SFusion import test_sfusion, train_sfusion
from SFusion.model import DUpsampling3D, SFusion, meta_model, sinusoid_table


def _tiny(seed: int = 0, **overrides: object) -> SFusion:
    torch.manual_seed(seed)
    return build_method("sfusion", "tiny", **overrides)  # type: ignore[return-value]


def _input(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- paper-size structure


def test_state_dict_keys_order_shapes_match_upstream() -> None:
    model = meta_model()
    lines = state_dict_listing(model)
    assert lines == shared_path("spec", "state_dicts", "sfusion_f16.txt").read_text().splitlines()


def test_parameter_counts_match_spec() -> None:
    model = meta_model()
    assert count_parameters(model) == 41_353_400
    assert count_parameters(meta_model(feature_maps=8)) == 18_649_008
    assert count_parameters(model.style_encoder_flair) == 2_765_000
    assert count_parameters(model.content_encoder_t1ce_) == 1_466_496
    assert count_parameters(model.image_decoder_t2___) == 4_940_257
    blocks = [getattr(model, f"fusion{s}") for s in range(1, 5)]
    assert [count_parameters(b) for b in blocks] == [1_074_816, 625_920, 662_016, 1_717_248]
    assert [count_parameters(b.fusion_block) for b in blocks] == [26_240, 101_632, 399_872, 1_586_176]
    assert [count_parameters(b.upsample) for b in blocks] == [1_048_576, 524_288, 262_144, 131_072]
    assert count_parameters(model.mask_decoder) == 586_388


def test_no_lazy_layers_so_fresh_and_trained_state_dicts_agree() -> None:
    model = _tiny()
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
    assert model.image_decoder_flair.mlp.get_submodule("unit.0.unit.1").in_features == 8
    before = state_dict_shapes(model)
    model.train()(_input(1), torch.tensor(MASKS[-1:]))
    assert state_dict_shapes(model) == before


def test_token_grid_and_dupsampling_follow_the_patch() -> None:
    scales = lambda m: [getattr(m, f"fusion{s}").upsample.scale for s in range(1, 5)]  # noqa: E731
    assert scales(meta_model()) == [16, 8, 4, 2] and meta_model().config.grid == 8
    assert scales(meta_model(patch_size=32)) == [16, 8, 4, 2] and meta_model(patch_size=32).config.grid == 2
    assert scales(meta_model(patch_size=64, token_grid=8)) == [8, 4, 2, 1]  # upstream's fixed grid at 64³
    with pytest.raises(ValueError, match="token_grid"):
        meta_model(patch_size=32, token_grid=8)


def test_upstream_architecture_is_inferred_from_weights() -> None:
    arch = test_sfusion.infer_architecture(meta_model().state_dict())
    assert arch == {"patch_size": 128, "token_grid": 8, "num_cls": 4, "feature_maps": 16, "style_dims": 32,
                    "style_code": 8, "num_layers": 8}  # fmt: skip
    assert state_dict_shapes(meta_model(**arch)) == state_dict_shapes(meta_model())


# ------------------------------------------------------------------------------------------------ SFusion internals


def _reference_dupsampling(y: torch.Tensor, s: int) -> torch.Tensor:
    """Upstream's permute/reshape sequence on the conv output y (B, C, D, H, W), C = E·s³."""
    b, c, d, h, w = y.shape
    y = y.permute(0, 4, 3, 2, 1).contiguous().view(b, w, h, d * s, c // s)
    y = y.permute(0, 3, 1, 2, 4).contiguous().view(b, d * s, w, h * s, c // s**2)
    y = y.permute(0, 1, 3, 2, 4).contiguous().view(b, d * s, h * s, w * s, c // s**3)
    return y.permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize(("channels", "scale", "grid"), [(3, 2, (2, 3, 4)), (2, 3, (2, 2, 2)), (4, 1, (3, 2, 2))])
def test_dupsampling_reproduces_the_reference_order(channels: int, scale: int, grid: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    up = DUpsampling3D(channels, scale)
    x = torch.randn(2, channels, *grid)
    expected = _reference_dupsampling(up.conv_3d(x), scale)
    out = up(x)
    assert out.shape == (2, channels, *(g * scale for g in grid))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_positional_table_formula() -> None:
    length, dim = 7, 6
    angles = np.array([[p / (np.power(10000, 2 * (j // 2) / dim) + 1e-8) for j in range(dim)] for p in range(length)])
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    torch.testing.assert_close(sinusoid_table(length, dim), torch.from_numpy(angles).float(), rtol=0, atol=0)


def test_contents_reach_the_fusion_in_upstream_order(monkeypatch) -> None:
    """Upstream lists present contents as T1ce, T1, T2, FLAIR (canonical indices 1, 2, 3, 0)."""
    model = _tiny().eval()
    contents = model.encode(_input(1))
    seen: list[list[int]] = []

    def record(maps):
        seen.append([next(i for i in range(4) if contents[i][0] is m) for m in maps])
        return maps[0]

    monkeypatch.setattr(model.fusion1, "forward", record)
    for s in (2, 3, 4):
        monkeypatch.setattr(getattr(model, f"fusion{s}"), "forward", lambda maps: maps[0])
    for mask in [(True, True, True, True), (True, False, True, False), (False, True, False, True)]:
        model.fuse(contents, torch.tensor([mask]))
    assert seen == [[1, 2, 3, 0], [2, 0], [1, 3]]


def test_each_sample_uses_its_own_mask_unless_reference_quirks() -> None:
    x, mask = _input(2), torch.tensor([MASKS[0], MASKS[2]])
    with torch.no_grad():
        model = _tiny().eval()
        alone = [model(x[i : i + 1], mask[i : i + 1]) for i in range(2)]
        torch.testing.assert_close(model(x, mask), torch.cat(alone), rtol=1e-4, atol=1e-5)
        model.config.first_sample_mask = True
        # the quirk is about training batches: evaluation (e.g. --scenario_batch) keeps each sample's own mask
        torch.testing.assert_close(model(x, mask), torch.cat(alone), rtol=1e-4, atol=1e-5)
        contents = model.encode(x)
        expected = model.fuse([[c[1:] for c in scales] for scales in contents], mask[:1])
        model.train()
        quirk = model.fuse(contents, mask)
        for fused, ref in zip(quirk, expected, strict=True):
            torch.testing.assert_close(fused[1:], ref, rtol=1e-4, atol=1e-5)
        model.config.first_sample_mask = False
        own = model.fuse(contents, mask)
        assert not torch.allclose(quirk[0][1:], own[0][1:], atol=1e-4)


# ------------------------------------------------------------------------------------------------------------ losses


class _Stub(nn.Module):
    """Returns fixed, hand-made training outputs."""

    def __init__(self, out: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.out


def test_loss_is_wce_plus_dice_plus_tenth_reconstruction_plus_tenth_kl() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 4, 2, 2, 2, generator=g), dim=1)
    image = torch.randn(1, 4, 2, 2, 2, generator=g)
    out = {"seg": probs, "reconstruction": image + 0.5, "mu": torch.ones(1, 4, 3), "sigma": torch.ones(1, 4, 3)}
    label = torch.tensor([0, 1, 2, 3, 0, 0, 2, -1]).reshape(1, 2, 2, 2)
    batch = {"image": image, "mask": torch.ones(1, 4, dtype=torch.bool), "label": label}
    loss, scalars = RMBTSLoss(reference_quirks=True)(_Stub(out), batch, 0)
    target = one_hot(torch.remainder(label, 4), 4)  # upstream's eye(4)[label]: −1 → ET
    # reconstruction: |0.5| everywhere, 4 modalities → 2.0; KL: μ = σ = 1 → ½(1 + 1 − 1 − 0) = 0.5 per modality → 2.0
    expected = softmax_weighted_loss(probs, target, eps=1e-8) + dice_loss(probs, target) + 0.1 * 2.0 + 0.1 * 2.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert scalars["rec"] == pytest.approx(2.0) and scalars["kl"] == pytest.approx(2.0)
    assert reconstruction_l1(image, out["reconstruction"]).item() == pytest.approx(2.0)
    assert kl_divergence(out["mu"], out["sigma"]).item() == pytest.approx(4 * 0.5 * (1 + 1 - 1 - math.log(1)))
    with pytest.raises(ValueError, match="one_hot_upstream"):
        RMBTSLoss()(_Stub(out), batch, 0)  # the −1 fill only exists with --reference-quirks


# ------------------------------------------------------------------------------------------------- tiny forward/back


def test_train_and_eval_forward_backward_all_modality_counts() -> None:
    model = _tiny().train()
    x, mask = _input(len(MASKS)), torch.tensor(MASKS)
    out = model(x, mask)
    assert out["seg"].shape == out["reconstruction"].shape == (4, 4, 32, 32, 32)
    assert out["mu"].shape == out["sigma"].shape == (4, 4, 32) and out["style"].shape == (4, 4, 8)
    loss = sum(t.float().mean() for t in out.values())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        probs = model(x, mask)
        assert model.output_kind == OutputKind.PROBABILITIES and probs.shape == (4, 4, 32, 32, 32)
        torch.testing.assert_close(probs.sum(1), torch.ones(4, 32, 32, 32))
        assert probs.min() >= 0
        torch.testing.assert_close(model.decode(model.encode(x), mask), probs, rtol=0, atol=0)


@pytest.mark.parametrize("mask", MASKS[:3])
def test_missing_channels_do_not_change_the_output(mask: tuple[bool, ...]) -> None:
    model = _tiny().eval()
    x = _input(1)
    noisy = x.clone()
    absent = [c for c, on in enumerate(mask) if not on]
    noisy[:, absent] = torch.randn(1, len(absent), 32, 32, 32) * 5
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, torch.tensor([mask])), model(x, torch.tensor([mask])), rtol=0, atol=0)


def test_bad_inputs_are_rejected() -> None:
    model = _tiny().eval()
    with pytest.raises(ValueError, match="at least one available modality"):
        model(_input(1), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="32³"):
        model(torch.zeros(1, 4, 40, 40, 40), torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------- scripts


def test_upstream_flags_and_validation_epochs() -> None:
    parser = train_sfusion.build_parser()
    args = parser.parse_args(
        shlex.split(
            "--datapath d --num_epochs 200 --dataname BRATS2023 --savepath s --batch_size 1 --feature_maps 16 "
            "--lr 1e-4 --weight_decay 1e-4 --drop_rate_value 0.0 --seed 999 --debug --levels 4 --norm_type instance "
            "--use_dropout True --out_channels 4 --in_channels 1 --train_file t2.txt"
        )
    )
    assert args.feature_maps == 16 and args.train_file == "t2.txt" and args.num_epochs == 200
    with pytest.raises(SystemExit):
        train_sfusion.main(["--datapath", "d", "--savepath", "s", "--levels", "3"])
    epochs = select_val_epochs(train_sfusion.UPSTREAM_VAL_EPOCHS, 200)
    assert epochs == [10, 15, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 110, 130, 150, 175, 200]
    test_args = test_sfusion.build_parser().parse_args(["--datapath", "d", "--resume", "r", "--savepath", "o"])
    assert test_args.savepath == "o" and test_args.test_file is None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sfusion")
    write_synthetic_dataset(root / "raw", 5, shape=(40, 40, 36), seed=7)
    assert preprocess(["--input-path", str(root / "raw"), "--output-path", str(root / "pre"), "--patch_size", "32",
                       "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    cases = sorted(p.name for p in (root / "raw").iterdir())
    split = splits.Split(cases[:3], [(cases[3], (False, True, True, False))], [(cases[4], (True, True, True, True))])
    split.write(root / "pre" / "splits")
    (root / "train2.txt").write_text("".join(f"{c}\n" for c in cases[:2]))  # upstream's train2.txt: a subset
    return root


@pytest.mark.slow
def test_train_two_steps_then_test_all_scenarios(dataset, tmp_path) -> None:
    pre, save = dataset / "pre", tmp_path / "run"
    assert train_sfusion.main(["--datapath", str(pre), "--dataname", "BRATS2023", "--savepath", str(save),
                               "--preset", "tiny", "--num_epochs", "1", "--max_steps", "2", "--batch_size", "2",
                               "--train_file", str(dataset / "train2.txt"), "--reference-quirks",
                               "--workers", "0", "--device", "cpu", "--no_progress"]) == 0  # fmt: skip
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["method"] == "sfusion" and ckpt["global_step"] == 2 and ckpt["config"]["first_sample_mask"]
    assert ckpt["config"]["feature_maps"] == 4 and ckpt["args"]["train_file"].endswith("train2.txt")
    out = tmp_path / "test"
    assert (
        test_sfusion.main(
            [
                "--datapath",
                str(pre),
                "--resume",
                str(save / "model_last.pth"),
                "--savepath",
                str(out),
                "--device",
                "cpu",
                "--no_hd95",
                "--no_progress",
            ]
        )
        == 0
    )
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[0]["scenario"] == "t2" and rows[-1]["scenario"] == "mean"
