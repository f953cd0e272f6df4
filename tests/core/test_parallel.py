"""DAP / sequence-parallel collectives on 2 gloo ranks against the unsharded computation."""

import pytest
import torch
import torch.distributed as dist

from ferryman.core.errors import ConfigError
from ferryman.core.parallel import (
    ParallelDims,
    all_to_all,
    all_to_all_async,
    gather,
    gather_async,
    grid_groups,
    init_parallel,
    pad_to_multiple,
    run_distributed,
    scatter,
    wait,
)
from tests.threaded import run_threaded

WORLD = 2
ROWS, COLS, CH = 5, 7, 3  # neither 5 nor 7 divides by 2: padding is exercised
MIX = torch.linspace(-1, 1, ROWS * ROWS).reshape(ROWS, ROWS)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, COLS, CH, generator=gen, dtype=torch.float64)


def _row_loss(rows: torch.Tensor) -> torch.Tensor:
    return (rows.sin() * 1.7).sum()  # zero for zero padding rows


def _own_rows(rank: int) -> slice:
    per = -(-ROWS // WORLD)
    return slice(rank * per, min((rank + 1) * per, ROWS))


def _shard(x: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    x = pad_to_multiple(x, dim, WORLD)
    per = x.shape[dim] // WORLD
    return x.narrow(dim, rank * per, per).clone()


def _collectives_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    group = dist.group.WORLD
    x_full = _inputs()
    out: dict[str, torch.Tensor] = {}

    # scatter: replicated input, sharded loss; grad must come back replicated and complete.
    x = x_full.clone().requires_grad_()
    local = scatter(x, 0, group)
    _row_loss(local).backward()
    out["scatter_fwd"], out["scatter_grad"] = local.detach(), x.grad

    # gather, sharded tail: each rank owns the output rows of MIX @ y that match its shard.
    for mode in ("sync", "async"):
        shard = _shard(x_full, 0, rank).requires_grad_()
        if mode == "sync":
            y = gather(shard, 0, group, size=ROWS)
        else:
            buf, handle = gather_async(shard, 0, group, size=ROWS)
            busy = (shard * 2).sum()  # independent work between start and wait
            y = wait(buf, handle)
        mixed = torch.einsum("ij,jkc->ikc", MIX[_own_rows(rank)].double(), y)
        loss = _row_loss(mixed) + (0 * busy if mode == "async" else 0)
        loss.backward()
        out[f"gather_{mode}_fwd"], out[f"gather_{mode}_grad"] = y.detach(), shard.grad

    # gather, replicated tail: every rank computes the same loss; grads are sliced, not summed.
    shard = _shard(x_full, 0, rank).requires_grad_()
    y = gather(shard, 0, group, size=ROWS, reduce_grad=False)
    y.tanh().pow(2).sum().backward()
    out["gather_repl_grad"] = shard.grad

    # all_to_all: sharded by column on input, by row on output.
    for mode in ("sync", "async"):
        cols = _shard(x_full, 1, rank).requires_grad_()  # [ROWS, 4, CH]
        if mode == "sync":
            rows = all_to_all(cols, 0, 1, group, gather_size=COLS)
        else:
            buf, handle = all_to_all_async(cols, 0, 1, group, gather_size=COLS)
            rows = wait(buf, handle)
        _row_loss(rows * rows).backward()
        out[f"a2a_{mode}_fwd"], out[f"a2a_{mode}_grad"] = rows.detach(), cols.grad
    return out


def _reference() -> dict[str, torch.Tensor]:
    ref = {}
    x = _inputs().requires_grad_()
    _row_loss(x).backward()
    ref["row_grad"] = x.grad
    x = _inputs().requires_grad_()
    _row_loss(torch.einsum("ij,jkc->ikc", MIX.double(), x)).backward()
    ref["mix_grad"] = x.grad
    x = _inputs().requires_grad_()
    x.tanh().pow(2).sum().backward()
    ref["repl_grad"] = x.grad
    x = _inputs().requires_grad_()
    _row_loss(x * x).backward()
    ref["sq_grad"] = x.grad
    return ref


def _check_collectives(results: list[dict[str, torch.Tensor]]) -> None:
    ref = _reference()
    x = _inputs()
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["scatter_fwd"], _shard(x, 0, rank))
        torch.testing.assert_close(got["scatter_grad"], ref["row_grad"])
        for mode in ("sync", "async"):
            torch.testing.assert_close(got[f"gather_{mode}_fwd"], x)
            torch.testing.assert_close(got[f"gather_{mode}_grad"], _shard(ref["mix_grad"], 0, rank))
            torch.testing.assert_close(got[f"a2a_{mode}_fwd"], _shard(x, 0, rank))
            torch.testing.assert_close(got[f"a2a_{mode}_grad"], _shard(ref["sq_grad"], 1, rank))
        torch.testing.assert_close(got["gather_repl_grad"], _shard(ref["repl_grad"], 0, rank))
        # async forms are the same computation, so the numbers are identical, not merely close
        assert torch.equal(got["gather_async_grad"], got["gather_sync_grad"])
        assert torch.equal(got["a2a_async_fwd"], got["a2a_sync_fwd"])
        assert torch.equal(got["a2a_async_grad"], got["a2a_sync_grad"])


@pytest.mark.distributed
def test_collectives_match_unsharded_forward_and_backward():
    _check_collectives(run_distributed(_collectives_worker, WORLD))


def test_collectives_match_unsharded_on_threaded_ranks():
    """The same check with the ranks as threads (tests/threaded.py): milliseconds, and seen by mutmut."""
    _check_collectives(run_threaded(_collectives_worker, WORLD))


def _dims_worker(rank: int, world: int, dap: int, sp: int, backend: str | None = None) -> tuple[int, int, int, int, float]:
    dims = init_parallel(dap=dap, sp=sp, backend=backend)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=dims.dap_group)
    return dims.dp, dims.dap, dims.sp, dims.dp_rank, t.item()


