"""Process groups for data, dynamic-axial and sequence parallelism, built from torchrun's environment.

The world is laid out as a [dp, dap, sp] grid of ranks (the innermost axis varies fastest), so the
ranks of one DAP or sequence-parallel group are neighbours and land on one node when they can.
Nothing here is global: code that communicates takes a group argument.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ferryman.core.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Sizes of the parallel axes and this rank's groups on each.

    ``dp * dap * sp == world_size``. A group is ``None`` when the world has one process, in which
    case every collective is the identity.
    """

    world_size: int = 1
    rank: int = 0
    dp: int = 1
    dap: int = 1
    sp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_group: dist.ProcessGroup | None = None
    dap_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "dap", "sp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel size {name}={getattr(self, name)} must be at least 1")
        if self.dp * self.dap * self.sp != self.world_size:
            raise ConfigError(
                f"dp={self.dp} x dap={self.dap} x sp={self.sp} = {self.dp * self.dap * self.sp} "
                f"does not match the {self.world_size} processes started (torchrun --nproc-per-node)"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.dap * self.sp)


def grid_groups(world_size: int, dp: int, dap: int, sp: int) -> dict[str, list[list[int]]]:
    """Rank lists of every group on each axis of a [dp, dap, sp] grid (pure arithmetic, testable)."""
    if dp * dap * sp != world_size:
        raise ConfigError(f"dp*dap*sp = {dp * dap * sp} but world_size = {world_size}")
    ranks = torch.arange(world_size).reshape(dp, dap, sp)
    return {
        "dp": ranks.permute(1, 2, 0).reshape(-1, dp).tolist(),  # [dap*sp groups, dp]
        "dap": ranks.permute(0, 2, 1).reshape(-1, dap).tolist(),  # [dp*sp groups, dap]
        "sp": ranks.reshape(-1, sp).tolist(),  # [dp*dap groups, sp]
    }


def _own_group(groups: list[list[int]], rank: int, backend: str | None) -> dist.ProcessGroup:
    mine = None
    for ranks in groups:  # every rank must take part in creating every group
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine


def init_parallel(*, dap: int = 1, sp: int = 1, backend: str | None = None, timeout_s: float = 600) -> ParallelDims:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, ...) and build the groups.

    Without torchrun's variables this is a single process and no group is created. The backend is
    NCCL when CUDA is available and gloo otherwise, unless given.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return ParallelDims(dap=dap, sp=sp, world_size=1, device=device) if dap == sp == 1 else _bad_single(dap, sp)
    if world_size % (dap * sp):
        raise ConfigError(f"{world_size} processes cannot be split into DAP groups of {dap} and sequence groups of {sp}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dp = world_size // (dap * sp)
    grid = grid_groups(world_size, dp, dap, sp)
    return ParallelDims(
        world_size=world_size,
        rank=rank,
        dp=dp,
        dap=dap,
        sp=sp,
        device=device,
        dp_group=_own_group(grid["dp"], rank, backend),
        dap_group=_own_group(grid["dap"], rank, backend),
        sp_group=_own_group(grid["sp"], rank, backend),
    )


def _bad_single(dap: int, sp: int) -> ParallelDims:
    raise ConfigError(
        f"dap={dap}, sp={sp} needs that many processes; start with "
        f"`torchrun --nproc-per-node {dap * sp} ...` (this is a single process)"
    )
