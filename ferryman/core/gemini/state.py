"""Moving between chunk shards and plain per-parameter tensors (for re-layout, state dicts, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ferryman.core.gemini.chunk import Chunk

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Ranks:
    """The data-parallel group the chunks are sharded over (``group`` None: one rank)."""

    world: int
    rank: int
    group: dist.ProcessGroup | None
    device: torch.device  # collectives go through it: NCCL gathers device tensors, gloo host ones


def gather_full(ranks: Ranks, chunk: Chunk, shard: torch.Tensor) -> torch.Tensor:
    """The full-chunk tensor from every rank's shard, on the host."""
    if ranks.world == 1:
        return shard.detach().cpu()
    full = torch.empty(chunk.numel, dtype=shard.dtype, device=ranks.device)
    dist.all_gather_into_tensor(full, shard.detach().to(ranks.device), group=ranks.group)
    return full.cpu()


def optim_state(chunk: Chunk) -> dict[str, torch.Tensor]:
    """The chunk's Adam state: flat moment shards and the per-parameter step counts ({} if frozen)."""
    if chunk.master is None or chunk.steps is None:
        return {}
    return {"exp_avg": chunk.exp_avg, "exp_avg_sq": chunk.exp_avg_sq, "steps": chunk.steps}


def export_full(chunks: list[Chunk], ranks: Ranks, with_moments: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per-parameter fp32 master values (frozen: compute copies) and Adam state, consolidated.

    Adam state per parameter: ``{"exp_avg": t, "exp_avg_sq": t, "step": float}``. A collective when
    data-parallel: every rank must call it.
    """
    values: dict[str, torch.Tensor] = {}
    moments: dict[str, dict] = {}
    for chunk in chunks:
        source = chunk.master.data if chunk.master is not None else chunk.shard
        values.update({k: v.clone() for k, v in chunk.unflatten(gather_full(ranks, chunk, source)).items()})
        state = optim_state(chunk) if with_moments else {}
        if not state:
            continue
        per_key = {key: chunk.unflatten(gather_full(ranks, chunk, state[key])) for key in MOMENTS}
        steps = state["steps"].tolist()  # the same on every rank
        for slot, step in zip(chunk.slots, steps):
            moments[slot.name] = {key: per_key[key][slot.name].clone() for key in MOMENTS} | {"step": step}
    return values, moments


def import_optim_state(chunks: list[Chunk], moments: dict[str, dict]) -> None:
    """Give each chunk's shards the Adam state of its parameters (fresh for the ones not given)."""
    if not moments:
        return
    for chunk in chunks:
        state = optim_state(chunk)
        if not state:
            continue
        names = [s.name for s in chunk.slots if s.name in moments]
        if not names:
            continue
        for key in MOMENTS:  # in place: the optimizer holds views of these tensors
            full = chunk.flatten({n: moments[n][key] for n in names}, torch.float32)
            state[key].copy_(chunk.shard_of(full))
        steps = [float(moments[s.name]["step"]) if s.name in moments else 0.0 for s in chunk.slots]
        state["steps"].copy_(torch.tensor(steps, dtype=torch.float32))
