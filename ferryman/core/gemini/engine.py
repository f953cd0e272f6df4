"""The Gemini engine: one object that owns a model's chunks, hooks, gradients and optimizer.

It implements the core training loop's ``Engine`` protocol (``ferryman.core.training.engine``)
method by method; core/gemini does not import core/training, which builds Gemini engines.

Construction is plan, then build: ``plan_layout`` (a pure function of the parameter order) gives
a ``Layout`` and ``_install`` builds chunks, placement, gradient reducer and optimizer from it.
Every re-layout takes that one path with what must outlive it handed over explicitly
(``_Carry``): the repack in forward order after the warm-up step, ``load_state_dict`` and
checkpoint loads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferryman.core import pretrained
from ferryman.core.gemini import hooks
from ferryman.core.gemini.adam import ShardAdamW
from ferryman.core.gemini.checkpoint import check_fits, read_full, save_sharded
from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.layout import Layout, plan_layout
from ferryman.core.gemini.lazy import InitialValues
from ferryman.core.gemini.manager import ChunkManager
from ferryman.core.gemini.optim import GradReducer, LossScaler, optimizer_step
from ferryman.core.gemini.state import Ranks, export_full, gather_full, import_optim_state
from ferryman.core.gemini.tracer import MemTracer
from ferryman.core.optim import OptimConfig, TrainableState
from ferryman.core.parallel import ParallelDims
from ferryman.core.runtime import pick_device


@dataclass(frozen=True)
class _Carry:
    """What a re-layout keeps: the learning rate, the warm-up record and peak (one run, one
    account), and the gradients still due when it happens between a forward and its backward."""

    lr: float
    tracer: MemTracer
    peak_bytes: int = 0
    expected: frozenset[str] = frozenset()


class GeminiEngine:
    """Chunked heterogeneous-memory training of any ``nn.Module`` (ColossalAI Gemini's design).

    Call it like the module; then ``backward(loss)``, ``step()``, ``zero_grad()``. Parameters of the
    module become views into chunk payloads while in use and shape-only NaN placeholders otherwise; the fp32
    master weights live in the chunks' shards (see ``state_dict``).
    """

    kind = "gemini"

    def __init__(
        self,
        module: nn.Module,
        cfg: GeminiConfig,
        ocfg: OptimConfig,
        dims: ParallelDims | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.module, self.cfg, self.ocfg = module, cfg, ocfg
        self.dtype = cfg.dtype
        self.device = device or (dims.device if dims is not None else pick_device("auto"))
        self.world = dims.dp if dims is not None else 1
        self.group = dims.dp_group if dims is not None and dims.dp > 1 else None
        self.rank = torch.distributed.get_rank(self.group) if self.group is not None else 0
        self.ranks = Ranks(self.world, self.rank, self.group, self.device)
        self.scaler = LossScaler(cfg)
        self.params = dict(module.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        names = {id(p): n for n, p in self.params.items()}
        # tied weights appear once in the chunks but under every name in a plain state_dict
        self.aliases = {n: names[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if n not in self.params}
        self.hook_modules = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        self.module_params = [[names[id(p)] for p in m.parameters(recurse=False)] for m in self.hook_modules]
        _buffers_to(module, self.device)
        self.budget = self._budget()
        self.order: list[str] = []  # parameters in the order the first forward used them
        self._seen: set[str] = set()
        self._first_forward_done = False
        self._tokens: list[hooks.CallToken] = []
        self._tracked: list[list[torch.Tensor]] = []
        self._backward_pending = False  # a forward built a graph whose backward is not finished
        values = InitialValues(self.params)  # weights left in files (lazy.py) are read chunk by chunk
        self._install(self._plan(list(self.params)), values, {}, _Carry(lr=ocfg.lr, tracer=MemTracer()))
        self._handles = hooks.install(self, self.hook_modules)
        self._handles += [p.register_post_accumulate_grad_hook(self._grad_hook(n)) for n, p in self.params.items() if p.requires_grad]

    # -- construction: plan, then build -------------------------------------------------------------
    def _budget(self) -> float:
        if self.cfg.device_budget_bytes:
            return float(self.cfg.device_budget_bytes)
        if self.device.type == "cuda":
            return float(torch.cuda.mem_get_info(self.device)[0])
        return math.inf

    def _plan(self, order: list[str]) -> Layout:
        return plan_layout(
            order, self.params, self.module_params, shapes=self.shapes,
            decays=lambda n: self.ocfg.decays(self.shapes[n]), cfg=self.cfg, world=self.world,
        )  # fmt: skip

    def _install(self, layout: Layout, values: dict[str, torch.Tensor], moments: dict[str, dict], carry: _Carry) -> None:
        """Build chunks, placement, gradient reducer and optimizer from ``layout`` and full
        per-parameter ``values`` and Adam ``moments`` (the one construction path)."""
        chunks = [
            Chunk.build(i, spec, values, dtype=self.dtype, world=self.world, rank=self.rank, device=self.device)
            for i, spec in enumerate(layout.specs)
        ]
        manager = ChunkManager(chunks, layout, self.cfg, device=self.device, group=self.group, budget=self.budget,
                               tracer=carry.tracer, peak_bytes=carry.peak_bytes)
        manager.place()
        import_optim_state(chunks, moments)
        reducer = GradReducer(manager, self.group, self.world, layout.reduce_order)
        for name in carry.expected:  # a re-layout between forward and backward (the warm-up step)
            reducer.expect(*layout.slot_of[name])
        self.layout, self.chunks, self.manager, self.reducer = layout, chunks, manager, reducer
        self.adam = ShardAdamW(chunks, self.ocfg, lr=carry.lr)

    def _relayout(self, order: list[str], values: dict[str, torch.Tensor], moments: dict[str, dict]) -> None:
        carry = _Carry(lr=self.lr, tracer=self.manager.tracer, peak_bytes=self.manager.peak_bytes,
                       expected=frozenset(self.reducer.expected_names()))
        self._install(self._plan(order), values, moments, carry)

    @property
    def layout_order(self) -> list[str]:
        return list(self.layout.order)

    def _grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            self.reducer.add(*self.layout.slot_of[name], param.grad)
            param.grad = None

        return hook

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        warmup = self.manager.tracer.recording and self.device.type == "cpu"
        probe = self.manager.tracer.saved_tensor_hooks(self._is_model_data) if warmup else contextlib.nullcontext()
        # A forward without grad (evaluation between steps) must not move the clock that indexes
        # the warm-up trace: the next training forward would read another step's memory plan.
        clock = self.manager.clock
        # autocast as the plain engine does, not a cast of the inputs: inputs such as timesteps or
        # coordinates keep their fp32 values, and each op runs in the precision autocast gives it
        with probe, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.module(*args, **kwargs)
        # Every collective after the forward comes after complete_gathers: a rank that used a
        # chunk others skipped must not be inside a gather while the others broadcast the layout.
        self.manager.complete_gathers()  # the chunks other ranks used and this one skipped
        if not self._first_forward_done:
            self._first_forward_done = True
            self._reorder()
            self.manager.complete_gathers()  # the repacked chunks
        if not torch.is_grad_enabled():
            self.manager.clock = clock
        self._backward_pending |= torch.is_grad_enabled()
        return out

    def _is_model_data(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(c.payload is not None and c.payload.untyped_storage().data_ptr() == ptr for c in self.chunks)

    def _reorder(self) -> None:
        """Repack the chunks in the order the first forward used the parameters."""
        order = self._agreed(self.order + [n for n in self.params if n not in self._seen])
        if not self.cfg.reorder_after_warmup or tuple(order) == self.layout.order:
            return
        values, moments = export_full(self.chunks, self.ranks)
        tracked = [self.named_from(flat) for flat in self._tracked]
        self._relayout(order, values, moments)
        for flat, named in zip(self._tracked, tracked):
            flat[:] = self.flat_from(named)

    def _agreed(self, order: list[str]) -> list[str]:
        """Rank 0's order on every rank: a branch taken on one rank only must not change the layout."""
        if self.group is None:
            return order
        names = list(self.params)
        index = {n: i for i, n in enumerate(names)}
        perm = torch.tensor([index[n] for n in order], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(perm, src=torch.distributed.get_global_rank(self.group, 0), group=self.group)
        return [names[i] for i in perm.tolist()]

    def _chunks_of(self, module_index: int) -> list[Chunk]:
        return [self.chunks[i] for i in self.layout.module_chunks[module_index]]

    def pre_forward(self, module_index: int) -> None:
        if not self._first_forward_done:
            for name in self.module_params[module_index]:
                if name not in self._seen:
                    self._seen.add(name)
                    self.order.append(name)
        if torch.is_grad_enabled():  # these parameters' gradients are due in the coming backward
            for chunk_index, slot_index in self.layout.module_slots[module_index]:
                self.reducer.expect(chunk_index, slot_index)
        if self.manager.tracer.recording:
            self.manager.tracer.record(module_index, self.manager.non_model_bytes())
        self.manager.access(self._chunks_of(module_index))

    def post_forward(self, module_index: int) -> None:
        self.manager.tracer.touch(self.manager.non_model_bytes())
        self.manager.release(self._chunks_of(module_index))

    # -- backward ---------------------------------------------------------------------------------
    def watch(self, token: hooks.CallToken) -> None:
        self._tokens.append(token)

    def pre_backward(self, token: hooks.CallToken) -> None:
        if token.pre_fired:
            return
        token.pre_fired = True
        if self.manager.tracer.recording:
            self.manager.tracer.record(token.module_index, self.manager.non_model_bytes())
        self.manager.access(self._chunks_of(token.module_index))

    def post_backward(self, token: hooks.CallToken) -> None:
        if token.input_grad_arrived() and token.pre_fired and not token.post_fired:
            token.post_fired = True
            self.manager.release(self._chunks_of(token.module_index))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled for fp16); gradients end in the fp32 shards, reduced."""
        (loss * self.scaler.scale if self.scaler.enabled else loss).backward()
        self.finish_backward()

    def finish_backward(self) -> None:
        if not self._backward_pending:  # step() calls it too; a second call has nothing to finish
            return
        self._backward_pending = False
        for token in self._tokens:
            if token.pre_fired and not token.post_fired:
                token.post_fired = True
                self.manager.release(self._chunks_of(token.module_index))
        self._tokens.clear()
        self.reducer.finish()

    # -- step -------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Clip, update the master shards and refresh the compute copies; returns grad_norm, skipped."""
        self.finish_backward()
        if self.manager.tracer.recording:
            self._finish_warmup()
        self.manager.clock = 0
        result = optimizer_step(self.reducer, self.scaler, self.adam, self.ocfg.max_grad_norm)
        if not result["skipped"]:
            for chunk in self.chunks:
                if chunk.master is not None:
                    self.manager.refresh(chunk)
        return result

    def _finish_warmup(self) -> None:
        tracer = self.manager.tracer
        if self.group is not None:
            # plan with the largest activation figure any rank saw at each point, where the ranks
            # ran the same modules (eviction is local, so plans may differ where they did not)
            lengths = torch.tensor([len(tracer.non_model), -len(tracer.non_model)], device=self.device)
            torch.distributed.all_reduce(lengths, op=torch.distributed.ReduceOp.MAX, group=self.group)
            longest, shortest = lengths[0].item(), -lengths[1].item()
            if longest == shortest > 0:
                peaks = torch.tensor(tracer.non_model, dtype=torch.int64, device=self.device)
                torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX, group=self.group)
                tracer.non_model = peaks.tolist()
        tracer.finish(self.manager.module_chunks)

    def zero_grad(self) -> None:
        self.reducer.zero_grad()

    @property
    def lr(self) -> float:
        return self.adam.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.adam.lr = value

    # -- module-like passthrough ------------------------------------------------------------------
    def train(self, mode: bool = True) -> GeminiEngine:
        self.module.train(mode)
        return self

    def eval(self) -> GeminiEngine:
        return self.train(False)

    def stats(self) -> dict[str, float]:
        reducer = {"overlapped_reductions": self.reducer.num_overlapped, "late_reductions": self.reducer.num_late}
        return self.manager.stats() | reducer | {"loss_scale": self.scaler.scale}

    # -- state, checkpoints (see state.py and checkpoint.py for the formats) ------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain consolidated state dict: fp32 master weights (compute copies of frozen ones), and the
        persistent buffers (as ``nn.Module.state_dict``: a plain module loads it strictly)."""
        values = self.param_values()
        values |= {alias: values[name] for alias, name in self.aliases.items()}
        return values | {n: b.detach().cpu() for n, b in pretrained.persistent_buffers(self.module).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights by name (optimizer moments are kept); buffers too."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
        _, moments = export_full(self.chunks, self.ranks)
        self._relayout(list(self.layout.order), {n: state[n] for n in self.params}, moments)
        for name, buf in self.module.named_buffers():
            if name in state:
                buf.copy_(state[name])

    def param_values(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, consolidated: fp32 masters, compute copies of frozen ones (a collective)."""
        return export_full(self.chunks, self.ranks, with_moments=False)[0]

    def save(self, folder: str | Path) -> None:
        """Write this rank's shards and (rank 0) the layout: ``checkpoint.py``'s format (every rank calls it)."""
        header = {"dtype": str(self.dtype).removeprefix("torch."), "loss_scale": self.scaler.scale,
                  "calm_steps": self.scaler.calm_steps, "aliases": self.aliases}
        save_sharded(folder, self.chunks, self.ranks, buffers=pretrained.persistent_buffers(self.module), header=header)

    def load(self, folder: str | Path) -> None:
        """Load weights, Adam state, buffers and loss scale from a sharded checkpoint of any layout."""
        values, moments, buffers, layout = read_full(folder)
        check_fits(folder, values, self.shapes)
        self._relayout(list(self.layout.order), {n: values[n] for n in self.params}, moments)
        named = dict(self.module.named_buffers())
        for name, value in buffers.items():
            if name in named:
                named[name].copy_(value)
        self.scaler.scale = float(layout["loss_scale"])
        self.scaler.calm_steps = int(layout["calm_steps"])

    def save_pretrained(self, folder: str | Path, *, max_shard_bytes: int = pretrained.DEFAULT_SHARD_BYTES,
                        dtype: torch.dtype | None = None) -> None:
        """Consolidated weights in transformers' layout, gathered and written one chunk at a time
        (a collective; rank 0 writes): fp32 masters, compute copies of frozen chunks."""

        def pieces():
            for chunk in self.chunks:
                source = chunk.master.data if chunk.master is not None else chunk.shard
                yield chunk.unflatten(gather_full(self.ranks, chunk, source))
            yield pretrained.persistent_buffers(self.module)

        pretrained.save_pretrained(folder, pieces(), module=self.module, write=self.rank == 0,
                                   max_shard_bytes=max_shard_bytes, dtype=dtype)

    def export_trainable(self) -> TrainableState:
        """The trainable parameters' weights and Adam state (a collective under data parallelism)."""
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        values, moments = export_full(self.chunks, self.ranks)
        return TrainableState(values={n: v for n, v in values.items() if n in names},
                              moments={n: m for n, m in moments.items() if n in names},
                              scale=self.scaler.scale, calm_steps=self.scaler.calm_steps)

    def import_trainable(self, state: TrainableState) -> None:
        """Put back what ``export_trainable`` gave; frozen chunks keep their current weights."""
        self.load_state_dict(self.state_dict() | state.values)
        import_optim_state(self.chunks, state.moments)
        if self.scaler.enabled:
            self.scaler.scale, self.scaler.calm_steps = float(state.scale), int(state.calm_steps)

    # -- flat views for weight averaging (EMA) ---------------------------------------------------
    def master_tensors(self) -> list[torch.Tensor]:
        """The fp32 master shards, one per trainable chunk (what an EMA should average)."""
        return [c.master.data for c in self.chunks if c.master is not None]

    def track(self, flat: list[torch.Tensor]) -> None:
        """Keep ``flat`` (shaped like ``master_tensors()``, e.g. an EMA) in step with re-layouts:
        after the warm-up repacks the chunks, the list is rewritten in place in the new layout."""
        self._tracked.append(flat)

    def named_from(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter full tensors from shards shaped like ``master_tensors()`` (a collective)."""
        out: dict[str, torch.Tensor] = {}
        trainable = iter(tensors)
        for chunk in self.chunks:
            source = next(trainable) if chunk.master is not None else chunk.shard
            out.update({k: v.clone() for k, v in chunk.unflatten(gather_full(self.ranks, chunk, source)).items()})
        return out | {alias: out[name] for alias, name in self.aliases.items()}

    def flat_from(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Shards shaped like ``master_tensors()`` from per-parameter tensors."""
        shards = []
        for chunk in self.chunks:
            if chunk.master is not None:
                full = chunk.flatten({s.name: named[s.name] for s in chunk.slots}, torch.float32)
                shards.append(chunk.shard_of(full).clone().to(chunk.master.device))
        return shards


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    """Buffers are small and always on the device."""
    for owner in module.modules():
        for key, buf in owner._buffers.items():
            if buf is not None:
                owner._buffers[key] = buf.to(device)


def gemini(
    module: nn.Module,
    cfg: GeminiConfig | None = None,
    optim: OptimConfig | None = None,
    dims: ParallelDims | None = None,
    device: torch.device | None = None,
) -> GeminiEngine:
    """Wrap ``module`` for chunked heterogeneous-memory training with AdamW.

    ``device`` defaults to ``dims.device``, else the current CUDA device, else the CPU.
    """
    return GeminiEngine(module, cfg or GeminiConfig(), optim or OptimConfig(), dims, device)
