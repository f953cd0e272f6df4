"""Differentiable collectives for dynamic axial parallelism (DAP) and sequence parallelism.

Conventions (the adjoint pairs that make sharded training equal unsharded training):

- ``scatter``: forward keeps this rank's slice of a replicated tensor; backward all-gathers the
  slice gradients, so every rank again holds the full (replicated) gradient.
- ``gather``: forward all-gathers the shards; backward reduce-scatters (sums the gradients the
  ranks computed from the full tensor and keeps this rank's slice). Use ``reduce_grad=False`` when
  everything after the gather is computed identically on every rank (a replicated tail).
- ``all_to_all``: re-shards from one dimension to another; backward is the reverse all_to_all.

Sizes that the group does not divide are padded with zeros at the end of the sharded dimension;
``gather`` and ``all_to_all`` take the true size to trim the padding off again.

Every op has an async form: ``buf, handle = gather_async(...)`` starts the communication and
``wait(buf, handle)`` finishes it, as two autograd nodes. Work placed between them overlaps the
communication in forward, and in backward the reverse communication is started by ``wait``'s
backward and finished by the start op's backward, overlapping the same work in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def pad_to_multiple(x: Tensor, dim: int, multiple: int) -> Tensor:
    """Zero-pad ``x`` at the end of ``dim`` so its length is a multiple of ``multiple``."""
    dim = dim % x.ndim
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def _wait(work: dist.Work | None) -> None:
    if work is not None:
        work.wait()


def _local_slice(x: Tensor, dim: int, group: Group) -> Tensor:
    world = group_size(group)
    x = pad_to_multiple(x, dim, world)
    length = x.shape[dim] // world
    return x.narrow(dim, group_rank(group) * length, length).contiguous()


class _GatherOp:
    """All-gather along ``dim``; the gradient is reduce-scattered (or sliced)."""

    def __init__(self, dim: int, group: Group, size: int | None, reduce_grad: bool):
        self.dim, self.group, self.size, self.reduce_grad = dim, group, size, reduce_grad
        self.world = group_size(group)

    def launch(self, x: Tensor) -> tuple[Tensor, dist.Work | None]:
        self.dim = self.dim % x.ndim
        self.local = x.shape[self.dim]
        inp = x.movedim(self.dim, 0).contiguous()  # [local, *rest]
        out = inp.new_empty((self.world * self.local, *inp.shape[1:]))  # [world*local, *rest]
        return out, dist.all_gather_single(out, inp, group=self.group, async_op=True)

    def finish(self, buf: Tensor) -> Tensor:
        y = buf.movedim(0, self.dim)
        if self.size is not None:
            y = y.narrow(self.dim, 0, self.size)
        return y.contiguous()

    def launch_grad(self, grad: Tensor) -> tuple[Tensor, dist.Work | None]:
        grad = pad_to_multiple(grad, self.dim, self.world).movedim(self.dim, 0).contiguous()  # [world*local, *rest]
        if not self.reduce_grad:
            return grad.narrow(0, group_rank(self.group) * self.local, self.local), None
        out = grad.new_empty((self.local, *grad.shape[1:]))
        return out, dist.reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def finish_grad(self, buf: Tensor) -> Tensor:
        return buf.movedim(0, self.dim).contiguous()


def _a2a_launch(x: Tensor, split_dim: int, group: Group) -> tuple[Tensor, dist.Work | None]:
    inp = x.movedim(split_dim, 0).contiguous()  # [world*s, *rest]
    out = torch.empty_like(inp)
    return out, dist.all_to_all_single(out, inp, group=group, async_op=True)


def _a2a_finish(buf: Tensor, split_dim: int, cat_dim: int, world: int) -> Tensor:
    # buf: [world*s, *rest]; block j came from rank j and holds its shard along cat_dim.
    blocks = [block.movedim(0, split_dim) for block in buf.chunk(world, 0)]
    return torch.cat(blocks, dim=cat_dim)


class _AllToAllOp:
    """Split ``scatter_dim`` across ranks and join ``gather_dim`` from them."""

    def __init__(self, scatter_dim: int, gather_dim: int, group: Group, gather_size: int | None):
        self.scatter_dim, self.gather_dim, self.group, self.gather_size = scatter_dim, gather_dim, group, gather_size
        self.world = group_size(group)

    def launch(self, x: Tensor) -> tuple[Tensor, dist.Work | None]:
        self.scatter_dim, self.gather_dim = self.scatter_dim % x.ndim, self.gather_dim % x.ndim
        if self.scatter_dim == self.gather_dim:
            raise ValueError("all_to_all needs two different dimensions")
        self.full_scatter, self.local_gather = x.shape[self.scatter_dim], x.shape[self.gather_dim]
        return _a2a_launch(pad_to_multiple(x, self.scatter_dim, self.world), self.scatter_dim, self.group)

    def finish(self, buf: Tensor) -> Tensor:
        y = _a2a_finish(buf, self.scatter_dim, self.gather_dim, self.world)
        if self.gather_size is not None:
            y = y.narrow(self.gather_dim, 0, self.gather_size).contiguous()
        return y

    def launch_grad(self, grad: Tensor) -> tuple[Tensor, dist.Work | None]:
        grad = pad_to_multiple(grad, self.gather_dim, self.world)
        return _a2a_launch(grad, self.gather_dim, self.group)

    def finish_grad(self, buf: Tensor) -> Tensor:
        g = _a2a_finish(buf, self.gather_dim, self.scatter_dim, self.world)
        return g.narrow(self.scatter_dim, 0, self.full_scatter).contiguous()


class _Sync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, op) -> Tensor:
        ctx.op = op
        buf, work = op.launch(x)
        _wait(work)
        return op.finish(buf)

    @staticmethod
    def backward(ctx, grad: Tensor):
        buf, work = ctx.op.launch_grad(grad)
        _wait(work)
        return ctx.op.finish_grad(buf), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: Group) -> Tensor:
        dim = dim % x.ndim
        ctx.op = _GatherOp(dim, group, size=x.shape[dim], reduce_grad=False)
        return _local_slice(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        buf, work = ctx.op.launch(grad.contiguous())
        _wait(work)
        return ctx.op.finish(buf), None, None


@dataclass
class AsyncHandle:
    """Links the start and wait halves of an async collective, in forward and in backward."""

    op: _GatherOp | _AllToAllOp | None
    work: dist.Work | None = None
    grad_buf: Tensor | None = None
    grad_work: dist.Work | None = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, handle: AsyncHandle) -> Tensor:
        ctx.handle = handle
        buf, handle.work = handle.op.launch(x)
        return buf

    @staticmethod
    def backward(ctx, _placeholder: Tensor):
        handle = ctx.handle
        _wait(handle.grad_work)
        grad = handle.op.finish_grad(handle.grad_buf)
        handle.grad_buf = handle.grad_work = None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf: Tensor, handle: AsyncHandle) -> Tensor:
        ctx.handle, ctx.buf_shape = handle, buf.shape
        _wait(handle.work)
        handle.work = None
        out = handle.op.finish(buf)
        return out.clone() if out.data_ptr() == buf.data_ptr() else out

    @staticmethod
    def backward(ctx, grad: Tensor):
        handle = ctx.handle
        handle.grad_buf, handle.grad_work = handle.op.launch_grad(grad.contiguous())
        # The real gradient travels through the handle; autograd only needs a tensor of the right shape.
        return grad.new_zeros(()).expand(ctx.buf_shape), None


def scatter(x: Tensor, dim: int, group: Group) -> Tensor:
    """This rank's slice of the replicated ``x`` along ``dim`` (padded to a multiple of the group)."""
    if group_size(group) == 1:
        return x
    return _Scatter.apply(x, dim, group)


