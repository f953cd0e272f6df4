"""The collectives on 3 threaded ranks, on every dimension (negative ones too) and with and
without trimming, against the unsharded tensor: forward values and gradients exactly equal.

The losses weigh each output element by a small integer that differs per rank, so every gradient
is a sum of small integers (exact in float64) and a gradient taken from the wrong rank, the wrong
slice or without the sum over ranks differs from the reference in value, not only in rounding.
"""

import pytest
import torch
import torch.distributed as dist

from ferryman.core.parallel import (
    all_to_all,
    all_to_all_async,
    gather,
    gather_async,
    pad_to_multiple,
    scatter,
    wait,
)
from ferryman.core.parallel.collectives import group_rank, group_size
from tests.threaded import run_threaded

WORLD = 3
SHAPE = (7, 5, 4)  # 7, 5, 4 are not multiples of 3: every sharded dimension is padded


def _full() -> torch.Tensor:
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float64).reshape(SHAPE) - 60


def _weights(shape, rank: int) -> torch.Tensor:
    """Small integers, a different pattern per rank."""
    n = torch.Size(shape).numel()
    return ((torch.arange(n, dtype=torch.float64) * (rank + 2)) % 7 - 3).reshape(shape)


def _shard(x: torch.Tensor, dim: int, rank: int, world: int = WORLD) -> torch.Tensor:
    x = pad_to_multiple(x, dim, world)
    per = x.shape[dim] // world
    return x.narrow(dim, rank * per, per)


def _concat(parts, dim: int, size: int) -> torch.Tensor:
    return torch.cat(parts, dim).narrow(dim, 0, size)


# (name, the call on this rank's input, the input of rank r, dim of the unsharded tensor it came from)
def _cases(rank: int):
    full = _full()
    cases = []
    for dim in (0, 1, 2, -1, -3):
        cases.append((f"scatter|{dim}", lambda x, d=dim: scatter(x, d, dist.group.WORLD), full))
        shard = _shard(full, dim, rank)
        for size in (None, full.shape[dim]):
            for reduce_grad in (True, False):
                for mode in ("sync", "async"):
                    def call(x, d=dim, s=size, r=reduce_grad, m=mode):
                        if m == "sync":
                            return gather(x, d, dist.group.WORLD, size=s, reduce_grad=r)
                        buf, handle = gather_async(x, d, dist.group.WORLD, size=s, reduce_grad=r)
                        out = wait(buf, handle)
                        assert handle.work is None  # waited for, and let go
                        return out
                    cases.append((f"gather|{dim}|{size}|{reduce_grad}|{mode}", call, shard))
    for scatter_dim, gather_dim in [(0, 1), (1, 0), (2, 0), (0, 2), (-1, -2), (-3, -1)]:
        shard = _shard(full, gather_dim, rank)
        for gather_size in (None, full.shape[gather_dim]):
            for mode in ("sync", "async"):
                def call(x, s=scatter_dim, g=gather_dim, n=gather_size, m=mode):
                    if m == "sync":
                        return all_to_all(x, s, g, dist.group.WORLD, gather_size=n)
                    buf, handle = all_to_all_async(x, s, g, dist.group.WORLD, gather_size=n)
                    return wait(buf, handle)
                cases.append((f"a2a|{scatter_dim}|{gather_dim}|{gather_size}|{mode}", call, shard))
    return cases


def _worker(rank: int, world: int):
    out = {}
    for name, call, x in _cases(rank):
        x = x.clone().requires_grad_()
        y = call(x)
        (y * _weights(y.shape, rank)).sum().backward()
        out[name] = (y.detach(), x.grad)
    out["sizes"] = (group_size(None), group_rank(None), group_size(dist.group.WORLD), group_rank(dist.group.WORLD))
    x = _full()
    out["identity"] = (scatter(x, 0, None) is x, gather(x, 1, None) is x, all_to_all(x, 0, 1, None) is x)
    return out


