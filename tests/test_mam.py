"""Missing-as-Masking: upstream state-dict parity and parameter counts, the token grid from the patch size, skip
masking and bottleneck reconstruction, the reconstruction loss, channel-order translation, the nnU-Net raw dataset
and plans entry, region → BraTS label conversion, the scripts' upstream flags, and (slow) nnU-Net planning,
preprocessing, two training iterations, resume, and prediction + scoring under two scenarios on CPU."""

from __future__ import annotations

import csv
import json
import math
import random

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import MASKS, shared_path

from brats_core.apps import predict
from brats_core.data.splits import Split
from brats_core.data.synthetic import write_synthetic_dataset
from brats_core.labels import regions_to_labels
from brats_core.modalities import SCENARIOS, from_canonical, parse_mam_bits, parse_mam_mask
from brats_core.registry import build_method, count_parameters, make_config, state_dict_listing
from MaM import prepare_dataset, test, train
from MaM.model import NATIVE_ORDER, MaMConfig, MaMOutput, MultimodalRecon, reconstruction_loss
from MaM.trained_model import load_nnunet_checkpoint
from MaM.trainer import ScenarioNetwork, native_masks, nnUNetTrainerMissingReconBaseline

PERM = [0, 2, 1, 3]  # canonical (FLAIR, T1ce, T1, T2) channel indices in MaM order (FLAIR, T1, T1ce, T2)


def _tiny(seed: int = 0) -> MultimodalRecon:
    torch.manual_seed(seed)
    return build_method("mam", "tiny")  # type: ignore[return-value]


def _input(batch: int = 1, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- paper-size structure


@pytest.fixture(scope="module")
def paper_meta() -> MultimodalRecon:
    with torch.device("meta"):
        return MultimodalRecon(MaMConfig())


def test_state_dict_matches_upstream(paper_meta: MultimodalRecon) -> None:
    assert state_dict_listing(paper_meta) == shared_path("spec", "state_dicts", "mam.txt").read_text().splitlines()


def test_parameter_counts_match_spec(paper_meta: MultimodalRecon) -> None:
    m = paper_meta
    assert count_parameters(m) == 67_358_767
    used = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("encoder."))
    assert used == 39_062_383
    assert count_parameters(m.modality_specific_encoders) == 7_080_864
    assert count_parameters(m.feature_reconstruction) == 165_120
    assert m.learned_bottleneck_tokens.numel() == 32_768
    assert count_parameters(m.encoder) == 28_296_384
    assert count_parameters(m.decoder) - count_parameters(m.encoder) == 31_783_631
    assert m.decoder.encoder is m.encoder  # the dead encoder is registered twice, as upstream


def test_paper_config_is_upstreams_plans_entry() -> None:
    c = MaMConfig()
    assert c.n_stages == 6 and c.grid == 4
    assert c.features_per_stage == [32, 64, 128, 256, 512, 512]
    assert c.modality_features == [8, 16, 32, 64, 128, 128]
    assert c.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5


def test_patch_size_drives_the_token_grid() -> None:
    tiny = make_config("mam", "tiny")
    assert (tiny.patch_size, tiny.n_stages, tiny.grid) == (32, 4, 4)
    with torch.device("meta"):
        m = MultimodalRecon(MaMConfig(patch_size=32, n_stages=3, base_features=16))
    c = 64 // 4  # per-modality bottleneck features
    assert tuple(m.learned_bottleneck_tokens.shape) == (4, c, 8, 8, 8)
    assert tuple(m.feature_reconstruction.pos_embedding.shape) == (1, 4 * 8**3, c)
    for bad in ({"patch_size": 48, "n_stages": 6}, {"patch_size": 8, "n_stages": 4}, {"base_features": 6}):
        with pytest.raises(ValueError):
            MaMConfig(**bad)


def test_arch_kwargs_round_trip() -> None:
    c = MaMConfig(patch_size=64, base_features=16, heads=2, dim_head=8, mlp_dim=32)
    assert MaMConfig.from_arch_kwargs(c.arch_kwargs(), [64, 64, 64], 3) == c
    capped = MaMConfig(patch_size=64, base_features=16, max_features=64)
    assert capped.features_per_stage == [16, 32, 64, 64, 64]
    assert MaMConfig.from_arch_kwargs(capped.arch_kwargs(), [64] * 3, 3) == capped
    with pytest.raises(ValueError, match="cubic"):
        MaMConfig.from_arch_kwargs(c.arch_kwargs(), [64, 64, 32], 3)


