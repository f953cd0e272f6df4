"""Attention with additive biases and a key mask, flash style: softmax(q k^T * scale + sum(biases)) v.

q: [*, H, Q, D], k and v: [*, H, K, D]. Each bias broadcasts to the logits [*, H, Q, K]
(AF2 pair bias [B, 1, H, Q, K] against q [B, S, H, Q, D]); the mask (bool or 0/1, True =
attend) too, typically [*, 1, 1, K]. Rows with every key masked give a zero output.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._layout import device_guard, lift, matrix_strides, next_pow2, offset_table, reduce_to, table_columns
from .backend import interpreter_enabled, resolve_backend
from .softmax import mask_to_bool, softmax_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs neither
    triton = tl = None

_LOG2E = 1.4426950408889634


def _as_bias_tuple(biases) -> tuple:
    if biases is None:
        return ()
    if isinstance(biases, torch.Tensor):
        return (biases,)
    return tuple(b for b in biases if b is not None)


def attention_ref(q, k, v, biases=(), mask=None, *, scale: float | None = None) -> torch.Tensor:
    """The spec (and eager baseline): full logits, softmax_ref in fp32, probabilities @ v."""
    biases = _as_bias_tuple(biases)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q * scale, k.transpose(-1, -2))  # [*, H, Q, K]
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    probs = softmax_ref(logits, mask, bias)
    return torch.matmul(probs.to(v.dtype), v)  # [*, H, Q, D]


def attention(q, k, v, biases=(), mask=None, *, scale: float | None = None, backend: str = "auto"):
    """Multi-head attention with additive biases and a mask; see the module docstring."""
    biases = _as_bias_tuple(biases)
    _check_shapes(q, k, v)
    if resolve_backend(backend, q, k, v, mask, *biases) == "triton":
        return attention_triton(q, k, v, biases, mask, scale=scale)
    return attention_ref(q, k, v, biases, mask, scale=scale)


# ---------------------------------------------------------------- Triton path
#
# Forward: FlashAttention-2 (online softmax per query block; the logits never leave
# registers, so memory is linear in the key length). Scores are kept in log2 units so the
# kernels use exp2. The row statistic saved for the backward is lse2 = m + log2(l), +inf for
# a row whose keys are all masked (its probabilities recompute to exactly 0).
# Backward, without atomics (bf16/fp16 atomics are unreliable in the interpreter, and
# unordered float atomics are not reproducible): one kernel per key block for dK/dV, one per
# query block for dQ, and for a bias broadcast over batch dims (the AF2 pair bias over MSA
# rows) a kernel whose program owns one tile of the bias gradient and loops over those dims.

MAX_BIASES = 2  # the kernels take two bias pointers; further biases are summed beforehand
MAX_HEAD_DIM = 256  # SD UNet heads reach 160; wider heads take the reference

# Columns of the offset tables (one row per batch index): the forward kernel's, and the one both
# backward kernels share. delta has lse's shape, so it is read at the LSE column's offset.
(FWD_Q, FWD_K, FWD_V, FWD_OUT, FWD_LSE, FWD_B0, FWD_B1, FWD_MASK), FWD_WIDTH = table_columns(8)
(BWD_Q, BWD_K, BWD_V, BWD_DO, BWD_LSE, BWD_B0, BWD_B1, BWD_MASK, BWD_DQ, BWD_DK, BWD_DV), BWD_WIDTH = table_columns(11)


def _check_shapes(q, k, v):
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention: head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: k has {k.shape[-2]} keys but v has {v.shape[-2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def kernel_config(kind: str, n_q: int, head_block: int, dtype: torch.dtype) -> dict:
    """Tile sizes for ``kind`` in fwd|bwd. Fixed, not autotuned: autotuning under the
    interpreter would run every candidate. Sized for H100 shared memory (fp32 tiles are twice
    as wide in bytes, so they get smaller blocks); not yet tuned on a GPU.
    """
    if interpreter_enabled():
        return dict(BLOCK_M=max(16, min(64, next_pow2(n_q))), BLOCK_N=64, num_warps=4, num_stages=1)
    wide = dtype == torch.float32
    if head_block > 128:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    elif kind == "fwd":
        block_m, block_n, warps, stages = (64, 32, 4, 2) if wide else (128, 64, 4 if head_block <= 64 else 8, 3)
    else:
        block_m, block_n, warps, stages = (32, 32, 4, 2) if wide else (64, 64, 4 if head_block <= 64 else 8, 2)
    block_m = max(16, min(block_m, next_pow2(n_q)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _bias_args(biases, mask):
    b0 = biases[0] if len(biases) > 0 else None
    b1 = biases[1] if len(biases) > 1 else None
    return b0, b1, mask


def _strides_args(*tensors):
    return [s for t in tensors for s in matrix_strides(t)]


def _attn_forward(q, k, v, biases, mask, scale, batch):
    n_q, n_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    o = torch.empty((*batch, n_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((*batch, n_q, 1), dtype=torch.float32, device=q.device)
    b0, b1, mask = _bias_args(biases, mask)
    operands = {FWD_Q: q, FWD_K: k, FWD_V: v, FWD_OUT: o, FWD_LSE: lse, FWD_B0: b0, FWD_B1: b1, FWD_MASK: mask}
    table = offset_table(batch, operands, FWD_WIDTH, q.device)
    block_d = max(16, next_pow2(head_dim))
    cfg = kernel_config("fwd", n_q, block_d, q.dtype)
    grid = (table.shape[0], triton.cdiv(n_q, cfg["BLOCK_M"]))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, q if b0 is None else b0, q if b1 is None else b1, q if mask is None else mask,
        table, n_q, n_k, head_dim, scale * _LOG2E,
        *_strides_args(q, k, v, o, b0, b1, mask),
        NUM_BIAS=len(biases), HAS_MASK=mask is not None, BLOCK_D=block_d, **cfg,
    )
    return o, lse


def _reduction_dims(bias, batch) -> list[int]:
    """Batch dims the bias is broadcast over: its gradient sums over them."""
    return [d for d, n in enumerate(batch) if bias.shape[d] == 1 and n > 1]


def _grouped_table(table, batch, r_dims):
    """Reorder table rows to [kept batch dims..., reduced dims...] so a program owns a group."""
    if not r_dims:
        return table, 1
    g_dims = [d for d in range(len(batch)) if d not in r_dims]
    order = torch.arange(table.shape[0], device=table.device).view(batch)
    order = order.permute(*g_dims, *r_dims).reshape(-1)
    num_r = math.prod(batch[d] for d in r_dims)
    return table[order].contiguous(), num_r


def _attn_backward(ctx, do):
    q, k, v, o, lse, mask, *biases = ctx.saved_tensors
    batch, scale = ctx.batch, ctx.scale
    n_q, n_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    delta = (do.float() * o.float()).sum(-1, keepdim=True)  # [*, H, Q, 1] like lse
    dq = torch.empty((*batch, n_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((*batch, n_k, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty_like(dk)
    mask = mask if ctx.has_mask else None
    b0, b1, mask = _bias_args(biases, mask)
    operands = {BWD_Q: q, BWD_K: k, BWD_V: v, BWD_DO: do, BWD_LSE: lse, BWD_B0: b0, BWD_B1: b1, BWD_MASK: mask,
                BWD_DQ: dq, BWD_DK: dk, BWD_DV: dv}
    table = offset_table(batch, operands, BWD_WIDTH, q.device)
    block_d = max(16, next_pow2(head_dim))
    cfg = kernel_config("bwd", n_q, block_d, q.dtype)
    common = dict(NUM_BIAS=len(biases), HAS_MASK=mask is not None, BLOCK_D=block_d, **cfg)
    pointers = (q, k, v, do, lse, delta, q if b0 is None else b0, q if b1 is None else b1,
                q if mask is None else mask)
    strides = _strides_args(q, k, v, do, b0, b1, mask)
    need_q, need_kv = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if need_kv:
        _attn_bwd_dkdv_kernel[(table.shape[0], triton.cdiv(n_k, cfg["BLOCK_N"]))](
            *pointers, dk, dv, table, n_q, n_k, head_dim, scale * _LOG2E, scale,
            *strides, *matrix_strides(dk), **common,
        )
    need_bias = [i for i, b in enumerate(biases) if ctx.needs_input_grad[5 + i]]
    dbiases = [None] * len(biases)
    dq_done = not need_q
    for i in need_bias:
        r_dims = _reduction_dims(biases[i], batch)
        grouped, num_r = _grouped_table(table, batch, r_dims)
        fuse_dq = not dq_done and num_r == 1
        gbuf = torch.empty((table.shape[0] // num_r, n_q, n_k), dtype=torch.float32, device=q.device)
        _attn_bwd_dq_db_kernel[(gbuf.shape[0], triton.cdiv(n_q, cfg["BLOCK_M"]))](
            *pointers, dq, gbuf, grouped, num_r, n_q, n_k, head_dim, scale * _LOG2E, scale,
            *strides, *matrix_strides(dq), COMPUTE_DQ=fuse_dq, COMPUTE_DB=True, **common,
        )
        dq_done = dq_done or fuse_dq
        dbiases[i] = _bias_grad(gbuf, biases[i], batch, ctx.bias_shapes[i])
    if not dq_done:
        _attn_bwd_dq_db_kernel[(table.shape[0], triton.cdiv(n_q, cfg["BLOCK_M"]))](
            *pointers, dq, dq, table, 1, n_q, n_k, head_dim, scale * _LOG2E, scale,
            *strides, *matrix_strides(dq), COMPUTE_DQ=True, COMPUTE_DB=False, **common,
        )
    return (dq if need_q else None), (dk if need_kv else None), (dv if need_kv else None), dbiases


def _bias_grad(gbuf, bias, batch, shape):
    """Per-group tiles of dS -> the bias gradient in the bias's own shape and dtype."""
    kept = tuple(1 if bias.shape[d] == 1 else n for d, n in enumerate(batch))
    grad = gbuf.view(*kept, *gbuf.shape[-2:])
    return reduce_to(grad, shape, bias.dtype)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, *biases):
        batch = ctx.batch = tuple(torch.broadcast_shapes(
            *(t.shape[:-2] for t in (q, k, v, *biases) if t is not None),
            *(() if mask is None else (mask.shape[:-2],)),
        ))
        ctx.scale, ctx.has_mask = scale, mask is not None
        ctx.bias_shapes = [b.shape for b in biases]
        ctx.orig_shapes = (q.shape, k.shape, v.shape)
        rank = len(batch) + 2
        q, k, v, mask = (lift(t, rank) for t in (q, k, v, mask))
        biases = tuple(lift(b, rank) for b in biases)
        with device_guard(q):
            o, lse = _attn_forward(q, k, v, biases, mask, scale, batch)
        ctx.save_for_backward(q, k, v, o, lse, mask, *biases)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q_shape, k_shape, v_shape = ctx.orig_shapes
        with device_guard(do):
            dq, dk, dv, dbiases = _attn_backward(ctx, do)
        grads = [None if g is None else reduce_to(g, shape, g.dtype)
                 for g, shape in zip((dq, dk, dv), (q_shape, k_shape, v_shape))]
        return (*grads, None, None, *dbiases)


