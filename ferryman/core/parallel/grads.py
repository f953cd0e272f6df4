"""Gradients that are partial sums over a model-parallel group (DAP, sequence parallelism).

Under DAP or sequence parallelism every rank of the group holds the same (replicated) weights but
applies them to its own shard of the rows or tokens, so each rank's gradient is its shard's share
and the true gradient is their sum over the group. An app's ``parallelize`` declares this once,
from outside the model, with ``mark_partial_grads(params, group)``: a tag on each parameter,
nothing more. The sum is taken by whoever owns the gradients, in buckets rather than one
collective per parameter:

- the plain engine calls ``reduce_partial_grads`` on its ``.grad`` tensors before it clips and
  steps (the sum is linear, so doing it once per update covers every accumulated micro-batch);
- the Gemini engine packs parameters of one group into their own chunks and all-reduces each such
  chunk's gradient buffer over the group before its data-parallel reduce-scatter;
- code that runs ``backward`` without an engine (a test, a custom loop) calls
  ``reduce_partial_grads`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ferryman.core.parallel.collectives import Group, group_size

PARTIAL_GROUP_ATTR = "_ferryman_partial_grad_group"
BUCKET_BYTES = 32 * 1024 * 1024  # per all-reduce: few, long collectives; bounded extra memory


def partial_grad_group(param: nn.Parameter) -> Group:
    """The group over which ``param``'s gradient is a partial sum, or None."""
    return getattr(param, PARTIAL_GROUP_ATTR, None)


def mark_partial_grads(params: Iterable[nn.Parameter], group: Group) -> int:
    """Declare that the gradients of ``params`` are partial sums over ``group``.

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
        marked += 1
    return marked


def reduce_partial_grads(params: Iterable[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum the ``.grad`` of every marked parameter over its group, a bucket per collective.

    Every rank of a group must call it with the same parameters in the same order (as the ranks of
    a DAP or sequence-parallel group do: they hold the same model). A parameter without a gradient
    on this rank takes part with zeros; one without a gradient on every rank keeps ``grad=None``.
    Returns the number of collectives issued.
    """
    by_group: dict[int, tuple[Group, list[nn.Parameter]]] = {}
    for param in params:
        group = partial_grad_group(param)
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(param)
    calls = 0
    for group, members in by_group.values():
        for bucket in _buckets(members, bucket_bytes):
            _all_reduce_bucket(bucket, group)
            calls += 1
    return calls


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one dtype, up to ``bucket_bytes`` each (a larger one alone)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != param.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(param)
        size += nbytes
    return buckets


def _all_reduce_bucket(bucket: list[nn.Parameter], group: Group) -> None:
    # one presence flag per parameter rides along, so a parameter no rank used keeps grad=None
    # (AdamW then skips it, as torch's does) and one that only some ranks used gets the sum
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
    present = torch.tensor([p.grad is not None for p in bucket], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*grads, present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset, used = 0, flat[-len(bucket) :].tolist()
    for param, count in zip(bucket, used):
        value = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
        if param.grad is not None:
            param.grad.copy_(value)
        elif count > 0:
            param.grad = value.clone()
