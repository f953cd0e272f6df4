"""Optimizer hyperparameters shared by every engine (plain PyTorch and Gemini), and the engine-neutral
form of the trainable parameters' AdamW state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass
class TrainableState:
    """The trainable parameters' weights and AdamW state, engine-neutral (what trainable-only
    checkpoints hold, so one engine's checkpoint resumes on the other).

    ``values``: fp32 weights by parameter name, on the host. ``moments``: per parameter that has
    stepped, ``{"exp_avg": t, "exp_avg_sq": t, "step": float}``. ``scale``, ``calm_steps``: the
    fp16 loss scaler's scale and its count of steps since the last overflow (1.0 and 0 without one).
    """

    values: dict[str, torch.Tensor]
    moments: dict[str, dict]
    scale: float = 1.0
    calm_steps: int = 0
