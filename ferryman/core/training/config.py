"""Typed config of the one training loop."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ferryman.core.errors import ConfigError
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.optim import OptimConfig
from ferryman.core.runtime import parse_dtype


@dataclass(kw_only=True)
class TrainConfig:
    """Everything the loop needs besides the model, data and loss an app supplies.

    engine: "plain" (the whole model on the device, torch AdamW, autocast) or "gemini" (chunked
    heterogeneous memory; placement and budget in ``gemini``). The precision here wins over
    ``gemini.precision``. resume: a checkpoint folder, "latest" (the newest under out_dir), or None.
    """

    out_dir: str = "runs/train"
    max_steps: int = 100
    stop_after: int = 0  # end this call after so many updates (a time-boxed job); 0: run to max_steps
    grad_accum: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    engine: str = "plain"  # plain | gemini
    gemini: GeminiConfig = field(default_factory=GeminiConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: str = "cosine"  # cosine | constant (both after a linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.0  # 0 disables the weight EMA
    ema_warmup: bool = False  # diffusers' EMAModel warm-up: decay 0 at the first update, then min(ema_decay, (1 + n) / (10 + n))
    ckpt_every: int = 0  # 0: only at the end
    ckpt_at_end: bool = True  # also where this call stops (needed to resume a stop_after job)
    keep_last: int = 2  # 0: keep every checkpoint
    log_every: int = 1
    resume: str | None = None
    seed: int = 0
    progress: bool = True
    plot: bool = True
    config_file: str = "config.yaml"  # this config is saved under out_dir by that name; "": the app saves its own

    def __post_init__(self) -> None:
        parse_dtype(self.precision, "precision")
        if self.engine not in ("plain", "gemini"):
            raise ConfigError(f"engine={self.engine!r} must be 'plain' or 'gemini'")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule={self.schedule!r} must be 'cosine' or 'constant'")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.max_steps < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ConfigError("max_steps, grad_accum and log_every must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.warmup_steps < 0 or self.ckpt_every < 0 or self.keep_last < 0 or self.stop_after < 0:
            raise ConfigError("warmup_steps, ckpt_every, keep_last and stop_after must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
