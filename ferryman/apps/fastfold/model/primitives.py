"""Building blocks shared by the AlphaFold2 modules: initialised linears, LayerNorm, gated
multi-head attention, global attention and the transition MLP.

Attention runs through ``ferryman.kernels.attention`` and LayerNorm through
``ferryman.kernels.LayerNorm``; the backend (auto|triton|torch) is a module attribute set from
config, so one model tree serves every kernel choice. Where the PyTorch path runs and no key is
masked, attention is PyTorch's fused ``scaled_dot_product_attention`` with the biases as its
additive mask: the same math as the reference, without the logits ever existing whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.core.chunking import chunk_layer
from ferryman.kernels import LayerNorm as FusedLayerNorm
from ferryman.kernels import attention as fused_attention
from ferryman.kernels import resolve_backend
from ferryman.kernels import softmax as fused_softmax


class Linear(nn.Linear):
    """nn.Linear with the AF2 initialisers (Suppl. 1.11.4): 'default' (LeCun normal), 'relu'
    (He normal), 'glorot', 'gating' (zero weights, unit bias) and 'final' (zeros).
    """

    def __init__(self, c_in: int, c_out: int, bias: bool = True, init: str = "default"):
        self._init = init
        super().__init__(c_in, c_out, bias=bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init, c_in = self._init, self.in_features
        if init in ("default", "relu"):
            # Truncated normal at two standard deviations; fmod folds the tails back cheaply.
            std = math.sqrt((2.0 if init == "relu" else 1.0) / c_in) / 0.8796
            self.weight.normal_().fmod_(2.0).mul_(std)
        elif init == "glorot":
            nn.init.xavier_uniform_(self.weight)
        elif init in ("gating", "final"):
            self.weight.zero_()
        else:
            raise ValueError(f"unknown init {init!r}")
        if self.bias is not None:
            self.bias.fill_(1.0 if init == "gating" else 0.0)


def layer_norm(c: int, backend: str = "auto") -> FusedLayerNorm:
    return FusedLayerNorm(c, backend=backend)


def add_(x: Tensor, update: Tensor, inplace: bool) -> Tensor:
    """Residual add; in place when allowed and no autograd graph needs ``x``."""
    if inplace and not torch.is_grad_enabled():
        return x.add_(update)
    return x + update


def lean(chunk_size: int | None, inplace: bool) -> bool:
    """Whether the memory-lean inference path runs: chunked, in place, nothing recorded for autograd.

    On it every residual update is added into its target chunk by chunk (``chunk_add_``), so no
    update the size of the pair representation ever exists; unchunked or training runs keep the
    plain ``x + f(x)`` form.
    """
    return chunk_size is not None and inplace and not torch.is_grad_enabled()


def unmasked(mask: Tensor) -> Tensor | None:
    """None when ``mask`` masks nothing (no padding: the usual case at inference), so the ops
    skip masking altogether; multiplying by ones and adding nothing would give the same numbers."""
    return None if bool(mask.all()) else mask


def key_mask(mask: Tensor | None) -> Tensor | None:
    """An attention key mask ``[*, K] -> [*, 1, 1, K]``; None (nothing masked) stays None."""
    return None if mask is None else mask[..., None, None, :]


def transposed(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.transpose(0, 1)


def row_slices(n: int, chunk_size: int | None) -> list[slice]:
    step = chunk_size or max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def chunk_add_(target: Tensor, fn, inputs: dict[str, Tensor], chunk_size: int | None) -> Tensor:
    """``target[rows] += fn(**inputs[rows])`` for each block of leading-axis rows, in place.

    Only valid for updates whose rows depend on nothing but the same rows of ``target`` (and on
    tensors fixed beforehand, such as a precomputed attention bias), which holds for every
    row-chunked Evoformer op once its cross-row inputs are computed.
    """
    for rows in row_slices(target.shape[0], chunk_size):
        target[rows].add_(fn(**{k: v[rows] for k, v in inputs.items()}))
    return target


def _rows_of_bias(b: Tensor, rows: slice) -> Tensor:
    return b[..., rows, :] if b.shape[-2] > 1 else b


def sdpa_applies(q: Tensor, mask: Tensor | None) -> bool:
    """Whether ``scaled_dot_product_attention`` computes what the reference does: 4-d inputs (its
    fused CPU kernel's layout) and no masked key. A masked key would need the mask folded into a
    bias the size of the logits, and a row with every key masked must give zeros, not its mean."""
    return q.dim() == 4 and (mask is None or bool(mask.all()))


def sdpa(q: Tensor, k: Tensor, v: Tensor, biases: tuple[Tensor, ...]) -> Tensor:
    """softmax(q k^T / sqrt(D) + sum(biases)) v for q ``[B, H, Q, D]``; the output's memory is
    ``[B, Q, H, D]``, so merging its heads back is a view."""
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))


class Attention(nn.Module):
    """Gated multi-head attention with additive biases (AF2 Suppl. Alg. 7, 8, 13, 14, 17).

    q_x: ``[*, Q, c_q]``, kv_x: ``[*, K, c_kv]``; biases broadcast to ``[*, H, Q, K]``; mask (1 =
    attend) broadcast to the same. Parameter names follow AF2 (query_w, key_w, ...).
    """

    def __init__(self, c_q: int, c_kv: int, c_hidden: int, num_heads: int, *, gating: bool = True,
                 c_out: int | None = None, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.num_heads, self.c_hidden, self.backend = num_heads, c_hidden, backend
        self.query_w = Linear(c_q, num_heads * c_hidden, bias=False, init="glorot")
        self.key_w = Linear(c_kv, num_heads * c_hidden, bias=False, init="glorot")
        self.value_w = Linear(c_kv, num_heads * c_hidden, bias=False, init="glorot")
        self.gating = Linear(c_q, num_heads * c_hidden, init="gating") if gating else None
        self.output = Linear(num_heads * c_hidden, c_out or c_q, init="final")

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.c_hidden)).transpose(-2, -3)  # [*, H, L, D]

    def forward(self, q_x: Tensor, kv_x: Tensor, biases=(), mask: Tensor | None = None,
                query_chunk: int | None = None) -> Tensor:  # fmt: skip
        """``query_chunk`` bounds the logits the PyTorch reference materialises to that many
        queries at a time; the fused kernel never materialises them and ignores it."""
        q, k, v, g = self._projections(q_x, kv_x, fused=query_chunk is None)
        n_q = q.shape[-2]
        reference = resolve_backend(self.backend, q) == "torch"
        if reference and sdpa_applies(q, mask):
            o = sdpa(q, k, v, tuple(biases))
        elif query_chunk is None or query_chunk >= n_q or not reference:
            o = fused_attention(q, k, v, biases, mask, backend=self.backend)  # [*, H, Q, D]
        else:
            o = torch.empty_like(q)
            for rows in row_slices(n_q, query_chunk):
                part = tuple(_rows_of_bias(b, rows) for b in biases)
                m_rows = None if mask is None else _rows_of_bias(mask, rows)
                o[..., rows, :] = fused_attention(q[..., rows, :], k, v, part, m_rows, backend=self.backend)
        o = o.transpose(-2, -3).flatten(-2)  # [*, Q, H * D]
        if g is not None:
            o = o.mul_(g.sigmoid_()) if not torch.is_grad_enabled() else o * torch.sigmoid(g)
        return self.output(o)

    def _projections(self, q_x: Tensor, kv_x: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v ``[*, H, L, D]`` and the gate's pre-activation ``[*, Q, H * D]`` (or None). For
        self-attention, ``fused`` makes them one matmul whose columns the four view (the
        memory-lean path keeps them apart: together they are four times a block's width)."""
        gating = self.gating
        if q_x is not kv_x or not fused:
            gate = None if gating is None else gating(q_x)
            return self._heads(self.query_w(q_x)), self._heads(self.key_w(kv_x)), self._heads(self.value_w(kv_x)), gate
        lins = [self.query_w, self.key_w, self.value_w] + ([] if gating is None else [gating])
        w = torch.cat([lin.weight for lin in lins])  # [3 or 4 x H * D, c]
        width = self.num_heads * self.c_hidden
        bias = None if gating is None else torch.cat([gating.bias.new_zeros(3 * width), gating.bias])
        qkvg = F.linear(q_x, w, bias).split(width, dim=-1)  # each [*, L, H * D]
        return self._heads(qkvg[0]), self._heads(qkvg[1]), self._heads(qkvg[2]), None if gating is None else qkvg[3]


class GlobalAttention(nn.Module):
    """Global attention over the rows of each column, one averaged query (AF2 Suppl. Alg. 19).

    m: ``[*, S, c]`` attended over S; mask ``[*, S]`` or None (nothing masked).
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, *, backend: str = "auto", eps: float = 1e-10):
        super().__init__()
        self.num_heads, self.c_hidden, self.backend, self.eps = num_heads, c_hidden, backend, eps
        self.query_w = Linear(c_in, num_heads * c_hidden, bias=False, init="glorot")
        self.key_w = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.value_w = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.gating = Linear(c_in, num_heads * c_hidden, init="gating")
        self.output = Linear(num_heads * c_hidden, c_in, init="final")

    def forward(self, m: Tensor, mask: Tensor | None) -> Tensor:
        # Sums over up to 5120 rows: fp32, since bf16 counts exactly only to 256.
        if mask is None:
            q_avg = (m.float().sum(-2) / (m.shape[-2] + self.eps)).to(m.dtype)
        else:
            mask32 = mask.float()
            q_avg = ((m.float() * mask32[..., None]).sum(-2) / (mask32.sum(-1, keepdim=True) + self.eps)).to(m.dtype)
            mask = mask.to(m.dtype)[..., None, :]
        q = self.query_w(q_avg).unflatten(-1, (self.num_heads, self.c_hidden))  # [*, H, D]
        q = q * self.c_hidden**-0.5
        k, v = self.key_w(m), self.value_w(m)  # [*, S, D]
        logits = torch.einsum("...hd,...sd->...hs", q, k)
        weights = fused_softmax(logits, mask, backend=self.backend)  # [*, H, S]
        avg = torch.einsum("...hs,...sd->...hd", weights, v)  # [*, H, D]
        gate = torch.sigmoid(self.gating(m)).unflatten(-1, (self.num_heads, self.c_hidden))  # [*, S, H, D]
        return self.output((gate * avg[..., None, :, :]).flatten(-2))


class Transition(nn.Module):
    """Two-layer MLP on each position (AF2 Suppl. Alg. 9 MSATransition, Alg. 15 PairTransition)."""

    def __init__(self, c: int, factor: int, backend: str = "auto"):
        super().__init__()
        self.factor = factor
        self.input_layer_norm = layer_norm(c, backend)
        self.transition1 = Linear(c, c * factor, init="relu")
        self.transition2 = Linear(c * factor, c, init="final")

    def _run(self, x: Tensor) -> Tensor:
        hidden = self.transition1(self.input_layer_norm(x))
        # In place when nothing is recorded: a fresh tensor factor-times the size of x costs more than the op.
        return self.transition2(hidden.relu_() if not torch.is_grad_enabled() else torch.relu(hidden))

    def forward(self, x: Tensor, mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        # The mask is unused, as in AF2: padded positions never feed real ones through a transition.
        # Chunks are whole rows of the leading axis, like every other chunked op.
        return chunk_layer(self._run, {"x": x}, chunk_size=chunk_size, num_batch_dims=max(x.dim() - 2, 1))

    def update_(self, x: Tensor, chunk_size: int | None) -> Tensor:
        """``x += transition(x)`` in place (the lean path), in row blocks a ``factor`` times smaller
        than ``chunk_size`` so that the hidden layer is no wider than ``chunk_size`` rows of x."""
        rows = max(1, chunk_size // self.factor)
        return chunk_add_(x, self._run, {"x": x}, rows)
