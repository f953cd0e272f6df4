"""Gradients and the optimizer step on chunk shards.

Gradients: each parameter's gradient is copied into its chunk's flat buffer as autograd delivers
it, and each chunk is reduce-scattered (asynchronously, so it overlaps the rest of backward) once
per backward; this rank's slice is added to the fp32 gradient shard, which accumulates over
micro-batches. With several ranks the chunks are reduced in one fixed order (reverse forward
order, the same on every rank): a chunk goes once it is ready and every chunk before it in the
order has gone, and the end of backward flushes the rest, zeros standing in for the gradients this
rank did not get. Ready: every parameter of the chunk whose module ran forward with grad on this
rank has delivered its gradient (a chunk of modules this rank skipped is ready at once). So ranks
whose data take different branches still issue the same collectives in the same order, and a
parameter used on some ranks only gets the DDP average.

A chunk's reduction within one backward (``Reduction``; the reducer alone moves it)::

    COLLECTING  gradients arrive in the buffer          -> REDUCED  (reduce)
    REDUCED     reduced in this backward                 -> LATE     (a gradient after the reduction)
    LATE        reentrant recomputation delivered more   -> REDUCED  (second round at the end)
    any         end of backward                          -> COLLECTING

Step: unscale and overflow check (fp16), global-norm clipping, then AdamW on the shards
(``adam.ShardAdamW``: per-parameter step counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch
import torch.distributed as dist

from ferryman.core.gemini.adam import ShardAdamW
from ferryman.core.gemini.chunk import Chunk, check_move
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.manager import ChunkManager


class Reduction(StrEnum):
    COLLECTING = "collecting"
    REDUCED = "reduced"
    LATE = "late"


_LEGAL = {
    Reduction.COLLECTING: {Reduction.REDUCED},
    Reduction.REDUCED: {Reduction.LATE, Reduction.COLLECTING},
    Reduction.LATE: {Reduction.REDUCED, Reduction.COLLECTING},
}


@dataclass(eq=False)
class ChunkGrads:
    """One trainable chunk's gradient bookkeeping (owned by the reducer)."""

    chunk: Chunk
    got: torch.Tensor  # [num slots] bool: a gradient since the last zero_grad (on any rank, after the step's all-reduce)
    buffer: torch.Tensor | None = None  # [numel] compute dtype, during backward
    seen: set[int] = field(default_factory=set)  # slots whose gradients this backward delivered
    expected: set[int] = field(default_factory=set)  # slots of modules that ran forward with grad here
    phase: Reduction = Reduction.COLLECTING

    def move(self, new: Reduction) -> None:
        self.phase = check_move(f"gradients of chunk {self.chunk.index}", self.phase, new, _LEGAL)  # type: ignore[assignment]

    @property
    def ready(self) -> bool:
        return len(self.seen) == len(self.chunk.slots) or self.expected.issubset(self.seen)