def _expected(name: str, rank: int):
    """Forward and gradient of ``name`` on ``rank`` from the unsharded tensor."""
    full = _full()
    kind, *rest = name.split("|")
    if kind == "scatter":
        dim = int(rest[0])
        # each rank's loss weighs its own slice; the replicated input's gradient is their concatenation
        grads = [_weights(_shard(full, dim, r).shape, r) for r in range(WORLD)]
        return _shard(full, dim, rank), _concat(grads, dim, full.shape[dim])
    if kind == "gather":
        dim, size, reduce_grad, _ = rest
        dim, padded = int(dim), pad_to_multiple(full, int(dim), WORLD)
        forward = full if size != "None" else padded
        if reduce_grad == "True":  # the sum of every rank's gradient of the whole tensor, sliced
            grad = sum(_weights(forward.shape, r) for r in range(WORLD))
        else:  # a replicated tail: this rank's own gradient, sliced
            grad = _weights(forward.shape, rank)
        return forward, _shard(grad, dim, rank)
    scatter_dim, gather_dim, gather_size, _ = rest
    scatter_dim, gather_dim = int(scatter_dim), int(gather_dim)
    joined = full if gather_size != "None" else pad_to_multiple(full, gather_dim, WORLD)
    grads = [_weights(_shard(joined, scatter_dim, r).shape, r) for r in range(WORLD)]
    grad = _concat(grads, scatter_dim, full.shape[scatter_dim])  # of the tensor joined on gather_dim
    return _shard(joined, scatter_dim, rank), _shard(grad, gather_dim, rank)


@pytest.fixture(scope="module")
def results():
    return run_threaded(_worker, WORLD)


def test_every_case_matches_the_unsharded_tensor_exactly(results):
    names = [name for name, _, _ in _cases(0)]
    assert len(names) == 5 + 5 * 8 + 6 * 4
    for rank, got in enumerate(results):
        for name in names:
            forward, grad = _expected(name, rank)
            y, g = got[name]
            assert y.shape == forward.shape and torch.equal(y, forward), (rank, name, "forward")
            assert g.shape == grad.shape and torch.equal(g, grad), (rank, name, "grad")


def test_a_missing_group_is_a_group_of_one_even_in_a_world_of_several(results):
    for rank, got in enumerate(results):
        assert got["sizes"] == (1, 0, WORLD, rank)
        assert got["identity"] == (True, True, True)


def _same_dims(rank: int, world: int):
    x = torch.zeros(4, 6, 3)
    with pytest.raises(ValueError, match=r"^all_to_all needs two different dimensions$"):
        all_to_all(x, 2, -1, dist.group.WORLD)
    with pytest.raises(ValueError, match=r"^all_to_all needs two different dimensions$"):
        all_to_all_async(x, -3, 0, dist.group.WORLD)
    return True


def test_all_to_all_refuses_one_dimension_for_both_sides():
    assert run_threaded(_same_dims, 2) == [True, True]


def _handle_lets_go(rank: int, world: int):
    x = torch.arange(6.0, dtype=torch.float64).reshape(6, 1).requires_grad_()
    buf, handle = all_to_all_async(x, 1, 0, dist.group.WORLD)
    y = wait(buf, handle)
    y.sum().backward()
    return handle.grad_buf is None and handle.grad_work is None, x.grad


def test_an_async_handle_lets_go_of_its_gradient_buffer_after_backward():
    for released, grad in run_threaded(_handle_lets_go, 2):
        assert released
        assert torch.equal(grad, torch.ones(6, 1, dtype=torch.float64))


def test_a_group_of_one_trims_and_waits_at_once():
    x = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(gather(x, -1, None, size=2), x[:, :2])
    buf, handle = gather_async(x, 1, None, size=3)
    assert handle.op is None and torch.equal(wait(buf, handle), x[:, :3])
    buf, handle = all_to_all_async(x, 0, 1, None, gather_size=1)
    assert handle.op is None and torch.equal(wait(buf, handle), x[:, :1])
    buf, handle = all_to_all_async(x, 0, 1, None)
    assert wait(buf, handle) is x


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_pad_to_multiple_pads_zeros_at_the_end_of_one_dimension(dim):
    x = torch.arange(1.0, 1 + 2 * 5 * 3).reshape(2, 5, 3)
    padded = pad_to_multiple(x, dim, 4)
    size = x.shape[dim]
    expected_size = -(-size // 4) * 4
    assert padded.shape == tuple(expected_size if d == dim % 3 else n for d, n in enumerate(x.shape))
    assert torch.equal(padded.narrow(dim, 0, size), x)
    assert torch.equal(padded.narrow(dim, size, expected_size - size), torch.zeros_like(padded.narrow(dim, size, expected_size - size)))
    assert pad_to_multiple(x, dim, 1) is x
    assert pad_to_multiple(x, dim, size) is x
    assert pad_to_multiple(x, dim, size + 3).shape[dim % 3] == size + 3
