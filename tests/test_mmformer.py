"""mmFormer: upstream state-dict parity and parameter count, the inter-modal token layout, forward/backward on 32³,
missing-modality invariance, encode-once/decode-many, the shared fused + separate + deep loss, and the scripts."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import MASKS, shared_path

from brats_core.data import splits
from brats_core.data.preprocessing import main as preprocess
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.modalities import SCENARIOS
from brats_core.nn.losses import FusedSeparateDeepLoss, dice_loss, one_hot, softmax_weighted_loss
from brats_core.registry import OutputKind, build_method, count_parameters, state_dict_listing
from brats_core.utils.checkpoint import load_checkpoint
from mmFormer import test as mmformer_test
from mmFormer import train as mmformer_train
from mmFormer.model import MMFormer, MMFormerConfig, meta_model


def _tiny(seed: int = 0) -> MMFormer:
    torch.manual_seed(seed)
    return build_method("mmformer", "tiny")  # type: ignore[return-value]


def _loss(loss_fn: FusedSeparateDeepLoss, outputs: tuple, label: torch.Tensor, epoch: int = 0):
    """Apply the loss (a ``training.LossFn``, which calls the model) to given outputs through a stub model."""
    return loss_fn(lambda image, mask: outputs, {"image": None, "mask": None, "label": label}, epoch)


def _assert_probabilities(p: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert p.shape == shape and torch.isfinite(p).all() and p.min() >= 0
    assert torch.allclose(p.sum(1), torch.ones(()), atol=1e-5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 synthetic cases preprocessed for 32³ patches: 3 train, 1 val (FLAIR + T1), 1 test."""
    root = tmp_path_factory.mktemp("mmformer")
    write_synthetic_dataset(root / "raw", 5, shape=(40, 40, 36), seed=4)
    assert preprocess(["--input-path", str(root / "raw"), "--output-path", str(root / "pre"), "--patch_size", "32",
                       "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    cases = sorted(p.name for p in (root / "raw").iterdir())
    split = splits.Split(cases[:3], [(cases[3], (True, False, True, False))], [(cases[4], MASKS[-1])])
    split.write(root / "pre" / "splits")
    return root / "pre"


# ----------------------------------------------------------------------------------------------- paper-size structure


def test_state_dict_matches_upstream_and_parameter_count():
    model = meta_model()
    assert all(p.is_meta for p in model.parameters())
    lines = state_dict_listing(model)
    assert lines == shared_path("spec", "state_dicts", "mmformer.txt").read_text().splitlines()
    # upstream's architecture
    assert count_parameters(model) == 36_391_760
    assert count_parameters(model.flair_encoder) == 1_473_216
    assert count_parameters(model.multimodal_transformer) == 5_250_048
    assert count_parameters(model.decoder_fuse) == 1_293_444
    assert count_parameters(model.decoder_sep) == 593_356
    assert count_parameters(model.multimodal_decode_conv) == 1_049_088
    assert model.flair_pos.numel() == 262_144


def test_architecture_inferred_from_upstream_weights():
    state = {f"module.{k}"[7:]: v for k, v in meta_model().state_dict().items()}
    assert mmformer_test.infer_architecture(state) == {
        "patch_size": 128, "transformer_dim": 512, "mlp_dim": 4096, "depth": 1, "basic_dims": 8, "num_cls": 4,
    }  # fmt: skip
    tiny = mmformer_test.infer_architecture(
        meta_model(MMFormerConfig(patch_size=64, basic_dims=4, depth=2)).state_dict()
    )
    assert tiny["patch_size"] == 64 and tiny["basic_dims"] == 4 and tiny["depth"] == 2


def test_registry_and_init():
    model = _tiny()
    assert model.output_kind is OutputKind.PROBABILITIES and model.supports_encode and model.patch_size == 32
    assert all(torch.count_nonzero(p) == 0 for p in (model.flair_pos, model.t2_pos))
    w = model.flair_encoder.e5_c2.conv.weight  # torch's default kaiming_normal_: gain √2, fan_in 32·27
    assert abs(w.std().item() - (2 / w[0].numel()) ** 0.5) < 0.1 * w.std().item()
    # upstream leaves the conv biases at PyTorch's default uniform init (IM-Fuse zeroes them)
    assert torch.count_nonzero(model.decoder_fuse.seg_layer.bias) > 0


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="multiple of 16"):
        MMFormerConfig(patch_size=40)
    model = _tiny().eval()
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 4, 16, 16, 16), mask)
    with pytest.raises(ValueError, match="bool mask"):
        model(torch.zeros(1, 4, 32, 32, 32), mask.float())


