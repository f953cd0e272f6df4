"""Optimizer hyperparameters shared by every engine (plain PyTorch and Gemini)."""

from __future__ import annotations

from dataclasses import dataclass

from ferryman.core.errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW hyperparameters (Loshchilov & Hutter 2019); weight_decay=0 gives Adam.

    With ``no_decay_1d`` the one-dimensional parameters (biases, norm scales) get no weight
    decay, the usual GPT recipe. max_grad_norm <= 0 disables clipping.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay_1d: bool = True
    max_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError("optim.lr and optim.weight_decay must be >= 0 and optim.eps > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def decays(self, shape: tuple[int, ...]) -> bool:
        return self.weight_decay > 0 and not (self.no_decay_1d and len(shape) < 2)
