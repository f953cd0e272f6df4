"""Sharded Gemini checkpoints: each rank writes its chunk shards; any layout and world size reads them.

Folder layout::

    gemini.json                    layout: world size, per chunk its parameters (name, offset,
                                   numel, shape), trainable flag; loss-scaler state
    shard-00000-of-00002.safetensors   rank 0's shards: c{i}.master, c{i}.exp_avg, c{i}.exp_avg_sq,
                                   c{i}.steps (trainable chunks: Adam step count per parameter, in
                                   slot order, the same in every file), c{i}.shard (frozen),
                                   buffer.<name>

Format ``ferryman-gemini-2``. Format 1 kept one step count per chunk (``c{i}.step``); it still
loads, every parameter of a chunk taking that chunk's count, as it had in the run that wrote it.

``read_full`` reassembles per-parameter tensors from every shard file and the engine repacks them
in its current layout (``GeminiEngine.load``), so a run may resume on a different number of ranks
or with different chunk sizes.
Everything is safetensors and JSON: no pickled code is run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ferryman.core.errors import UserError
from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.state import MOMENTS, Ranks, optim_state
from ferryman.core.io import atomic_path, write_text

LAYOUT = "gemini.json"
FORMAT = "ferryman-gemini-2"
READABLE = ("ferryman-gemini-1", FORMAT)


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def save_sharded(folder: str | Path, chunks: list[Chunk], ranks: Ranks, *, buffers: dict[str, torch.Tensor], header: dict) -> None:
    """Write this rank's shards (every rank calls it) and, on rank 0, the layout file.

    ``header``: the engine's fields of the layout file (dtype, loss scaler, aliases); ``buffers``
    are written by rank 0.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        key = f"c{chunk.index}"
        if chunk.master is None:
            tensors[f"{key}.shard"] = chunk.shard.detach().cpu()
            continue
        tensors[f"{key}.master"] = chunk.master.detach().cpu()
        state = optim_state(chunk)
        for name in (*MOMENTS, "steps"):
            tensors[f"{key}.{name}"] = state[name].cpu()
    if ranks.rank == 0:
        tensors |= {f"buffer.{n}": b.detach().cpu() for n, b in buffers.items()}
    with atomic_path(folder / _shard_name(ranks.rank, ranks.world)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    if ranks.rank == 0:
        chunk_list = [
            {"numel": c.numel, "trainable": c.trainable, "params": [[s.name, s.offset, s.numel, list(s.shape)] for s in c.slots]}
            for c in chunks
        ]
        layout = {"format": FORMAT, "world_size": ranks.world, **header, "chunks": chunk_list}
        write_text(folder / LAYOUT, json.dumps(layout, indent=1))
    if ranks.group is not None:
        dist.barrier(group=ranks.group)


def read_layout(folder: str | Path) -> dict:
    path = Path(folder) / LAYOUT
    if not path.is_file():
        raise UserError(f"{path}: not found; is {folder} a Gemini checkpoint folder?")
    try:
        layout = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if layout.get("format") not in READABLE:
        raise UserError(f"{path}: unknown format {layout.get('format')!r}; this version reads {', '.join(READABLE)}")
    return layout


def read_full(folder: str | Path) -> tuple[dict, dict, dict, dict]:
    """(values, moments, buffers, layout) with per-parameter tensors reassembled from every shard."""
    folder = Path(folder)
    layout = read_layout(folder)
    world = layout["world_size"]
    files = []
    for rank in range(world):
        path = folder / _shard_name(rank, world)
        if not path.is_file():
            raise UserError(f"{path}: missing; the checkpoint was written by {world} ranks")
        files.append(load_file(str(path)))
    values, moments = {}, {}
    for index, chunk in enumerate(layout["chunks"]):
        key = f"c{index}"
        kind = "master" if chunk["trainable"] else "shard"
        flat = {name: torch.cat([f[f"{key}.{name}"] for f in files]) for name in (kind, *MOMENTS) if f"{key}.{name}" in files[0]}
        steps = _step_counts(files[0], key, len(chunk["params"]), folder)
        for (name, offset, numel, shape), step in zip(chunk["params"], steps):
            piece = lambda t, o=offset, n=numel, s=shape: t[o : o + n].view(s).clone()  # noqa: E731
            values[name] = piece(flat[kind])
            if step is not None:
                moments[name] = {m: piece(flat[m]) for m in MOMENTS} | {"step": step}
    buffers = {k.removeprefix("buffer."): v for k, v in files[0].items() if k.startswith("buffer.")}
    return values, moments, buffers, layout


def _step_counts(tensors: dict, key: str, num_params: int, folder) -> list[float | None]:
    """Per-parameter Adam step counts of one chunk (None: no optimizer state saved)."""
    if f"{key}.steps" in tensors:
        steps = tensors[f"{key}.steps"].tolist()
        if len(steps) != num_params:
            raise UserError(f"{folder}: {key}.steps has {len(steps)} counts for {num_params} parameters")
        return steps
    if f"{key}.step" in tensors:  # format 1: one count for the whole chunk
        return [float(tensors[f"{key}.step"][0])] * num_params
    return [None] * num_params


def check_fits(folder: str | Path, values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint that lacks a parameter of the model or holds one of another shape."""
    missing = sorted(set(shapes) - set(values))
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} parameters of this model, e.g. {missing[:3]}")
    for name, value in values.items():
        if name in shapes and tuple(value.shape) != shapes[name]:
            raise UserError(f"{folder}: {name} has shape {tuple(value.shape)}, the model wants {shapes[name]}")


def consolidate(folder: str | Path) -> dict[str, torch.Tensor]:
    """A plain ``state_dict`` (fp32 master weights and buffers) from a sharded checkpoint folder."""
    values, _, buffers, layout = read_full(folder)
    values |= {alias: values[name] for alias, name in layout.get("aliases", {}).items()}
    return values | buffers
