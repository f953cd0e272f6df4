"""reduce_partial_grads and mark_partial_grads on threaded ranks, against sums computed here:
gradients that only some ranks have, two groups at once, several buckets, mixed dtypes, and the
marking rules (frozen parameters, a second group, the count returned)."""

import pytest
import torch
import torch.distributed as dist

from ferryman.core.parallel import mark_partial_grads, partial_grad_group, reduce_partial_grads
from ferryman.core.parallel.grads import _buckets
from tests.threaded import run_threaded

WORLD = 3


def _grad(rank: int, n: int, dtype=torch.float64) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) * (rank + 1) + 10 * rank).to(dtype)  # exact small values


def _params():
    shapes = {"a": (2, 3), "b": (4,), "c": (3,), "f": (3,), "d": (5,), "e": (2,)}
    params = {k: torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for k, s in shapes.items()}
    params["h"] = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    return params


# which ranks hold a gradient for each parameter (the others ran no backward through it)
HAS_GRAD = {"a": {0, 1, 2}, "b": {1}, "c": set(), "f": {0, 2}, "d": {0, 2}, "e": {0, 1, 2}, "h": {2}}


def _reduce(rank: int, world: int, bucket_bytes: int):
    params = _params()
    pair = dist.new_group([0, 1])  # ranks 0 and 1; rank 2 takes part in creating it only
    everyone = dist.group.WORLD
    marked = mark_partial_grads([params[k] for k in ("a", "b", "c", "f", "h")], everyone)
    if rank < 2:
        marked += mark_partial_grads([params["d"]], pair)
    for name, param in params.items():
        if rank in HAS_GRAD[name]:
            param.grad = _grad(rank, param.numel(), param.dtype).reshape(param.shape)
    kept = params["a"].grad
    calls = reduce_partial_grads(list(params.values()), bucket_bytes=bucket_bytes)
    return marked, calls, kept is params["a"].grad, {k: p.grad for k, p in params.items()}


def _sum(name: str, ranks) -> torch.Tensor | None:
    shape = _params()[name].shape
    holders = [r for r in ranks if r in HAS_GRAD[name]]
    if not holders:
        return None
    return sum(_grad(r, shape.numel()) for r in holders).reshape(shape)


@pytest.mark.parametrize("bucket_bytes, calls", [(1 << 20, [3, 3, 2]), (64, [5, 5, 4])])
def test_partial_gradients_are_summed_over_their_group_only(bucket_bytes, calls):
    """World group: a, b, c, f (float64: 48 + 32 + 24 + 24 bytes) and h (bfloat16: its own
    bucket); the pair [0, 1]: d; e is not marked. With 64-byte buckets: [a], [b, c], [f]."""
    results = run_threaded(_reduce, WORLD, bucket_bytes)
    for rank, (marked, n_calls, kept, grads) in enumerate(results):
        assert marked == (6 if rank < 2 else 5)
        assert n_calls == calls[rank]
        assert kept  # a gradient that existed is summed in place, not replaced
        for name in ("a", "b", "f"):  # f comes after c, which no rank has: its place in the bucket
            assert torch.equal(grads[name], _sum(name, range(WORLD))), (rank, name)
        assert grads["c"] is None  # no rank has one: AdamW must skip it
        expected_d = _sum("d", [0, 1]) if rank < 2 else _grad(2, 5)  # rank 2 is not in d's group
        assert torch.equal(grads["d"], expected_d), rank
        assert torch.equal(grads["e"], _grad(rank, 2))  # not marked: left alone
        assert grads["h"].dtype == torch.bfloat16  # one rank's gradient, summed in its own dtype
        assert torch.equal(grads["h"], _grad(2, 4, torch.bfloat16))


def _marking(rank: int, world: int):
    first, second = dist.new_group([0, 1]), dist.new_group([0, 1])
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    counts = [mark_partial_grads([frozen, a], first), mark_partial_grads(iter([a, b]), first),
              mark_partial_grads([b], first)]
    with pytest.raises(ValueError, match=r"^a parameter's gradient cannot be a partial sum over two different groups$"):
        mark_partial_grads([b], second)
    return counts, partial_grad_group(frozen) is None, partial_grad_group(a) is first, partial_grad_group(b) is first


def test_marking_counts_new_trainable_parameters_and_refuses_a_second_group():
    for counts, frozen_unmarked, a_first, b_first in run_threaded(_marking, 2):
        assert counts == [1, 1, 0]
        assert frozen_unmarked and a_first and b_first


def test_buckets_split_by_size_and_dtype():
    f32 = [torch.nn.Parameter(torch.zeros(n)) for n in (4, 4, 1, 8, 20, 2)]
    assert [[p.numel() for p in b] for b in _buckets(f32, bucket_bytes=36)] == [[4, 4, 1], [8], [20], [2]]
    assert [[p.numel() for p in b] for b in _buckets(f32, bucket_bytes=35)] == [[4, 4], [1], [8], [20], [2]]
    mixed = [torch.nn.Parameter(torch.zeros(2, dtype=d)) for d in (torch.float16, torch.float16, torch.float32)]
    assert [[p.dtype for p in b] for b in _buckets(mixed, bucket_bytes=1 << 20)] == [
        [torch.float16, torch.float16], [torch.float32]]
    assert _buckets([], bucket_bytes=8) == []