def attention_triton(q, k, v, biases=(), mask=None, *, scale=None):
    """The fused path: head dims up to MAX_HEAD_DIM in fp32/fp16/bf16; else the reference."""
    biases = _as_bias_tuple(biases)
    if q.dtype == torch.float64 or q.shape[-1] > MAX_HEAD_DIM or 0 in (q.numel(), k.numel()):
        return attention_ref(q, k, v, biases, mask, scale=scale)
    if len(biases) > MAX_BIASES:
        extra = biases[MAX_BIASES - 1]
        for b in biases[MAX_BIASES:]:
            extra = extra + b
        biases = (*biases[: MAX_BIASES - 1], extra)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is not None:
        mask = mask_to_bool(mask).view(torch.uint8)
    return _AttentionFn.apply(q, k, v, mask, scale, *biases)


if triton is not None:

    @triton.jit
    def _scores(qk, offs_m, offs_n, n_q, n_k, B0, B1, MASK, sb0m, sb0n, sb1m, sb1n, smm, smn,
                scale_log2, NUM_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
        """Biased, masked logits of one [BLOCK_M, BLOCK_N] tile, in log2 units."""
        inside = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
        s = qk * scale_log2
        if NUM_BIAS >= 1:
            b = tl.load(B0 + offs_m[:, None] * sb0m + offs_n[None, :] * sb0n, mask=inside, other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        if NUM_BIAS >= 2:
            b = tl.load(B1 + offs_m[:, None] * sb1m + offs_n[None, :] * sb1n, mask=inside, other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        keep = offs_n[None, :] < n_k
        if HAS_MASK:
            keep = keep & (tl.load(MASK + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inside, other=0) != 0)
        return tl.where(keep, s, float("-inf"))

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, OUT, LSE, B0, B1, MASK, TABLE, n_q, n_k, head_dim, scale_log2,
        sqm, sqd, skn, skd, svn, svd, som, sod, sb0m, sb0n, sb1m, sb1n, smm, smn,
        NUM_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = TABLE + tl.program_id(0).to(tl.int64) * FWD_WIDTH
        Q += tl.load(row + FWD_Q)
        K += tl.load(row + FWD_K)
        V += tl.load(row + FWD_V)
        OUT += tl.load(row + FWD_OUT)
        LSE += tl.load(row + FWD_LSE)
        B0 += tl.load(row + FWD_B0)
        B1 += tl.load(row + FWD_B1)
        MASK += tl.load(row + FWD_MASK)
        offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_ok = (offs_m[:, None] < n_q) & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
            kv_ok = (offs_n[:, None] < n_k) & d_ok[None, :]
            kt_ok = (offs_n[None, :] < n_k) & d_ok[:, None]
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=kt_ok, other=0.0)
            qk = tl.dot(q, kt, input_precision="ieee")
            s = _scores(qk, offs_m, offs_n, n_q, n_k, B0, B1, MASK, sb0m, sb0n, sb1m, sb1n, smm, smn,
                        scale_log2, NUM_BIAS, HAS_MASK)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Until a row sees an unmasked key its max is -inf; shifting by 0 keeps exp2 at 0.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(OUT + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(OUT.dtype.element_ty), mask=q_ok)
        tl.store(LSE + offs_m, lse, mask=offs_m < n_q)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, B0, B1, MASK, DK, DV, TABLE, n_q, n_k, head_dim, scale_log2, scale,
        sqm, sqd, skn, skd, svn, svd, sdom, sdod, sb0m, sb0n, sb1m, sb1n, smm, smn, sdkn, sdkd,
        NUM_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = TABLE + tl.program_id(0).to(tl.int64) * BWD_WIDTH
        Q += tl.load(row + BWD_Q)
        K += tl.load(row + BWD_K)
        V += tl.load(row + BWD_V)
        DO += tl.load(row + BWD_DO)
        LSE += tl.load(row + BWD_LSE)
        DELTA += tl.load(row + BWD_LSE)
        B0 += tl.load(row + BWD_B0)
        B1 += tl.load(row + BWD_B1)
        MASK += tl.load(row + BWD_MASK)
        DK += tl.load(row + BWD_DK)
        DV += tl.load(row + BWD_DV)
        offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        kv_ok = (offs_n[:, None] < n_k) & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            q_ok = (offs_m[:, None] < n_q) & d_ok[None, :]
            q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
            do = tl.load(DO + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=q_ok, other=0.0)
            lse = tl.load(LSE + offs_m, mask=offs_m < n_q, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < n_q, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = _scores(qk, offs_m, offs_n, n_q, n_k, B0, B1, MASK, sb0m, sb0n, sb1m, sb1n, smm, smn,
                        scale_log2, NUM_BIAS, HAS_MASK)
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
        tl.store(DK + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, (dk * scale).to(DK.dtype.element_ty),
                 mask=kv_ok)
        tl.store(DV + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _attn_bwd_dq_db_kernel(
        Q, K, V, DO, LSE, DELTA, B0, B1, MASK, DQ, DB, TABLE, num_r, n_q, n_k, head_dim, scale_log2, scale,
        sqm, sqd, skn, skd, svn, svd, sdom, sdod, sb0m, sb0n, sb1m, sb1n, smm, smn, sdqm, sdqd,
        NUM_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DQ: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (g, m) owns rows m of group g: dQ for the group's single batch index, and/or
        # the bias-gradient tile summed over the num_r batch indices the bias is broadcast on.
        group = tl.program_id(0).to(tl.int64)
        offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_ok = (offs_m[:, None] < n_q) & d_ok[None, :]
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
            kv_ok = (offs_n[:, None] < n_k) & d_ok[None, :]
            db = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for r in range(0, num_r):
                row = TABLE + (group * num_r + r) * BWD_WIDTH
                q_off = tl.load(row + BWD_Q)
                k_off = tl.load(row + BWD_K)
                v_off = tl.load(row + BWD_V)
                do_off = tl.load(row + BWD_DO)
                lse_off = tl.load(row + BWD_LSE)
                q = tl.load(Q + q_off + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
                do = tl.load(DO + do_off + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=q_ok, other=0.0)
                lse = tl.load(LSE + lse_off + offs_m, mask=offs_m < n_q, other=float("inf"))
                delta = tl.load(DELTA + lse_off + offs_m, mask=offs_m < n_q, other=0.0)
                k = tl.load(K + k_off + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
                v = tl.load(V + v_off + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                s = _scores(qk, offs_m, offs_n, n_q, n_k, B0 + tl.load(row + BWD_B0), B1 + tl.load(row + BWD_B1),
                            MASK + tl.load(row + BWD_MASK), sb0m, sb0n, sb1m, sb1n, smm, smn,
                            scale_log2, NUM_BIAS, HAS_MASK)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                if COMPUTE_DQ:
                    dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
                if COMPUTE_DB:
                    db += ds
            if COMPUTE_DB:
                tile = group * n_q * n_k + offs_m[:, None] * n_k + offs_n[None, :]
                tl.store(DB + tile, db, mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k))
        if COMPUTE_DQ:
            dq_off = tl.load(TABLE + group * num_r * BWD_WIDTH + BWD_DQ)
            dq_ptr = DQ + dq_off + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
            tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)
