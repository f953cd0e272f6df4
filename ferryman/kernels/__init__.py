"""Fused kernels with pure-PyTorch references.

Each op has ``<op>_ref`` (the spec and the CPU path), a Triton implementation and a public
``<op>()`` that picks one via ``backend="auto"|"triton"|"torch"`` (see ``resolve_backend``).
Triton is optional: without it every op runs its reference.
"""

from .attention import attention, attention_ref
from .backend import BACKENDS, interpreter_enabled, resolve_backend, triton_available
from .layer_norm import LayerNorm, layer_norm, layer_norm_ref
from .softmax import softmax, softmax_ref

__all__ = [
    "BACKENDS",
    "LayerNorm",
    "attention",
    "attention_ref",
    "interpreter_enabled",
    "layer_norm",
    "layer_norm_ref",
    "resolve_backend",
    "softmax",
    "softmax_ref",
    "triton_available",
]
