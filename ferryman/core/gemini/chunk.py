"""One chunk: a flat run of parameters with its compute copy, fp32 master shard and gradient buffers.

States (ColossalAI Gemini's chunk life cycle, reduced to what the schedule needs):
- ``released``: only this rank's shard of the compute copy exists (on device or on host);
  the parameters point at a NaN placeholder of their own shape.
- ``held``: the full compute copy (the payload) is on the device and the parameters view it, but no
  module is using it; it is a cache that the manager may drop.
- ``compute``: one or more modules are running (forward, or backward between their pre- and
  post-backward hooks); it cannot be dropped.

With one data-parallel rank and the shard on the device, the payload *is* the shard (no copy).
The fp32 master shard, Adam moments and fp32 gradient shard live together on the device or the
host ("optimizer placement"); the Adam step counts are kept per parameter (``steps``).

With several data-parallel ranks a chunk is all-gathered at most once per weight version (between
optimizer steps), by every rank, in the engine's agreed order; a later use in the same step that
finds the payload dropped takes it from a host copy of the gathered chunk (``full_host``) instead
of gathering again, so ranks whose modules run different code paths still pair their collectives.
"""

from __future__ import annotations

import torch
from torch import nn

from ferryman.core.gemini.layout import ChunkSpec


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


class Chunk:
    """Tensors of one chunk; the manager decides where they live and does the accounting."""

    def __init__(
        self, index: int, spec: ChunkSpec, *, dtype: torch.dtype, world: int, rank: int, device: torch.device
    ) -> None:
        self.index = index
        self.slots = spec.slots
        self.numel = spec.numel
        self.trainable = spec.trainable
        self.decay = spec.decay
        self.dtype = dtype
        self.world, self.rank = world, rank
        self.device = device
        self.shard_numel = spec.numel // world
        self.shard: torch.Tensor = _empty(dtype, torch.device("cpu"))
        self.payload: torch.Tensor | None = None
        self.master: nn.Parameter | None = None
        self.grad_full: torch.Tensor | None = None  # [numel] compute dtype, during backward
        self.exp_avg: torch.Tensor | None = None  # [shard_numel] fp32, beside the master
        self.exp_avg_sq: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None  # [num slots] fp32 Adam step count per parameter
        self.in_use = 0
        self.grad_seen: set[int] = set()  # slot indices whose grads this backward delivered
        self.got_grad = torch.zeros(len(self.slots), dtype=torch.bool)  # since the last zero_grad
        # reduction state within one backward (see GradReducer)
        self.expected: set[int] = set()  # slots of modules that ran forward with grad on this rank
        self.reduced = False
        self.late = False  # a gradient arrived after the chunk was reduced
        # data-parallel gather state (see the module docstring)
        self.gathered = False  # the full values of the current version are held on this rank
        self.full_host: torch.Tensor | None = None
        self.full_valid = False  # full_host holds the current version
        # Where the shard and the optimizer state live, kept as flags rather than read off the
        # tensors: on a CPU run "device" and "host" are the same memory but distinct places.
        self.shard_loc = "host"
        self.optim_loc = "host"
        self.host_shard: torch.Tensor | None = None  # persistent host home of the shard, once needed
        self.host_valid = False  # whether host_shard holds the current values

    # -- sizes -------------------------------------------------------------------------------
    @property
    def payload_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def shard_bytes(self) -> int:
        return self.shard_numel * self.dtype.itemsize

    @property
    def optim_bytes(self) -> int:
        """fp32 master + two Adam moments + fp32 gradient shard."""
        return 16 * self.shard_numel if self.trainable else 0

    @property
    def state(self) -> str:
        if self.payload is None:
            return "released"
        return "compute" if self.in_use else "held"

    @property
    def shard_on_device(self) -> bool:
        return self.shard_loc == "device"

    @property
    def optim_on_device(self) -> bool:
        return self.master is not None and self.optim_loc == "device"

    @property
    def payload_is_shard(self) -> bool:
        return self.payload is not None and self.payload is self.shard

    @property
    def shard_range(self) -> tuple[int, int]:
        start = self.rank * self.shard_numel
        return start, start + self.shard_numel

    # -- parameter binding ---------------------------------------------------------------------
    def bind(self) -> None:
        """Point every parameter at its slice of the payload."""
        assert self.payload is not None
        for slot in self.slots:
            slot.param.data = self.payload[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def unbind(self) -> None:
        """Point every parameter at a one-element NaN tensor expanded to its shape.

        Shape reads keep working (modules such as CLIP's embeddings read a child's
        ``weight.shape`` before the child runs and its hook gathers the chunk), while a stale read
        of the values poisons the result with NaN instead of silently using old numbers.
        """
        placeholder = torch.full((), float("nan"), dtype=self.dtype, device=self.device)
        for slot in self.slots:
            slot.param.data = placeholder.expand(slot.shape)

    # -- full <-> shard helpers ----------------------------------------------------------------
    def shard_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full-chunk tensor."""
        start, end = self.shard_range
        return full[start:end]

    def flatten(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """A full-chunk flat tensor from per-parameter tensors (missing names stay zero)."""
        flat = torch.zeros(self.numel, dtype=dtype)
        for slot in self.slots:
            if slot.name in tensors:
                flat[slot.offset : slot.offset + slot.numel] = tensors[slot.name].reshape(-1).to(dtype)
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of a full-chunk flat tensor."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}

    def __repr__(self) -> str:
        where = "device" if self.shard_on_device else "host"
        return f"Chunk({self.index}, {len(self.slots)} params, {self.numel} elems, {self.state}, shard on {where})"
