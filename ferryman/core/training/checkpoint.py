"""Training checkpoints: engine state, EMA, RNG states and loop position, written atomically.

Layout of the default ``CheckpointStore`` under ``<out_dir>/checkpoints/``::

    step-00000100/  engine files (Gemini shards or model/optimizer safetensors),
                    ema.safetensors, rng-rank00000.safetensors, trainer.json
    latest          the name of the newest complete folder

A folder is written under a temporary name and renamed when every rank has finished, so a crash
never leaves a half-written ``step-*`` folder; the temporary folders a crash leaves behind are
removed by the next save. Nothing is unpickled on load, and every file of a checkpoint is checked
before any of it is loaded, so a damaged file ends the resume in one line naming it, with the
run's state untouched. A damaged ``latest`` pointer falls back to the newest complete folder.

An app that owes its users another layout (diffusers' ``checkpoint-N/`` with weights diffusers
reads) subclasses the store: folder names, where the engine files go, files of its own
(``export``), fields of its own in the trainer file (``extra_state``), trainable-only engine state
for adapters on a frozen base, and whether ``resume="latest"`` with nothing saved starts fresh.
The loop's exact resume (engine, EMA, RNG, data position) is the same whatever the layout.
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
from safetensors.torch import save_file

from ferryman.core.errors import UserError
from ferryman.core.files import check_safetensors, load_safetensors, reading
from ferryman.core.io import atomic_path, write_text
from ferryman.core.training.engine import Engine
from ferryman.core.training.trainable import load_trainable, save_trainable


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


class CheckpointStore:
    """Where the training loop keeps its checkpoints and what goes into them.

    ``keep_last``: complete checkpoints kept (0: all). ``trainable_only``: the engine state holds
    only the trainable parameters and their optimizer state (see ``trainable.py``); the frozen
    ones must be rebuilt identically by the model builder on resume.
    """

    trainer_file = "trainer.json"
    pointer: str | None = "latest"  # file under root naming the newest folder; None: no pointer
    fresh_if_none = False  # resume="latest" with nothing saved yet: start fresh instead of failing

    def __init__(self, root: str | Path, *, keep_last: int = 2, trainable_only: bool = False) -> None:
        self.root, self.keep_last, self.trainable_only = Path(root), keep_last, trainable_only

    # -- layout (override for another one) ------------------------------------------------------
    def name(self, step: int) -> str:
        return f"step-{step:08d}"

    def engine_folder(self, folder: Path) -> Path:
        return folder

    def complete(self) -> list[Path]:
        """Finished checkpoint folders, oldest first."""
        return sorted(p for p in self.root.glob("step-*") if (p / self.trainer_file).is_file())

    # -- app hooks --------------------------------------------------------------------------------
    def export(self, folder: Path, engine: Engine, ema_named: dict | None, *, rank: int) -> None:
        """Add app files to a checkpoint being written (every rank calls it; rank 0 should write)."""

    def extra_state(self) -> dict[str, Any]:
        """App fields for the trainer file, handed back by ``load``."""
        return {}

    # -- the loop's calls -------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path | None:
        """The folder ``resume`` names: a folder path, or "latest"; None: nothing to resume."""
        if resume == "latest":
            found = self.newest()
            if found is None:
                if self.fresh_if_none:
                    return None
                raise UserError(f"resume=latest: no checkpoint under {self.root}")
            return found
        folder = Path(resume)
        if not (folder / self.trainer_file).is_file():
            raise UserError(f"resume={resume}: {folder} is not a complete checkpoint (no {self.trainer_file})")
        return folder

    def newest(self) -> Path | None:
        """The newest complete checkpoint folder (the pointer's, if it names one), or None."""
        found = self.complete()
        newest = found[-1] if found else None
        if self.pointer is None:
            return newest
        try:  # the pointer is a convenience for people and scripts; the folders are the truth
            name = (self.root / self.pointer).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError, ValueError):
            return newest
        named = self.root / name
        return named if name and Path(name).name == name and (named / self.trainer_file).is_file() else newest

    def save(self, step: int, engine: Engine, ema_named: dict | None, trainer: dict, *, rank: int, group=None) -> Path:
        """Write the checkpoint of ``step`` (every rank calls this); returns its folder.

        ``rank`` is the global rank and ``group`` defaults to the whole world: every rank, whatever
        its DAP or sequence-parallel group, writes into the folder that rank 0 creates and renames.
        """
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:  # left by a crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(group)
        self._save_engine(engine, self.engine_folder(tmp))
        tensors, meta = rng_state()
        with atomic_path(tmp / f"rng-rank{rank:05d}.safetensors") as path:
            save_file(tensors, str(path))
        write_text(tmp / f"rng-rank{rank:05d}.json", json.dumps(meta))
        self.export(tmp, engine, ema_named, rank=rank)
        if rank == 0:
            if ema_named is not None:
                with atomic_path(tmp / "ema.safetensors") as path:
                    save_file({k: v.contiguous() for k, v in _untie(ema_named).items()}, str(path))
            write_text(tmp / self.trainer_file, json.dumps({**self.extra_state(), **trainer}, indent=1) + "\n")
        _barrier(group)
        if rank == 0:
            old = self.root / f".old-{final.name}"  # a step saved again: the previous copy goes last
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            if self.pointer is not None:
                write_text(self.root / self.pointer, final.name + "\n")
            self.prune()
        _barrier(group)
        return final

    def _save_engine(self, engine: Engine, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.trainable_only:
            save_trainable(engine, folder)
        else:
            engine.save(folder)

    def load(self, folder: Path, engine: Engine, *, rank: int) -> tuple[dict, dict | None]:
        """Load engine state and this rank's RNG; returns (the trainer file, EMA tensors or None)."""
        check_checkpoint_files(folder)
        with reading(folder / self.trainer_file, "checkpoint file"):
            trainer = json.loads((folder / self.trainer_file).read_text(encoding="utf-8"))
        try:
            engine_folder = self.engine_folder(folder)
            if self.trainable_only and (engine_folder / "trainable.json").is_file():
                load_trainable(engine, engine_folder)
            else:  # a full engine checkpoint also serves a trainable-only run
                engine.load(engine_folder)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"checkpoint {folder} cannot be loaded into this run: {err}") from None
        rng_file = folder / f"rng-rank{rank:05d}.safetensors"
        if rng_file.is_file():
            meta_file = rng_file.with_suffix(".json")
            with reading(meta_file, "checkpoint file"):
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                set_rng_state(load_safetensors(rng_file, "checkpoint file"), meta)
        ema_file = folder / "ema.safetensors"
        ema = load_safetensors(ema_file, "checkpoint file") if ema_file.is_file() else None
        return trainer, ema

    def prune(self) -> None:
        if self.keep_last:
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def check_checkpoint_files(folder: Path) -> None:
    """Every safetensors and JSON file of a checkpoint, checked before anything is loaded from it:
    a truncated or overwritten file is named in one line, and the run's state is not half-restored."""
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            check_safetensors(path, "checkpoint file")
        elif path.suffix == ".json":
            with reading(path, "checkpoint file"):
                json.loads(path.read_text(encoding="utf-8"))


def _untie(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: give tied entries their own copies."""
    seen: set[int] = set()
    out = {}
    for key, value in named.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out
