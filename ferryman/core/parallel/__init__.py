"""Process groups and the collectives of dynamic axial parallelism (DAP) and sequence parallelism."""

from ferryman.core.parallel.collectives import (
    AsyncHandle,
    all_to_all,
    all_to_all_async,
    gather,
    gather_async,
    pad_to_multiple,
    scatter,
    wait,
)
from ferryman.core.parallel.dims import ParallelDims, grid_groups, init_parallel
from ferryman.core.parallel.grads import mark_partial_grads, partial_grad_group, reduce_partial_grads
from ferryman.core.parallel.launch import run_distributed

__all__ = [
    "AsyncHandle",
    "ParallelDims",
    "all_to_all",
    "all_to_all_async",
    "gather",
    "gather_async",
    "grid_groups",
    "init_parallel",
    "mark_partial_grads",
    "pad_to_multiple",
    "partial_grad_group",
    "reduce_partial_grads",
    "run_distributed",
    "scatter",
    "wait",
]
