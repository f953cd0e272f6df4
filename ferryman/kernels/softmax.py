"""Masked softmax with an additive bias, fused: softmax(x + bias) over the last dim where mask.

Logits are [*, H, Q, K]; mask and bias broadcast against them the way AlphaFold's MSA row,
column and triangle attention use them (mask [*, 1, 1, K], pair bias [B, 1, H, Q, K]).
Statistics are accumulated in fp32. Rows whose keys are all masked give zero probabilities
and zero gradients rather than NaN.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._layout import (
    device_guard,
    lift,
    matrix_strides,
    offset_table,
    reduce_to,
    row_launch_config,
    table_columns,
)
from .backend import interpreter_enabled, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs neither
    triton = tl = None


def mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = attend) from a bool or 0/1 mask, without expanding it."""
    return mask if mask.dtype == torch.bool else mask != 0


def softmax_ref(x: torch.Tensor, mask=None, bias=None) -> torch.Tensor:
    """The spec: fp32 (or fp64 for fp64 input) softmax of x + bias over the last dim."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(acc)
    if bias is not None:
        logits = logits + bias.to(acc)
    if mask is not None:
        logits = logits.masked_fill(~mask_to_bool(mask), float("-inf"))
    if logits.shape[-1] == 0:  # no keys: empty rows (amax would raise); attention then gives zeros
        return logits.to(x.dtype)
    row_max = logits.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; shifting by 0 keeps exp() at exactly 0 there.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max.detach())
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / denom.clamp_min(torch.finfo(acc).tiny)
    return probs.to(x.dtype)


def softmax(x: torch.Tensor, mask=None, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """Softmax of ``x + bias`` over the last dim with ``mask`` (True or 1 = attend).

    x: [*, H, Q, K]; mask: bool or 0/1, broadcastable to x; bias: additive tensor
    broadcastable to x (its gradient is reduced over the dims it was broadcast on).
    """
    if resolve_backend(backend, x, mask, bias) == "triton":
        return softmax_triton(x, mask, bias)
    return softmax_ref(x, mask, bias)


# ---------------------------------------------------------------- Triton path

MAX_COLS = 65536  # one row lives in registers; longer rows take the reference


# Columns of the offset tables (one row per batch index) of the forward and the backward kernel.
(FWD_X, FWD_Y, FWD_BIAS, FWD_MASK), FWD_WIDTH = table_columns(4)
(BWD_Y, BWD_DY, BWD_DX), BWD_WIDTH = table_columns(3)


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    return row_launch_config(n_rows, n_cols, interpreter_enabled())


def _as_matrix_batch(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() >= 2 else x.unsqueeze(0)


def _softmax_forward(x, mask, bias):
    x2 = _as_matrix_batch(x)
    rank = x2.dim()
    mask = None if mask is None else lift(mask_to_bool(mask), rank).view(torch.uint8)
    bias = lift(bias, rank)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    batch, (n_rows, n_cols) = tuple(x2.shape[:-2]), x2.shape[-2:]
    table = offset_table(batch, {FWD_X: x2, FWD_Y: y, FWD_BIAS: bias, FWD_MASK: mask}, FWD_WIDTH, x.device)
    block_r, block_c, warps = _launch_config(n_rows, n_cols)
    grid = (table.shape[0], triton.cdiv(n_rows, block_r))
    _softmax_fwd_kernel[grid](
        x2, y, x2 if bias is None else bias, x2 if mask is None else mask, table, n_rows, n_cols,
        *matrix_strides(x2), *matrix_strides(y), *matrix_strides(bias), *matrix_strides(mask),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return y.view(x.shape)


def _softmax_backward(y, dy):
    y2, dy2 = _as_matrix_batch(y), _as_matrix_batch(dy)
    dx = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    batch, (n_rows, n_cols) = tuple(y2.shape[:-2]), y2.shape[-2:]
    table = offset_table(batch, {BWD_Y: y2, BWD_DY: dy2, BWD_DX: dx}, BWD_WIDTH, y.device)
    block_r, block_c, warps = _launch_config(n_rows, n_cols)
    grid = (table.shape[0], triton.cdiv(n_rows, block_r))
    _softmax_bwd_kernel[grid](
        y2, dy2, dx, table, n_rows, n_cols,
        *matrix_strides(y2), *matrix_strides(dy2), *matrix_strides(dx),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return dx.view(y.shape)


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, bias):
        with device_guard(x):
            y = _softmax_forward(x, mask, bias)
        ctx.save_for_backward(y)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        with device_guard(y):
            dx = _softmax_backward(y, dy)
        dbias = None
        if ctx.needs_input_grad[2]:
            dbias = reduce_to(dx, *ctx.bias_meta)
        return (dx if ctx.needs_input_grad[0] else None), None, dbias


def softmax_triton(x, mask=None, bias=None):
    """The fused path; fp64 and rows longer than MAX_COLS fall back to the reference."""
    if x.dtype == torch.float64 or x.shape[-1] > MAX_COLS or x.numel() == 0:
        return softmax_ref(x, mask, bias)
    return _SoftmaxFn.apply(x, mask, bias)


if triton is not None:

    @triton.jit
    def _softmax_fwd_kernel(
        X, Y, BIAS, MASK, TABLE, n_rows, n_cols,
        sxr, sxc, syr, syc, sbr, sbc, smr, smc,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        r, c = rows[:, None], cols[None, :]
        row = TABLE + pid_b * FWD_WIDTH
        x = tl.load(X + tl.load(row + FWD_X) + r * sxr + c * sxc, mask=inside, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            b = tl.load(BIAS + tl.load(row + FWD_BIAS) + r * sbr + c * sbc, mask=inside, other=0.0)
            x += b.to(tl.float32)
        keep = inside
        if HAS_MASK:
            m = tl.load(MASK + tl.load(row + FWD_MASK) + r * smr + c * smc, mask=inside, other=0)
            keep = keep & (m != 0)
        x = tl.where(keep, x, float("-inf"))
        row_max = tl.max(x, axis=1)
        # A fully masked row: shift by 0 so every exp() is exactly 0, then divide by 1.
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        e = tl.where(keep, tl.exp(x - row_max[:, None]), 0.0)
        denom = tl.sum(e, axis=1)
        denom = tl.where(denom == 0.0, 1.0, denom)
        y = e / denom[:, None]
        y_ptr = Y + tl.load(row + FWD_Y) + r * syr + c * syc
        tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _softmax_bwd_kernel(
        Y, DY, DX, TABLE, n_rows, n_cols, syr, syc, sdyr, sdyc, sdxr, sdxc,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        r, c = rows[:, None], cols[None, :]
        row = TABLE + pid_b * BWD_WIDTH
        y = tl.load(Y + tl.load(row + BWD_Y) + r * syr + c * syc, mask=inside, other=0.0)
        dy = tl.load(DY + tl.load(row + BWD_DY) + r * sdyr + c * sdyc, mask=inside, other=0.0)
        y, dy = y.to(tl.float32), dy.to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        dx = y * (dy - dot[:, None])
        dx_ptr = DX + tl.load(row + BWD_DX) + r * sdxr + c * sdxc
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=inside)
