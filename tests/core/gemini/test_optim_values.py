"""core/gemini/optim.py and adam.py by value: the loss scaler's floor, the gradient norm and the
clipping against torch's, the step's report, the engine's counters, and the pieces of a shard
that an AdamW step updates."""

import math

import pytest
import torch
from torch import nn

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.adam import local_slice, shard_pieces
from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.host_adam import Piece
from ferryman.core.gemini.layout import ChunkSpec, Slot
from ferryman.core.gemini.optim import LossScaler, _squared_norm, all_reduce_small
from tests.core.gemini.models import TinyNet, batches, lm_loss, reference_optimizer, twin


def test_the_loss_scale_halves_down_to_its_floor_and_is_one_without_fp16():
    scaler = LossScaler(GeminiConfig(precision="fp16", initial_loss_scale=8.0, min_loss_scale=2.0,
                                     loss_scale_growth_interval=2))
    assert (scaler.enabled, scaler.scale, scaler.growth_interval, scaler.min_scale) == (True, 8.0, 2, 2.0)
    scaler.update(overflow=False)
    scaler.update(overflow=True)  # a calm run is broken by an overflow
    assert (scaler.scale, scaler.calm_steps) == (4.0, 0)
    scaler.update(overflow=True)
    scaler.update(overflow=True)
    assert scaler.scale == 2.0
    scaler.update(overflow=False)
    scaler.update(overflow=False)
    assert (scaler.scale, scaler.calm_steps) == (4.0, 0)
    off = LossScaler(GeminiConfig(precision="bf16", initial_loss_scale=8.0))
    assert (off.enabled, off.scale) == (False, 1.0)
    off.update(overflow=True)
    off.update(overflow=False)
    assert (off.scale, off.calm_steps) == (1.0, 0)


def test_squared_norm_and_the_one_rank_all_reduce():
    total = _squared_norm([torch.tensor([3.0, 4.0]), torch.tensor([12.0]), torch.tensor([])])
    assert total.dtype == torch.float64 and total.item() == 169.0
    assert _squared_norm([]).item() == 0.0
    t = torch.tensor([1, 2])
    assert all_reduce_small(t, None, torch.device("cpu")) is t


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e3])
def test_the_step_reports_torchs_norm_and_clips_as_torch_does(max_norm):
    torch.manual_seed(0)
    model = TinyNet()
    reference = twin(model)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32"), optim)
    opt = reference_optimizer(reference, optim.lr, optim.weight_decay)
    for ids, tgt in batches(3):
        engine.backward(lm_loss(engine(ids), tgt))
        result = engine.step()
        engine.zero_grad()
        lm_loss(reference(ids), tgt).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm if max_norm > 0 else math.inf)
        opt.step()
        opt.zero_grad()
        assert set(result) == {"grad_norm", "skipped", "loss_scale"}
        assert result["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
        assert (result["skipped"], result["loss_scale"]) == (0.0, 1.0)
    state = engine.state_dict()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=2e-6)


def test_engine_counters():
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32"), OptimConfig(lr=1e-2))
    stats = engine.stats()
    assert set(stats) == {"device_bytes", "peak_bytes", "budget_bytes", "evictions", "fetches", "gathers",
                          "chunks_on_device", "num_chunks", "overlapped_reductions", "late_reductions", "loss_scale"}
    assert stats["budget_bytes"] == math.inf and stats["num_chunks"] == len(engine.chunks)
    assert stats["chunks_on_device"] == len(engine.chunks)  # no budget: everything stays
    assert (stats["evictions"], stats["fetches"], stats["gathers"], stats["loss_scale"]) == (0, 0, 0, 1.0)
    ids, tgt = batches(1)[0]
    engine.backward(lm_loss(engine(ids), tgt))
    engine.step()
    stats = engine.stats()
    trainable = sum(c.master is not None for c in engine.chunks)
    # one rank: each trainable chunk is reduced once, during backward, as soon as all its
    # gradients are in; the unused layer's chunk never gets one and is reduced at the end
    unused = {engine.layout.slot_of[n][0] for n in ("unused.weight", "unused.bias")}
    assert stats["overlapped_reductions"] == trainable - len(unused) and stats["late_reductions"] == 0
    assert stats["device_bytes"] == engine.manager.recount() and stats["peak_bytes"] >= stats["device_bytes"]


