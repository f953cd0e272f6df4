"""Partial gradients over a model-parallel group: summed once, before accumulation."""

import pytest
import torch
import torch.distributed as dist

from ferryman.core.parallel import mark_partial_grads, partial_grad_group, run_distributed

ROWS = 6


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)


def _layer():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3, dtype=torch.float64)


def _sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
    layer = _layer()
    group = dist.new_group(list(range(world)))
    assert mark_partial_grads(layer.parameters(), group) == 2
    assert mark_partial_grads(layer.parameters(), group) == 0  # idempotent
    rows = _data()[rank::world]  # this rank's shard of the rows
    for _ in range(2):  # two micro-batches accumulate
        (layer(rows).tanh() ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.distributed
def test_marked_gradients_equal_the_unsharded_gradient():
    layer = _layer()
    for _ in range(2):
        (layer(_data()).tanh() ** 2).sum().backward()
    for grads in run_distributed(_sharded, 2):
        for name, param in layer.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_group_of_one_marks_nothing():
    layer = _layer()
    assert mark_partial_grads(layer.parameters(), None) == 0
    assert partial_grad_group(layer.weight) is None
