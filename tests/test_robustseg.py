"""RobustSeg: upstream state-dict parity and parameter counts (paper size, meta device), the shared RMBTS
reconstruction and KL losses on hand-made tensors, forward/backward on 32³, missing-modality invariance and the
inference-dropout quirk, the scripts' flags, and (slow) a two-step train + 15-scenario test through the scripts."""

from __future__ import annotations

import csv
import math
import shlex

import pytest
import torch
from conftest import MASKS, shared_path

from brats_core.apps.scripts import select_val_epochs
from brats_core.data import splits
from brats_core.data.preprocessing import main as preprocess
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.nn.losses import kl_divergence, reconstruction_l1
from brats_core.registry import (
    OutputKind,
    build_from_config,
    build_method,
    config_dict,
    count_parameters,
    state_dict_listing,
)
from brats_core.utils.checkpoint import load_checkpoint
from RobustSeg import test_robustseg, train_robustseg
from RobustSeg.model import RobustSeg, meta_model


def _tiny(seed: int = 0) -> RobustSeg:
    torch.manual_seed(seed)
    return build_method("robustseg", "tiny")  # type: ignore[return-value]


def _input(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- paper-size structure


def test_state_dict_keys_order_shapes_match_upstream() -> None:
    model = meta_model()
    lines = state_dict_listing(model)
    assert lines == shared_path("spec", "state_dicts", "robustseg.txt").read_text().splitlines()


def test_parameter_counts_match_spec() -> None:
    model = meta_model()
    assert count_parameters(model) == 42_136_376
    assert count_parameters(model.se_flair) == 2_765_000
    assert count_parameters(model.ce_t1c) == 1_466_496
    assert count_parameters(model.image_de_t2) == 6_108_257
    assert [count_parameters(getattr(model, f"att_c{s}")) for s in range(1, 5)] == [6_916, 13_828, 27_652, 55_300]
    assert [count_parameters(getattr(model, f"fusion_c{s}")) for s in range(1, 5)] == [1_040, 4_128, 16_448, 65_664]
    assert count_parameters(model.mask_de) == 586_388


def test_patch_size_drives_the_layer_norm_shapes() -> None:
    sides = {p: [meta_model(patch_size=p).image_de_flair.get_submodule(f"layer_norm_{i}").weight.shape
                 for i in (1, 2, 3)] for p in (80, 32)}  # fmt: skip
    assert sides[80] == [(20, 20, 20), (40, 40, 40), (80, 80, 80)]
    assert sides[32] == [(8, 8, 8), (16, 16, 16), (32, 32, 32)]
    with pytest.raises(ValueError, match="multiple of 8"):
        meta_model(patch_size=36)


def test_upstream_architecture_is_inferred_from_weights() -> None:
    assert test_robustseg.infer_architecture(meta_model().state_dict()) == {
        "patch_size": 80, "num_cls": 4, "basic_dims": 16, "style_dims": 32, "style_code": 8,
    }  # fmt: skip
    tiny = test_robustseg.infer_architecture(_tiny().state_dict())
    assert tiny["patch_size"] == 32 and tiny["basic_dims"] == 4 and tiny["style_dims"] == 8


# ------------------------------------------------------------------------------------------------------------ losses


def test_reconstruction_l1_by_hand() -> None:
    image = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]).reshape(2, 2, 1, 1, 2)
    recon = torch.tensor([[[0.0, 2.0], [0.5, 1.0]], [[1.0, 1.0], [1.0, -2.0]]]).reshape(2, 2, 1, 1, 2)
    # modality 0: |1-0|, |2-2|, |3-1|, |0-1| → mean 1.0; modality 1: |0-0.5|, |-1-1|, |1-1|, |1+2| → mean 1.375
    assert reconstruction_l1(image, recon).item() == pytest.approx(2.375)
    with pytest.raises(ValueError, match="differ"):
        reconstruction_l1(image, recon[:, :1])


def test_kl_divergence_by_hand_with_clamp() -> None:
    # (B=1, M=2 modalities, C=2 channels); modality 1 has log σ² = −60 and +60, both clamped to ±50
    mu = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    sigma = torch.tensor([[[1.0, 2.0], [math.exp(-30.0), math.exp(30.0)]]])

    def term(m: float, logvar: float) -> float:
        return 0.5 * (m**2 + math.exp(logvar) - 1.0 - logvar)

    modality0 = (term(1.0, 0.0) + term(0.0, math.log(4.0))) / 2
    modality1 = (term(0.5, -50.0) + term(2.0, 50.0)) / 2
    assert kl_divergence(mu, sigma).item() == pytest.approx(modality0 + modality1, rel=1e-6)
    assert kl_divergence(torch.zeros(3, 4, 5), torch.ones(3, 4, 5)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(B, M, C\)"):
        kl_divergence(mu[0], sigma[0])


# ------------------------------------------------------------------------------------------------- tiny forward/back


def test_train_and_eval_forward_backward_all_modality_counts() -> None:
    model = _tiny().train()
    x, mask = _input(len(MASKS)), torch.tensor(MASKS)
    out = model(x, mask)
    assert out["seg"].shape == out["logits"].shape == out["reconstruction"].shape == (4, 4, 32, 32, 32)
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
        # the encode-once / decode-per-mask path of the evaluator gives the same output
        torch.testing.assert_close(model.decode(model.encode(x), mask), probs, rtol=0, atol=0)


def test_missing_channels_do_not_change_the_output() -> None:
    model = _tiny().eval()
    assert model.missing_content_invariant is True
    x, mask = _input(3), torch.tensor(MASKS[:3])
    noisy = x.clone()
    for b, m in enumerate(MASKS[:3]):
        for c, on in enumerate(m):
            if not on:
                noisy[b, c] = torch.randn(32, 32, 32) * 5
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, mask), model(x, mask), rtol=0, atol=0)


