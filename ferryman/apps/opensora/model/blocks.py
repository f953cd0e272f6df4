"""STDiT transformer blocks: self-attention over space or time, cross-attention to text, MLP, adaLN-single.

A block is PixArt-α's (Chen et al. 2023, Sec. 2.3): the timestep conditioning arrives as one
shared [B, 6 D] vector ("adaLN-single") that each block offsets with its own learned
``scale_shift_table``. Open-Sora's STDiT alternates a spatial block (attention among the patches
of one frame) with a temporal block (attention among the frames at one patch position).

The blocks act on whatever tokens they are given: sequence parallelism (``parallel.py``) hands
them a shard of each frame's patches and swaps the spatial attention for one that exchanges
shards. Every attention and LayerNorm has a ``backend`` attribute (auto|triton|torch) that
``runtime.apply_runtime`` sets from outside.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ferryman.kernels import LayerNorm, attention

from .config import STDiTConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional LayerNorm on queries and keys (Open-Sora 1.2 qk_norm)."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, "auto"
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda: LayerNorm(self.head_dim, eps=1e-6)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, L, D] -> [N, L, D]."""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)  # [N, L, 3, H, Dh]
        out = self.attend(qkv)  # [N, L, H', Dh]
        return self.proj(out.reshape(n, length, dim))

    def attend(self, qkv: Tensor) -> Tensor:
        """[N, L, 3, H, Dh] queries, keys and values -> [N, L, H, Dh]."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, Dh] each
        out = attention(self.q_norm(q), self.k_norm(k), v, backend=self.backend)  # [N, H, L, Dh]
        return out.transpose(1, 2)  # [N, L, H, Dh]


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys and values from the caption tokens (padding masked)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, "auto"
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B, N, D]; y: [B, L, D]; mask: [B, L] bool (True = a real token) or None."""
        b, n, dim = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, Dh]
        kv = self.kv(y).reshape(b, y.shape[1], 2, self.num_heads, self.head_dim)  # [B, L, 2, H, Dh]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, Dh] each
        m = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L]
        out = attention(q, k, v, mask=m, backend=self.backend)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiTBlock(nn.Module):
    """One spatial or temporal STDiT block (Open-Sora 1.2 ``STDiT3Block``) with adaLN-single modulation."""

    def __init__(self, cfg: STDiTConfig, *, temporal: bool):
        super().__init__()
        dim = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.cross_attn = CrossAttention(dim, cfg.num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, y: Tensor, t0: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B, T, S, D] (S: this rank's patches under sequence parallelism); y: [B, L, D]; t0: [B, 6 D]."""
        b, t, s, d = x.shape
        mods = (self.scale_shift_table[None] + t0.reshape(b, 6, d))[:, :, None, None, :]  # [B, 6, 1, 1, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            h = h.transpose(1, 2).reshape(b * s, t, d)  # [B*S, T, D]
            h = self.attn(h).reshape(b, s, t, d).transpose(1, 2)  # [B, T, S, D]
        else:
            h = self.attn(h.reshape(b * t, s, d)).reshape(b, t, s, d)
        x = x + gate_msa * h
        x = x + self.cross_attn(x.reshape(b, t * s, d), y, mask).reshape(b, t, s, d)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)

    def zero_init(self) -> None:
        """Make the block the identity: its three residual branches end in zeroed projections."""
        for layer in (self.attn.proj, self.cross_attn.proj, self.mlp.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


class FinalLayer(nn.Module):
    """PixArt-α ``T2IFinalLayer``: modulated LayerNorm and a linear map back to patch pixels."""

    def __init__(self, dim: int, patch_numel: int, out_channels: int):
        super().__init__()
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_numel * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: [B, T, S, D]; t: [B, D] -> [B, T, S, patch_numel * C]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, :, None, None, :].unbind(1)  # [B, 1, 1, D]
        return self.linear(modulate(self.norm(x), shift, scale))
