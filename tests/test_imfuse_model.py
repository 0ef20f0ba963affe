"""IM-Fuse model: upstream state-dict parity, parameter counts, tokenisation layouts, forward/backward on 32³,
missing-modality invariance and the encode-once/decode-many path."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import shared_path

from brats_core.modalities import SCENARIOS
from brats_core.nn.fusion import MambaFusionBlock, read_fused_tokens, tokenize
from brats_core.registry import (
    OutputKind,
    build_method,
    count_parameters,
    make_config,
    state_dict_listing,
)
from IMFuse.model import IMFuse, IMFuseConfig, mamba_shapes, meta_model

FLAGS = list(itertools.product([False, True], repeat=2))  # (first_skip, mamba_skip)

# upstream's parameter counts: total, never-used, used in training; "used at inference" additionally drops decoder_sep.
COUNTS = {
    (False, True): (47_343_624, 2_958_848, 44_384_776, 43_791_420),
    (False, False): (64_137_984, 25_315_464, 38_822_520, 38_229_164),
    (True, True): (64_388_120, 3_221_504, 61_166_616, 60_573_260),
    (True, False): (64_404_440, 25_578_120, 38_826_320, 38_232_964),
}


def _upstream_lines(first_skip: bool, mamba_skip: bool) -> list[str]:
    name = f"imfuse_first_skip{int(first_skip)}_mamba_skip{int(mamba_skip)}.txt"
    return shared_path("spec", "state_dicts", name).read_text().splitlines()


def _lines(model: torch.nn.Module) -> list[str]:
    return state_dict_listing(model)


def _tiny(**overrides: object) -> IMFuse:
    torch.manual_seed(0)
    return build_method("imfuse", "tiny", **overrides)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- paper-size structure


@pytest.mark.parametrize(("first_skip", "mamba_skip"), FLAGS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_state_dict_keys_order_shapes_match_upstream(first_skip: bool, mamba_skip: bool, interleaved: bool) -> None:
    model = meta_model(first_skip=first_skip, mamba_skip=mamba_skip, interleaved_tokenization=interleaved)
    assert all(p.is_meta for p in model.parameters())
    assert _lines(model) == _upstream_lines(first_skip, mamba_skip)


@pytest.mark.parametrize(("first_skip", "mamba_skip"), FLAGS)
def test_parameter_counts_match_spec(first_skip: bool, mamba_skip: bool) -> None:
    model = meta_model(first_skip=first_skip, mamba_skip=mamba_skip)
    total, dead, training, inference = COUNTS[(first_skip, mamba_skip)]
    params = dict(model.named_parameters())
    n_dead = sum(params[n].numel() for n in model.unused_parameter_names())
    assert count_parameters(model) == total
    assert n_dead == dead
    assert total - n_dead == training
    assert total - n_dead - count_parameters(model.decoder_sep) == inference


DECODER_FUSE = {(False, True): 1_273_516, (False, False): 1_289_644, (True, True): 1_277_124, (True, False): 1_293_444}
# upstream's counts per MFB width C: fused tokens + Mamba layer
MFB = {
    8: 16_777_216 + 1_016,
    16: 4_194_304 + 3_696,
    32: 1_048_576 + 14_176,
    64: 262_144 + 55_488,
    512: 262_144 + 2_696_704,
}


@pytest.mark.parametrize(("first_skip", "mamba_skip"), FLAGS)
def test_building_block_counts_match_spec(first_skip: bool, mamba_skip: bool) -> None:
    model = meta_model(first_skip=first_skip, mamba_skip=mamba_skip)
    assert count_parameters(model.flair_encoder) == 1_473_216
    assert count_parameters(model.multimodal_transformer) == 5_250_048
    assert count_parameters(model.decoder_sep) == 593_356
    assert count_parameters(model.decoder_fuse) == DECODER_FUSE[(first_skip, mamba_skip)]
    assert count_parameters(model.multimodal_decode_conv) == 262_656
    assert model.flair_pos.numel() == 262_144
    for block in (model.mamba_fusion_layer, *model.mamba_fusion_layers):
        assert count_parameters(block) == MFB[block.fused_tokens.shape[2]]
    assert count_parameters(model.mamba_fusion_layers[-1].mamba_layer.mamba.mamba) == 2_432_000


def test_paper_config_token_tables_derive_from_patch_size() -> None:
    model = meta_model(first_skip=True)
    assert [tuple(m.fused_tokens.shape) for m in model.mamba_fusion_layers] == [
        (1, 128**3, 8), (1, 64**3, 16), (1, 32**3, 32), (1, 16**3, 64), (1, 8**3, 512)
    ]  # fmt: skip
    tiny = meta_model(make_config("imfuse", "tiny"), first_skip=True)
    assert tuple(tiny.flair_pos.shape) == (1, 2**3, 64)
    assert [tuple(m.fused_tokens.shape) for m in tiny.mamba_fusion_layers] == [
        (1, 32**3, 4), (1, 16**3, 8), (1, 8**3, 16), (1, 4**3, 32), (1, 2**3, 64)
    ]  # fmt: skip


@pytest.mark.parametrize("first_skip", [True, False])
def test_mamba_shapes_describe_the_built_blocks(first_skip: bool) -> None:
    cfg = make_config("imfuse", "paper", first_skip=first_skip, mamba_skip=True)
    model = meta_model(cfg)
    shapes = mamba_shapes(cfg)
    assert [s.name for s in shapes][-1] == "bottleneck 8³" and len(shapes) == len(model.mamba_fusion_layers)
    for shape, block in zip(shapes, model.mamba_fusion_layers, strict=True):
        mamba = block.mamba_layer.mamba.mamba  # MambaLayer → MambaTrans → Mamba
        assert (mamba.d_model, mamba.d_state) == (shape.d_model, shape.d_state)
        assert block.fused_tokens.shape[1] == shape.tokens and 5 * shape.tokens == shape.L
    assert (model.mamba_fusion_layer.mamba_layer.mamba.mamba.d_model, shapes[-1].level) == (512, 5)


def test_module_prefixed_checkpoint_loads_after_stripping() -> None:
    upstream_keys = [line.split(" ")[0] for line in _upstream_lines(False, True)]
    ckpt = {"module." + k: v for k, v in meta_model(mamba_skip=True).state_dict().items()}
    assert [k.removeprefix("module.") for k in ckpt] == upstream_keys
    source = _tiny(mamba_skip=True)
    torch.manual_seed(1)
    target = build_method("imfuse", "tiny", mamba_skip=True)
    prefixed = {"module." + k: v for k, v in source.state_dict().items()}
    target.load_state_dict({k.removeprefix("module."): v for k, v in prefixed.items()}, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_registry_and_init() -> None:
    model = _tiny()
    assert model.output_kind is OutputKind.PROBABILITIES and model.supports_encode and model.patch_size == 32
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    w = model.flair_encoder.e5_c2.conv.weight  # fan_in 64·27, Kaiming gain √(2 / (1 + 0.01²))
    assert abs(w.std().item() - (2 / (1 + 1e-4) / w[0].numel()) ** 0.5) < 0.1 * w.std().item()
    assert all(torch.count_nonzero(p) == 0 for p in (model.flair_pos, model.fused_pos))
    conv1d = model.mamba_fusion_layers[-1].mamba_layer.mamba.mamba.conv1d
    assert torch.count_nonzero(conv1d.bias) > 0  # Mamba's Conv1d keeps its own (PyTorch default) init


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        IMFuseConfig(patch_size=40)
    model = _tiny().eval()
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 4, 16, 16, 16), mask)
    with pytest.raises(ValueError, match="bool mask"):
        model(torch.zeros(1, 4, 32, 32, 32), mask.float())


# -------------------------------------------------------------------------------------------------------- tokenisation


def _handmade(b: int = 2, m: int = 4, n: int = 3, c: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    # value = 1000·modality + 10·position + channel (+ 0.5 for batch 1); the fused "modality" has index m
    idx = torch.arange(b)[:, None, None, None] * 0.5
    mod = torch.arange(m)[None, :, None, None] * 1000.0
    pos = torch.arange(n)[None, None, :, None] * 10.0
    ch = torch.arange(c)[None, None, None, :]
    modal = idx + mod + pos + ch
    fused = (idx + m * 1000.0 + pos + ch)[:, 0]
    return modal, fused


def test_plain_tokenisation_is_modality_major_and_reads_last_n() -> None:
    modal, fused = _handmade()
    seq = tokenize(modal, fused, interleaved=False)
    assert seq.shape == (2, 15, 2)
    assert seq[1, :, 0].tolist() == [1000.0 * k + 10 * p + 0.5 for k in range(5) for p in range(3)]
    assert torch.equal(read_fused_tokens(seq, 4, interleaved=False), fused)


def test_interleaved_tokenisation_places_five_tokens_per_position_and_reads_every_fifth_from_4() -> None:
    modal, fused = _handmade()
    seq = tokenize(modal, fused, interleaved=True)
    assert seq.shape == (2, 15, 2)
    assert seq[0, :, 1].tolist() == [1000.0 * k + 10 * p + 1 for p in range(3) for k in range(5)]
    assert torch.equal(seq[:, 4::5], fused)
    assert torch.equal(read_fused_tokens(seq, 4, interleaved=True), fused)


def test_mfb_runs_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    block = MambaFusionBlock(8, 4**3, interleaved=True)
    maps = torch.randn(2, 4, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(maps.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="MFB expects"):
        block(torch.randn(2, 4, 8, 2, 2, 2))


# ---------------------------------------------------------------------------------------------- forward and backward


def _assert_probabilities(p: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert p.shape == shape and torch.isfinite(p).all()
    assert torch.allclose(p.sum(1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize(("first_skip", "mamba_skip", "interleaved"), list(itertools.product([False, True], repeat=3)))
def test_forward_backward_tiny(first_skip: bool, mamba_skip: bool, interleaved: bool) -> None:
    model = _tiny(first_skip=first_skip, mamba_skip=mamba_skip, interleaved_tokenization=interleaved)
    x = torch.randn(2, 4, 32, 32, 32)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    target = torch.randint(0, 4, (2, 32, 32, 32))
    full = (2, 4, 32, 32, 32)

    model.train()
    fused, separate, deep = model(x, mask)
    assert len(separate) == 4 and len(deep) == 4
    for p in (fused, *separate, *deep):
        _assert_probabilities(p, full)
    loss = sum(torch.nn.functional.nll_loss(p.clamp_min(5e-3).log(), target) for p in (fused, *separate, *deep))
    loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == set(model.unused_parameter_names())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with torch.no_grad():
        _assert_probabilities(model(x, mask), full)


@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True)])
def test_missing_modality_content_does_not_change_eval_output(flags: tuple[bool, bool, bool]) -> None:
    first_skip, mamba_skip, interleaved = flags
    model = _tiny(first_skip=first_skip, mamba_skip=mamba_skip, interleaved_tokenization=interleaved).eval()
    mask = torch.tensor([[False, False, True, False], [True, False, False, True], [True, True, False, True]])
    x = torch.randn(3, 4, 32, 32, 32)
    scrambled = torch.where(mask[:, :, None, None, None], x, 5 * torch.randn_like(x) + 3)
    with torch.no_grad():
        ref, out = model(x, mask), model(scrambled, mask)
        present_changed = model(torch.where(mask[:, :, None, None, None], scrambled.flip(2), x), mask)
    assert torch.allclose(ref, out, atol=1e-6, rtol=0)
    assert not torch.allclose(ref, present_changed, atol=1e-3)  # sanity: the present channels do matter


def test_encode_once_decode_all_scenarios_equals_forward() -> None:
    model = _tiny(mamba_skip=True, interleaved_tokenization=True).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        features = model.encode(x)
        for scenario in SCENARIOS:
            mask = scenario.tensor()
            assert torch.allclose(model.decode(features, mask), model(x, mask), atol=1e-6, rtol=0), scenario.name


@pytest.mark.slow
def test_paper_size_eval_forward() -> None:
    torch.manual_seed(0)
    model = IMFuse(IMFuseConfig(mamba_skip=True, interleaved_tokenization=True)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 128, 128, 128), torch.tensor([[True, False, True, True]]))
    _assert_probabilities(out, (1, 4, 128, 128, 128))