class GradReducer:
    """Collects per-parameter gradients into chunk buffers and reduces every chunk once per backward."""

    max_in_flight = 2  # reductions left running behind backward; bounds the buffers held

    def __init__(self, manager: ChunkManager, group: dist.ProcessGroup | None, world: int, order: tuple[int, ...]) -> None:
        self.manager = manager
        self.group = group
        self.world = world
        self.grads = {c.index: ChunkGrads(c, torch.zeros(len(c.slots), dtype=torch.bool)) for c in manager.chunks if c.master is not None}
        self.order = [self.grads[i] for i in order]  # reduction order
        self.position = 0  # self.order[:position] are reduced in this backward
        self.num_overlapped = 0  # reductions started during backward, not by finish()
        self.num_late = 0  # second-round reductions of gradients that came after their chunk's
        self._pending: list[tuple[Chunk, torch.Tensor, torch.Tensor, dist.Work | None]] = []
        manager.buffer_bytes.append(self.buffer_bytes)
        manager.give_back.append(lambda: self._drain(0))  # any reservation, a fetch's too, may wait for them

    def buffer_bytes(self) -> int:
        """Device bytes of the gradient buffers being filled (the manager's recount adds them)."""
        return sum(g.chunk.payload_bytes for g in self.grads.values() if g.buffer is not None)

    # -- bookkeeping the engine reports --------------------------------------------------------
    def expect(self, chunk_index: int, slot_index: int) -> None:
        """This parameter's module ran forward with grad: its gradient is due in this backward."""
        self.grads[chunk_index].expected.add(slot_index)

    def expected_names(self) -> set[str]:
        return {g.chunk.slots[i].name for g in self.grads.values() for i in g.expected}

    def zero_grad(self) -> None:
        for g in self.grads.values():
            assert g.chunk.master is not None and g.chunk.master.grad is not None
            g.chunk.master.grad.zero_()
            g.got.zero_()
            g.seen.clear()

    # -- backward --------------------------------------------------------------------------------
    def _buffer(self, g: ChunkGrads) -> torch.Tensor:
        if g.buffer is None:
            self.manager.reserve(g.chunk.payload_bytes, f"gradient buffer of chunk {g.chunk.index}")
            g.buffer = torch.zeros(g.chunk.numel, dtype=g.chunk.dtype, device=self.manager.device)
        return g.buffer

    def add(self, chunk_index: int, slot_index: int, grad: torch.Tensor) -> None:
        g = self.grads[chunk_index]
        slot = g.chunk.slots[slot_index]
        view = self._buffer(g)[slot.offset : slot.offset + slot.numel]
        if slot_index in g.seen:  # a second delivery in one backward (reentrant checkpoint)
            view.add_(grad.reshape(-1))
        else:
            view.copy_(grad.reshape(-1))
            g.seen.add(slot_index)
        if g.phase != Reduction.COLLECTING:  # after its reduction: a second round at the end of backward
            g.move(Reduction.LATE)
        elif self.world > 1:
            self._advance()
        elif g.ready:
            self.num_overlapped += 1
            self.reduce(g)

    def _advance(self) -> None:
        while self.position < len(self.order) and self.order[self.position].ready:
            self.num_overlapped += 1
            self.reduce(self.order[self.position])
            self.position += 1

    def reduce(self, g: ChunkGrads) -> None:
        """Reduce the chunk's buffer (all zeros if this rank got none of its gradients)."""
        full = self._buffer(g)
        g.got[list(g.seen)] = True
        g.seen.clear()
        g.buffer = None
        g.move(Reduction.REDUCED)
        chunk = g.chunk
        if chunk.partial_group is not None:  # model-parallel shares first: one collective per chunk
            dist.all_reduce(full, group=chunk.partial_group)
        if self.world == 1:
            self._pending.append((chunk, full, full, None))
        else:
            self.manager.reserve(chunk.shard_bytes, f"reduce-scatter output of chunk {chunk.index}")
            out = torch.empty(chunk.shard_numel, dtype=chunk.dtype, device=self.manager.device)
            work = dist.reduce_scatter_tensor(out, full, group=self.group, async_op=True)
            self._pending.append((chunk, full, out, work))
        self._drain(self.max_in_flight if self.world > 1 else 0)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            chunk, full, reduced, work = self._pending.pop(0)
            if work is not None:
                work.wait()
                self.manager.device_bytes -= reduced.numel() * reduced.element_size()
            assert chunk.master is not None and chunk.master.grad is not None
            grad = reduced.to(chunk.master.grad.device, dtype=torch.float32)
            if self.world > 1:
                grad.div_(self.world)
            chunk.master.grad.add_(grad)
            self.manager.device_bytes -= full.numel() * full.element_size()

    def finish(self) -> None:
        """End of backward: reduce what is left in order, then the late gradients, and wait."""
        if self.world == 1:
            for g in self.order:
                if g.buffer is not None:
                    self.reduce(g)
        else:
            for g in self.order[self.position :]:
                self.reduce(g)
            # late gradients are rare (reentrant recomputation of a parameter used twice); one flag
            # per chunk tells every rank which chunks take a second reduction
            late = torch.tensor([g.phase == Reduction.LATE for g in self.order], dtype=torch.uint8)
            late = all_reduce_small(late, self.group, self.manager.device, dist.ReduceOp.MAX)
            for g, again in zip(self.order, late.tolist()):
                if again:
                    self.num_late += 1
                    g.move(Reduction.LATE)  # also where only another rank was late
                    self.reduce(g)
        self._drain(0)
        self.position = 0
        for g in self.order:
            g.move(Reduction.COLLECTING)
            g.expected.clear()


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018): halve on overflow, double after a calm run."""

    def __init__(self, cfg: GeminiConfig) -> None:
        self.enabled = cfg.dtype == torch.float16
        self.scale = cfg.initial_loss_scale if self.enabled else 1.0
        self.growth_interval = cfg.loss_scale_growth_interval
        self.min_scale = cfg.min_loss_scale
        self.calm_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.min_scale, self.scale / 2)
            self.calm_steps = 0
        else:  # counted as torch.amp.GradScaler's growth tracker is, so the state moves between engines
            self.calm_steps += 1
            if self.calm_steps == self.growth_interval:
                self.scale *= 2
                self.calm_steps = 0


def all_reduce_small(t: torch.Tensor, group, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host tensor (through the device: NCCL reduces device tensors only)."""
    if group is None:
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return on_device.cpu()


def optimizer_step(reducer: GradReducer, scaler: LossScaler, adam: ShardAdamW, max_grad_norm: float) -> dict[str, float]:
    """Unscale, check overflow, clip and update; returns the gradient norm and whether it skipped."""
    grads = list(reducer.grads.values())
    group, device = reducer.group, reducer.manager.device
    flags = all_reduce_small(torch.cat([g.got for g in grads]).to(torch.uint8), group, device, dist.ReduceOp.MAX)
    offset = 0
    for g in grads:  # a gradient on any rank counts as a gradient everywhere
        g.got = flags[offset : offset + len(g.chunk.slots)].bool()
        offset += len(g.chunk.slots)
    shards = [g.chunk.master.grad for g in grads]
    if scaler.enabled and shards:
        torch._foreach_mul_(shards, 1.0 / scaler.scale)
    norm = math.sqrt(all_reduce_small(_squared_norm(shards), group, device).item())
    if not math.isfinite(norm):
        scaler.update(overflow=True)
        return {"grad_norm": norm, "skipped": 1.0, "loss_scale": scaler.scale}
    scaler.update(overflow=False)
    if max_grad_norm > 0:
        coef = min(1.0, max_grad_norm / (norm + 1e-6))
        for shard in shards:
            shard.mul_(coef)
    adam.step({g.chunk.index: g.got for g in grads})
    return {"grad_norm": norm, "skipped": 0.0, "loss_scale": scaler.scale}


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all gradient shards: one foreach norm per device, one sync in the end."""
    total = torch.zeros((), dtype=torch.float64)
    for device in {g.device for g in grads}:
        norms = torch._foreach_norm([g for g in grads if g.device == device])
        total += torch.stack(norms).double().pow(2).sum().cpu()
    return total
