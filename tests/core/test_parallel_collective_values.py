"""The collectives on threaded ranks, on every dimension (negative ones too) and with and without
trimming, against the unsharded tensor: forward values and gradients exactly equal.

Six ranks form two interleaved groups of three, [0, 2, 4] and [1, 3, 5], so a rank's place in its
group is not its place in the world, and a collective on the wrong group has the wrong size. The
losses weigh each output element by a small integer that differs per rank, so every gradient is a
sum of small integers (exact in float64) and a gradient taken from the wrong rank, the wrong slice
or without the sum over ranks differs from the reference in value, not only in rounding.

The transport is made late on purpose: an async collective's output holds NaN until its work is
waited for (as with gloo or NCCL, and unlike torch's threaded group, which finishes every
collective before returning), so a result used before its wait shows.
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

WORLD = 6
GROUP = 3  # ranks per group: [0, 2, 4] and [1, 3, 5]
SHAPE = (7, 5, 4)  # 7, 5, 4 are not multiples of 3: every sharded dimension is padded


def _full() -> torch.Tensor:
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float64).reshape(SHAPE) - 60


def _weights(shape, rank: int) -> torch.Tensor:
    """Small integers, a different pattern per rank."""
    n = torch.Size(shape).numel()
    return ((torch.arange(n, dtype=torch.float64) * (rank + 2)) % 7 - 3).reshape(shape)


def _shard(x: torch.Tensor, dim: int, rank: int, world: int = GROUP) -> torch.Tensor:
    x = pad_to_multiple(x, dim, world)
    per = x.shape[dim] // world
    return x.narrow(dim, rank * per, per)


def _concat(parts, dim: int, size: int) -> torch.Tensor:
    return torch.cat(parts, dim).narrow(dim, 0, size)


# (name, the call on this rank's input, the input of rank r, dim of the unsharded tensor it came from)
def _cases(rank: int, group):
    full = _full()
    cases = []
    for dim in (0, 1, 2, -1, -3):
        cases.append((f"scatter|{dim}", lambda x, d=dim: scatter(x, d, group), full))
        shard = _shard(full, dim, rank)
        for size in (None, full.shape[dim]):
            for reduce_grad in (True, False):
                for mode in ("sync", "async"):
                    def call(x, d=dim, s=size, r=reduce_grad, m=mode):
                        if m == "sync":
                            return gather(x, d, group, size=s, reduce_grad=r)
                        buf, handle = gather_async(x, d, group, size=s, reduce_grad=r)
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
                        return all_to_all(x, s, g, group, gather_size=n)
                    buf, handle = all_to_all_async(x, s, g, group, gather_size=n)
                    return wait(buf, handle)
                cases.append((f"a2a|{scatter_dim}|{gather_dim}|{gather_size}|{mode}", call, shard))
    return cases


def _groups(rank: int):
    groups = [dist.new_group([0, 2, 4]), dist.new_group([1, 3, 5])]  # every rank creates both
    return groups[rank % 2]


def _worker(rank: int, world: int):
    group = _groups(rank)
    me = group_rank(group)
    out = {"me": me}
    for name, call, x in _cases(me, group):
        x = x.clone().requires_grad_()
        y = call(x)
        (y * _weights(y.shape, me)).sum().backward()
        out[name] = (y.detach(), x.grad)
    return out


class _LateWork:
    def __init__(self, out: torch.Tensor, result: torch.Tensor):
        self.out, self.result = out, result

    def wait(self):
        self.out.copy_(self.result)
        return True


def _late(collective):
    """``collective`` whose async form delivers its output at ``wait`` only."""

    def late(out, inp, *args, async_op=False, **kwargs):
        if not async_op:
            return collective(out, inp, *args, **kwargs)
        result = torch.empty_like(out)
        collective(result, inp, *args, **kwargs)
        out.fill_(float("nan"))
        return _LateWork(out, result)

    return late


@pytest.fixture
def late_transport(monkeypatch):
    for name in ("all_gather_single", "reduce_scatter_single", "all_to_all_single"):
        monkeypatch.setattr(dist, name, _late(getattr(dist, name)))


def _expected(name: str, rank: int):
    """Forward and gradient of ``name`` on ``rank`` from the unsharded tensor."""
    full = _full()
    kind, *rest = name.split("|")
    if kind == "scatter":
        dim = int(rest[0])
        # each rank's loss weighs its own slice; the replicated input's gradient is their concatenation
        grads = [_weights(_shard(full, dim, r).shape, r) for r in range(GROUP)]
        return _shard(full, dim, rank), _concat(grads, dim, full.shape[dim])
    if kind == "gather":
        dim, size, reduce_grad, _ = rest
        dim, padded = int(dim), pad_to_multiple(full, int(dim), GROUP)
        forward = full if size != "None" else padded
        if reduce_grad == "True":  # the sum of every rank's gradient of the whole tensor, sliced
            grad = sum(_weights(forward.shape, r) for r in range(GROUP))
        else:  # a replicated tail: this rank's own gradient, sliced
            grad = _weights(forward.shape, rank)
        return forward, _shard(grad, dim, rank)
    scatter_dim, gather_dim, gather_size, _ = rest
    scatter_dim, gather_dim = int(scatter_dim), int(gather_dim)
    joined = full if gather_size != "None" else pad_to_multiple(full, gather_dim, GROUP)
    grads = [_weights(_shard(joined, scatter_dim, r).shape, r) for r in range(GROUP)]
    grad = _concat(grads, scatter_dim, full.shape[scatter_dim])  # of the tensor joined on gather_dim
    return _shard(joined, scatter_dim, rank), _shard(grad, gather_dim, rank)


def test_every_case_matches_the_unsharded_tensor_exactly(late_transport):
    results = run_threaded(_worker, WORLD)
    names = [name for name, _, _ in _cases(0, None)]
    assert len(names) == 5 + 5 * 8 + 6 * 4
    assert [got["me"] for got in results] == [0, 0, 1, 1, 2, 2]
    for got in results:
        for name in names:
            forward, grad = _expected(name, got["me"])
            y, g = got[name]
            assert y.shape == forward.shape and torch.equal(y, forward), (got["me"], name, "forward")
            assert g.shape == grad.shape and torch.equal(g, grad), (got["me"], name, "grad")


def _sizes(rank: int, world: int):
    group, x = _groups(rank), _full()
    sizes = (group_size(None), group_rank(None), group_size(group), group_rank(group))
    return sizes, scatter(x, 0, None) is x, gather(x, 1, None) is x, all_to_all(x, 0, 1, None) is x


def test_no_group_means_one_rank_inside_a_world_of_several():
    for rank, (sizes, *identity) in enumerate(run_threaded(_sizes, WORLD)):
        assert sizes == (1, 0, GROUP, rank // 2)
        assert identity == [True, True, True]


def _in_flight(rank: int, world: int):
    """What an async handle holds between its two halves, forward and backward."""
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2).requires_grad_()
    seen = {}
    for kind in ("gather", "a2a"):
        if kind == "gather":
            buf, handle = gather_async(x, 0, dist.group.WORLD)
        else:
            buf, handle = all_to_all_async(x, 1, 0, dist.group.WORLD)
        seen[f"{kind} forward"] = isinstance(handle.work, _LateWork)  # started, not finished
        buf.register_hook(lambda grad, h=handle, k=kind: seen.__setitem__(f"{k} backward", isinstance(h.grad_work, _LateWork)))
        y = wait(buf, handle)
        seen[f"{kind} after wait"] = handle.work is None
        y.sum().backward()
        seen[f"{kind} after backward"] = handle.grad_buf is None and handle.grad_work is None  # let go
    return seen, x.grad


def test_an_async_collective_is_in_flight_between_its_halves_and_let_go_after(late_transport):
    for seen, grad in run_threaded(_in_flight, 2):
        assert seen == {f"{k} {when}": True for k in ("gather", "a2a")
                        for when in ("forward", "backward", "after wait", "after backward")}
        # gather: each rank's sum of ones over the gathered 8 rows, summed over the 2 ranks, sliced;
        # all_to_all: the ones of this rank's output, routed back
        assert torch.equal(grad, torch.full((4, 2), 3.0, dtype=torch.float64))


def _same_dims(rank: int, world: int):
    x = torch.zeros(4, 6, 3)
    with pytest.raises(ValueError, match=r"^all_to_all needs two different dimensions$"):
        all_to_all(x, 2, -1, dist.group.WORLD)
    with pytest.raises(ValueError, match=r"^all_to_all needs two different dimensions$"):
        all_to_all_async(x, -3, 0, dist.group.WORLD)
    return True


def test_all_to_all_refuses_one_dimension_for_both_sides():
    assert run_threaded(_same_dims, 2) == [True, True]


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


def _modified_in_place(rank: int, world: int):
    grads = []
    for kind in ("gather", "a2a"):
        x = torch.arange(4.0, dtype=torch.float64).reshape(2, 2).requires_grad_()
        if kind == "gather":  # along dim 0, untrimmed: the gathered rows are the buffer itself
            buf, handle = gather_async(x, 0, dist.group.WORLD)
        else:
            buf, handle = all_to_all_async(x, 1, 0, dist.group.WORLD)
        y = wait(buf, handle)
        y.mul_(3)  # as an in-place activation would
        (y * y).sum().backward()
        grads.append(x.grad)
    return grads


def test_the_result_of_wait_can_be_modified_in_place(late_transport):
    x = torch.arange(4.0, dtype=torch.float64).reshape(2, 2)
    for gather_grad, a2a_grad in run_threaded(_modified_in_place, 2):
        # d/dx of sum((3y)^2) is 18 y; gather sums it over the 2 ranks, all_to_all routes it back
        assert torch.equal(gather_grad, 36 * x)
        assert torch.equal(a2a_grad, 18 * x)
