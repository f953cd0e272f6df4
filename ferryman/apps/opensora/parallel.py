"""Sequence parallelism for a built STDiT: shard each frame's patches over a process group.

``parallelize(model, group)`` switches a model to sharded tokens (see ``model/blocks.py`` for the
all_to_all in spatial attention). Every rank of the group must then see the same batch and draw
the same noise. Each rank's backward covers only its own patches, so a gradient hook on every
parameter sums the gradient over the group before it is accumulated: ``.grad`` (and any engine
hook that reads it, such as Gemini's) then holds the gradient of the whole sequence, and gradient
accumulation over micro-batches stays correct.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .model import STDiT


def _sum_over(group: dist.ProcessGroup):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad

    return hook


def parallelize(model: STDiT, sp_group: dist.ProcessGroup | None) -> STDiT:
    """Shard tokens over ``sp_group`` (None or a group of one: leave the model as it is)."""
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return model
    model.sp_group = sp_group
    for block in model.spatial_blocks:
        block.attn.sp_group = sp_group
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(_sum_over(sp_group))
    return model