@pytest.mark.distributed
def test_init_parallel_builds_groups_from_torchrun_env():
    results = run_distributed(_dims_worker, WORLD, 2, 1)
    assert [r[:4] for r in results] == [(1, 2, 1, 0), (1, 2, 1, 0)]
    assert [r[4] for r in results] == [3.0, 3.0]  # both ranks are in one DAP group


def test_init_parallel_groups_on_threaded_ranks():
    results = run_threaded(_dims_worker, 8, 2, 2, "threaded")  # a [dp=2, dap=2, sp=2] grid
    assert [r[:4] for r in results] == [(2, 2, 2, rank // 4) for rank in range(8)]
    assert [r[4] for r in results] == [4.0, 6.0, 4.0, 6.0, 12.0, 14.0, 12.0, 14.0]  # DAP groups [0, 2], [1, 3], ...


def test_grid_groups_layout():
    groups = grid_groups(8, dp=2, dap=2, sp=2)
    assert groups["sp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dap"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ConfigError, match="world_size"):
        grid_groups(6, dp=2, dap=2, sp=2)


def test_parallel_dims_validation_names_the_mismatch():
    with pytest.raises(ConfigError, match="does not match the 4 processes"):
        ParallelDims(world_size=4, dp=1, dap=2, sp=1)
    with pytest.raises(ConfigError, match="dap=0"):
        ParallelDims(world_size=1, dap=0)
    with pytest.raises(ConfigError, match="torchrun"):
        init_parallel(dap=2)


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 4)
    assert scatter(x, 0, None) is x
    assert gather(x, 1, None) is x
    assert torch.equal(all_to_all(x, 0, 1, None, gather_size=2), x[:, :2])
    buf, handle = gather_async(x, 0, None)
    assert wait(buf, handle) is x


def test_pad_to_multiple():
    x = torch.ones(2, 5)
    padded = pad_to_multiple(x, 1, 4)
    assert padded.shape == (2, 8)
    assert padded[:, 5:].abs().sum() == 0
    assert pad_to_multiple(x, 0, 2) is x
