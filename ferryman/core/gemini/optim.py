"""Gradients and the optimizer step on chunk shards.

Gradients: each parameter's gradient is copied into its chunk's flat buffer as autograd delivers
it; when a chunk has all its gradients the buffer is reduce-scattered (asynchronously, so it
overlaps the rest of backward) and this rank's slice is added to the fp32 gradient shard, which
accumulates over micro-batches. Step: unscale and overflow check (fp16), global-norm clipping,
then torch's fused AdamW over the flat fp32 master shards, one optimizer for the device shards and
one for the host shards (the device one first, so its kernels run while the host works).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.config import GeminiConfig, OptimConfig
from ferryman.core.gemini.manager import ChunkManager


class GradReducer:
    """Collects per-parameter gradients into chunk buffers and reduces each chunk once it is full."""

    max_in_flight = 2  # reductions left running behind backward; bounds the buffers held

    def __init__(self, manager: ChunkManager, group: dist.ProcessGroup | None, world: int) -> None:
        self.manager = manager
        self.group = group
        self.world = world
        self._pending: list[tuple[Chunk, torch.Tensor, torch.Tensor, dist.Work | None]] = []

    def add(self, chunk: Chunk, slot_index: int, grad: torch.Tensor) -> None:
        slot = chunk.slots[slot_index]
        if chunk.grad_full is None:
            self.manager.reserve(chunk.payload_bytes, f"gradient buffer of chunk {chunk.index}")
            chunk.grad_full = torch.zeros(chunk.numel, dtype=chunk.dtype, device=self.manager.device)
        view = chunk.grad_full[slot.offset : slot.offset + slot.numel]
        if slot_index in chunk.grad_seen:  # a second delivery in one backward (reentrant checkpoint)
            view.add_(grad.reshape(-1))
        else:
            view.copy_(grad.reshape(-1))
            chunk.grad_seen.add(slot_index)
        if len(chunk.grad_seen) == len(chunk.slots):
            self.reduce(chunk)

    def reduce(self, chunk: Chunk) -> None:
        assert chunk.grad_full is not None
        chunk.got_grad[list(chunk.grad_seen)] = True
        chunk.grad_seen.clear()
        full, chunk.grad_full = chunk.grad_full, None
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
        """Reduce the chunks some of whose parameters got no gradient, then wait for every reduction."""
        for chunk in self.manager.chunks:  # chunk order: the same on every rank
            if chunk.grad_full is not None:
                self.reduce(chunk)
        self._drain(0)


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


def build_optimizers(chunks: list[Chunk], ocfg: OptimConfig) -> list[torch.optim.AdamW]:
    """Fused AdamW over the master shards, the device optimizer before the host one."""
    optimizers = []
    for on_device in (True, False):
        groups = []
        for decay in (True, False):
            params = [c.master for c in chunks if c.master is not None and c.optim_on_device == on_device and c.decay == decay]
            if params:
                groups.append({"params": params, "weight_decay": ocfg.weight_decay if decay else 0.0})
        if groups:
            optimizers.append(
                torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, fused=True)
            )
    return optimizers


def _all_reduce(t: torch.Tensor, group, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
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
    flags = _all_reduce(got, engine.group, engine.device, dist.ReduceOp.MAX)
    offset = 0
    for chunk in chunks:  # a gradient on any rank counts as a gradient everywhere
        chunk.got_grad = flags[offset : offset + len(chunk.slots)].bool()
        offset += len(chunk.slots)
    scaler: LossScaler = engine.scaler
    grads = [c.master.grad for c in chunks]
    if scaler.enabled and grads:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)
    norm = math.sqrt(_all_reduce(_squared_norm(grads), engine.group, engine.device).item())
    if not math.isfinite(norm):
        scaler.update(overflow=True)
        return {"grad_norm": norm, "skipped": 1.0, "loss_scale": scaler.scale}
    scaler.update(overflow=False)
    if engine.ocfg.max_grad_norm > 0:
        coef = min(1.0, engine.ocfg.max_grad_norm / (norm + 1e-6))
        for chunk in chunks:
            chunk.master.grad.mul_(coef)
    _update(chunks, engine.optimizers)
    return {"grad_norm": norm, "skipped": 0.0, "loss_scale": scaler.scale}


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all gradient shards: one foreach norm per device, one sync in the end."""
    total = torch.zeros((), dtype=torch.float64)
    for device in {g.device for g in grads}:
        norms = torch._foreach_norm([g for g in grads if g.device == device])
        total += torch.stack(norms).double().pow(2).sum().cpu()
    return total


def _update(chunks: list[Chunk], optimizers: list[torch.optim.AdamW]) -> None:
    """AdamW on the shards; parameters with no gradient since zero_grad are left as they were.

    A chunk with no gradient at all is skipped like a ``grad=None`` parameter in torch. In a chunk
    with some, the gradless slots' master and moments are restored after the flat update (their
    Adam step count is the chunk's, the one difference from per-parameter torch).
    """
    saved: list[tuple[Chunk, list[tuple[slice, dict[str, torch.Tensor]]]]] = []
    grads = {}
    for chunk in chunks:
        if not bool(chunk.got_grad.any()):
            grads[chunk.index], chunk.master.grad = chunk.master.grad, None
            continue
        if bool(chunk.got_grad.all()):
            continue
        kept = []
        state = _state_of(optimizers, chunk)
        for slot, got in zip(chunk.slots, chunk.got_grad.tolist()):
            piece = _local_slice(chunk, slot.offset, slot.numel)
            if got or piece is None:
                continue
            tensors = {"master": chunk.master.data} | {k: v for k, v in state.items() if k != "step"}
            kept.append((piece, {k: v[piece].clone() for k, v in tensors.items()}))
        saved.append((chunk, kept))
    for optimizer in optimizers:
        optimizer.step()
    for chunk, kept in saved:
        state = _state_of(optimizers, chunk)
        for piece, values in kept:
            for key, value in values.items():
                (chunk.master.data if key == "master" else state[key])[piece] = value
    for chunk in chunks:
        if chunk.index in grads:
            chunk.master.grad = grads[chunk.index]


def _state_of(optimizers: list[torch.optim.AdamW], chunk: Chunk) -> dict:
    for optimizer in optimizers:
        if chunk.master in optimizer.state:
            return optimizer.state[chunk.master]
    return {}


def _local_slice(chunk: Chunk, offset: int, numel: int) -> slice | None:
    """The part of [offset, offset + numel) of the full chunk that lies in this rank's shard."""
    start, end = chunk.shard_range
    lo, hi = max(start, offset), min(end, offset + numel)
    return slice(lo - start, hi - start) if lo < hi else None