def test_fetches_count_every_copy_up_of_a_released_chunk():
    # static, everything on the host, two chunks (one per layer): each step fetches chunk 0 and 1
    # for the forward and again, in reverse, for the backward
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    cfg = GeminiConfig(placement="static", precision="fp32", min_num_chunks=2, param_host_fraction=1.0)
    engine = gemini(model, cfg, OptimConfig(lr=1e-2))
    assert len(engine.chunks) == 2
    for step in range(2):
        engine.backward(engine(torch.ones(2, 4)).square().sum())
        engine.step()
        assert engine.stats()["fetches"] == 4 * (step + 1)


def _chunk(world, rank):
    a, b, c = (nn.Parameter(torch.zeros(n)) for n in (5, 6, 3))
    slots = [Slot(name="a", param=a, offset=0, numel=5, shape=(5,)), Slot(name="b", param=b, offset=5, numel=6, shape=(6,)),
             Slot(name="c", param=c, offset=11, numel=3, shape=(3,))]
    spec = ChunkSpec(slots=slots, numel=16, trainable=True, decay=True)
    values = {n: torch.zeros(s.numel) for n, s in zip("abc", slots)}
    return Chunk.build(0, spec, values, dtype=torch.float32, world=world, rank=rank, device=torch.device("cpu"))


def test_the_pieces_of_a_shard():
    # full chunk: a [0, 5), b [5, 11), c [11, 14), padding [14, 16); four ranks of 4 elements
    assert shard_pieces(_chunk(1, 0)) == [Piece(0, 0, 5), Piece(1, 5, 11), Piece(2, 11, 14)]
    assert [shard_pieces(_chunk(4, r)) for r in range(4)] == [
        [Piece(0, 0, 4)], [Piece(0, 0, 1), Piece(1, 1, 4)], [Piece(1, 0, 3), Piece(2, 3, 4)], [Piece(2, 0, 2)]]
    chunk = _chunk(4, 2)  # elements [8, 12)
    assert local_slice(chunk, 0, 5) is None and local_slice(chunk, 12, 4) is None
    assert local_slice(chunk, 7, 1) is None  # ends where the shard starts
    assert local_slice(chunk, 8, 1) == slice(0, 1) and local_slice(chunk, 11, 1) == slice(3, 4)
    assert local_slice(chunk, 4, 100) == slice(0, 4)


def _first_norm(precision: str, scale: float) -> float:
    torch.manual_seed(0)
    engine = gemini(TinyNet(), GeminiConfig(placement="static", precision=precision, initial_loss_scale=scale),
                    OptimConfig(lr=1e-2))
    ids, tgt = batches(1)[0]
    engine.backward(lm_loss(engine(ids), tgt))
    return engine.step()["grad_norm"]


def test_fp16_gradients_are_unscaled_before_the_norm():
    # powers of two scale fp16 gradients exactly (no overflow, no underflow here): the same norm
    assert _first_norm("fp16", 2.0**4) == _first_norm("fp16", 2.0**8)
    assert _first_norm("fp16", 2.0**8) == pytest.approx(_first_norm("fp32", 1.0), rel=1e-2)  # fp16's resolution


def test_an_overflowing_step_reports_the_skip():
    engine = gemini(TinyNet(), GeminiConfig(placement="static", precision="fp16", initial_loss_scale=2.0**10),
                    OptimConfig(lr=1e-2))
    ids, tgt = batches(1)[0]
    engine.backward(lm_loss(engine(ids), tgt) * 1e30)
    result = engine.step()
    assert set(result) == {"grad_norm", "skipped", "loss_scale"} and not math.isfinite(result["grad_norm"])
    assert (result["skipped"], result["loss_scale"]) == (1.0, 2.0**9)


class UnusedFirst(nn.Module):
    """The first registered layer is never called: its chunk gets no gradient, the later ones do."""

    def __init__(self) -> None:
        super().__init__()
        self.unused, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("placement", [dict(placement="auto"), dict(placement="static", optim_host_fraction=1.0)])
