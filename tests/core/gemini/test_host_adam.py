"""The host AdamW step: long fused calls over runs of a shard, numbers of one call per parameter."""

import pytest
import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini, host_adam
from ferryman.core.gemini.host_adam import Piece, host_adamw_
from tests.core.gemini.models import TinyNet, batches, train_engine, train_reference, twin

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _shard(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths) + 5  # padding past the last piece must stay untouched
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pieces = [Piece(i, s, s + n) for i, (s, n) in enumerate(zip(starts, lengths))]
    scale = 10.0 ** torch.randint(-6, 2, (total,), generator=gen).float()
    tensors = (torch.randn(total, generator=gen), torch.randn(total, generator=gen) * scale,
               torch.randn(total, generator=gen) * 1e-2, torch.rand(total, generator=gen) * 1e-3)
    return pieces, tensors


def _per_parameter(tensors, pieces, steps):
    out = [t.clone() for t in tensors]
    lists = [[t[p.start : p.end] for p in pieces] for t in out]
    torch._fused_adamw_(*lists, [], [steps[p.slot] for p in pieces], lr=HYPER["lr"], beta1=0.9, beta2=0.999,
                        weight_decay=HYPER["weight_decay"], eps=HYPER["eps"], amsgrad=False, maximize=False)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", ["one-run", "skipped", "mixed-steps"])
def test_equals_one_call_per_parameter_bit_for_bit(seed, case):
    gen = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(1, 90, (40,), generator=gen).tolist()
    pieces, tensors = _shard(lengths, seed)
    steps = torch.full((len(lengths),), 4.0)
    if case == "skipped":
        pieces = [p for p in pieces if p.slot % 5 != 2]
    if case == "mixed-steps":
        steps[torch.randint(0, len(lengths), (8,), generator=gen)] = 9.0
    want = _per_parameter(tensors, pieces, steps)
    got = [t.clone() for t in tensors]
    host_adamw_(*got, steps, pieces, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_the_common_case_is_one_long_call(monkeypatch):
    pieces, tensors = _shard([1000, 333, 4096, 17], seed=0)
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda params, *a, **k: calls.append([p.numel() for p in params]) or fused(params, *a, **k))
    host_adamw_(*tensors, torch.full((4,), 2.0), pieces, **HYPER)
    width = host_adam.vector_width()
    assert width is not None
    long, fixups = calls
    assert long == [(5446 // width) * width]  # the whole run in one tensor
    assert sum(fixups) < 5 * width  # and a few elements recomputed per parameter


@pytest.mark.parametrize("placement", [dict(placement="static", optim_host_fraction=1.0),
                                       dict(placement="auto", device_budget_bytes=30_000)])
def test_gemini_with_host_optimizer_equals_torch_adamw_bit_for_bit(placement):
    """Odd parameter sizes (vocab 29, width 12), so the long calls need their recomputed tails."""
    torch.manual_seed(0)
    model = TinyNet(vocab=29, dim=12)
    reference = twin(model)
    data = batches(4, vocab=29)
    engine = gemini(model, GeminiConfig(precision="fp32", **placement), OptimConfig(lr=1e-2, weight_decay=0.1))
    assert train_engine(engine, data) == train_reference(reference, data)
    state = engine.state_dict()
    assert all(torch.equal(state[n], p.detach()) for n, p in reference.named_parameters())


def test_the_fallback_for_an_unknown_kernel_is_one_call_per_parameter(monkeypatch):
    """A torch build whose CPU kernel no probed width reproduces: plain per-parameter calls."""
    monkeypatch.setattr(host_adam, "vector_width", lambda: None)
    pieces, tensors = _shard([5, 17, 40, 3], seed=3)
    pieces = [p for p in pieces if p.slot != 1]
    steps = torch.tensor([2.0, 2.0, 5.0, 2.0])
    want = _per_parameter(tensors, pieces, steps)
    got = [t.clone() for t in tensors]
    host_adamw_(*got, steps, pieces, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert all(torch.equal(a[5:22], b[5:22]) for a, b in zip(got, tensors))  # the skipped piece is untouched
