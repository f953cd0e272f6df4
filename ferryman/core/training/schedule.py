"""Learning-rate schedule and exponential moving average of weights."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, base_lr: float, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate for update ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(decay: float, num_updates: int) -> float:
    """The decay for the update that follows ``n`` earlier ones, as diffusers' EMAModel has it: 0 for
    the first (the average starts at the first updated weights), then min(decay, (1 + n) / (10 + n)),
    so the early average follows training instead of staying near the initial weights."""
    return 0.0 if num_updates <= 0 else min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """Exponential moving average of the trainable weights: shadow <- decay * shadow + (1 - decay) * w.

    Works on flat tensors (the Gemini master shards or the plain parameters), so the update is one
    fused foreach call however many parameters the model has.
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [t.detach().clone().float() for t in tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(self.shadow, [t.float() for t in tensors], 1.0 - self.decay)