def test_initialisation() -> None:
    m = _tiny()
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    assert all(bool((mod.bias == 0).all()) for mod in convs)
    w = m.decoder.stages[0].convs[0].conv.weight.detach()  # Kaiming normal, a = 0.01: std √(2 / (1 + a²) / fan_in)
    fan_in = w.shape[1] * 27
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (1 + 1e-4) / fan_in), rel=0.05)
    tokens = torch.cat(
        [m.learned_bottleneck_tokens.flatten(), m.feature_reconstruction.pos_embedding.flatten()]
    ).detach()
    assert abs(float(tokens.mean())) < 0.05 and float(tokens.std()) == pytest.approx(1.0, rel=0.05)


# ----------------------------------------------------------------------------------------------- missing modalities


def test_skip_features_of_missing_modalities_are_zero_and_present_untouched() -> None:
    m = _tiny().eval()
    x = _input(2)
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])  # MaM order
    with torch.no_grad():
        feats = m.encode_native(x)
        skips, original = m.fuse(feats, mask)
    widths = m.config.modality_features
    for s, fused in enumerate(skips[:-1]):
        parts = fused.split(widths[s], dim=1)
        for mod in range(4):
            for b in range(2):
                if mask[b, mod]:
                    assert torch.equal(parts[mod][b], feats[mod][s][b])
                else:
                    assert bool((parts[mod][b] == 0).all())
                    assert bool((feats[mod][s][b] != 0).any())  # the encoder did produce features
    bottleneck = skips[-1].split(widths[-1], dim=1)
    for mod in range(4):
        for b in range(2):
            assert torch.equal(original[b, mod], feats[mod][-1][b])
            if mask[b, mod]:
                assert torch.equal(bottleneck[mod][b], feats[mod][-1][b])
            else:  # reconstructed by the transformer: neither the encoder's features nor the raw token
                assert not torch.allclose(bottleneck[mod][b], feats[mod][-1][b])
                assert not torch.allclose(bottleneck[mod][b], m.learned_bottleneck_tokens[mod])


def test_reconstruction_loss_zero_without_missing_and_positive_otherwise() -> None:
    m = _tiny().train()
    x = _input(2)
    full = torch.ones(2, 4, dtype=torch.bool)
    out = m(x, full, native=True)
    assert isinstance(out, MaMOutput)
    assert float(reconstruction_loss(out, full).detach()) == 0.0
    mask = torch.tensor([[True, False, True, False], [True, True, True, False]])
    out = m(x, mask, native=True)
    loss = reconstruction_loss(out, mask)
    assert float(loss.detach()) > 0
    # by hand: mean over the three (sample, missing modality) pairs of the MSE over (C, g, g, g)
    c = m.config.modality_features[-1]
    recon = out.fused.detach().reshape(2, 4, c, 4, 4, 4)
    pairs = [(0, 1), (0, 3), (1, 3)]
    expected = sum(float(((recon[b, k] - out.original[b, k]) ** 2).mean()) for b, k in pairs) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert m.learned_bottleneck_tokens.grad is not None and float(m.learned_bottleneck_tokens.grad.abs().sum()) > 0


def test_learned_tokens_unused_when_nothing_is_missing() -> None:
    m = _tiny().train()
    out = m(_input(1), torch.ones(1, 4, dtype=torch.bool))
    sum(o.float().mean() for o in out.seg).backward()
    assert float(m.learned_bottleneck_tokens.grad.abs().sum()) == 0.0
    assert all(p.grad is None for p in m.encoder.parameters())  # upstream's dead encoder


def test_canonical_and_native_orders_agree() -> None:
    m = _tiny().eval()
    x = _input(len(MASKS))
    mask = torch.tensor(MASKS)
    with torch.no_grad():
        a = m(x, mask)
        b = m(x[:, PERM], mask[:, PERM], native=True)
        c = m.decode(m.encode(x), mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    assert native_masks([(False, True, False, False)]).tolist() == [[False, False, True, False]]  # T1ce → index 2


def test_scenario_network_is_the_model_under_one_scenario() -> None:
    m = _tiny().eval()
    x = _input(1)
    wrapper = ScenarioNetwork(m)
    for s in (SCENARIOS[1], SCENARIOS[5], SCENARIOS[-1]):
        wrapper.set_mask(s.mask)
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x[:, PERM]), m(x, s.tensor()), atol=0, rtol=0)


