"""Gradients that are partial sums over a model-parallel group (DAP, sequence parallelism).

Under DAP or sequence parallelism every rank of the group holds the same (replicated) weights but
applies them to its own shard of the rows or tokens, so each rank's gradient is its shard's share
and the true gradient is their sum over the group. ``parallelize`` functions of the apps declare
this once, from outside the model, with ``mark_partial_grads(params, group)``; the sum is then
taken by the code in this module, never by model code.

The sum happens before the gradient is accumulated into ``.grad``, so ``.grad`` (and any engine
hook that reads it, such as Gemini's) holds the whole gradient, and accumulation over
micro-batches stays linear.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ferryman.core.parallel.collectives import Group, group_size

PARTIAL_GROUP_ATTR = "_ferryman_partial_grad_group"


def partial_grad_group(param: nn.Parameter) -> Group:
    """The group over which ``param``'s gradient is a partial sum, or None."""
    return getattr(param, PARTIAL_GROUP_ATTR, None)


def mark_partial_grads(params: Iterable[nn.Parameter], group: Group) -> int:
    """Declare that the gradients of ``params`` are partial sums over ``group`` and have them summed.

    Returns how many parameters were marked (frozen ones and a group of one are skipped). Marking a
    parameter twice for the same group is a no-op; for two different groups it is an error.
    """
    if group_size(group) == 1:
        return 0
    marked = 0
    for param in params:
        if not param.requires_grad:
            continue
        current = partial_grad_group(param)
        if current is group:
            continue
        if current is not None:
            raise ValueError("a parameter's gradient cannot be a partial sum over two different groups")
        setattr(param, PARTIAL_GROUP_ATTR, group)
        param.register_hook(_summed_over(group))
        marked += 1
    return marked


def _summed_over(group: Group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad

    return hook
