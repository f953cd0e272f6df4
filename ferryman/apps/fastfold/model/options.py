"""How a built AlphaFold runs, apart from what it is: chunking, kernels, in-place updates, precision.

None of these options changes a parameter's name or shape, so one checkpoint and one official npz
load whatever they are. ``apply_run_options`` sets them on a built model from outside, once
(as ``parallelize`` does for DAP); the model reads them at each call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ferryman.core.errors import ConfigError
from ferryman.kernels.backend import BACKENDS

PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True, frozen=True)
class RunOptions:
    """``chunk_size`` splits every N_res x N_res and N_seq x N_res computation into row blocks of
    that many rows (None = whole); ``auto_chunk`` picks the chunk size from free memory at each
    call instead; ``kernels`` selects the fused Triton kernels or the PyTorch reference (auto:
    Triton on CUDA); ``inplace`` adds residual updates in place when no gradient is recorded;
    ``precision`` is the dtype of the trunk (embedders and stacks; the structure module and heads
    stay fp32). A chunk size with ``inplace`` and no gradient selects the memory-lean path: updates
    are added into the representations chunk by chunk and never exist whole (``primitives.lean``).
    """

    chunk_size: int | None = None
    auto_chunk: bool = False
    kernels: str = "auto"
    inplace: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.kernels not in BACKENDS:
            raise ConfigError(f"kernels must be one of {', '.join(BACKENDS)}, got {self.kernels!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer or None, got {self.chunk_size}")

    @property
    def trunk_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def set_kernels(module: nn.Module, backend: str) -> nn.Module:
    """Every fused op (attention, softmax, LayerNorm) in ``module`` on ``backend`` (auto|triton|torch)."""
    for sub in module.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    return module


def apply_run_options(model: nn.Module, run: RunOptions) -> nn.Module:
    """Run ``model`` (an AlphaFold) as ``run`` says: every fused op's backend, the trunk's dtype
    (its modules listed in ``model.TRUNK``; the rest fp32) and, read at each call, the chunking and
    in-place settings. Returns the model."""
    set_kernels(model, run.kernels)
    model.float()
    if run.precision != "fp32":
        for name in model.TRUNK:
            module = getattr(model, name)
            if module is not None:
                module.to(run.trunk_dtype)
    model.run_options = run
    return model
