"""Broadcast bookkeeping shared by the Triton wrappers.

A kernel sees every operand as a batch of matrices. Instead of coalescing batch dims
(and being limited to a fixed number of them), the host builds a small table with one row
per batch index and one column per operand: the element offset of that operand's matrix.
Broadcast dims get stride 0, so a pair bias [B, 1, H, Q, K] is read, never expanded.

The columns are named once per table (``table_columns``): the host places each operand under its
column's name and the kernel loads the same name, so the two cannot disagree on the order.
"""

from __future__ import annotations

import contextlib
import math

import torch

try:
    from triton.language import constexpr as _column
except ImportError:  # without Triton only the host reads the columns
    _column = int


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_launch_config(n_rows: int, n_cols: int, interpreted: bool) -> tuple[int, int, int]:
    """(rows per program, padded row length, warps) for the row-wise kernels (softmax, LayerNorm)."""
    block_c = next_pow2(n_cols)
    # The interpreter pays per program, a GPU per register: bigger tiles there.
    budget, max_rows = (65536, 64) if interpreted else (4096, 4096)
    block_r = max(1, min(next_pow2(n_rows), max_rows, budget // block_c))
    num_warps = min(16, max(4, next_pow2(block_r * block_c // 1024)))
    return block_r, block_c, num_warps


def lift(t: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """View t with leading size-1 dims so it has ``rank`` dims (the broadcasting rule)."""
    if t is None or t.dim() == rank:
        return t
    if t.dim() > rank:
        raise ValueError(f"tensor of shape {tuple(t.shape)} has more dims than the logits ({rank})")
    return t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))


def matrix_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(row, col) strides of the trailing matrix, 0 along a broadcast (size-1) dim."""
    if t is None:
        return 0, 0
    rows, cols = t.shape[-2:]
    return (t.stride(-2) if rows > 1 else 0), (t.stride(-1) if cols > 1 else 0)


def batch_strides(t: torch.Tensor | None, batch_shape: tuple[int, ...]) -> list[int]:
    """Strides of t's batch dims against batch_shape, 0 where t is broadcast."""
    if t is None:
        return [0] * len(batch_shape)
    t = lift(t, len(batch_shape) + 2)
    out = []
    for dim, size in enumerate(batch_shape):
        if t.shape[dim] == size and size > 1:
            out.append(t.stride(dim))
        elif t.shape[dim] == 1 or size == 1:
            out.append(0)
        else:
            raise ValueError(f"shape {tuple(t.shape)} does not broadcast to batch {batch_shape}")
    return out


def table_columns(count: int) -> tuple[tuple, object]:
    """(column numbers 0..count-1, the row width) as compile-time constants a Triton kernel can read.

    Kernels may read module globals only when they are ``tl.constexpr``; unpack the result into
    named globals, e.g. ``(FWD_Q, FWD_K), FWD_WIDTH = table_columns(2)``.
    """
    return tuple(_column(i) for i in range(count)), _column(count)


def offset_table(batch_shape, operands: dict, width, device) -> torch.Tensor:
    """[prod(batch_shape), width] int64 matrix offsets, each operand in the column that is its key.

    ``operands`` maps every column of the table (from ``table_columns``) to its tensor, or None
    (offsets 0: the kernel does not read it).
    """
    columns = sorted(int(c) for c in operands)
    if columns != list(range(int(width))):
        raise ValueError(f"offset table of width {int(width)} given columns {columns}: name each column once")
    num = math.prod(batch_shape)
    table = torch.zeros((*batch_shape, int(width)), dtype=torch.int64)
    for col, t in ((int(c), t) for c, t in operands.items()):
        for dim, stride in enumerate(batch_strides(t, tuple(batch_shape))):
            if stride:
                view = [1] * len(batch_shape)
                view[dim] = batch_shape[dim]
                idx = torch.arange(batch_shape[dim], dtype=torch.int64).view(view)
                table[..., col] += idx * stride
    return table.reshape(num, int(width)).to(device)


def reduce_to(grad: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """Sum a gradient of the broadcast shape back to an operand's own shape, in fp32."""
    lifted = (1,) * (grad.dim() - len(shape)) + tuple(shape)
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, lifted)) if s == 1 and g != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True, dtype=torch.float32)
    return grad.reshape(shape).to(dtype)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
