"""Run options applied to a built STDiT from outside: kernel backends and activation checkpointing.

None of them changes a parameter, so the same weights train and sample under any of them.
"""

from __future__ import annotations

from ferryman.kernels import LayerNorm

from .config import RuntimeConfig
from .model import STDiT
from .model.blocks import CrossAttention, SelfAttention
from .model.config import STDiTConfig


def apply_runtime(model: STDiT, runtime: RuntimeConfig) -> STDiT:
    """Set every attention's and LayerNorm's kernel backend and the blocks' recomputation."""
    for module in model.modules():
        if isinstance(module, SelfAttention | CrossAttention):
            module.backend = runtime.attention_backend
        elif isinstance(module, LayerNorm):
            module.backend = runtime.norm_backend
    model.grad_checkpointing = runtime.grad_checkpointing
    return model


def build_stdit(model_cfg: STDiTConfig, runtime: RuntimeConfig) -> STDiT:
    """An STDiT of these sizes, set up to run as ``runtime`` says."""
    return apply_runtime(STDiT(model_cfg), runtime)
