"""STDiT: the spatial-temporal diffusion transformer of Open-Sora (Zheng et al. 2024, Open-Sora 1.0-1.2).

A latent video [B, C, T, H, W] is cut into 3D patches; sin-cos positions are added (2D over the
patches of a frame, PixArt-style scaled to ``base_size``; 1D over frames before the first temporal
block, as in Open-Sora 1.0). ``depth`` spatial and ``depth`` temporal blocks alternate, each with
cross-attention to the caption. The timestep, fps and frame size are embedded, summed and turned
into one adaLN-single vector shared by all blocks. Temporal blocks start as the identity, so a
model initialised from an image DiT first behaves like it frame by frame.

The token trunk runs from ``x_embedder`` (patches with their spatial positions) to
``final_layer``; everything between acts on each token, each frame or each patch position, so
sequence parallelism (``parallel.py``) can shard the patches at the trunk's entry and gather them
at its exit with hooks on those two modules, leaving this file free of collectives.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import FinalLayer, STDiTBlock
from .config import STDiTConfig
from .embed import CaptionEmbedder, PatchEmbed3D, SizeEmbedder, TimestepEmbedder, sincos_1d


class STDiT(nn.Module):
    """Noise (or velocity) prediction for latent videos conditioned on text, timestep, fps and size."""

    def __init__(self, cfg: STDiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, dim, cfg.base_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.fps_embedder = SizeEmbedder(1, dim)
        self.size_embedder = SizeEmbedder(2, dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, dim, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiTBlock(cfg, temporal=False) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(STDiTBlock(cfg, temporal=True) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, math.prod(cfg.patch_size), cfg.in_channels)
        self.grad_checkpointing = False  # recompute blocks in backward; set by runtime.apply_runtime
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Open-Sora/PixArt init: xavier linears, N(0, 0.02) embedders, zero output layer and temporal branches."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for embedder in (self.t_embedder, self.fps_embedder, self.size_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.proj[0].weight, std=0.02)
        nn.init.normal_(self.y_embedder.proj[2].weight, std=0.02)
        for block in self.temporal_blocks:
            block.zero_init()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(self, timestep: Tensor, fps: Tensor | None, height: Tensor | None, width: Tensor | None) -> Tensor:
        """[B, D]: timestep embedding plus the optional fps and frame-size embeddings."""
        t = self.t_embedder(timestep)
        if fps is not None:
            t = t + self.fps_embedder(fps.float()[:, None])
        if height is not None and width is not None:
            t = t + self.size_embedder(torch.stack([height.float(), width.float()], dim=1))
        return t

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        *,
        fps: Tensor | None = None,
        height: Tensor | None = None,
        width: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """x: [B, C, T, H, W] latents; timestep: [B] in [0, num_timesteps); y: [B, L, C_cap] caption
        features; mask: [B, L] bool (True = real token); drop: [B] bool, captions replaced by the null
        caption (classifier-free guidance). Returns [B, C, T, H, W]."""
        _, _, frames, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        nt, nh, nw = -(-frames // pt), -(-h // ph), -(-w // pw)
        tokens = self.x_embedder(x)  # [B, T', S, D]

        t = self.condition(timestep, fps, height, width)  # [B, D]
        t0 = self.t_block(t)  # [B, 6 D]
        if drop is not None and mask is not None:
            mask = mask | drop[:, None]  # the null caption has no padding
        y = self.y_embedder(y, drop)  # [B, L, D]
        pos_t = sincos_1d(self.cfg.hidden_size, torch.arange(nt, device=x.device))[None, :, None]  # [1, T', 1, D]
        pos_t = pos_t.to(tokens.dtype)

        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            tokens = self._block(spatial, tokens, y, t0, mask)
            if i == 0:
                tokens = tokens + pos_t
            tokens = self._block(temporal, tokens, y, t0, mask)

        out = self.final_layer(tokens, t)  # [B, T', S, pt*ph*pw*C]
        return self.unpatchify(out, nt, nh, nw)[:, :, :frames, :h, :w]

    def _block(self, block: STDiTBlock, x, y, t0, mask) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, y, t0, mask, use_reentrant=False)
        return block(x, y, t0, mask)

    def unpatchify(self, x: Tensor, nt: int, nh: int, nw: int) -> Tensor:
        pt, ph, pw = self.cfg.patch_size
        b, c = x.shape[0], self.cfg.in_channels
        x = x.reshape(b, nt, nh, nw, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, H', ph, W', pw]
        return x.reshape(b, c, nt * pt, nh * ph, nw * pw)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
