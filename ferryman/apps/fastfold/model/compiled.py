"""``RunOptions(compile=True)``: the Evoformer, extra-MSA and template pair blocks and the structure
module's layer through ``torch.compile`` (inductor), which fuses the elementwise work around their
matmuls that eager PyTorch runs op by op, and plans their temporaries instead of allocating each.

Every block of a kind has the same code and shapes, so one compiled graph serves all of them
(the parameters are its inputs); the structure module's eight layers share one too. Compiled calls are used at inference on the unchunked path when
no position is masked (no data-dependent branch is left in the block then); anything else runs
eagerly. Compilation happens on the first call for each N_res; if it fails (no C++ compiler, an
inductor error), the call falls back to eager code for good, with one warning line. Dynamo keeps
a few graphs per function (``torch._dynamo.config.recompile_limit``) shared by the main and
extra-MSA stacks: a process that predicts many different lengths runs the later ones eagerly
(dynamo says so once).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class CompiledCall:
    """``fn`` compiled on first use; ``fn`` itself once compiling it has failed."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, torch.compile(fn, dynamic=False), False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise  # not a compiler failure: eager code would run out too
            except Exception as exc:
                self.failed = True
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                log.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__, reason[:200])
        return self.fn(*args)


def _evoformer_block(block: nn.Module, m: Tensor, z: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
    return block(m, z, None, None, None, inplace)


def _pair_block(block: nn.Module, t: Tensor, inplace: bool, attention_first: bool) -> Tensor:
    return block(t, None, None, inplace, template_order=attention_first)


def _fold_step(fold_iteration: nn.Module, *tensors: Tensor) -> tuple[Tensor, ...]:
    return fold_iteration.step(*tensors)


def block_calls(enabled: bool) -> dict[str, CompiledCall | None]:
    """The compiled calls a model's stacks and structure module use (None when not ``enabled``)."""
    kinds = {"evoformer": _evoformer_block, "pair": _pair_block, "structure": _fold_step}
    return {kind: CompiledCall(fn) if enabled else None for kind, fn in kinds.items()}


def use_compiled(call: CompiledCall | None, chunk_size: int | None, *masks: Tensor | None) -> bool:
    """Whether a module runs through ``call``: inference, unchunked, nothing masked."""
    return call is not None and chunk_size is None and all(m is None for m in masks) and not torch.is_grad_enabled()
