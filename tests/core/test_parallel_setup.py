"""Process-group setup: the [dp, dap, sp] grid against an independent layout, each group's members
found by a collective on threaded ranks, the backend and timeout init_parallel asks for, and its
one-line errors."""

import datetime
import itertools

import pytest
import torch
import torch.distributed as dist

from ferryman.core.errors import ConfigError
from ferryman.core.parallel import ParallelDims, grid_groups, init_parallel
from tests.threaded import run_threaded


def _layout(dp: int, dap: int, sp: int) -> dict[str, list[list[int]]]:
    """The groups by their definition: rank = (i*dap + j)*sp + k; a group varies one index."""
    rank = {(i, j, k): (i * dap + j) * sp + k for i, j, k in itertools.product(range(dp), range(dap), range(sp))}
    return {
        "dp": [[rank[i, j, k] for i in range(dp)] for j in range(dap) for k in range(sp)],
        "dap": [[rank[i, j, k] for j in range(dap)] for i in range(dp) for k in range(sp)],
        "sp": [[rank[i, j, k] for k in range(sp)] for i in range(dp) for j in range(dap)],
    }


@pytest.mark.parametrize("dp, dap, sp", [(2, 3, 2), (3, 1, 2), (1, 4, 1), (2, 1, 1), (1, 1, 3)])
def test_grid_groups_match_the_layout_by_definition(dp, dap, sp):
    assert grid_groups(dp * dap * sp, dp, dap, sp) == _layout(dp, dap, sp)


def test_grid_groups_refuse_a_world_of_another_size():
    with pytest.raises(ConfigError, match=r"^dp\*dap\*sp = 12 but world_size = 10$"):
        grid_groups(10, dp=2, dap=3, sp=2)


def test_parallel_dims_messages():
    with pytest.raises(ConfigError, match=(
        r"^dp=1 x dap=2 x sp=3 = 6 does not match the 4 processes started \(torchrun --nproc-per-node\)$"
    )):
        ParallelDims(world_size=4, dp=1, dap=2, sp=3)
    for name in ("dp", "dap", "sp"):
        for bad in (0, -2):
            with pytest.raises(ConfigError, match=rf"^parallel size {name}={bad} must be at least 1$"):
                ParallelDims(world_size=1, **{name: bad})
    dims = ParallelDims(world_size=12, rank=7, dp=2, dap=3, sp=2)
    assert dims.dp_rank == 1 and not dims.is_main


def test_a_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dims = init_parallel()
    assert (dims.world_size, dims.rank, dims.dp, dims.dap, dims.sp) == (1, 0, 1, 1, 1)
    assert dims.device == torch.device("cpu")
    assert dims.dp_group is dims.dap_group is dims.sp_group is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # what torchrun sets for one process
    assert init_parallel(backend="gloo").world_size == 1 and not dist.is_initialized()


def test_a_single_process_uses_the_current_cuda_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert init_parallel().device == torch.device("cuda", 2)


@pytest.mark.parametrize("dap, sp, processes", [(2, 1, 2), (1, 3, 3), (2, 3, 6)])
def test_a_single_process_refuses_model_parallel_sizes_in_one_line(monkeypatch, dap, sp, processes):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=(
        rf"^dap={dap}, sp={sp} needs that many processes; start with "
        rf"`torchrun --nproc-per-node {processes} \.\.\.` \(this is a single process\)$"
    )):
        init_parallel(dap=dap, sp=sp)


def test_a_world_the_groups_do_not_divide_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=(
        r"^4 processes cannot be split into DAP groups of 3 and sequence groups of 1$"
    )):
        init_parallel(dap=3)
    with pytest.raises(ConfigError, match=r"^4 processes cannot be split into DAP groups of 1 and sequence groups of 3$"):
        init_parallel(sp=3)


class _Joined(Exception):
    pass


@pytest.fixture
def joins(monkeypatch):
    """What init_parallel passes to ``init_process_group`` (which then stops it: no peers here)."""
    calls = []

    def init_process_group(**kwargs):
        calls.append(kwargs)
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "6")
    return calls


