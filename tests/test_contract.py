"""The model contract, checked for every registered method at its tiny preset (new methods inherit these tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MASKS

from brats_core.apps.scripts import model_from_checkpoint
from brats_core.engine.inference import predict_scenarios
from brats_core.registry import METHOD_MODULES, OutputKind, build_from_config, build_method, config_dict, list_methods
from brats_core.utils.checkpoint import save_checkpoint

METHODS = list_methods()


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)] if isinstance(out, list | tuple) else []


@pytest.fixture(scope="module", params=METHODS)
def method(request):
    return request.param


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_method(name, "tiny")


def _input(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = model.patch_size
    return torch.randn(batch, 4, p, p, p, generator=g)


def _expected_channels(model):
    return len(model.region_order) if model.output_kind == OutputKind.REGION_LOGITS else model.config.num_cls


def test_methods_are_registered():
    assert METHODS[: len(METHOD_MODULES)] == list(METHOD_MODULES)


def test_a_method_module_that_fails_to_import_fails_the_contract_suite(tmp_path):
    # a plugin makes SFusion's model module unimportable, as a syntax error or a missing dependency would
    (tmp_path / "break_sfusion.py").write_text(
        "import sys\n\ndef pytest_configure(config):\n    sys.modules['SFusion.model'] = None\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "break_sfusion", str(Path(__file__))],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode != 0
    assert "cannot import SFusion.model" in done.stdout + done.stderr


def test_registry_refuses_duplicates_and_unknown_config_keys():
    from brats_core import registry

    info = registry.method_info("uhved")

    class Other(info.model_cls):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        registry.register("uhved", config=info.config_cls)(Other)
    assert registry.method_info("uhved").model_cls is info.model_cls
    config = config_dict(build_method("uhved", "tiny"))
    build_from_config("uhved", config)
    with pytest.raises(TypeError, match="unknown config field"):
        build_from_config("uhved", {**config, "no_such_field": 1})


def test_train_forward_backward(method):
    model = _model(method).train()
    x = _input(model, 2)
    loss = torch.zeros(())
    for m in MASKS:  # backward through every scenario's outputs, missing modalities included
        mask = torch.tensor([m, MASKS[-1]])
        outputs = _tensors(model(x, mask))
        assert outputs and all(torch.isfinite(t).all() for t in outputs)
        loss = loss + sum(t.float().mean() for t in outputs)
    loss.backward()
    # every parameter learns, except the dead ones a model declares (kept for upstream's state dicts); DDP's
    # find_unused_parameters follows the same declaration
    unused = set(model.unused_parameter_names())
    params = dict(model.named_parameters())
    assert unused <= set(params), sorted(unused - set(params))
    without = sorted(n for n, p in params.items() if p.requires_grad and p.grad is None and n not in unused)
    assert not without, f"{len(without)} parameters get no gradient: {without[:5]}"
    assert all(params[n].grad is None for n in unused), "a parameter declared unused got a gradient"
    for name, p in params.items():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_mask_dependent_parameters_declaration_is_exact(method):
    # DDP runs without its per-step search for unused parameters unless the model declares dead parameters or a
    # mask-dependent graph: a wrong "False" would stall multi-GPU training, a wrong "True" only slows it
    model = _model(method).train()
    declared = set(model.unused_parameter_names())
    x = _input(model, 1)
    gaps = []
    for m in MASKS:
        model.zero_grad(set_to_none=True)
        sum(t.float().mean() for t in _tensors(model(x, torch.tensor([m])))).backward()
        gaps += [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and n not in declared]
    assert bool(gaps) == model.mask_dependent_parameters, gaps[:3]


def test_eval_output_shape_and_kind(method):
    model = _model(method).eval()
    x = _input(model, len(MASKS))
    with torch.no_grad():
        out = model(x, torch.tensor(MASKS))
    p = model.patch_size
    assert out.shape == (len(MASKS), _expected_channels(model), p, p, p) and out.dtype == torch.float32
    if model.output_kind == OutputKind.PROBABILITIES:
        assert torch.allclose(out.sum(1), torch.ones(()), atol=1e-5) and out.min() >= 0


def test_missing_channel_content_is_ignored(method):
    model = _model(method).eval()
    if getattr(model, "missing_content_invariant", True) is not True:
        pytest.xfail(str(model.missing_content_invariant))
    x = _input(model, 1)
    for m in MASKS[:-1]:
        mask = torch.tensor([m])
        noisy = x.clone()
        absent = [i for i, on in enumerate(m) if not on]
        noisy[:, absent] = torch.randn_like(noisy[:, absent]) * 5
        with torch.no_grad():
            a, b = model(x, mask), model(noisy, mask)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{method}: mask {m}")


def test_scenarios_decoded_in_one_batch_match_one_at_a_time(method):
    # every method's decode (or forward) must take a different mask per sample: --scenario_batch relies on it
    model = _model(method).eval()
    x = _input(model, 1)
    one = predict_scenarios(model, x, MASKS)
    batched = predict_scenarios(model, x, MASKS, scenario_batch=len(MASKS))
    torch.testing.assert_close(batched, one, atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip(method, tmp_path):
    model = _model(method, seed=3).eval()
    save_checkpoint(tmp_path / "m.pth", model, method=method, config=config_dict(model))
    loaded, ckpt = model_from_checkpoint(tmp_path / "m.pth", method, {})
    assert ckpt["method"] == method and not loaded.training
    x = _input(model, 1)
    mask = torch.tensor([MASKS[1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask), model(x, mask), atol=0, rtol=0)
