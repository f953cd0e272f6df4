"""Consolidated weights in transformers' folder layout, written piece by piece (both engines'
``save_pretrained``).

    model.safetensors                                   when everything fits one shard, else
    model-00001-of-00003.safetensors ...                shards of at most ``max_shard_bytes``
    model.safetensors.index.json                        {"metadata": {"total_size"}, "weight_map"}
    config.json, generation_config.json                 the module's own, when it has them

This is what ``PreTrainedModel.save_pretrained`` writes, so ``AutoModelForCausalLM.from_pretrained``
reads it. The weights arrive as an iterable of ``{name: tensor}`` pieces (Gemini: one chunk at a
time, gathered from every rank), so the writer holds at most one shard and one piece, never the
whole model. Tied parameters appear once, under the name ``named_parameters`` gives first, as
transformers saves them. Everything is written into a hidden folder first and moved in at the end,
index and config last; weight files of an earlier save that the new one does not replace are
removed, so a reader never mixes two saves.

The module's config is duck-typed (an object with ``save_pretrained``): core does not import
transformers.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ferryman.core.io import atomic_path, write_text

# transformers writes shards of up to 50 GB; the writer holds one shard in host memory, so less.
DEFAULT_SHARD_BYTES = 2 * 10**9
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def save_pretrained(
    folder: str | Path,
    pieces: Iterable[dict[str, torch.Tensor]],
    *,
    module: nn.Module | None = None,
    write: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``pieces`` (and ``module.config``) to ``folder`` in transformers' layout.

    Every rank iterates ``pieces`` (it may hold collectives); only a rank with ``write`` writes.
    ``dtype`` casts floating-point weights (default: as they come).
    """
    folder = Path(folder)
    tmp = folder / ".tmp-pretrained"
    if not write:
        for _ in pieces:  # the other ranks' part of the collectives
            pass
        return folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _Shards(tmp, max_shard_bytes)
    for piece in pieces:
        for name, value in piece.items():
            cast = dtype if dtype is not None and value.is_floating_point() else None
            shards.add(name, value.detach().to("cpu", dtype=cast, copy=True))  # own storage: safetensors refuses views
    names = shards.finish()
    if module is not None:
        _save_configs(module, tmp, dtype)
    _publish(tmp, folder, names)
    return folder


class _Shards:
    """Tensors packed into shards of at most ``limit`` bytes, each written when full under a
    provisional name (the count is known only at the end)."""

    def __init__(self, tmp: Path, limit: int) -> None:
        self.tmp, self.limit = tmp, limit
        self.open: dict[str, torch.Tensor] = {}
        self.open_bytes = self.total = 0
        self.written: list[list[str]] = []  # the names in each written shard

    def add(self, name: str, value: torch.Tensor) -> None:
        nbytes = value.numel() * value.element_size()
        if self.open and self.open_bytes + nbytes > self.limit:
            self._flush()
        self.open[name] = value.contiguous()
        self.open_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        with atomic_path(self._part(len(self.written))) as path:  # also gives the file the umask's mode
            save_file(self.open, str(path), metadata={"format": "pt"})
        self.written.append(list(self.open))
        self.open, self.open_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.tmp / f"part-{index:05d}.safetensors"

    def finish(self) -> list[str]:
        """Give the shards transformers' names; write the index when there are several."""
        if self.open or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            self._part(0).rename(self.tmp / SINGLE)
            return [SINGLE]
        names, weight_map = [], {}
        for i, members in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self._part(i).rename(self.tmp / name)
            weight_map |= dict.fromkeys(members, name)
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(self.tmp / INDEX, json.dumps(index, indent=2) + "\n")
        return [*names, INDEX]


def _save_configs(module: nn.Module, tmp: Path, dtype: torch.dtype | None) -> None:
    config = getattr(module, "config", None)
    if hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        if dtype is not None:  # from_pretrained(dtype="auto") loads the weights as the config says
            config.dtype = dtype
        config.save_pretrained(str(tmp))
    generation = getattr(module, "generation_config", None)
    if hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(tmp))


def _publish(tmp: Path, folder: Path, weights: list[str]) -> None:
    """Move the new files in: stale weight files out first, then weights, then index and configs."""
    for old in [folder / SINGLE, folder / INDEX, *folder.glob("model-*-of-*.safetensors")]:
        if old.name not in weights:
            old.unlink(missing_ok=True)
    last = {INDEX, "config.json", "generation_config.json"}
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name in last):
        entry.replace(folder / entry.name)
    tmp.rmdir()


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong in a state dict (non-persistent ones, e.g. rotary frequencies, do not)."""
    keys = set(module.state_dict(keep_vars=True))
    return {name: buf for name, buf in module.named_buffers() if name in keys}