def test_a_chunk_without_gradients_does_not_stop_the_others_update(placement):
    torch.manual_seed(0)
    model = UnusedFirst()
    reference = twin(model)
    cfg = GeminiConfig(precision="fp32", min_num_chunks=3, reorder_after_warmup=False, **placement)
    engine = gemini(model, cfg, OptimConfig(lr=1e-2, weight_decay=0.1))
    assert engine.layout.slot_of["unused.weight"][0] < engine.layout.slot_of["a.weight"][0]
    opt = reference_optimizer(reference, 1e-2, 0.1)
    x = torch.randn(4, 8)
    for _ in range(2):
        engine.backward(engine(x).square().mean())
        engine.step()
        engine.zero_grad()
        reference(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=1e-6, msg=name)


def test_after_the_warm_up_the_trace_clock_follows_the_modules():
    """The eviction plan is read at the trace position of the module running: step() rewinds it."""
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32"), OptimConfig(lr=1e-2))
    positions = []
    for index, module in enumerate(engine.hook_modules):  # after the engine's own hooks: clock is past it
        module.register_forward_pre_hook(lambda *_, i=index: positions.append((i, engine.manager.clock)))
    data = batches(3)
    for ids, tgt in data:
        positions.clear()
        engine.backward(lm_loss(engine(ids), tgt))
        engine.step()
    trace = engine.manager.tracer.modules
    assert positions and all(trace[clock - 1] == i for i, clock in positions)


class Partial(nn.Module):
    """A module that runs but leaves one of its parameters out of its output: no gradient for it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.idle = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w)


def test_a_chunk_missing_a_gradient_is_reduced_at_the_end_of_backward():
    torch.manual_seed(0)
    model = Partial()
    reference = twin(model)
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32", min_num_chunks=1), OptimConfig(lr=1e-2))
    assert len(engine.chunks) == 1  # w and idle together: the chunk never has all its gradients
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randn(3, 4)
    for _ in range(2):
        engine.backward(engine(x).sum())
        engine.step()
        engine.zero_grad()
        reference(x).sum().backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    assert engine.stats()["overlapped_reductions"] == 0
    torch.testing.assert_close(state["w"], reference.w.detach(), rtol=0, atol=1e-6)
    assert torch.equal(state["idle"], reference.idle.detach())  # no gradient: untouched


def test_the_warm_up_counts_saved_activations_not_the_weights():
    # Linear 1 saves its input x (2 x 4 fp32: 32 B); Linear 2 saves its input h (32 B) and its
    # weight, which is model data (the chunk's payload) and must not count as an activation
    engine = gemini(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), GeminiConfig(placement="auto", precision="fp32"),
                    OptimConfig(lr=1e-2))
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    assert max(engine.manager.tracer.non_model) == 64


def test_the_trace_clock_follows_backward_too_and_skips_evaluation_forwards():
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32"), OptimConfig(lr=1e-2))
    seen = []

    def watch(out, i):
        if out.requires_grad:  # after the engine's own hook on the output: the clock is past it
            out.register_hook(lambda grad: seen.append((i, engine.manager.clock)))

    for index, module in enumerate(engine.hook_modules):
        module.register_forward_hook(lambda m, a, o, i=index: watch(o, i))
    for ids, tgt in batches(3):
        seen.clear()
        engine.backward(lm_loss(engine(ids), tgt))
        engine.step()
        with torch.no_grad():  # evaluations between steps must not move the clock of the next step
            engine(ids)
            engine(ids)
    trace = engine.manager.tracer.modules
    assert len(seen) > 5 and all(trace[clock - 1] == i for i, clock in seen)


def test_step_finishes_a_backward_run_by_autograd_directly():
    """loss.backward() without engine.backward: step() reduces the gradients (an evaluation
    forward in between must not make it forget that a backward is due). Partial's chunk is never
    complete, so only the end of backward reduces it."""
    def run(direct: bool):
        torch.manual_seed(0)
        engine = gemini(Partial(), GeminiConfig(placement="static", precision="fp32", min_num_chunks=1),
                        OptimConfig(lr=1e-2))
        x = torch.linspace(-1, 1, 12).reshape(3, 4)
        for _ in range(2):
            loss = engine(x).sum()
            with torch.no_grad():
                engine(x)
            loss.backward() if direct else engine.backward(loss)
            engine.step()
            engine.zero_grad()
        return engine.state_dict()

    direct, through, start = run(True), run(False), (torch.manual_seed(0), Partial())[1]
    assert not torch.equal(through["w"], start.w.detach())  # it trained
    assert all(torch.equal(direct[k], through[k]) for k in through)
