"""Training checkpoints: engine state, EMA, RNG states and loop position, written atomically.

Layout under ``<out_dir>/checkpoints/``::

    step-00000100/  engine files (Gemini shards or model/optimizer safetensors),
                    ema.safetensors, rng-rank00000.safetensors, trainer.json
    latest          the name of the newest complete folder

A folder is written under a temporary name and renamed when every rank has finished, so a crash
never leaves a half-written ``step-*`` folder. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path, write_text


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"python": [version, list(state), gauss], "numpy": [kind, pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def save_checkpoint(root: Path, step: int, engine, ema_named: dict | None, trainer: dict, *, rank: int, group=None) -> Path:
    """Write ``root/step-<step>`` (every rank calls this) and point ``root/latest`` at it.

    ``rank`` is the global rank and ``group`` defaults to the whole world: every rank, whatever
    its DAP or sequence-parallel group, writes into the folder that rank 0 creates and renames.
    """
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)
    engine.save(tmp)
    tensors, meta = rng_state()
    with atomic_path(tmp / f"rng-rank{rank:05d}.safetensors") as path:
        save_file(tensors, str(path))
    write_text(tmp / f"rng-rank{rank:05d}.json", json.dumps(meta))
    if rank == 0:
        if ema_named is not None:
            with atomic_path(tmp / "ema.safetensors") as path:
                save_file({k: v.contiguous() for k, v in _untie(ema_named).items()}, str(path))
        write_text(tmp / "trainer.json", json.dumps(trainer, indent=1))
    _barrier(group)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(root / "latest", final.name + "\n")
    _barrier(group)
    return final


def _untie(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: give tied entries their own copies."""
    seen: set[int] = set()
    out = {}
    for key, value in named.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def prune(root: Path, keep_last: int) -> None:
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(resume: str, out_dir: Path) -> Path:
    """The checkpoint folder named by ``resume``: a folder, or "latest" under ``out_dir``."""
    if resume == "latest":
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise UserError(f"resume=latest: no checkpoint under {out_dir / 'checkpoints'}")
        folder = out_dir / "checkpoints" / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not (folder / "trainer.json").is_file():
        raise UserError(f"resume={resume}: {folder} is not a complete checkpoint (no trainer.json)")
    return folder


def load_checkpoint(folder: Path, engine, *, rank: int) -> tuple[dict, dict | None]:
    """Load engine state and this rank's RNG; returns (trainer.json, EMA tensors or None)."""
    engine.load(folder)
    trainer = json.loads((folder / "trainer.json").read_text())
    rng_file = folder / f"rng-rank{rank:05d}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((folder / f"rng-rank{rank:05d}.json").read_text()))
    ema = load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").is_file() else None
    return trainer, ema