def gather(x: Tensor, dim: int, group: Group, *, size: int | None = None, reduce_grad: bool = True) -> Tensor:
    """Concatenate every rank's shard along ``dim``; ``size`` trims padding added by ``scatter``."""
    if group_size(group) == 1:
        return x if size is None else x.narrow(dim, 0, size)
    return _Sync.apply(x, _GatherOp(dim, group, size, reduce_grad))


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: Group, *, gather_size: int | None = None) -> Tensor:
    """Re-shard ``x`` from ``gather_dim`` (sharded on input) to ``scatter_dim`` (sharded on output).

    ``scatter_dim`` is padded to a multiple of the group size; ``gather_size`` trims the padding
    of the joined dimension.
    """
    if group_size(group) == 1:
        return x if gather_size is None else x.narrow(gather_dim, 0, gather_size)
    return _Sync.apply(x, _AllToAllOp(scatter_dim, gather_dim, group, gather_size))


def gather_async(
    x: Tensor, dim: int, group: Group, *, size: int | None = None, reduce_grad: bool = True
) -> tuple[Tensor, AsyncHandle]:
    """Start ``gather``; pass both results to ``wait`` to get the gathered tensor."""
    if group_size(group) == 1:
        return gather(x, dim, group, size=size), AsyncHandle(op=None)
    handle = AsyncHandle(op=_GatherOp(dim, group, size, reduce_grad))
    return _Start.apply(x, handle), handle


def all_to_all_async(
    x: Tensor, scatter_dim: int, gather_dim: int, group: Group, *, gather_size: int | None = None
) -> tuple[Tensor, AsyncHandle]:
    """Start ``all_to_all``; pass both results to ``wait``."""
    if group_size(group) == 1:
        return all_to_all(x, scatter_dim, gather_dim, group, gather_size=gather_size), AsyncHandle(op=None)
    handle = AsyncHandle(op=_AllToAllOp(scatter_dim, gather_dim, group, gather_size))
    return _Start.apply(x, handle), handle


def wait(buf: Tensor, handle: AsyncHandle) -> Tensor:
    """Finish an async collective started by ``gather_async`` or ``all_to_all_async``."""
    if handle.op is None:
        return buf
    return _Wait.apply(buf, handle)
