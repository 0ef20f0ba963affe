"""U-HVED: upstream state-dict parity and parameter count, initialisation, the product of Gaussians and the
multi-subset KL term on hand-made tensors, forward/backward on 32³, missing-modality invariance, the validation
schedule and losses, the scripts' flags, and (slow) a two-step train + 15-scenario test through the scripts."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import MASKS, shared_path
from scipy import stats

from brats_core.apps.scripts import model_from_checkpoint
from brats_core.modalities import MODALITIES, SCENARIOS
from brats_core.nn.losses import dice_loss, one_hot, softmax_loss, softmax_weighted_loss
from brats_core.registry import (
    OutputKind,
    build_method,
    count_parameters,
    make_config,
    state_dict_listing,
    state_dict_shapes,
)
from UHVED import test_uhved, train_uhved
from UHVED.losses import (
    SUBSETS,
    UHVEDLoss,
    kl_divergence,
    kld_loss,
    multi_subset_kld,
    reconstruction_loss,
    validation_seg_loss,
)
from UHVED.model import UHVED, Gaussian, UHVEDConfig, UHVEDTrainOutput, product_of_gaussians


@pytest.fixture(scope="module")
def paper_model() -> UHVED:
    torch.manual_seed(0)
    return UHVED(UHVEDConfig())


def _tiny(seed: int = 0) -> UHVED:
    torch.manual_seed(seed)
    return build_method("uhved", "tiny")  # type: ignore[return-value]


def _input(batch: int = 1, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- paper-size structure


def test_state_dict_keys_order_shapes_match_upstream() -> None:
    with torch.device("meta"):
        model = UHVED(UHVEDConfig())
    lines = state_dict_listing(model)
    assert lines == shared_path("spec", "state_dicts", "uhved.txt").read_text().splitlines()


def test_parameter_counts_match_spec(paper_model: UHVED) -> None:
    assert count_parameters(paper_model) == 1_250_552
    for m in MODALITIES:
        assert count_parameters(getattr(paper_model, f"{m}_encoder")) == 221_560
    for name in ("flair_decoder", "t1c_decoder", "t1_decoder", "t2_decoder"):
        assert count_parameters(getattr(paper_model, name)) == 72_860
    assert count_parameters(paper_model.seg_decoder) == 72_872


def test_parameters_do_not_depend_on_patch_size(paper_model: UHVED) -> None:
    assert state_dict_shapes(_tiny()) == state_dict_shapes(paper_model)


def test_presets_and_config_validation() -> None:
    assert make_config("uhved") == UHVEDConfig(num_cls=4, patch_size=112, base_features=8)
    assert make_config("uhved", "tiny").patch_size == 32
    for bad in ({"patch_size": 36}, {"patch_size": 8}, {"base_features": 7}):
        with pytest.raises(ValueError):
            UHVEDConfig(**bad)


def test_initialisation_statistics(paper_model: UHVED) -> None:
    params = dict(paper_model.named_parameters())
    assert all(bool((p == 0).all()) for n, p in params.items() if n.endswith("bias"))
    weights = {n: p.detach() for n, p in params.items() if "weight" in n}
    assert all(float(w.abs().max()) <= 2.0 for w in weights.values())  # truncated at ±2 (absolute)
    for name, w in weights.items():
        if w.dim() == 5 and w.numel() >= 10_000:  # std √(2 / (out·in·k·k)); the cut at ±2 is many stds away
            expected = math.sqrt(2.0 / np.prod(w.shape[:-1]))
            assert abs(float(w.std()) / expected - 1) < 0.05, name
            assert abs(float(w.mean())) < 0.05 * expected, name
    first = torch.cat([weights[f"{m}_encoder.conv1.weight"].flatten() for m in MODALITIES])
    assert first.numel() == 32  # (8, 1, 1, 1, 1): std √(2/8) = 0.5
    assert 0.3 < float(first.std()) < 0.7
    # InstanceNorm weights: std √2 cut at ±2, i.e. ±√2 standard deviations
    norm = torch.cat([w.flatten() for n, w in weights.items() if ".norm." in n])
    assert norm.numel() == 4 * 184 + 5 * 140
    expected_std = stats.truncnorm(-math.sqrt(2), math.sqrt(2), scale=math.sqrt(2)).std()
    assert abs(float(norm.std()) - expected_std) < 0.1 and abs(float(norm.mean())) < 0.1
    assert float(norm.abs().max()) > 1.5  # not a plain N(0, 1)-like init: the tails reach towards ±2


# ------------------------------------------------------------------------------------------- product of Gaussians


def test_product_of_gaussians_by_hand() -> None:
    # two present experts N(1, 1) and N(3, 2), two absent ones with wild values, and the N(0, 1) prior:
    # T = 1 + 1/2 + 1 = 2.5, μ = (1·1 + 3·½ + 0) / 2.5 = 1, var = 0.4
    mu = torch.tensor([1.0, 3.0, 1e6, -7.0]).reshape(1, 4, 1)
    logvar = torch.tensor([0.0, math.log(2.0), -50.0, 50.0]).reshape(1, 4, 1)
    present = torch.tensor([[True, True, False, False]])
    post = product_of_gaussians(mu, logvar, present, eps=0.0)
    assert post.mu.shape == (1, 1)
    assert float(post.mu) == pytest.approx(1.0, abs=1e-6)
    assert float(post.logvar) == pytest.approx(math.log(0.4), abs=1e-6)
    # with eps: T_m = 1/(var_m + eps), logvar = log(1/ΣT + eps)
    eps = 1e-2
    t = [1 / (1 + eps), 1 / (2 + eps), 1.0]
    post = product_of_gaussians(mu, logvar, present, eps=eps)
    assert float(post.mu) == pytest.approx((1 * t[0] + 3 * t[1]) / sum(t), rel=1e-6)
    assert float(post.logvar) == pytest.approx(math.log(1 / sum(t) + eps), rel=1e-6)
    # no expert at all: the prior
    post = product_of_gaussians(mu, logvar, torch.zeros(1, 4, dtype=torch.bool), eps=0.0)
    assert float(post.mu) == 0.0 and float(post.logvar) == 0.0


def test_product_of_gaussians_batch_masks_and_subsets() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 4, 2, 3, generator=g)
    masks = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    post = product_of_gaussians(mu, logvar, masks, eps=1e-7)
    for b in range(3):
        idx = masks[b].nonzero().flatten().tolist()
        precision = [1 / (torch.exp(logvar[b, i]) + 1e-7) for i in idx] + [torch.ones(2, 3)]
        weighted = [mu[b, i] / (torch.exp(logvar[b, i]) + 1e-7) for i in idx]
        torch.testing.assert_close(post.mu[b], sum(weighted) / sum(precision))
        torch.testing.assert_close(post.logvar[b], torch.log(1 / sum(precision) + 1e-7))
    # a (M,) subset mask equals selecting the modalities
    subset = product_of_gaussians(mu, logvar, torch.tensor([False, True, True, False]))
    selected = product_of_gaussians(mu[:, 1:3], logvar[:, 1:3])
    torch.testing.assert_close(subset.mu, selected.mu)
    torch.testing.assert_close(subset.logvar, selected.logvar)


def test_model_fusion_translates_the_mask_order() -> None:
    model = _tiny().eval()
    g = torch.Generator().manual_seed(2)
    params = Gaussian(torch.randn(2, 4, 3, 2, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, 2, generator=g))
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    fused = model.fuse(params, mask)  # summed in upstream's T1, T1ce, T2, FLAIR order
    expected = product_of_gaussians(params.mu, params.logvar, mask, eps=1e-7)
    torch.testing.assert_close(fused.mu, expected.mu)
    torch.testing.assert_close(fused.logvar, expected.logvar)


# ----------------------------------------------------------------------------------------------------- KL terms


def test_kl_divergence_by_hand() -> None:
    # KL(N(1, 1) ‖ N(0, 1)) = ½ (−1 + 0 − 0 + (1 + 1)/(1 + 0.01))
    a = Gaussian(torch.ones(2, 3), torch.zeros(2, 3))
    b = Gaussian(torch.zeros(()), torch.zeros(()))
    assert float(kl_divergence(a, b)) == pytest.approx(0.5 * (2 / 1.01 - 1), rel=1e-6)
    # KL(N(0, e²) ‖ N(2, e)) = ½ (−1 + 1 − 2 + (e² + 4)/(e + 0.01))
    a = Gaussian(torch.zeros(1), torch.full((1,), 2.0))
    b = Gaussian(torch.full((1,), 2.0), torch.ones(1))
    assert float(kl_divergence(a, b)) == pytest.approx(0.5 * (-2 + (math.e**2 + 4) / (math.e + 0.01)), rel=1e-6)


def test_multi_subset_kld_by_hand() -> None:
    # Every modality N(0, 1): a product of k experts and the prior has mean 0 and precision k/(1 + ε) + 1.
    eps = 1e-5

    def logvar_of(k: int) -> float:
        return math.log(1 / (k / (1 + eps) + 1) + eps)

    def kl(lv_a: float, lv_b: float) -> float:
        return 0.5 * (-1 + lv_b - lv_a + math.exp(lv_a) / (math.exp(lv_b) + 0.01))

    params = Gaussian(*torch.zeros(2, 1, 4, 2, 2, 2, 2, dtype=torch.float64))  # float64: the KLs are small differences
    for present in (1, 2, 4):
        mask = torch.tensor([[i < present for i in range(4)]])
        inter, prior = multi_subset_kld(params, mask)
        subsets = [(k, math.comb(4, k)) for k in range(1, 5)]  # 4 + 6 + 4 + 1 = 15 subsets
        assert float(inter) == pytest.approx(sum(n * kl(logvar_of(present), logvar_of(k)) for k, n in subsets) / 15)
        assert float(prior) == pytest.approx(sum(n * kl(logvar_of(k), 0.0) for k, n in subsets) / 15)


def _direct_kld(mu: np.ndarray, logvar: np.ndarray, mask: np.ndarray) -> float:
    """An independent float64 transcription of the KL term for one scale (mu, logvar (B, 4, ...), mask (B, 4))."""
    eps = 1e-5

    def product(members: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        means, logvars = [], []
        for b, idx in enumerate(members):
            precision, weighted = 1.0, 0.0
            for m in idx:
                precision = precision + 1 / (np.exp(logvar[b, m]) + eps)
                weighted = weighted + mu[b, m] / (np.exp(logvar[b, m]) + eps)
            means.append(weighted / precision * np.ones_like(mu[b, 0]))
            logvars.append(np.log(1 / precision + eps) * np.ones_like(mu[b, 0]))
        return np.stack(means), np.stack(logvars)

    def kl(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
        return 0.5 * np.mean(-1 + b[1] - a[1] + (np.exp(a[1]) + (a[0] - b[0]) ** 2) / (np.exp(b[1]) + 0.01))

    batch = mu.shape[0]
    full = product([[m for m in range(4) if mask[b, m]] for b in range(batch)])
    zero = (np.zeros_like(full[0]), np.zeros_like(full[0]))
    subsets = [s for k in range(1, 5) for s in itertools.combinations(range(4), k)]
    inter = sum(kl(full, product([list(s)] * batch)) for s in subsets) / 15
    prior = sum(kl(product([list(s)] * batch), zero) for s in subsets) / 15
    return inter + prior


def test_multi_subset_kld_matches_a_direct_transcription() -> None:
    assert len(SUBSETS) == 15 and len(set(SUBSETS)) == 15
    g = torch.Generator().manual_seed(3)
    scales = [
        Gaussian(torch.randn(2, 4, c, s, s, s, generator=g), 2 * torch.randn(2, 4, c, s, s, s, generator=g))
        for c, s in ((2, 4), (4, 2))
    ]
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    expected = [_direct_kld(p.mu.double().numpy(), p.logvar.double().numpy(), mask.numpy()) for p in scales]
    for p, e in zip(scales, expected, strict=True):
        assert float(sum(multi_subset_kld(p, mask))) == pytest.approx(e, rel=1e-5)
    assert float(kld_loss(scales, mask)) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_reconstruction_loss_covers_all_modalities() -> None:
    images = torch.zeros(1, 4, 2, 2, 2)
    recon = torch.zeros(1, 4, 2, 2, 2)
    recon[:, 3] = 2.0  # one of four channels off by 2 everywhere: mean of 4 over a quarter of the voxels
    assert float(reconstruction_loss(recon, images)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ forward and backward


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_train_forward_backward(mask: tuple[bool, ...]) -> None:
    model = _tiny().train()
    x = _input()
    batch = {
        "image": x,
        "label": torch.randint(0, 4, (1, 32, 32, 32), generator=torch.Generator().manual_seed(0)),
        "mask": torch.tensor([mask]),
    }
    out = model(x, batch["mask"])
    assert isinstance(out, UHVEDTrainOutput)
    assert out.seg.shape == (1, 4, 32, 32, 32) and out.reconstructions.shape == (1, 4, 32, 32, 32)
    torch.testing.assert_close(out.seg.sum(1), torch.ones(1, 32, 32, 32))
    shapes = [(tuple(g.mu.shape), tuple(g.logvar.shape)) for g in out.posteriors]
    assert shapes == [((1, 4, c, s, s, s),) * 2 for c, s in ((4, 32), (8, 16), (16, 8), (32, 4))]
    assert all(float(g.logvar.detach().abs().max()) <= 50 for g in out.posteriors)

    torch.manual_seed(5)
    loss, scalars = UHVEDLoss()(model, batch, epoch=0)
    assert torch.isfinite(loss)
    expected = scalars["cross"] + scalars["dice"] + 0.1 * scalars["kld"] + 0.1 * scalars["reconstruction"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the KL term over all 15 subsets trains every encoder, also the absent modalities'
    for m in MODALITIES:
        assert float(grads[f"{m}_encoder.e1_c1.conv.weight"].abs().sum()) > 0


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_eval_forward_backward(mask: tuple[bool, ...]) -> None:
    model = _tiny().eval()
    out = model(_input(), torch.tensor([mask]))
    assert out.shape == (1, 4, 32, 32, 32) and out.dtype == torch.float32
    out.square().mean().backward()
    for i, m in enumerate(MODALITIES):
        grad = model.get_parameter(f"{m}_encoder.e1_c1.conv.weight").grad
        assert grad is not None and torch.isfinite(grad).all()
        assert (float(grad.abs().sum()) > 0) == mask[i]  # absent encoders do not reach the output
    assert all(torch.isfinite(p.grad).all() for p in model.seg_decoder.parameters())


def test_eval_output_is_logits() -> None:
    model = _tiny().eval()
    assert UHVED.output_kind is OutputKind.LOGITS and model.output_kind is OutputKind.LOGITS
    with torch.no_grad():
        out = model(_input(len(MASKS)), torch.tensor(MASKS))
    assert out.shape == (len(MASKS), 4, 32, 32, 32)
    assert not torch.allclose(out.sum(1), torch.ones(())) and float(out.min()) < 0  # not a softmax


def test_output_unchanged_when_missing_channels_are_noise() -> None:
    model = _tiny().eval()
    x = _input()
    for m in MASKS[:-1]:
        mask = torch.tensor([m])
        noisy = x.clone()
        absent = [i for i, on in enumerate(m) if not on]
        noisy[:, absent] = torch.randn(1, len(absent), 32, 32, 32, generator=torch.Generator().manual_seed(9)) * 5
        present = x.clone()
        present[:, [i for i, on in enumerate(m) if on]] += 1.0
        with torch.no_grad():
            reference = model(x, mask)
            assert torch.equal(model(noisy, mask), reference), m
            assert not torch.allclose(model(present, mask), reference), m  # while present channels matter


def test_encode_once_decode_all_scenarios_equals_forward() -> None:
    model = _tiny().eval()
    x = _input(seed=4)
    with torch.no_grad():
        features = model.encode(x)
        for scenario in SCENARIOS:
            mask = scenario.tensor()
            assert torch.equal(model.decode(features, mask), model(x, mask)), scenario.name


def test_training_samples_and_inference_uses_the_mean() -> None:
    model = _tiny().train()
    x, mask = _input(), torch.tensor([MASKS[1]])
    torch.manual_seed(0)
    a = model(x, mask).seg
    torch.manual_seed(0)
    b = model(x, mask).seg
    c = model(x, mask).seg
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        d = model(x, mask)
        assert torch.equal(d, model(x, mask))


def test_bad_inputs_are_rejected() -> None:
    model = _tiny().eval()
    with torch.no_grad(), pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 4, 36, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(ValueError, match="bool mask"):
        model(_input(), torch.ones(1, 4))
    with torch.no_grad(), pytest.raises(ValueError, match="at least one"):
        model(_input(), torch.zeros(1, 4, dtype=torch.bool))


# -------------------------------------------------------------------------------------- validation loss and scripts


def test_validation_seg_loss_fixed_and_reference_quirks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1, 4, 6, 6, 6, generator=g)
    label = torch.randint(0, 4, (1, 6, 6, 6), generator=g)
    target = one_hot(label, 4)
    probs = torch.softmax(logits, 1)
    fixed = softmax_weighted_loss(probs, target, eps=1e-8) + dice_loss(probs, target)
    quirk = softmax_weighted_loss(logits, target, eps=1e-8) + dice_loss(logits, target)
    assert float(validation_seg_loss(logits, label)) == pytest.approx(float(fixed), rel=1e-6)
    assert float(validation_seg_loss(logits, label, reference_quirks=True)) == pytest.approx(float(quirk), rel=1e-6)
    assert float(fixed) != pytest.approx(float(quirk))


def test_reference_quirks_loss_maps_the_rotation_fill_to_et() -> None:
    model = _tiny().train()
    label = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    label[:, :4] = -1  # outside the rotated cube
    batch = {"image": _input(), "label": label, "mask": torch.tensor([MASKS[3]])}
    with pytest.raises(ValueError, match="labels must lie"):
        UHVEDLoss()(model, batch, 0)
    torch.manual_seed(0)
    _, scalars = UHVEDLoss(reference_quirks=True)(model, batch, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        seg = model(batch["image"], batch["mask"]).seg
    target = one_hot(torch.where(label < 0, 3, label), 4)
    assert scalars["cross"] == pytest.approx(float(softmax_loss(seg, target)), rel=1e-5)


def test_validation_epoch_schedule() -> None:
    spec = [5, 10, 15, 20, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 90, 100, 110, 125, 150, 175, 200, 225, 250]
    spec += [260, 270, 275, 280, 285, 290, 295, 300]
    assert train_uhved.upstream_val_epochs(300) == spec
    assert train_uhved.upstream_val_epochs(400) == [*spec, 310, 320, 330, 340, 350, 360, 370, 380, 390, 400]
    assert train_uhved.upstream_val_epochs(425)[-3:] == [400, 410, 420]
    assert train_uhved.upstream_val_epochs(4) == []
    assert train_uhved.upstream_val_epochs(100)[-3:] == [75, 90, 100]


def test_script_flags_and_defaults() -> None:
    args = train_uhved.build_parser().parse_args(["--datapath", "d", "--savepath", "s"])
    assert (args.batch_size, args.lr, args.weight_decay, args.num_epochs, args.seed) == (1, 1e-3, 1e-5, 300, 999)
    assert (args.dataname, args.resume, args.debug, args.preset, args.reference_quirks) == (
        "BRATS2023",
        None,
        False,
        "paper",
        False,
    )
    args = test_uhved.build_parser().parse_args(["--datapath", "d", "--resume", "r.pth"])
    assert args.savepath == "eval" and args.scenarios == "all"
    with pytest.raises(SystemExit):
        test_uhved.build_parser().parse_args(["--datapath", "d"])  # --resume is required


def test_upstream_checkpoint_loads(tmp_path, paper_model: UHVED) -> None:
    state = {f"module.{k}": v for k, v in paper_model.state_dict().items()}
    torch.save({"epoch": 299, "state_dict": state, "val_Dice_best": 0.5}, tmp_path / "model_last.pth")
    assert test_uhved.infer_architecture(paper_model.state_dict()) == {"base_features": 8, "num_cls": 4}
    model, _ = model_from_checkpoint(tmp_path / "model_last.pth", "uhved", {}, test_uhved.infer_architecture)
    assert model.config == UHVEDConfig() and not model.training
    for k, v in paper_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_train_two_steps_then_test_15_scenarios(tmp_path) -> None:
    from brats_core.data import preprocessing, splits, synthetic
    from brats_core.utils.checkpoint import load_checkpoint

    raw, data, run, out = tmp_path / "raw", tmp_path / "data", tmp_path / "run", tmp_path / "eval"
    cases = synthetic.write_synthetic_dataset(raw, 10, shape=(48, 48, 40))
    assert preprocessing.main(["--input-path", str(raw), "--output-path", str(data), "--patch_size", "32"]) == 0
    splits.generate(cases).write(data / "splits")
    common = ["--datapath", str(data), "--workers", "0", "--device", "cpu", "--no_progress"]
    train_args = ["--savepath", str(run), "--preset", "tiny", "--num_epochs", "1", "--max_steps", "2"]
    # two steps make one epoch, so the (--debug: every-epoch) validation with its plateau loss runs too
    assert train_uhved.main([*common, *train_args, "--iter_per_epoch", "2", "--debug"]) == 0
    ckpt = load_checkpoint(run / "model_last.pth")
    assert ckpt["method"] == "uhved" and ckpt["config"]["patch_size"] == 32 and ckpt["global_step"] == 2
    assert math.isfinite(ckpt["scheduler"]["best"])  # ReduceLROnPlateau was stepped with the validation loss
    assert (run / "best.pth").is_file()
    assert test_uhved.main([*common, "--resume", str(run / "model_last.pth"), "--savepath", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows) == 16 and rows[-1]["scenario"] == "mean"
    assert [r["scenario"] for r in rows[:15]] == [s.name for s in SCENARIOS]
