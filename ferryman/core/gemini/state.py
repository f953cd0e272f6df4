"""Moving between chunk shards and plain per-parameter tensors (for re-layout, state dicts, checkpoints)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ferryman.core.gemini.chunk import Chunk

MOMENTS = ("exp_avg", "exp_avg_sq")


def gather_full(engine, chunk: Chunk, shard: torch.Tensor) -> torch.Tensor:
    """The full-chunk tensor from every rank's shard, on the host."""
    if engine.world == 1:
        return shard.detach().cpu()
    comm_device = engine.device  # NCCL gathers device tensors; gloo host ones (device is cpu then)
    full = torch.empty(chunk.numel, dtype=shard.dtype, device=comm_device)
    dist.all_gather_into_tensor(full, shard.detach().to(comm_device), group=engine.group)
    return full.cpu()


def optim_state(engine, chunk: Chunk) -> dict:
    for optimizer in engine.optimizers:
        if chunk.master in optimizer.state:
            return optimizer.state[chunk.master]
    return {}


def export_full(engine, with_moments: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per-parameter fp32 master values (frozen: compute copies) and Adam moments, consolidated.

    A collective when data-parallel: every rank must call it.
    """
    values: dict[str, torch.Tensor] = {}
    moments: dict[str, dict] = {}
    for chunk in engine.chunks:
        source = chunk.master.data if chunk.master is not None else chunk.shard
        values.update({k: v.clone() for k, v in chunk.unflatten(gather_full(engine, chunk, source)).items()})
        state = optim_state(engine, chunk) if with_moments else {}
        if not state:
            continue
        per_key = {key: chunk.unflatten(gather_full(engine, chunk, state[key])) for key in MOMENTS}
        step = float(state["step"])
        for slot in chunk.slots:
            moments[slot.name] = {key: per_key[key][slot.name].clone() for key in MOMENTS} | {"step": step}
    return values, moments


def import_optim_state(engine, moments: dict[str, dict]) -> None:
    """Give each chunk's master shard the Adam state of its parameters (flattened and sharded)."""
    if not moments:
        return
    for chunk in engine.chunks:
        if chunk.master is None:
            continue
        names = [s.name for s in chunk.slots if s.name in moments]
        if not names:
            continue
        state = {}
        for key in MOMENTS:
            full = chunk.flatten({n: moments[n][key] for n in names}, torch.float32)
            state[key] = chunk.shard_of(full).clone().to(chunk.master.device)
        # one step count per chunk; parameters that joined later take the chunk's largest
        step = max(float(moments[n]["step"]) for n in names)
        state["step"] = torch.tensor(step, dtype=torch.float32, device=chunk.master.device)
        for optimizer in engine.optimizers:
            if any(chunk.master is p for group in optimizer.param_groups for p in group["params"]):
                optimizer.state[chunk.master] = state
