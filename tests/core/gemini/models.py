"""Tiny models shared by the Gemini tests: residual blocks with in-place adds, tied embeddings,
an unused branch, optional frozen layers and optional activation checkpointing
("reentrant" or "nonreentrant")."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        x = x * 1.0
        x += h  # in place on a module output, as real models do
        return x


class TinyNet(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, depth: int = 3, recompute: str = "") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(8, dim) * 0.02)  # used directly by the root module
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.unused = nn.Linear(dim, dim)  # never called: never gets a gradient
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.recompute = recompute

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.recompute == "reentrant") if self.recompute else block(x)
        return self.head(self.norm(x))


def batches(num: int, batch: int = 4, seq: int = 8, vocab: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen))
        for _ in range(num)
    ]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def reference_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def train_reference(model: nn.Module, data, *, lr=1e-2, weight_decay=0.1, max_norm=0.0, accum=1) -> list[float]:
    opt = reference_optimizer(model, lr, weight_decay)
    losses = []
    for i in range(0, len(data), accum):
        total = 0.0
        for ids, tgt in data[i : i + accum]:
            loss = lm_loss(model(ids), tgt) / accum
            loss.backward()
            total += loss.item()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def train_engine(engine, data, *, accum=1) -> list[float]:
    losses = []
    for i in range(0, len(data), accum):
        total = 0.0
        for ids, tgt in data[i : i + accum]:
            loss = lm_loss(engine(ids), tgt) / accum
            engine.backward(loss)
            total += loss.item()
        engine.step()
        engine.zero_grad()
        losses.append(total)
    return losses


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
