"""The one engine interface: what the training loop, the checkpoint stores and the apps may use.

Two engines implement it, each method explicitly: ``PlainEngine`` (training/plain.py: the whole
model on one device, torch AdamW) and ``GeminiEngine`` (core/gemini: chunked heterogeneous
memory). Nothing outside an engine reaches into its internals: an engine writes and reads its own
checkpoint files (``save``/``load``) and hands its trainable state over in the engine-neutral
``TrainableState`` (``export_trainable``/``import_trainable``), which ``trainable.py`` stores.
The protocol is structural: core/gemini does not import core/training (which builds Gemini
engines), and a test checks that both classes define every member.

Calls that are collectives under data parallelism (every rank must make them): Gemini's
``state_dict``, ``param_values``, ``export_trainable``, ``named_from``, ``save``,
``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ferryman.core.optim import TrainableState


class Engine(Protocol):
    """A model wrapped for training: call it like the module, then backward, step, zero_grad."""

    kind: str  # "plain" | "gemini": recorded in trainable-only checkpoints
    module: nn.Module  # the wrapped model (its parameters may be placeholders between uses)
    device: torch.device  # where batches go
    dtype: torch.dtype  # compute precision; fp16 means loss scaling and skipped steps on overflow
    rank: int  # this process's rank among those sharing the engine's state; 0 writes shared files

    # -- training ---------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward, in the engine's precision."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled if fp16)."""

    def step(self) -> dict[str, float]:
        """Unscale, clip and update; returns ``grad_norm``, ``skipped`` (1.0 or 0.0) and ``loss_scale``."""

    def zero_grad(self) -> None: ...

    @property
    def lr(self) -> float: ...

    @lr.setter
    def lr(self, value: float) -> None: ...

    def train(self, mode: bool = True) -> Engine: ...

    def eval(self) -> Engine: ...

    def stats(self) -> dict[str, float]:
        """Engine figures for logs (memory, evictions, loss scale ...)."""

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated weights (fp32 masters where kept) and buffers, as the plain module names them."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights and buffers by name; optimizer state is kept."""

    def param_values(self) -> dict[str, torch.Tensor]:
        """Every parameter's current value by name (tied weights once)."""

    def save(self, folder: str | Path) -> None:
        """Write the full engine state (weights, optimizer, loss scaler) in the engine's own format."""

    def load(self, folder: str | Path) -> None:
        """Read what ``save`` wrote (a ``UserError`` if the folder does not fit this model)."""

    def save_pretrained(self, folder: str | Path, *, max_shard_bytes: int = ..., dtype: torch.dtype | None = None) -> None:
        """Consolidated weights (and the module's config) in transformers' sharded safetensors
        layout (``core/pretrained.py``); rank 0 writes."""

    def export_trainable(self) -> TrainableState:
        """The trainable parameters' weights and AdamW state, engine-neutral."""

    def import_trainable(self, state: TrainableState) -> None:
        """Put back an ``export_trainable`` result (of either engine); frozen weights stay."""

    # -- flat views of the trainable weights (for the EMA) -------------------------------------------
    def master_tensors(self) -> list[torch.Tensor]:
        """The fp32 trainable weights as the engine holds them (flat shards or parameters)."""

    def track(self, flat: list[torch.Tensor]) -> None:
        """Keep ``flat`` (shaped like ``master_tensors()``) valid across the engine's re-layouts."""

    def named_from(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter tensors from tensors shaped like ``master_tensors()``."""

    def flat_from(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like ``master_tensors()`` from per-parameter tensors."""
