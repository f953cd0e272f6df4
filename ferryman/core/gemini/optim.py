"""Gradients and the optimizer step on chunk shards.

Gradients: each parameter's gradient is copied into its chunk's flat buffer as autograd delivers
it, and each chunk is reduce-scattered (asynchronously, so it overlaps the rest of backward) once
per backward; this rank's slice is added to the fp32 gradient shard, which accumulates over
micro-batches. With several ranks the chunks are reduced in one fixed order (reverse forward
order, the same on every rank): a chunk goes once it is ready and every chunk before it in the
order has gone, and the end of backward flushes the rest, zeros standing in for the gradients this
rank did not get. Ready: every parameter of the chunk whose module ran forward with grad on this
rank has delivered its gradient (a chunk of modules this rank skipped is ready at once). So ranks whose data take different branches still issue the same
collectives in the same order, and a parameter used on some ranks only gets the DDP average.
Step: unscale and overflow check (fp16), global-norm clipping, then AdamW on the shards
(``adam.ShardAdamW``: per-parameter step counts, one fused kernel per group).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.manager import ChunkManager


class GradReducer:
    """Collects per-parameter gradients into chunk buffers and reduces every chunk once per backward."""

    max_in_flight = 2  # reductions left running behind backward; bounds the buffers held

    def __init__(self, manager: ChunkManager, group: dist.ProcessGroup | None, world: int, order: list[int]) -> None:
        self.manager = manager
        self.group = group
        self.world = world
        self.order = [manager.chunks[i] for i in order]  # trainable chunks, reduction order
        self.position = 0  # self.order[:position] are reduced in this backward
        self.num_overlapped = 0  # reductions started during backward, not by finish()
        self.num_late = 0  # second-round reductions of gradients that came after their chunk's
        self._pending: list[tuple[Chunk, torch.Tensor, torch.Tensor, dist.Work | None]] = []

    def _reserve(self, nbytes: int, what: str) -> None:
        if self.manager.device_bytes + nbytes > self.manager.soft_limit():
            self._drain(0)  # finished reductions give their buffers back before anything is evicted
        self.manager.reserve(nbytes, what)

    def _buffer(self, chunk: Chunk) -> torch.Tensor:
        if chunk.grad_full is None:
            self._reserve(chunk.payload_bytes, f"gradient buffer of chunk {chunk.index}")
            chunk.grad_full = torch.zeros(chunk.numel, dtype=chunk.dtype, device=self.manager.device)
        return chunk.grad_full

    def add(self, chunk: Chunk, slot_index: int, grad: torch.Tensor) -> None:
        slot = chunk.slots[slot_index]
        view = self._buffer(chunk)[slot.offset : slot.offset + slot.numel]
        if slot_index in chunk.grad_seen:  # a second delivery in one backward (reentrant checkpoint)
            view.add_(grad.reshape(-1))
        else:
            view.copy_(grad.reshape(-1))
            chunk.grad_seen.add(slot_index)
        if chunk.reduced:  # after its reduction: goes in a second round at the end of backward
            chunk.late = True
        elif self.world > 1:
            self._advance()
        elif self._ready(chunk):
            self.num_overlapped += 1
            self.reduce(chunk)

    @staticmethod
    def _ready(chunk: Chunk) -> bool:
        return len(chunk.grad_seen) == len(chunk.slots) or chunk.expected.issubset(chunk.grad_seen)

    def _advance(self) -> None:
        while self.position < len(self.order) and self._ready(self.order[self.position]):
            self.num_overlapped += 1
            self.reduce(self.order[self.position])
            self.position += 1

    def reduce(self, chunk: Chunk) -> None:
        """Reduce the chunk's buffer (all zeros if this rank got none of its gradients)."""
        full = self._buffer(chunk)
        chunk.got_grad[list(chunk.grad_seen)] = True
        chunk.grad_seen.clear()
        chunk.grad_full, chunk.reduced = None, True
        if self.world == 1:
            self._pending.append((chunk, full, full, None))
        else:
            self._reserve(chunk.shard_bytes, f"reduce-scatter output of chunk {chunk.index}")
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
            for chunk in self.order:
                if chunk.grad_full is not None:
                    self.reduce(chunk)
        else:
            for chunk in self.order[self.position :]:
                self.reduce(chunk)
            # late gradients are rare (reentrant recomputation of a parameter used twice); one flag
            # per chunk tells every rank which chunks take a second reduction
            late = torch.tensor([c.late for c in self.order], dtype=torch.uint8)
            late = all_reduce_small(late, self.group, self.manager.device, dist.ReduceOp.MAX)
            for chunk, again in zip(self.order, late.tolist()):
                if again:
                    self.num_late += 1
                    chunk.reduced = False
                    self.reduce(chunk)
        self._drain(0)
        self.position = 0
        for chunk in self.order:
            chunk.reduced = chunk.late = False
            chunk.expected.clear()


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
        else:
            self.calm_steps += 1
            if self.calm_steps % self.growth_interval == 0:
                self.scale *= 2


def all_reduce_small(t: torch.Tensor, group, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host tensor (through the device: NCCL reduces device tensors only)."""
    if group is None:
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return on_device.cpu()


def optimizer_step(engine) -> dict[str, float]:
    """Unscale, check overflow, clip and update; returns the gradient norm and whether it skipped."""
    chunks = [c for c in engine.chunks if c.master is not None]
    got = torch.cat([c.got_grad for c in chunks]).to(torch.uint8)
    flags = all_reduce_small(got, engine.group, engine.device, dist.ReduceOp.MAX)
    offset = 0
    for chunk in chunks:  # a gradient on any rank counts as a gradient everywhere
        chunk.got_grad = flags[offset : offset + len(chunk.slots)].bool()
        offset += len(chunk.slots)
    scaler: LossScaler = engine.scaler
    grads = [c.master.grad for c in chunks]
    if scaler.enabled and grads:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)
    norm = math.sqrt(all_reduce_small(_squared_norm(grads), engine.group, engine.device).item())
    if not math.isfinite(norm):
        scaler.update(overflow=True)
        return {"grad_norm": norm, "skipped": 1.0, "loss_scale": scaler.scale}
    scaler.update(overflow=False)
    if engine.ocfg.max_grad_norm > 0:
        coef = min(1.0, engine.ocfg.max_grad_norm / (norm + 1e-6))
        for chunk in chunks:
            chunk.master.grad.mul_(coef)
    engine.adam.step()
    return {"grad_norm": norm, "skipped": 0.0, "loss_scale": scaler.scale}


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all gradient shards: one foreach norm per device, one sync in the end."""
    total = torch.zeros((), dtype=torch.float64)
    for device in {g.device for g in grads}:
        norms = torch._foreach_norm([g for g in grads if g.device == device])
        total += torch.stack(norms).double().pow(2).sum().cpu()
    return total