def test_inference_dropout_quirk_makes_eval_stochastic() -> None:
    model = _tiny().eval()
    x, mask = _input(1), torch.tensor(MASKS[-1:])
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), model(x, mask), rtol=0, atol=0)
        model.set_inference_dropout(True)
        assert model.config.inference_dropout and isinstance(model.missing_content_invariant, str)
        assert not torch.equal(model(x, mask), model(x, mask))
    assert build_method("robustseg", "tiny", inference_dropout=True).missing_content_invariant is not True
    # a checkpoint trained with --reference-quirks records the flag; a rebuilt model (predict.py) starts without it
    saved = config_dict(build_method("robustseg", "tiny", inference_dropout=True))
    assert saved["inference_dropout"] and not build_from_config("robustseg", saved).config.inference_dropout


def test_bad_inputs_are_rejected() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="at least one available modality"):
        model(_input(1), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(1, 4\)"):
        model(_input(1), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="32³"):
        model.train().check_spatial((40, 40, 40))
    model.eval().check_spatial((40, 48, 40))  # eval windows: any multiple of 8
    with pytest.raises(ValueError, match="multiples of 8"):
        model.check_spatial((36, 40, 40))


# ----------------------------------------------------------------------------------------------------------- scripts


def test_upstream_flags_and_validation_epochs() -> None:
    args = train_robustseg.build_parser().parse_args(
        shlex.split(
            "--datapath d --num_epochs 300 --dataname BRATS2023 --savepath s --batch_size 1 -batch_size 1 --lr 1e-4 "
            "--weight_decay 1e-4 --drop_rate_value 0.0 --seed 999 --scale 8 --debug --resume r"
        )
    )
    assert args.num_epochs == 300 and args.lr == 1e-4 and args.debug and args.resume == "r"
    defaults = train_robustseg.build_parser().parse_args(["--datapath", "d", "--savepath", "s"])
    assert (defaults.num_epochs, defaults.batch_size, defaults.weight_decay, defaults.seed) == (300, 1, 1e-4, 999)
    epochs = select_val_epochs(train_robustseg.UPSTREAM_VAL_EPOCHS, 300)
    assert epochs[:9] == [10, 15, 20, 25, 30, 40, 50, 60, 70] and 80 not in epochs and epochs[-1] == 300
    assert select_val_epochs(train_robustseg.UPSTREAM_VAL_EPOCHS, 320)[-2:] == [310, 320]
    assert select_val_epochs(train_robustseg.UPSTREAM_VAL_EPOCHS, 3, debug=True) == [1, 2, 3]
    assert select_val_epochs(train_robustseg.UPSTREAM_VAL_EPOCHS, 7, val_every=3) == [3, 6]
    test_args = test_robustseg.build_parser().parse_args(["--datapath", "d", "--resume", "r"])
    assert test_args.savepath == "eval" and test_args.scenarios == "all"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustseg")
    write_synthetic_dataset(root / "raw", 4, shape=(40, 40, 36), seed=5)
    assert preprocess(["--input-path", str(root / "raw"), "--output-path", str(root / "pre"), "--patch_size", "32",
                       "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    cases = sorted(p.name for p in (root / "raw").iterdir())
    split = splits.Split(cases[:2], [(cases[2], (True, False, True, False))], [(cases[3], (True, True, True, True))])
    split.write(root / "pre" / "splits")
    return root / "pre"


@pytest.mark.slow
def test_train_two_steps_then_test_all_scenarios(dataset, tmp_path) -> None:
    save = tmp_path / "run"
    assert train_robustseg.main(["--datapath", str(dataset), "--dataname", "BRATS2023", "--savepath", str(save),
                                 "--preset", "tiny", "--num_epochs", "1", "--max_steps", "2", "--batch_size", "1",
                                 "--workers", "0", "--device", "cpu", "--no_progress"]) == 0  # fmt: skip
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["method"] == "robustseg" and ckpt["global_step"] == 2 and ckpt["config"]["patch_size"] == 32
    out = tmp_path / "test"
    assert (
        test_robustseg.main(
            [
                "--datapath",
                str(dataset),
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
    # an upstream checkpoint (DataParallel keys, no config) evaluates with the architecture read from its weights
    upstream = {"epoch": 0, "state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}
    torch.save(upstream, tmp_path / "best.pth")
    assert test_robustseg.main(["--datapath", str(dataset), "--resume", str(tmp_path / "best.pth"), "--savepath",
                                str(tmp_path / "up"), "--scenarios", "flair", "--device", "cpu", "--no_hd95",
                                "--no_progress", "--reference-quirks"]) == 0  # fmt: skip
