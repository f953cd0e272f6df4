"""AdamW on chunk shards with torch's per-parameter semantics: one step count per parameter.

torch's AdamW keeps a step count per tensor and leaves a tensor whose ``grad`` is None alone (no
update, no weight decay, no step). Over flat chunk shards the same holds here: a parameter's piece
of this rank's shard is updated with its own bias correction only if it got a gradient since
``zero_grad`` on any rank. A chunk holds parameters of one weight-decay kind, so the pieces of a
shard differ only in their step counts.

Device shards: one fused multi-tensor kernel per (device, decay) group over per-parameter views.
Host shards (``host_adamw_``): the update is bounded by memory bandwidth, and torch's CPU kernel
runs much faster over one long tensor than over many views, so it runs once per run of adjacent
pieces sharing a step count: in the common case (every parameter stepped the same number of
times) once over the whole shard. The numbers stay those of one call per parameter, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.host_adam import Piece, host_adamw_
from ferryman.core.optim import OptimConfig


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


def shard_pieces(chunk: Chunk) -> list[Piece]:
    """The parameters' pieces of this rank's shard, in shard order."""
    pieces = []
    for index, slot in enumerate(chunk.slots):
        part = local_slice(chunk, slot.offset, slot.numel)
        if part is not None:
            pieces.append(Piece(slot=index, start=part.start, end=part.stop))
    return pieces


class ShardAdamW:
    """AdamW (Loshchilov & Hutter 2019) over the master shards of the trainable chunks.

    The pieces are found once per layout; a step takes the chunks' gradient flags (all-reduced
    over the ranks, so every rank advances the same counts). Device shards go first, so their
    kernels run while the host updates its shards.
    """

    def __init__(self, chunks: list[Chunk], ocfg: OptimConfig, *, lr: float) -> None:
        self.ocfg = ocfg
        self.lr = lr
        self.chunks = [c for c in chunks if c.master is not None]
        self.pieces = {c.index: shard_pieces(c) for c in self.chunks}
        self.views = {c.index: self._views(c) for c in self.chunks}

    def _views(self, chunk: Chunk) -> _Views:
        assert chunk.master is not None and chunk.master.grad is not None and chunk.steps is not None
        views = _Views()
        for piece in self.pieces[chunk.index]:
            part = slice(piece.start, piece.end)
            views.slots.append(piece.slot)
            views.params.append(chunk.master.data[part])
            views.grads.append(chunk.master.grad[part])
            views.exp_avgs.append(chunk.exp_avg[part])
            views.exp_avg_sqs.append(chunk.exp_avg_sq[part])
            views.steps.append(chunk.steps[piece.slot])
        return views

    def step(self, got: dict[int, torch.Tensor]) -> None:
        """One update; ``got[chunk index]``: which of its parameters got a gradient (bool per slot)."""
        for on_device in (True, False):
            for decay in (True, False):
                group = [c for c in self.chunks if c.optim_on_device == on_device and c.decay == decay]
                self._step_group(group, got, self.ocfg.weight_decay if decay else 0.0)

    def _step_group(self, chunks: list[Chunk], got: dict[int, torch.Tensor], weight_decay: float) -> None:
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
        for chunk in chunks:
            flags = got[chunk.index]
            if not bool(flags.any()):
                continue
            # every slot's count, also of slots with no piece here: all ranks keep the same counts
            chunk.steps.add_(flags.to(chunk.steps.device, torch.float32))
            if chunk.master.device.type == "cpu":
                self._host_step(chunk, flags.tolist(), weight_decay)
                continue
            views = self.views[chunk.index]
            listed = flags.tolist()
            keep = None if all(listed) else [k for k, slot in enumerate(views.slots) if listed[slot]]
            for out, part in zip(lists, views.lists(keep)):
                out.extend(part)
        if lists[0]:
            beta1, beta2 = self.ocfg.betas
            torch._fused_adamw_(
                *lists[:4], [], lists[4],
                lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=self.ocfg.eps,
                amsgrad=False, maximize=False,
            )  # fmt: skip

    def _host_step(self, chunk: Chunk, flags: list[bool], weight_decay: float) -> None:
        assert chunk.master is not None and chunk.master.grad is not None and chunk.steps is not None
        host_adamw_(
            chunk.master.data, chunk.master.grad, chunk.exp_avg, chunk.exp_avg_sq, chunk.steps,
            [p for p in self.pieces[chunk.index] if flags[p.slot]],
            lr=self.lr, betas=self.ocfg.betas, eps=self.ocfg.eps, weight_decay=weight_decay,
        )  # fmt: skip
