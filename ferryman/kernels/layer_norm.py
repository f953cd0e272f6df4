"""LayerNorm over the last dim with fp32 statistics, fused forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._layout import device_guard, row_launch_config
from .backend import interpreter_enabled, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs neither
    triton = tl = None


def layer_norm_ref(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """The spec: statistics in fp32 (fp64 for fp64 input), result in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(x.to(acc), x.shape[-1:], w, b, eps).to(x.dtype)


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5, *, backend: str = "auto"):
    """LayerNorm of x over its last dim with optional elementwise affine weight and bias."""
    if resolve_backend(backend, x, weight, bias) == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same parameters and state_dict) using the fused kernel.

    ``backend`` (auto|triton|torch) may be set after construction, e.g. from a config.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


# ---------------------------------------------------------------- Triton path

MAX_FEATURES = 32768  # a row lives in registers; wider rows take the reference


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    return row_launch_config(n_rows, n_cols, interpreter_enabled())


def _ln_forward(x2, weight, bias, eps):
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    block_r, block_c, warps = _launch_config(n_rows, n_cols)
    _ln_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, y, x2 if weight is None else weight, x2 if bias is None else bias, mean, rstd,
        n_rows, n_cols, x2.stride(0), y.stride(0), eps,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return y, mean, rstd


def _num_partials(n_rows: int, block_r: int) -> int:
    # Each program sums dweight/dbias over its own rows into a private fp32 slot (no atomics).
    target = 4 if interpreter_enabled() else 256
    return max(1, min(target, triton.cdiv(n_rows, block_r)))


def _ln_backward(dy2, x2, weight, mean, rstd, need_wb):
    n_rows, n_cols = x2.shape
    block_r, block_c, warps = _launch_config(n_rows, n_cols)
    programs = _num_partials(n_rows, block_r)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_r) * block_r
    programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty_like(x2)
    partial = torch.empty((2, programs, n_cols), dtype=torch.float32, device=x2.device)
    _ln_bwd_kernel[(programs,)](
        dy2, x2, x2 if weight is None else weight, mean, rstd, dx, partial,
        n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program, programs * n_cols,
        HAS_W=weight is not None, NEED_WB=need_wb,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return dx, partial.sum(dim=1)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        with device_guard(x2):
            y, mean, rstd = _ln_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        need_wb = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        with device_guard(x2):
            dx, sums = _ln_backward(dy2, x2, weight, mean, rstd, need_wb)
        dw = sums[0].to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = sums[1].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.view(dy.shape), dw, db, None


def layer_norm_triton(x, weight=None, bias=None, eps: float = 1e-5):
    """The fused path; fp64 and rows wider than MAX_FEATURES fall back to the reference."""
    if x.dtype == torch.float64 or x.shape[-1] > MAX_FEATURES or x.numel() == 0:
        return layer_norm_ref(x, weight, bias, eps)
    return _LayerNormFn.apply(x, weight, bias, eps)


if triton is not None:

    @triton.jit
    def _ln_fwd_kernel(
        X, Y, W, B, MEAN, RSTD, n_rows, n_cols, sx, sy, eps,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        inside = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _ln_bwd_kernel(
        DY, X, W, MEAN, RSTD, DX, PARTIAL, n_rows, n_cols, sdy, sx, sdx, rows_per_program, db_offset,
        HAS_W: tl.constexpr, NEED_WB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_W else 1.0
        dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for start in range(0, rows_per_program, BLOCK_R):
            rows = first + start + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            inside = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w
            c1 = tl.sum(xhat * wdy, axis=1) / n_cols
            c2 = tl.sum(wdy, axis=1) / n_cols
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + rows[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=inside)
            if NEED_WB:
                dw_acc += tl.sum(dy * xhat, axis=0)
                db_acc += tl.sum(dy, axis=0)
        if NEED_WB:
            tl.store(PARTIAL + pid * n_cols + cols, dw_acc, mask=col_ok)
            tl.store(PARTIAL + db_offset + pid * n_cols + cols, db_acc, mask=col_ok)
