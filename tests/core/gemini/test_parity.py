"""Gemini-offloaded training against plain PyTorch AdamW: moving data must not change the numbers."""

import pytest
import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from tests.core.gemini.models import TinyNet, batches, lm_loss, train_engine, train_reference, twin
from tests.tolerance import approx

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)


def _max_param_diff(engine, reference) -> float:
    state = engine.state_dict()
    return max((state[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters())


@pytest.mark.parametrize(("param_host", "optim_host"), [(0.0, 0.0), (0.5, 0.25), (1.0, 1.0)])
def test_static_fp32_matches_adamw(param_host, optim_host):
    model = TinyNet()
    reference = twin(model)
    data = batches(5)
    cfg = GeminiConfig(placement="static", precision="fp32", param_host_fraction=param_host, optim_host_fraction=optim_host)
    engine = gemini(model, cfg, OPTIM)
    assert engine.stats()["num_chunks"] >= cfg.min_num_chunks  # a tiny model is still chunked
    expected = train_reference(reference, data)
    got = train_engine(engine, data)
    assert got == approx(expected)
    assert _max_param_diff(engine, reference) < 1e-6
    host_chunks = sum(not c.shard_on_device for c in engine.chunks)
    assert (host_chunks > 0) == (param_host > 0)
    assert engine.manager.device_bytes == engine.manager.recount()


def _budget_for(model) -> int:
    params = sum(p.numel() for p in model.parameters())
    return int(params * 4 * 1.2)  # fp32 weights plus a little: optimizer state cannot all stay


@pytest.mark.parametrize("recompute", ["", "nonreentrant", "reentrant"])
def test_auto_fp32_under_budget_matches_adamw(recompute):
    model = TinyNet(recompute=recompute)
    reference = twin(model)
    data = batches(5)
    budget = _budget_for(model)
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=budget), OPTIM)
    expected = train_reference(reference, data)
    got = train_engine(engine, data)
    assert got == approx(expected)
    assert _max_param_diff(engine, reference) < 1e-6
    stats = engine.stats()
    assert stats["evictions"] > 0  # the budget forced chunks off the device
    assert stats["peak_bytes"] <= budget
    assert engine.manager.device_bytes == engine.manager.recount()  # the running account is honest
    assert engine.manager.tracer.ready and len(engine.manager.tracer.modules) > 0


def test_budget_too_small_is_a_clear_error():
    from ferryman.core.errors import UserError

    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=64), OPTIM)
    ids, tgt = batches(1)[0]
    with pytest.raises(UserError, match="device_budget_bytes"):
        engine.backward(lm_loss(engine(ids), tgt))


def test_grad_accumulation_and_clipping_match():
    model = TinyNet()
    reference = twin(model)
    data = batches(6)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5), optim)
    expected = train_reference(reference, data, max_norm=0.5, accum=3)
    got = train_engine(engine, data, accum=3)
    assert got == approx(expected)
    assert _max_param_diff(engine, reference) < 1e-6


def test_frozen_and_gradless_parameters():
    model = TinyNet()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    reference = twin(model)
    unused_before = model.unused.weight.detach().clone()
    frozen_before = model.blocks[0].up.weight.detach().clone()
    data = batches(4)
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32"), OPTIM)
    assert any(not c.trainable for c in engine.chunks)
    expected = train_reference(reference, data)
    got = train_engine(engine, data)
    assert got == approx(expected)
    state = engine.state_dict()
    assert torch.equal(state["unused.weight"], unused_before)  # no gradient: untouched, no decay
    assert torch.equal(state["blocks.0.up.weight"], frozen_before)
    assert _max_param_diff(engine, reference) < 1e-6


@pytest.mark.parametrize(("precision", "tol"), [("bf16", 3e-2), ("fp16", 5e-3)])
def test_mixed_precision_close_to_fp32(precision, tol):
    """Stated tolerance: relative loss difference over 5 steps (bf16 has 8 mantissa bits, fp16 11)."""
    model = TinyNet()
    reference = twin(model)
    data = batches(5)
    # a modest fixed scale: with the default 2**16 the first steps overflow and are skipped
    cfg = GeminiConfig(placement="auto", precision=precision, initial_loss_scale=2.0**8)
    engine = gemini(model, cfg, OPTIM)
    expected = train_reference(reference, data)
    got = train_engine(engine, data)
    assert engine.scaler.scale == (2.0**8 if precision == "fp16" else 1.0)  # no step was skipped
    assert got == pytest.approx(expected, rel=tol)
    assert all(p.dtype == engine.dtype for p in model.parameters())
    assert engine.state_dict()["norm.weight"].dtype == torch.float32  # masters stay fp32


def test_fp16_overflow_skips_step_and_halves_scale():
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="static", precision="fp16"), OPTIM)
    before = engine.state_dict()
    ids, tgt = batches(1)[0]
    engine.backward(lm_loss(engine(ids), tgt) * 1e30)  # inf gradients at any scale
    scale = engine.scaler.scale
    result = engine.step()
    engine.zero_grad()
    assert result["skipped"] == 1.0
    assert engine.scaler.scale == scale / 2
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    engine.backward(lm_loss(engine(ids), tgt))  # the next, finite step goes through
    assert engine.step()["skipped"] == 0.0