# ---------------------------------------------------------------------------------------------- forward and backward


def test_inter_transformer_sees_concatenated_modality_tokens_and_plain_reshape():
    model = _tiny().eval()
    seen = {}

    def record(module, args, output):
        seen["tokens"], seen["pos"] = args
        seen["out"] = output

    model.multimodal_transformer.register_forward_hook(record)
    model.multimodal_decode_conv.register_forward_hook(lambda m, a, o: seen.setdefault("grid", a[0]))
    x = torch.randn(1, 4, 32, 32, 32)
    mask = torch.tensor([[True, False, True, True]])
    with torch.no_grad():
        feats = model.encode(x)
        model.decode(feats, mask)
    n = 2**3  # (32/16)³ tokens per modality
    tokens = seen["tokens"]
    assert tokens.shape == (1, 4 * n, 64)
    # modality-major concatenation of row-major tokens; the absent T1ce block is zero
    assert torch.equal(tokens[0, :n], feats.intra[0, 0].flatten(1).T)
    assert torch.equal(tokens[0, n : 2 * n], torch.zeros(n, 64))
    assert torch.equal(seen["pos"], torch.cat([model.flair_pos, model.t1ce_pos, model.t1_pos, model.t2_pos], 1))
    # plain reshape (B, 4n, C) -> (B, s, s, s, 4C): grid position q (here (0, 0, 1), q = 1) holds tokens 4q..4q+3
    assert seen["grid"].shape == (1, 256, 2, 2, 2)
    assert torch.equal(seen["grid"][0, :, 0, 0, 1], seen["out"][0, 4:8].reshape(-1))


def test_forward_backward_tiny_all_modality_counts():
    model = _tiny().train()
    x = torch.randn(len(MASKS), 4, 32, 32, 32)
    mask = torch.tensor(MASKS)  # 1, 2, 3 and 4 modalities
    full = (len(MASKS), 4, 32, 32, 32)
    fused, separate, deep = model(x, mask)
    assert len(separate) == 4 and len(deep) == 4
    for p in (fused, *separate, *deep):
        _assert_probabilities(p, full)
    loss, _ = _loss(FusedSeparateDeepLoss(), (fused, separate, deep), torch.randint(0, 4, full[:1] + full[2:]))
    loss.backward()
    # mmFormer has no dead parameters: everything, every deep-supervision head included, gets a finite gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        _assert_probabilities(model(x, mask), full)


