"""Typed config of Gemini heterogeneous memory (the optimizer's is ``ferryman.core.optim.OptimConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferryman.core.errors import ConfigError
from ferryman.core.runtime import parse_dtype

__all__ = ["GeminiConfig"]


@dataclass(kw_only=True)
class GeminiConfig:
    """Where chunks live and how they are built.

    placement: "static" keeps ``param_host_fraction`` of the parameter chunks and
    ``optim_host_fraction`` of the optimizer-state chunks (fp32 master, Adam moments, gradient
    shard) on the host for the whole run. "auto" records non-model memory and the order of use in a
    warm-up step and then evicts the chunks needed latest to stay under ``device_budget_bytes``.
    device_budget_bytes: cap on the bytes of model data (chunks, optimizer shards, gradient
    buffers) on the device; 0 means the free device memory (on CPU: no cap). The chunk manager's
    own accounting enforces it, so it also holds on CPU, where "device" and "host" share RAM.
    """

    placement: str = "auto"
    precision: str = "bf16"
    param_host_fraction: float = 0.0
    optim_host_fraction: float = 0.0
    device_budget_bytes: int = 0
    warmup_non_model_fraction: float = 0.3  # of the budget, assumed for activations before they are measured
    chunk_numel: int = 0  # 0: searched to waste the least padding
    min_num_chunks: int = 4  # small models are chunked too, never folded into one buffer
    max_chunk_numel: int = 64 * 1024 * 1024
    prefetch: int = 2  # chunks fetched ahead on a side stream (CUDA only)
    reorder_after_warmup: bool = True  # repack chunks in the order the warm-up step used them
    initial_loss_scale: float = 2.0**16
    loss_scale_growth_interval: int = 2000  # torch.amp.GradScaler's: the two engines scale alike
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.placement not in ("static", "auto"):
            raise ConfigError(f"gemini.placement={self.placement!r} must be 'static' or 'auto'")
        parse_dtype(self.precision, "gemini.precision")
        for name in ("param_host_fraction", "optim_host_fraction", "warmup_non_model_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"gemini.{name}={value} must lie in [0, 1]")
        if self.device_budget_bytes < 0:
            raise ConfigError(f"gemini.device_budget_bytes={self.device_budget_bytes} must be >= 0")
        if self.min_num_chunks < 1 or self.chunk_numel < 0 or self.prefetch < 0:
            raise ConfigError("gemini.min_num_chunks must be >= 1; chunk_numel and prefetch >= 0")

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.precision)
