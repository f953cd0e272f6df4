"""Chunk manager: where each chunk lives, the device-memory accounting, and eviction under a budget.

Every byte of model data the manager puts on the device (compute shards, gathered payloads,
gradient buffers, optimizer shards) goes through :meth:`ChunkManager.reserve`, which evicts and,
if that is not enough, raises instead of running out of memory. The accounting is the manager's
own, so the budget holds and can be tested on a CPU, where "device" and "host" are both RAM.

With several data-parallel ranks every all-gather is a collective, so all ranks must gather the
same chunks in the same order even when their data send them down different branches of the
model. Each chunk is gathered at most once per weight version, in ``gather_order`` (forward order,
agreed by the ranks): gathering a chunk first gathers every earlier chunk of the order not yet
gathered (the ones this rank skipped), and ``complete_gathers`` at the end of each forward gathers
the rest. A chunk dropped after its gather keeps a host copy of the full values, so a later use in
the same step is a local copy, not another collective.

The manager is the only code that moves chunk data; every move goes through the chunk's checked
transitions (the state table in ``chunk.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from ferryman.core.errors import UserError
from ferryman.core.gemini.chunk import Chunk, FullCopy, OptimAt, ShardAt
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.layout import Layout
from ferryman.core.gemini.tracer import MemTracer


class ChunkManager:
    """Placement (static or auto), accounting, gather/release and eviction of chunks."""

    def __init__(
        self,
        chunks: list[Chunk],
        layout: Layout,
        cfg: GeminiConfig,
        *,
        device: torch.device,
        group: dist.ProcessGroup | None,
        budget: float,
        tracer: MemTracer,
        peak_bytes: int = 0,
    ) -> None:
        self.chunks = chunks
        self.cfg = cfg
        self.device = device
        self.host = torch.device("cpu")
        self.group = group
        self.budget = budget
        self.tracer = tracer  # one run, one warm-up record: it outlives re-layouts
        self.clock = 0
        self.device_bytes = 0
        self.peak_bytes = peak_bytes
        self.num_evictions = 0
        self.num_fetches = 0
        self.num_gathers = 0  # collective all-gathers
        self.gather_order = list(layout.gather_order)
        self.module_chunks = layout.module_chunks  # module index -> chunk indices
        self.buffer_bytes: list[Callable[[], int]] = []  # other holders of the accounted bytes (gradient buffers)
        # holders that can give accounted bytes back when asked (finished reductions' buffers)
        self.give_back: list[Callable[[], None]] = []
        self._prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- accounting ----------------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.device_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.device_bytes)

    def soft_limit(self) -> float:
        """Bytes of model data allowed now: the budget less the activations expected at this point."""
        if self.cfg.placement == "static" or math.isinf(self.budget):
            return self.budget
        if not self.tracer.ready:
            return self.budget * (1.0 - self.cfg.warmup_non_model_fraction)
        return self.budget - self.tracer.non_model_at(self.clock)

    def non_model_bytes(self) -> int:
        if self.device.type == "cuda":
            return max(0, torch.cuda.memory_allocated(self.device) - self.device_bytes)
        return max(0, self.tracer.saved_bytes)

    def reserve(self, nbytes: int, what: str) -> None:
        """Account ``nbytes`` more on the device, evicting unused chunks to make room."""
        if self.device_bytes + nbytes > self.soft_limit():
            for give_back in self.give_back:  # finished reductions return their buffers before anything is evicted
                give_back()
        while self.device_bytes + nbytes > self.soft_limit():
            if not self._evict_one():
                break
        if self.device_bytes + nbytes > self.budget:
            in_use = sum(c.payload_bytes for c in self.chunks if c.in_use)
            raise UserError(
                f"gemini: {what} needs {_size(nbytes)} but the device budget "
                f"(gemini.device_budget_bytes={self.budget:.0f}) is full: {_size(self.device_bytes)} "
                f"of model data, {_size(in_use)} of it in use by running modules; raise the budget, "
                f"move optimizer state to the host (optim_host_fraction) or use smaller chunks"
            )
        self._add(nbytes)

    # -- initial placement ---------------------------------------------------------------------
    def place(self) -> None:
        """Put shards and optimizer state where the policy says, and account for them."""
        host_params, host_optim = self._host_sets()
        for chunk in self.chunks:
            if chunk.index not in host_params:
                chunk.move_shard(ShardAt.DEVICE, chunk.shard.to(self.device))
                self._add(chunk.shard_bytes)
            else:
                home = self._host_home(chunk)
                home.copy_(chunk.shard)
                chunk.move_shard(ShardAt.HOST, home)
            if chunk.master is not None:
                self._place_optim(chunk, OptimAt.HOST if chunk.index in host_optim else OptimAt.DEVICE)
            if self.world == 1 and chunk.shard_on_device:
                chunk.attach(chunk.shard)
            else:
                chunk.unbind()

    def _place_optim(self, chunk: Chunk, where: OptimAt) -> None:
        """The fp32 master, its gradient shard and zero Adam state, together where ``where`` says."""
        assert chunk.master is not None
        chunk.place_optim(where)
        chunk.master.data = chunk.master.data.to(self.device if where == OptimAt.DEVICE else self.host)
        chunk.master.grad = torch.zeros_like(chunk.master.data)
        chunk.exp_avg = torch.zeros_like(chunk.master.data)
        chunk.exp_avg_sq = torch.zeros_like(chunk.master.data)
        chunk.steps = torch.zeros(len(chunk.slots), dtype=torch.float32, device=chunk.master.device)
        if where == OptimAt.DEVICE:
            self._add(chunk.optim_bytes)

    @property
    def world(self) -> int:
        return self.chunks[0].world if self.chunks else 1

    def _host_sets(self) -> tuple[set[int], set[int]]:
        order = list(reversed(self.chunks))  # the last-used chunks go to the host first
        if self.cfg.placement == "static":
            return (
                _take_fraction(order, self.cfg.param_host_fraction, lambda c: c.shard_bytes),
                _take_fraction(
                    [c for c in order if c.trainable], self.cfg.optim_host_fraction, lambda c: c.optim_bytes
                ),
            )
        room = self.budget * (1.0 - self.cfg.warmup_non_model_fraction)
        host_params, used = set(), 0
        for chunk in self.chunks:  # parameters first: they are what every step waits for
            if used + chunk.shard_bytes <= room:
                used += chunk.shard_bytes
            else:
                host_params.add(chunk.index)
        host_optim = set()
        for chunk in self.chunks:
            if used + chunk.optim_bytes <= room:
                used += chunk.optim_bytes
            else:
                host_optim.add(chunk.index)
        return host_params, host_optim

    # -- gather / release ----------------------------------------------------------------------
    def access(self, chunks: list[Chunk]) -> None:
        """Make the chunks' full compute copies resident and mark them in use."""
        for chunk in chunks:
            chunk.acquire()  # before fetching, so fetching one cannot evict another
        for chunk in chunks:
            if chunk.payload is None:
                self._fetch(chunk)
        self.clock += 1
        self._prefetch()

    def release(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            chunk.release()
            if chunk.in_use == 0 and self.cfg.placement == "static" and not chunk.payload_is_shard:
                self._drop_payload(chunk)

    def _gather(self, chunk: Chunk) -> None:
        """All-gather the chunk's payload (a collective: only through the agreed order)."""
        self.reserve(chunk.payload_bytes, f"gathering chunk {chunk.index}")
        full = torch.empty(chunk.numel, dtype=chunk.dtype, device=self.device)
        dist.all_gather_into_tensor(full, chunk.shard.to(self.device, non_blocking=True), group=self.group)
        chunk.set_full_copy(FullCopy.GATHERED)
        self.num_gathers += 1
        chunk.attach(full)
        if not chunk.in_use and self.cfg.placement == "static":  # skipped here: keep it on the host
            self._drop_payload(chunk)

    def _gather_through(self, target: Chunk | None) -> None:
        """Gather, in the agreed order, every chunk not yet gathered up to ``target`` (all if None)."""
        for index in self.gather_order:
            chunk = self.chunks[index]
            if chunk.full_copy == FullCopy.PENDING:
                self._gather(chunk)
            if chunk is target:
                return

    def complete_gathers(self) -> None:
        """End of a forward: gather what this rank skipped, so every rank has gathered every chunk."""
        if self.world > 1:
            self._gather_through(None)

    def _fetch(self, chunk: Chunk) -> None:
        self.num_fetches += 1
        if self.world == 1:
            if self.cfg.placement == "auto":
                self._to_device(chunk)
                chunk.attach(chunk.shard)
                return
            self.reserve(chunk.payload_bytes, f"gathering chunk {chunk.index}")
            payload = self._take_prefetched(chunk)
            if payload is None:  # copy=True: on a CPU run .to() would alias the host shard
                payload = chunk.shard.to(self.device, non_blocking=True, copy=True)
            chunk.attach(payload)
        elif chunk.full_copy == FullCopy.PENDING:
            self._gather_through(chunk)
        else:  # gathered earlier in this step and dropped since: the host copy is current
            assert chunk.full_copy == FullCopy.KEPT and chunk.full_host is not None
            self.reserve(chunk.payload_bytes, f"fetching chunk {chunk.index}")
            chunk.attach(chunk.full_host.to(self.device, non_blocking=True, copy=True))

    def _host_home(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's persistent host buffer (pinned on CUDA, allocated once: pinning is slow)."""
        if chunk.host_shard is None:
            chunk.host_shard = torch.empty(chunk.shard_numel, dtype=chunk.dtype, pin_memory=self.device.type == "cuda")
        return chunk.host_shard

    def _to_device(self, chunk: Chunk) -> None:
        """HOST -> DEVICE_AND_HOST: the host home stays current, so evicting it again is free."""
        if chunk.shard_on_device:
            return
        self.reserve(chunk.shard_bytes, f"moving chunk {chunk.index} to the device")
        moved = self._take_prefetched(chunk)
        if moved is None:
            moved = chunk.shard.to(self.device, non_blocking=True, copy=True)
        chunk.move_shard(ShardAt.DEVICE_AND_HOST, moved)

    def _to_host(self, chunk: Chunk) -> None:
        """DEVICE or DEVICE_AND_HOST -> HOST, copying only if the host home is stale."""
        if not chunk.shard_on_device:
            return
        home = self._host_home(chunk)
        if not chunk.host_current:
            home.copy_(chunk.shard)
        self.device_bytes -= chunk.shard_bytes
        chunk.move_shard(ShardAt.HOST, home)

    def refresh(self, chunk: Chunk) -> None:
        """After an optimizer step: the compute copy takes the new fp32 master values."""
        assert chunk.master is not None
        self._cancel_prefetch(chunk)  # a copy in flight carries the old values
        chunk.set_full_copy(FullCopy.PENDING)  # gathered copies hold the old values
        if chunk.shard_on_device and chunk.optim_on_device:
            chunk.shard.copy_(chunk.master.data)
            chunk.move_shard(ShardAt.DEVICE)
        elif chunk.shard_on_device:  # host master: cast on the host, then one copy up
            home = self._host_home(chunk)
            home.copy_(chunk.master.data)
            chunk.shard.copy_(home)
            chunk.move_shard(ShardAt.DEVICE_AND_HOST)
        else:
            chunk.shard.copy_(chunk.master.data)
        if chunk.payload is not None and not chunk.payload_is_shard:  # a cached full copy is now stale
            self._drop_payload(chunk)

    def _drop_payload(self, chunk: Chunk) -> None:
        if chunk.payload is None:
            return
        if chunk.full_copy == FullCopy.GATHERED:  # re-gathering it this step would be a collective
            if chunk.full_host is None:
                chunk.full_host = torch.empty(chunk.numel, dtype=chunk.dtype, pin_memory=self.device.type == "cuda")
            chunk.full_host.copy_(chunk.payload)
            chunk.set_full_copy(FullCopy.KEPT)
        if not chunk.payload_is_shard:
            self.device_bytes -= chunk.payload_bytes
        chunk.drop()

    def _evict_one(self) -> bool:
        """Drop the resident, unused chunk whose next use is furthest away; False if none can go."""
        auto = self.cfg.placement == "auto"
        candidates = [
            c
            for c in self.chunks
            if not c.in_use and ((c.payload is not None and not c.payload_is_shard) or (auto and c.shard_on_device))
        ]
        if not candidates:
            return False
        victim = max(candidates, key=lambda c: (self.tracer.next_use(c.index, self.clock), c.index))
        self._drop_payload(victim)
        if auto:
            self._to_host(victim)
        self.num_evictions += 1
        return True

    # -- prefetch (CUDA only: on a CPU every copy is synchronous, so there is nothing to overlap) --
    def _prefetch(self) -> None:
        if self._stream is None or not self.tracer.ready or self.world != 1:
            return
        wanted: list[Chunk] = []
        for module in self.tracer.upcoming(self.clock - 1, 2 * self.cfg.prefetch):
            for index in self.module_chunks.get(module, []):
                chunk = self.chunks[index]
                if chunk.payload is None and not chunk.shard_on_device and index not in self._prefetched:
                    wanted.append(chunk)
        for chunk in wanted[: self.cfg.prefetch]:
            if self.device_bytes + chunk.shard_bytes > self.soft_limit():
                break  # prefetching must never cause an eviction
            self._add(chunk.shard_bytes)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                copy = chunk.shard.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._prefetched[chunk.index] = (copy, event)

    def _cancel_prefetch(self, chunk: Chunk) -> None:
        if chunk.index in self._prefetched:
            self._prefetched.pop(chunk.index)
            self.device_bytes -= chunk.shard_bytes

    def _take_prefetched(self, chunk: Chunk) -> torch.Tensor | None:
        """A copy started by _prefetch, already accounted; the reserve made for it is returned."""
        if chunk.index not in self._prefetched:
            return None
        assert self._stream is not None
        copy, event = self._prefetched.pop(chunk.index)
        torch.cuda.current_stream(self.device).wait_event(event)
        copy.record_stream(torch.cuda.current_stream(self.device))
        self.device_bytes -= chunk.shard_bytes  # reserve() has just counted these bytes again
        return copy

    def recount(self) -> int:
        """Device bytes recomputed from the chunks' tensors and states (between steps; a check on
        the running account, which also covers transient buffers)."""
        total = 0
        for chunk in self.chunks:
            total += chunk.shard_bytes if chunk.shard_on_device else 0
            total += chunk.payload_bytes if chunk.payload is not None and not chunk.payload_is_shard else 0
            total += chunk.optim_bytes if chunk.optim_on_device else 0
        total += sum(c.shard_bytes for c in self.chunks if c.index in self._prefetched)
        total += sum(count() for count in self.buffer_bytes)
        return total

    def stats(self) -> dict[str, float]:
        return {
            "device_bytes": self.device_bytes,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget,
            "evictions": self.num_evictions,
            "fetches": self.num_fetches,
            "gathers": self.num_gathers,
            "chunks_on_device": sum(c.shard_on_device for c in self.chunks),
            "num_chunks": len(self.chunks),
        }


def _take_fraction(chunks: list[Chunk], fraction: float, size) -> set[int]:
    """Indices of leading chunks whose sizes add up to ``fraction`` of the total (rounded to chunks)."""
    total = sum(size(c) for c in chunks)
    chosen, taken = set(), 0
    for chunk in chunks:
        if taken + size(chunk) / 2 > fraction * total:
            break
        chosen.add(chunk.index)
        taken += size(chunk)
    return chosen


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"