def test_bad_inputs_are_rejected() -> None:
    m = _tiny().eval()
    with pytest.raises(ValueError, match="at least one"):
        m(_input(1), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token grid"):
        m(torch.randn(1, 4, 16, 16, 16), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        m(_input(2), torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- nnU-Net dataset


def _split(cases: list[str]) -> Split:
    return Split(cases[:1], [(cases[1], (True, False, True, False))], [(cases[2], (False, True, False, True))])


def test_prepare_dataset_writes_a_valid_nnunet_raw_dataset(tmp_path) -> None:
    cases = write_synthetic_dataset(tmp_path / "brats", 3, shape=(20, 20, 18), seed=3)
    out = prepare_dataset.convert_dataset(tmp_path / "brats", tmp_path / "raw", _split(cases))
    assert out == tmp_path / "raw" / "Dataset138_MaM"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}
    assert meta["labels"] == {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]}
    assert meta["regions_class_order"] == [2, 1, 3] and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert json.loads((out / "splits_final.json").read_text()) == [{"train": [cases[0]], "val": [cases[1]]}]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{cases[2]}_{k:04d}.nii.gz" for k in range(4)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases[:2]]
    suffix = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    for case, part in ((cases[0], "Tr"), (cases[2], "Ts")):
        for k, modality in enumerate(NATIVE_ORDER):
            src = nib.load(tmp_path / "brats" / case / f"{case}-{suffix[modality]}.nii.gz")
            dst = nib.load(out / f"images{part}" / f"{case}_{k:04d}.nii.gz")
            assert np.array_equal(src.get_fdata(), dst.get_fdata()) and np.allclose(src.affine, dst.affine)
        src = np.asarray(nib.load(tmp_path / "brats" / case / f"{case}-seg.nii.gz").dataobj)
        assert np.array_equal(np.asarray(nib.load(out / f"labels{part}" / f"{case}.nii.gz").dataobj), src)
    assert (out / "val15splits.csv").read_text().splitlines()[1] == f'{cases[1]},"[True, False, True, False]"'
    # re-running keeps the files (resumable) and a missing case folder is reported by name
    prepare_dataset.convert_dataset(tmp_path / "brats", tmp_path / "raw", _split(cases))
    with pytest.raises(FileNotFoundError, match="BraTS-SYN-00009-000"):
        prepare_dataset.convert_dataset(
            tmp_path / "brats", tmp_path / "raw", _split([*cases[:2], "BraTS-SYN-00009-000"])
        )


def test_plans_entry_inherits_3d_fullres(tmp_path) -> None:
    plans = {"configurations": {"3d_fullres": {"patch_size": [128, 128, 128], "batch_size": 2}}}
    entry = prepare_dataset.mam_configuration(plans, MaMConfig())
    assert entry["inherits_from"] == "3d_fullres" and entry["batch_size"] == 1
    assert entry["patch_size"] == [128, 128, 128] and entry["unet_max_num_features"] == 512
    arch = entry["architecture"]
    assert arch["network_class_name"] == "MaM.model.MultimodalRecon"
    assert arch["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256, 512, 512]
    assert MaMConfig.from_arch_kwargs(arch["arch_kwargs"], entry["patch_size"], 3) == MaMConfig()
    with pytest.raises(KeyError, match="3d_fullres"):
        prepare_dataset.mam_configuration({"configurations": {}}, MaMConfig())


def test_region_order_writes_brats_labels() -> None:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    upstream = {"labels": prepare_dataset.REGION_LABELS, "regions_class_order": [1, 2, 3]}
    fixed = prepare_dataset.with_brats_region_order(upstream)
    assert fixed["regions_class_order"] == [2, 1, 3] and upstream["regions_class_order"] == [1, 2, 3]
    lm = LabelManager(fixed["labels"], fixed["regions_class_order"])
    probs = torch.rand(3, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    seg = lm.convert_probabilities_to_segmentation(probs)
    assert np.array_equal(np.asarray(seg), regions_to_labels((probs > 0.5).numpy()))
    # by hand: WT only → ED (2), TC without ET → NCR (1), ET → 3
    hand = lm.convert_probabilities_to_segmentation(torch.tensor([[1.0, 1.0, 1.0, 0.0], [0, 1, 1, 0], [0, 0, 1, 0]]))
    assert np.asarray(hand).tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="regions"):
        prepare_dataset.with_brats_region_order({"labels": {"background": 0, "tumour": 1}})


# ----------------------------------------------------------------------------------------------- scripts


def test_upstream_flags_are_accepted(tmp_path, capsys) -> None:
    p = prepare_dataset.build_parser()
    a = p.parse_args(["--input-path", "in", "--output-path", "out"])
    b = p.parse_args(["--input-dir", "in", "--output-dir", "out"])
    assert (a.input_path, a.output_path) == (b.input_path, b.output_path) == ("in", "out")
    t = test.build_parser().parse_args(["--input-path", "ts", "--output-path", "o", "--checkpoint-path", "c.pth"])
    assert (t.input_path, t.output_path, t.checkpoint_path, t.tta, t.step_size) == ("ts", "o", "c.pth", False, 0.5)
    r = train.build_parser().parse_args(
        ["-tr", "nnUNetTrainerMissingReconBaseline", "138", "3d_fullres_multiencoder_recon", "0", "--c"]
    )
    assert (r.dataset_name_or_id, r.configuration, r.fold, r.c) == ("138", "3d_fullres_multiencoder_recon", "0", True)
    # -mask is MaM order (FLAIR, T1, T1ce, T2): 0,1,0,0 is T1, i.e. canonical (F, F, T, F)
    assert parse_mam_mask(["0,1,0,0"]) == parse_mam_mask(["0", "1", "0", "0"]) == (False, False, True, False)
    assert from_canonical(parse_mam_bits("0010"), NATIVE_ORDER) == (False, False, True, False)
    with pytest.raises(SystemExit):
        train.main(["-tr", "nnUNetTrainer"])
    # nnUNetv2_predict's flags on the test script: -mask (one scenario, MaM order), --disable_tta, -npp, -nps
    u = test.build_parser().parse_args(["-o", "o", "-mask", "1,0,1,0", "--disable_tta", "-npp", "3", "-nps", "3"])
    assert u.mask == ["1,0,1,0"] and u.disable_tta and not u.tta
    bad_flags = (
        (["-mask", "1,0,1,0", "--scenarios", "t1"], "not both"),
        (["--tta", "--disable_tta"], "contradict"),
        (["-mask", "0,0,0,0"], "at least one"),
    )
    for bad, reason in bad_flags:
        with pytest.raises(SystemExit):
            test.main(["-o", str(tmp_path / "o"), *bad])
        assert reason in capsys.readouterr().err


def test_trainer_schedule_defaults() -> None:
    t = nnUNetTrainerMissingReconBaseline.__new__(nnUNetTrainerMissingReconBaseline)
    t.num_epochs, t.validation_epochs = 500, None
    epochs = [e for e in range(500) if t.is_validation_epoch(e)]
    assert epochs[:3] == [20, 50, 70] and epochs[-1] == 499 and len(epochs) == 22
    t.num_epochs = 30
    assert [e for e in range(30) if t.is_validation_epoch(e)] == [20, 29]


def _stub_trainer(tmp_path, val_keys: list[str]) -> nnUNetTrainerMissingReconBaseline:
    """A trainer without nnU-Net's heavy initialisation, for the methods that only need a split and a CSV."""
    t = nnUNetTrainerMissingReconBaseline.__new__(nnUNetTrainerMissingReconBaseline)
    t._val_masks, t.val_csv, t.preprocessed_dataset_folder_base = None, None, str(tmp_path)
    t.do_split = lambda: ([], val_keys)  # type: ignore[method-assign]
    t.print_to_log_file = lambda *a, **k: None  # type: ignore[method-assign]
    return t


def test_validation_scenarios_come_from_the_canonical_csv(tmp_path) -> None:
    (tmp_path / "val15splits.csv").write_text(
        'case,mask\na,"[False, True, False, False]"\nb,"[True, True, True, True]"\n'
    )
    t = _stub_trainer(tmp_path, ["a", "b", "c", "d"])
    masks = t.validation_masks()
    assert masks["a"] == (False, True, False, False)  # T1ce only, canonical
    assert native_masks([masks["a"]]).tolist() == [[False, False, True, False]]  # T1ce is MaM channel 2
    assert masks["b"] == (True, True, True, True)
    # cases the CSV lacks cycle through the scenarios in the CSVs' order (0001, 0010, ...)
    assert masks["c"] == (False, False, False, True) and masks["d"] == (False, False, True, False)


def test_training_scenarios_are_uniform_over_the_15_subsets() -> None:
    from scipy import stats

    t = _stub_trainer(".", [])
    t.scenario_rng = random.Random(0)
    draws = [t.draw_scenario() for _ in range(15_000)]
    counts = [draws.count(s.mask) for s in SCENARIOS]
    assert sum(counts) == 15_000 and min(counts) > 0
    assert stats.chisquare(counts).pvalue > 0.001


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_nnunet_plan_train_resume_predict_score(tmp_path, monkeypatch) -> None:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "0")
    threads = torch.get_num_threads()
    cases = write_synthetic_dataset(tmp_path / "brats", 4, shape=(40, 40, 40), seed=0)
    Split(cases[:2], [(cases[2], (True, False, True, False))], [(cases[3], (True, True, True, True))]).write(
        tmp_path / "brats" / "splits"
    )
    try:
        prepare_args = ["--input-path", str(tmp_path / "brats"), "--output-path", str(tmp_path / "raw"), "--plan",
                        "--patch_size", "32", "--base_features", "16", "-np", "1"]  # fmt: skip
        assert prepare_dataset.main(prepare_args) == 0
        pre = tmp_path / "preprocessed" / "Dataset138_MaM"
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        assert plans["configurations"]["3d_fullres_multiencoder_recon"]["inherits_from"] == "3d_fullres"
        assert json.loads((pre / "splits_final.json").read_text())[0]["val"] == [cases[2]]
        common = ["138", "3d_fullres_multiencoder_recon", "0", "-device", "cpu", "--num_iterations_per_epoch", "2",
                  "--num_val_iterations_per_epoch", "1", "--seed", "0"]  # fmt: skip
        assert train.main([*common, "--num_epochs", "1"]) == 0
        fold = tmp_path / "results" / "Dataset138_MaM" / (
            "nnUNetTrainerMissingReconBaseline__nnUNetPlans__3d_fullres_multiencoder_recon"
        ) / "fold_0"  # fmt: skip
        for name in ("checkpoint_final.pth", "checkpoint_best.pth", "validation/summary.json"):
            assert (fold / name).is_file(), name
        first = load_nnunet_checkpoint(fold / "checkpoint_final.pth")  # weights-only, as train.py --c reads it
        assert first["current_epoch"] == 1 and first["trainer_name"] == "nnUNetTrainerMissingReconBaseline"
        assert train.main([*common, "--num_epochs", "2", "--c"]) == 0  # resume: one more epoch
        second = load_nnunet_checkpoint(fold / "checkpoint_final.pth")  # weights-only, as train.py --c reads it
        assert second["current_epoch"] == 2
        assert len(second["logging"]["train_losses"]) == 2 and math.isnan(second["logging"]["mean_fg_dice"][0]) is False
        key = "decoder.transpconvs.0.weight"  # always on the gradient path (seg_layers.0 has DS weight 0)
        assert not torch.equal(first["network_weights"][key], second["network_weights"][key])
        out = tmp_path / "pred"
        assert test.main(["--input-path", str(tmp_path / "raw" / "Dataset138_MaM" / "imagesTs"), "--output-path",
                          str(out), "--checkpoint-path", "checkpoint_final.pth", "-device", "cpu",
                          "--scenarios", "t1ce,flair+t1ce+t1+t2"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # upstream's folder names use MaM bits (FLAIR, T1, T1ce, T2): T1ce alone is 0010
    seg_files = [out / "prediction_0010" / f"{cases[3]}.nii.gz", out / "prediction_1111" / f"{cases[3]}.nii.gz"]
    gt = nib.load(tmp_path / "brats" / cases[3] / f"{cases[3]}-seg.nii.gz")
    for f in seg_files:
        seg = nib.load(f)
        assert seg.shape == gt.shape and np.allclose(seg.affine, gt.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
    # predict.py reads the nnU-Net checkpoint itself and writes the same label maps (case folder; a lone T1ce file)
    src = tmp_path / "brats" / cases[3]
    common = ["--checkpoint", str(fold / "checkpoint_final.pth"), "--device", "cpu", "--no_progress"]
    assert predict.main([*common, "-i", str(src), "-o", str(tmp_path / "p")]) == 0
    assert (
        predict.main([*common, "--t1ce", str(src / f"{cases[3]}-t1c.nii.gz"), "-o", str(tmp_path / "t1ce.nii.gz")]) == 0
    )
    for ours, theirs in (
        (tmp_path / "p" / f"{cases[3]}-seg.nii.gz", seg_files[1]),
        (tmp_path / "t1ce.nii.gz", seg_files[0]),
    ):
        assert np.array_equal(np.asarray(nib.load(ours).dataobj), np.asarray(nib.load(theirs).dataobj))
    # the same files under the evaluator's names (canonical bits: T1ce alone is 0100)
    for f, bits in zip(seg_files, ("0100", "1111"), strict=True):
        assert (out / "predictions" / f"{cases[3]}_{bits}.nii.gz").samefile(f)
    with open(out / "per_case_0100-1111.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["scenario"], r["bits"]) for r in rows] == [
        (cases[3], "t1ce", "0100"), (cases[3], "flair+t1ce+t1+t2", "1111"),
    ]  # fmt: skip
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("WT", "TC", "ET", "ETpp"))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["scenario"] for r in summary] == ["t1ce", "flair+t1ce+t1+t2", "mean"]