def test_the_backend_is_gloo_without_cuda_and_the_timeout_is_passed(monkeypatch, joins):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_Joined):
        init_parallel(dap=2, sp=3)  # 2 x 3 divides 6 (2 + 3 would not)
    with pytest.raises(_Joined):
        init_parallel(dap=3, timeout_s=42)
    with pytest.raises(_Joined):
        init_parallel(backend="mpi")
    assert joins == [
        {"backend": "gloo", "timeout": datetime.timedelta(seconds=600)},
        {"backend": "gloo", "timeout": datetime.timedelta(seconds=42)},
        {"backend": "mpi", "timeout": datetime.timedelta(seconds=600)},
    ]


def test_the_backend_is_nccl_on_the_local_rank_s_gpu_with_cuda(monkeypatch, joins):
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(_Joined):
        init_parallel(dap=2)
    monkeypatch.delenv("LOCAL_RANK")  # torchrun always sets it; a bare launcher's rank 0 is GPU 0
    with pytest.raises(_Joined):
        init_parallel(dap=2, backend="nccl")
    with pytest.raises(_Joined):
        init_parallel(dap=2, backend="gloo")  # asked for: no GPU is claimed
    assert [j["backend"] for j in joins] == ["nccl", "nccl", "gloo"]
    assert devices == [3, 0]


def _members(rank: int, world: int, dap: int, sp: int, backend: str | None):
    dims = init_parallel(dap=dap, sp=sp, backend=backend)
    members = {}
    for axis in ("dp", "dap", "sp"):
        group = getattr(dims, f"{axis}_group")
        bits = torch.tensor([float(2**rank)], dtype=torch.float64)
        dist.all_reduce(bits, group=group)  # the sum of 2**rank over a group names its members
        members[axis] = [r for r in range(world) if int(bits.item()) >> r & 1]
        members[f"{axis}_backend"] = dist.get_backend(group)
    fields = (dims.world_size, dims.rank, dims.dp, dims.dap, dims.sp, dims.dp_rank, dims.device)
    return fields, members


@pytest.mark.parametrize("world, dap, sp", [(8, 2, 2), (6, 3, 1), (4, 1, 2)])
def test_each_rank_is_in_the_groups_of_the_grid(world, dap, sp):
    results = run_threaded(_members, world, dap, sp, "threaded")
    dp = world // (dap * sp)
    layout = _layout(dp, dap, sp)
    for rank, (fields, members) in enumerate(results):
        assert fields == (world, rank, dp, dap, sp, rank // (dap * sp), torch.device("cpu"))
        for axis in ("dp", "dap", "sp"):
            [mine] = [g for g in layout[axis] if rank in g]
            assert members[axis] == mine, (rank, axis)
            assert members[f"{axis}_backend"] == "threaded"


def test_groups_use_the_backend_asked_for_not_the_default_group_s(monkeypatch):
    """A process group already joined (threaded here) and groups asked for on another backend:
    the groups are built on the one asked for, or on gloo without CUDA when none is asked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("gloo", None):
        for fields, members in run_threaded(_members, 4, 2, 1, backend):
            assert [members[f"{axis}_backend"] for axis in ("dp", "dap", "sp")] == ["gloo"] * 3
            assert fields[-1] == torch.device("cpu")


def _nccl_rank(rank: int, world: int):
    dims = init_parallel(dap=2, backend="nccl")
    return dims.device, dims.dap


def test_an_nccl_rank_s_dims_name_the_gpu_it_was_set_to(monkeypatch):
    """NCCL is not built into the CPU wheel this suite runs on: its groups are gloo stand-ins here,
    and what is checked is init_parallel's own part, the device it sets and records."""
    devices = []
    real_new_group = dist.new_group
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None: real_new_group(
        ranks, backend="gloo" if backend == "nccl" else backend))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_threaded(_nccl_rank, 2) == [(torch.device("cuda", 1), 2)] * 2
    assert devices == [1, 1]
