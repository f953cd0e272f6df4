"""Partial gradients over a model-parallel group: tagged by parallelize, summed once in buckets by
whoever owns the gradients (the engines, or code that runs backward itself)."""

import pytest
import torch
import torch.distributed as dist

from ferryman.core.gemini import GeminiConfig
from ferryman.core.optim import OptimConfig
from ferryman.core.parallel import (
    mark_partial_grads,
    partial_grad_group,
    reduce_partial_grads,
    run_distributed,
)
from ferryman.core.parallel.grads import _buckets
from ferryman.core.training import TrainConfig
from ferryman.core.training.loop import build_engine
from tests.threaded import one_rank_at_a_time, run_threaded
from tests.tolerance import assert_close

ROWS = 6


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(ROWS, 4, generator=gen)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rows = torch.nn.Linear(4, 5)  # applied to each rank's shard of the rows: partial gradients
        self.unused = torch.nn.Linear(2, 2)  # no rank uses it: its gradient must stay None
        self.head = torch.nn.Linear(5, 1)  # applied to the gathered sum on every rank: full gradients

    def forward(self, rows, world):
        pooled = self.rows(rows).tanh().sum(0, keepdim=True)
        if world > 1:  # the sum over all rows, as a sharded model gathers it
            pooled = _AllSum.apply(pooled)
        return self.head(pooled).square().sum()


class _AllSum(torch.autograd.Function):
    """Forward: sum over ranks; backward: the (identical) upstream gradient on every rank."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _grads(net):
    return {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


def _sharded(rank: int, world: int, how: str) -> dict:
    with one_rank_at_a_time():  # _Net seeds the global RNG, which threaded ranks share
        net = _Net()
    group = dist.new_group(list(range(world)))
    assert mark_partial_grads(net.rows.parameters(), group) == 2
    assert mark_partial_grads(net.rows.parameters(), group) == 0  # idempotent
    rows = _data()[rank::world]  # this rank's shard of the rows
    if how == "function":
        for _ in range(2):  # two micro-batches accumulate, one sum at the end
            net(rows, world).backward()
        assert reduce_partial_grads(net.parameters()) == 1  # one bucket: one collective
        return _grads(net)
    cfg = TrainConfig(engine=how, precision="fp32", device="cpu", optim=OptimConfig(lr=0.1),
                      gemini=GeminiConfig(placement="static", precision="fp32", min_num_chunks=1))
    engine = build_engine(net, cfg, None)
    for _ in range(2):
        engine.backward(engine(rows, world))
    norm = engine.step()["grad_norm"]  # AdamW's first step ignores the gradients' scale: compare it too
    return {**engine.state_dict(), "grad_norm": torch.tensor(norm)}


def _reference(how: str) -> dict:
    net = _Net()
    for _ in range(2):
        net(_data(), 1).backward()
    if how == "function":
        return _grads(net)
    cfg = TrainConfig(engine="plain", precision="fp32", device="cpu", optim=OptimConfig(lr=0.1))
    engine = build_engine(_Net(), cfg, None)
    for _ in range(2):
        engine.backward(engine(_data(), 1))
    norm = engine.step()["grad_norm"]
    return {**engine.state_dict(), "grad_norm": torch.tensor(norm)}


def _check(how, results):
    expected = _reference(how)
    for got in results:
        for name, value in expected.items():
            if value is None:
                assert got[name] is None, name  # unused by every rank: AdamW skips it
            else:
                assert_close(got[name], value, ulps=16, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["function", "plain", "gemini"])
def test_marked_gradients_are_summed_once(how):
    _check(how, run_distributed(_sharded, 2, how))


@pytest.mark.parametrize("how", ["function", "plain", "gemini"])
def test_marked_gradients_are_summed_once_on_threaded_ranks(how):
    """The same check with the ranks as threads (tests/threaded.py): fast, and seen by mutmut."""
    _check(how, run_threaded(_sharded, 2, how))


def test_a_group_of_one_marks_nothing():
    net = _Net()
    assert mark_partial_grads(net.parameters(), None) == 0
    assert partial_grad_group(net.rows.weight) is None
    assert reduce_partial_grads(net.parameters()) == 0


def test_buckets_respect_size_and_dtype():
    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              [(10, torch.float32), (10, torch.float32), (10, torch.float32), (4, torch.bfloat16), (30, torch.float32)]]
    sizes = [[p.numel() for p in b] for b in _buckets(params, bucket_bytes=80)]
    assert sizes == [[10, 10], [10], [4], [30]]