def test_missing_modality_content_does_not_change_eval_output():
    model = _tiny(1).eval()
    mask = torch.tensor(MASKS[:3])
    x = torch.randn(3, 4, 32, 32, 32)
    noisy = torch.where(mask[:, :, None, None, None], x, 5 * torch.randn_like(x) + 3)
    changed = torch.where(mask[:, :, None, None, None], noisy.flip(2), x)
    with torch.no_grad():
        ref, out, present_changed = model(x, mask), model(noisy, mask), model(changed, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(ref, present_changed, atol=1e-3)  # sanity: the present channels do matter


def test_encode_once_decode_all_scenarios_equals_forward():
    model = _tiny(2).eval()
    x = torch.randn(1, 4, 32, 32, 32)  # batch 1: oneDNN results differ slightly across batch sizes
    with torch.no_grad():
        feats = model.encode(x)
        for scenario in SCENARIOS:
            mask = scenario.tensor()
            torch.testing.assert_close(model.decode(feats, mask), model(x, mask), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------------- loss


def _wce(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Weighted CE written out: w_bc = 1 − Σ t_bc / Σ_c Σ t_bc; mean_{b,xyz} Σ_c −w t log(clamp(p, 0.005, 1))."""
    counts = t.sum(dim=(2, 3, 4))
    w = 1 - counts / counts.sum(1, keepdim=True)
    return (-(w[:, :, None, None, None] * t * p.clamp(0.005, 1).log()).sum(1)).mean()


def _dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Soft Dice written out: 1 − (1/C) Σ_c 2 Σ p_c t_c / (Σ p_c + Σ t_c + 1e-7), sums over batch and space."""
    per_class = [2 * (p[:, c] * t[:, c]).sum() / (p[:, c].sum() + t[:, c].sum() + 1e-7) for c in range(p.shape[1])]
    return 1 - torch.stack(per_class).mean()


def test_shared_loss_is_the_sum_of_the_rfnet_terms_by_hand():
    g = torch.Generator().manual_seed(5)
    maps = [torch.softmax(3 * torch.randn(2, 4, 3, 2, 2, generator=g, dtype=torch.float64), 1) for _ in range(9)]
    outputs = maps[0], tuple(maps[1:5]), tuple(maps[5:])
    label = torch.randint(0, 4, (2, 3, 2, 2), generator=g)
    t = torch.nn.functional.one_hot(label, 4).permute(0, 4, 1, 2, 3).double()
    terms = [_wce(p, t) + _dice(p, t) for p in maps]

    loss, parts = _loss(FusedSeparateDeepLoss(), outputs, label)
    torch.testing.assert_close(loss.double(), sum(terms), rtol=1e-5, atol=1e-6)
    assert parts["fuse"] == pytest.approx(terms[0].item(), rel=1e-5)
    assert parts["sep"] == pytest.approx(sum(terms[1:5]).item(), rel=1e-5)
    assert parts["prm"] == pytest.approx(sum(terms[5:]).item(), rel=1e-5)

    # the fused term counts from region_fusion_start_epoch (0-based) on
    late = FusedSeparateDeepLoss(region_fusion_start_epoch=2)
    torch.testing.assert_close(_loss(late, outputs, label, 1)[0].double(), sum(terms[1:]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_loss(late, outputs, label, 2)[0], loss)

    # upstream's −1 rotation fill: an error by default, the last class (ET) with reference quirks
    filled = label.clone()
    filled[0, 0] = -1
    with pytest.raises(ValueError, match="one_hot_upstream"):
        _loss(FusedSeparateDeepLoss(), outputs, filled)
    quirk, _ = _loss(FusedSeparateDeepLoss(reference_quirks=True), outputs, filled)
    as_et, _ = _loss(FusedSeparateDeepLoss(), outputs, filled.where(filled >= 0, 3))
    torch.testing.assert_close(quirk, as_et)


def test_shared_loss_on_model_outputs():
    model = _tiny(2).train()
    batch = {"image": torch.randn(2, 4, 32, 32, 32), "mask": torch.tensor(MASKS[:2]),
             "label": torch.randint(0, 4, (2, 32, 32, 32))}  # fmt: skip
    torch.manual_seed(3)  # same dropout draws in both passes
    loss, parts = FusedSeparateDeepLoss()(model, batch, epoch=0)
    torch.manual_seed(3)
    fused, sep, deep = model(batch["image"], batch["mask"])
    t = one_hot(batch["label"], 4)
    torch.testing.assert_close(loss, sum(softmax_weighted_loss(p, t) + dice_loss(p, t) for p in (fused, *sep, *deep)))
    assert parts["fuse"] > 0 and parts["sep"] > 0 and parts["prm"] > 0


# ---------------------------------------------------------------------------------------------------------- scripts


def test_upstream_flags_parse():
    args = mmformer_train.build_parser().parse_args(
        "--datapath d --num_epochs 1000 --dataname BRATS2023 --savepath s -batch_size 3 --lr 2e-4 "
        "--weight_decay 1e-4 --iter_per_epoch 150 --region_fusion_start_epoch 0 --seed 999 --debug --stop_epoch 5 "
        "--resume r --pretrain p --reference-quirks --preset tiny --patch_size 64 --val_every 10".split()
    )
    assert args.batch_size == 3 and args.stop_epoch == 5 and args.debug and args.reference_quirks
    assert args.lr == 2e-4 and args.weight_decay == 1e-4 and args.preset == "tiny" and args.val_every == 10
    defaults = mmformer_train.build_parser().parse_args(["--datapath", "d", "--savepath", "s"])
    assert (defaults.batch_size, defaults.lr, defaults.weight_decay, defaults.num_epochs) == (1, 2e-4, 1e-4, 1000)
    test_args = mmformer_test.build_parser().parse_args(["--datapath", "d", "--resume", "r"])
    assert test_args.savepath == "eval" and test_args.scenarios == "all"


def test_upstream_checkpoint_loads_and_evaluates(dataset, tmp_path):
    model = _tiny(4)
    upstream = {"epoch": 999, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optim_dict": {}}  # fmt: skip
    torch.save(upstream, tmp_path / "model_last.pth")
    out = tmp_path / "eval"
    assert mmformer_test.main(["--datapath", str(dataset), "--resume", str(tmp_path / "model_last.pth"), "--savepath",
                               str(out), "--scenarios", "t2,1111", "--device", "cpu", "--no_hd95",
                               "--no_progress"]) == 0  # fmt: skip
    with (out / "summary.csv").open() as f:
        assert [r["scenario"] for r in csv.DictReader(f)] == ["t2", "flair+t1ce+t1+t2", "mean"]


@pytest.mark.slow
def test_train_two_steps_then_test_all_scenarios(dataset, tmp_path):
    save = tmp_path / "run"
    common = ["--datapath", str(dataset), "--preset", "tiny", "--workers", "0", "--device", "cpu", "--no_progress"]
    assert mmformer_train.main([*common, "--savepath", str(save), "--dataname", "BRATS2023", "--batch_size", "1",
                                "--num_epochs", "3", "--iter_per_epoch", "2", "--stop_epoch", "1"]) == 0  # fmt: skip
    ckpt = load_checkpoint(save / "model_last.pth")
    assert ckpt["method"] == "mmformer" and ckpt["global_step"] == 2 and ckpt["next_epoch"] == 1
    assert ckpt["config"]["patch_size"] == 32
    assert not (save / "best.pth").exists()  # upstream never validates
    out = tmp_path / "test"
    assert mmformer_test.main(["--datapath", str(dataset), "--resume", str(save / "model_last.pth"), "--savepath",
                               str(out), "--device", "cpu", "--no_progress"]) == 0  # fmt: skip
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[-1]["scenario"] == "mean"
    with (out / "per_case_all.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 15  # 1 test case × 15 scenarios

    # --debug: upstream's one step per epoch, plus validation after every epoch (so best.pth exists)
    debug = tmp_path / "debug"
    assert mmformer_train.main([*common, "--savepath", str(debug), "--num_epochs", "2", "--debug"]) == 0
    ckpt = load_checkpoint(debug / "best.pth")
    assert load_checkpoint(debug / "model_last.pth")["global_step"] == 2 and ckpt["best_score"] >= 0


@pytest.mark.slow
def test_paper_size_eval_forward():
    torch.manual_seed(0)
    model = MMFormer().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 128, 128, 128), torch.tensor([[True, False, True, True]]))
    _assert_probabilities(out, (1, 4, 128, 128, 128))
