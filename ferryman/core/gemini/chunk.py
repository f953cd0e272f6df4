"""One chunk: a flat run of parameters, and where each copy of its data lives (a small state machine).

Each part of a chunk's data has its own state; ``ChunkManager`` is the only caller of the moves,
and a move the table does not list raises ``IllegalMove`` (staying put is always allowed).
ColossalAI Gemini's chunk life cycle, reduced to what the schedule needs::

    part       state            where the data is                                  legal moves    by
    ---------  ---------------  -------------------------------------------------  -------------  ----------------------
    shard      UNPLACED         built from the weights, not placed yet             HOST, DEVICE   place
    (this      HOST             the (pinned) host home only                        DEVICE_AND_HOST fetch under "auto"
    rank's     DEVICE           the device; the host home is stale or absent       HOST           evict (copies home)
    compute                                                                        DEVICE_AND_HOST refresh, host master
    copy)      DEVICE_AND_HOST  the device, and the host home holds the same       HOST           evict (free)
                                values                                             DEVICE         refresh, device master
    optimizer  NONE             frozen chunk: no optimizer state                   -
               UNPLACED         fp32 master built, not placed yet                  HOST, DEVICE   place
               HOST, DEVICE     master, fp32 gradient shard, Adam moments there    -              (fixed for the run)
    full copy  PENDING          this weight version not all-gathered here          GATHERED       all-gather
    (several   GATHERED         full values only in the payload                    KEPT           drop payload (host copy)
    ranks)                                                                         PENDING        refresh (new version)
               KEPT             full values also in ``full_host``                  PENDING        refresh
    payload    RELEASED         parameters point at NaN placeholders               HELD, COMPUTE  attach
    (derived:  HELD             resident, no module running (a cache)              RELEASED       drop; COMPUTE acquire
    ``state``) COMPUTE          modules running                                    HELD           release (drop raises)

With one data-parallel rank and the shard on the device the payload *is* the shard (no copy).
With several ranks a chunk is all-gathered at most once per weight version, by every rank, in the
engine's agreed order; a use after its payload was dropped copies from ``full_host`` (KEPT)
instead of gathering again, so ranks whose modules run different code paths still pair their
collectives. Gradient bookkeeping is not placement: it lives in ``optim.GradReducer``.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import nn

from ferryman.core.gemini.layout import ChunkSpec


class ShardAt(StrEnum):
    UNPLACED = "unplaced"
    HOST = "host"
    DEVICE = "device"
    DEVICE_AND_HOST = "device+host"


class OptimAt(StrEnum):
    NONE = "none"
    UNPLACED = "unplaced"
    HOST = "host"
    DEVICE = "device"


class FullCopy(StrEnum):
    PENDING = "pending"
    GATHERED = "gathered"
    KEPT = "kept"


class Payload(StrEnum):
    RELEASED = "released"
    HELD = "held"
    COMPUTE = "compute"


LEGAL: dict[type[StrEnum], dict[StrEnum, set[StrEnum]]] = {
    ShardAt: {
        ShardAt.UNPLACED: {ShardAt.HOST, ShardAt.DEVICE},
        ShardAt.HOST: {ShardAt.DEVICE_AND_HOST},
        ShardAt.DEVICE: {ShardAt.HOST, ShardAt.DEVICE_AND_HOST},
        ShardAt.DEVICE_AND_HOST: {ShardAt.HOST, ShardAt.DEVICE},
    },
    OptimAt: {OptimAt.NONE: set(), OptimAt.UNPLACED: {OptimAt.HOST, OptimAt.DEVICE}, OptimAt.HOST: set(), OptimAt.DEVICE: set()},
    FullCopy: {
        FullCopy.PENDING: {FullCopy.GATHERED},
        FullCopy.GATHERED: {FullCopy.KEPT, FullCopy.PENDING},
        FullCopy.KEPT: {FullCopy.PENDING},
    },
}


class IllegalMove(RuntimeError):
    """A chunk was asked to move its data in a way the state table does not allow (a bug, not bad input)."""


def check_move(what: str, old: StrEnum, new: StrEnum, legal: dict) -> StrEnum:
    """``new`` if ``legal[old]`` allows it (or nothing changes); else an ``IllegalMove`` naming both."""
    if new != old and new not in legal[old]:
        allowed = ", ".join(sorted(legal[old])) or "nothing"
        raise IllegalMove(f"{what}: {type(new).__name__} {old} -> {new} is not a legal move (from {old}: {allowed})")
    return new


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


class Chunk:
    """Tensors of one chunk and the states of their homes; the manager moves them (see the table)."""

    def __init__(self, index: int, spec: ChunkSpec, *, dtype: torch.dtype, world: int, rank: int, device: torch.device) -> None:
        self.index = index
        self.slots = spec.slots
        self.numel = spec.numel
        self.trainable = spec.trainable
        self.decay = spec.decay
        self.partial_group = spec.partial_group  # gradients summed over it first (core.parallel.grads)
        self.dtype = dtype
        self.world, self.rank = world, rank
        self.device = device
        self.shard_numel = spec.numel // world
        self.shard: torch.Tensor = _empty(dtype, torch.device("cpu"))
        self.host_shard: torch.Tensor | None = None  # persistent host home of the shard, once needed
        self.payload: torch.Tensor | None = None
        self.full_host: torch.Tensor | None = None  # host copy of the gathered full values (KEPT)
        self.in_use = 0  # running modules holding the payload
        self.master: nn.Parameter | None = None  # fp32 master shard; .grad is the fp32 gradient shard
        self.exp_avg: torch.Tensor | None = None  # [shard_numel] fp32, beside the master
        self.exp_avg_sq: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None  # [num slots] fp32 Adam step count per parameter
        self.shard_at = ShardAt.UNPLACED
        self.optim_at = OptimAt.UNPLACED if spec.trainable else OptimAt.NONE
        self.full_copy = FullCopy.PENDING

    @classmethod
    def build(cls, index: int, spec: ChunkSpec, values: dict[str, torch.Tensor], *, dtype: torch.dtype, world: int,
              rank: int, device: torch.device) -> Chunk:
        """An UNPLACED chunk holding this rank's shard of ``values`` (and its fp32 master if trainable)."""
        chunk = cls(index, spec, dtype=dtype, world=world, rank=rank, device=device)
        names = [s.name for s in spec.slots]
        full = chunk.flatten({n: values[n] for n in names}, torch.float32 if spec.trainable else dtype)
        shard = chunk.shard_of(full)
        chunk.shard = shard.to(dtype).clone()
        if spec.trainable:
            chunk.master = nn.Parameter(shard.clone())
        return chunk

    # -- moves (called by the manager only) ----------------------------------------------------
    def move_shard(self, new: ShardAt, shard: torch.Tensor | None = None) -> None:
        self.shard_at = check_move(f"chunk {self.index}", self.shard_at, new, LEGAL[ShardAt])
        if shard is not None:
            self.shard = shard

    def place_optim(self, new: OptimAt) -> None:
        self.optim_at = check_move(f"chunk {self.index}", self.optim_at, new, LEGAL[OptimAt])

    def set_full_copy(self, new: FullCopy) -> None:
        self.full_copy = check_move(f"chunk {self.index}", self.full_copy, new, LEGAL[FullCopy])

    def attach(self, payload: torch.Tensor) -> None:
        """RELEASED -> HELD/COMPUTE: the parameters view ``payload``."""
        if self.payload is not None:
            raise IllegalMove(f"chunk {self.index}: payload attached twice (state {self.state})")
        self.payload = payload
        self.bind()

    def drop(self) -> None:
        """HELD -> RELEASED: the parameters point at NaN placeholders again."""
        if self.in_use:
            raise IllegalMove(f"chunk {self.index}: payload dropped while {self.in_use} running module(s) use it")
        self.payload = None
        self.unbind()

    def acquire(self) -> None:
        self.in_use += 1

    def release(self) -> None:
        if self.in_use == 0:
            raise IllegalMove(f"{self} released more often than used")
        self.in_use -= 1

    # -- sizes and derived states ----------------------------------------------------------------
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
    def state(self) -> Payload:
        if self.payload is None:
            return Payload.RELEASED
        return Payload.COMPUTE if self.in_use else Payload.HELD

    @property
    def shard_on_device(self) -> bool:
        return self.shard_at in (ShardAt.DEVICE, ShardAt.DEVICE_AND_HOST)

    @property
    def host_current(self) -> bool:
        """The host home holds the shard's current values (evicting it needs no copy)."""
        return self.shard_at in (ShardAt.HOST, ShardAt.DEVICE_AND_HOST)

    @property
    def optim_on_device(self) -> bool:
        return self.optim_at == OptimAt.DEVICE

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
        return f"Chunk({self.index}, {len(self.slots)} params, {self.numel} elems, {self.state}, shard {self.shard_at})"
