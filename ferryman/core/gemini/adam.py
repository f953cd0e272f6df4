"""AdamW on chunk shards with torch's per-parameter semantics: one step count per parameter.

torch's AdamW keeps a step count per tensor and leaves a tensor whose ``grad`` is None alone (no
update, no weight decay, no step). Over flat chunk shards the same holds here: every parameter's
piece of this rank's shard is a view into the flat master, gradient and moment tensors, and one
fused multi-tensor kernel per (device, decay) group updates the pieces of the parameters that got a
gradient since ``zero_grad`` on any rank, each with its own bias correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.config import OptimConfig


@dataclass
class _Views:
    """One chunk's per-parameter views (only the parameters with a piece in this rank's shard)."""

    slots: list[int] = field(default_factory=list)  # slot index of each view
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)

    def lists(self, keep: list[int] | None = None) -> tuple[list[torch.Tensor], ...]:
        all_lists = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps)
        if keep is None:
            return all_lists
        return tuple([lst[k] for k in keep] for lst in all_lists)


def local_slice(chunk: Chunk, offset: int, numel: int) -> slice | None:
    """The part of [offset, offset + numel) of the full chunk that lies in this rank's shard."""
    start, end = chunk.shard_range
    lo, hi = max(start, offset), min(end, offset + numel)
    return slice(lo - start, hi - start) if lo < hi else None


def init_state(chunk: Chunk) -> None:
    """Zero moments and step counts beside the chunk's master shard (wherever it was placed)."""
    assert chunk.master is not None
    chunk.exp_avg = torch.zeros_like(chunk.master.data)
    chunk.exp_avg_sq = torch.zeros_like(chunk.master.data)
    chunk.steps = torch.zeros(len(chunk.slots), dtype=torch.float32, device=chunk.master.device)


class ShardAdamW:
    """AdamW (Loshchilov & Hutter 2019) over the master shards of the trainable chunks.

    The views are made once per layout; a step filters them by the chunks' ``got_grad`` flags
    (all-reduced over the ranks, so every rank advances the same counts) and makes one fused call
    per group: device shards first, so their kernels run while the host updates its shards.
    """

    def __init__(self, chunks: list[Chunk], ocfg: OptimConfig) -> None:
        self.ocfg = ocfg
        self.lr = ocfg.lr
        self.chunks = [c for c in chunks if c.master is not None]
        self.views = {c.index: self._views(c) for c in self.chunks}

    @staticmethod
    def _views(chunk: Chunk) -> _Views:
        assert chunk.master is not None and chunk.master.grad is not None and chunk.steps is not None
        views = _Views()
        for index, slot in enumerate(chunk.slots):
            piece = local_slice(chunk, slot.offset, slot.numel)
            if piece is None:
                continue
            views.slots.append(index)
            views.params.append(chunk.master.data[piece])
            views.grads.append(chunk.master.grad[piece])
            views.exp_avgs.append(chunk.exp_avg[piece])
            views.exp_avg_sqs.append(chunk.exp_avg_sq[piece])
            views.steps.append(chunk.steps[index])
        return views

    def step(self) -> None:
        for on_device in (True, False):
            for decay in (True, False):
                group = [c for c in self.chunks if c.optim_on_device == on_device and c.decay == decay]
                self._step_group(group, self.ocfg.weight_decay if decay else 0.0)

    def _step_group(self, chunks: list[Chunk], weight_decay: float) -> None:
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
        for chunk in chunks:
            got = chunk.got_grad
            if not bool(got.any()):
                continue
            # every slot's count, also of slots with no piece here: all ranks keep the same counts
            chunk.steps.add_(got.to(chunk.steps.device, torch.float32))
            views = self.views[chunk.index]
            if bool(got.all()):
                keep = None
            else:
                flags = got.tolist()
                keep = [k for k, slot in enumerate(views.slots) if flags[slot]]
            for out, part in zip(lists, views.lists(keep)):
                out.extend(part)
        params, grads, exp_avgs, exp_avg_sqs, steps = lists
        if not params:
            return
        beta1, beta2 = self.ocfg.betas
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=self.ocfg.eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
