"""Input embeddings of STDiT: 3D patches, sin-cos positions, timestep, fps/size and caption.

Follows DiT (Peebles & Xie 2023) for the timestep embedder, PixArt-α (Chen et al. 2023) for the
caption embedder with a learned null caption and for the resolution-scaled 2D sin-cos grid, and
Open-Sora 1.1/1.2 for the fps and size conditioning added to the timestep embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[N] positions -> [N, dim] embedding: sin of the first half of frequencies, cos of the rest."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # [N, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, height: int, width: int, base_size: int, device=None) -> Tensor:
    """[height*width, dim] 2D sin-cos grid; coordinates scaled so ``base_size`` patches span the same range."""
    scale_h, scale_w = height / base_size, width / base_size
    grid_h = torch.arange(height, dtype=torch.float64, device=device) / scale_h
    grid_w = torch.arange(width, dtype=torch.float64, device=device) / scale_w
    gh, gw = torch.meshgrid(grid_h, grid_w, indexing="ij")  # [H, W] each
    emb_h = sincos_1d(dim // 2, gh.reshape(-1))
    emb_w = sincos_1d(dim // 2, gw.reshape(-1))
    return torch.cat([emb_h, emb_w], dim=1)  # [H*W, dim]


class PatchEmbed3D(nn.Module):
    """Non-overlapping (pt, ph, pw) patches of a latent video projected to ``hidden`` channels, plus
    the 2D sin-cos position of each patch within its frame (PixArt-style, scaled to ``base_size``)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden: int, base_size: int):
        super().__init__()
        self.patch_size, self.base_size = patch_size, base_size
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, T', S, D] with S = H' W' patches per frame."""
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))  # sizes that the patch does not divide
        x = self.proj(x)  # [B, D, T', H', W']
        dim, nh, nw = x.shape[1], x.shape[3], x.shape[4]
        tokens = x.flatten(3).permute(0, 2, 3, 1)  # [B, T', S, D]
        return tokens + sincos_2d(dim, nh, nw, self.base_size, x.device).to(tokens.dtype)[None, None]


class TimestepEmbedder(nn.Module):
    """DiT: sinusoidal features of a (possibly fractional) timestep through a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [B, dim/2]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        feats = self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)  # [B, D]


class SizeEmbedder(nn.Module):
    """Open-Sora 1.1: scalar conditions (fps; height and width) as sinusoidal features through an MLP.

    The features of the K scalars are concatenated, not summed, so (height, width) and
    (width, height) give different embeddings.
    """

    def __init__(self, num_values: int, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(num_values * freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, values: Tensor) -> Tensor:  # [B, K] -> [B, D]
        b, k = values.shape
        feats = TimestepEmbedder.features(values.reshape(-1), self.freq_dim).reshape(b, k * self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """PixArt-α: text features through a GELU MLP; dropped captions become a learned null caption."""

    def __init__(self, caption_channels: int, hidden: int, num_tokens: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(caption_channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden)
        )
        self.y_embedding = nn.Parameter(torch.randn(num_tokens, caption_channels) / caption_channels**0.5)

    def forward(self, y: Tensor, drop: Tensor | None = None) -> Tensor:
        """y: [B, L, C_cap]; drop: [B] bool, True where the null caption replaces the text."""
        if drop is not None:
            null = self.y_embedding[: y.shape[1]].to(y.dtype)
            y = torch.where(drop[:, None, None], null[None], y)
        return self.proj(y)  # [B, L, D]
