"""Gemini by value, for behaviour a review found untested: a one-rank model keeps its parameters
on the device between steps (nothing refetched, nothing released), reloading weights after the
warm-up keeps the memory plan's clock, reductions left in flight count in the budget, and an fp32
forward enters no autocast (which warns on CPU)."""

import warnings

import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini import optim as gemini_optim
from ferryman.core.parallel import init_parallel
from tests.core.gemini.models import TinyNet, batches, lm_loss, twin
from tests.core.gemini.test_last_survivors_values import _spare
from tests.threaded import run_threaded

OPTIM = OptimConfig(lr=1e-2)


def _train(engine, steps):
    for ids, tgt in batches(steps):
        engine.backward(lm_loss(engine(ids), tgt))
        engine.step()


def test_one_rank_without_a_budget_keeps_every_parameter_in_place_between_steps():
    for placement in ("static", "auto"):
        model = TinyNet()
        engine = gemini(model, GeminiConfig(placement=placement, precision="fp32"), OPTIM)
        _train(engine, 3)
        assert engine.stats()["fetches"] == 0, placement
        state = engine.state_dict()
        for name, p in model.named_parameters():  # the module's own tensors hold the trained values
            assert torch.equal(p.detach(), state[name]), (placement, name)


def test_reloading_weights_after_a_warm_up_without_evictions_changes_nothing_after():
    """A budget at which the warm-up step evicts nothing but later steps do: reloading the same
    weights then rebuilds the chunks in the state they were in, so the next steps evict and peak
    exactly as without the reload (the rebuilt manager's plan clock starts where a step starts)."""
    model = TinyNet()
    cfg = GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=30000)
    plain, reloaded = gemini(model, cfg, OPTIM), gemini(twin(model), cfg, OPTIM)
    warm_up, *later = batches(3)
    stats = []
    for engine in (plain, reloaded):
        engine.backward(lm_loss(engine(warm_up[0]), warm_up[1]))
        engine.step()
        assert engine.stats()["evictions"] == 0
        if engine is reloaded:
            engine.load_state_dict(engine.state_dict())
        for ids, tgt in later:
            engine.backward(lm_loss(engine(ids), tgt))
            engine.step()
        stats.append((engine.stats()["evictions"], engine.stats()["peak_bytes"]))
    assert stats[0][0] > 0 and stats[1] == stats[0]


def _in_flight_ranks(rank: int, world: int):
    dims = init_parallel()
    model, cfg = _spare()
    engine = gemini(model, cfg, OptimConfig(lr=1e-2, weight_decay=0.0, max_grad_norm=0.0), dims)
    engine.backward(engine(torch.ones(2, 16)).sum())
    engine.step()
    return engine.stats()["peak_bytes"], engine.state_dict()


def test_reductions_left_in_flight_count_in_the_budget(monkeypatch):
    """Two ranks: with reductions left running behind backward (the default), their full
    gradient buffers and reduce-scatter outputs are held at once, so the peak is higher by at least
    one chunk's buffer than when each is waited for at once; the weights are the same."""
    overlapped = run_threaded(_in_flight_ranks, 2, timeout_s=60)
    monkeypatch.setattr(gemini_optim.GradReducer, "max_in_flight", 0)
    waited = run_threaded(_in_flight_ranks, 2, timeout_s=60)
    for (peak, state), (peak_waited, state_waited) in zip(overlapped, waited):
        assert peak - peak_waited >= 256 * 4  # one 256-element fp32 chunk's gradient buffer
        assert state.keys() == state_waited.keys()
        assert all(torch.equal(state[k], state_waited[k]) for k in state)


def test_an_fp32_forward_enters_no_autocast():
    engine = gemini(TinyNet(), GeminiConfig(placement="static", precision="fp32"), OPTIM)
    ids, tgt = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU autocast warns that it cannot lower to float32
        loss = lm_loss(engine(ids), tgt)
    assert loss.dtype == torch.float32
