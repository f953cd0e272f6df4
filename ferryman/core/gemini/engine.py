"""The Gemini engine: one object that owns a model's chunks, hooks, gradients and optimizer."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ferryman.core.gemini import hooks
from ferryman.core.gemini.adam import ShardAdamW, init_state
from ferryman.core.gemini.chunk import Chunk
from ferryman.core.gemini.config import GeminiConfig, OptimConfig
from ferryman.core.gemini.layout import plan_chunks
from ferryman.core.gemini.manager import ChunkManager
from ferryman.core.gemini.optim import GradReducer, LossScaler, optimizer_step
from ferryman.core.gemini.state import export_full, gather_full, import_optim_state
from ferryman.core.parallel import ParallelDims


class GeminiEngine:
    """Chunked heterogeneous-memory training of any ``nn.Module`` (ColossalAI Gemini's design).

    Call it like the module; then ``backward(loss)``, ``step()``, ``zero_grad()``. Parameters of the
    module become views into chunk payloads while in use and shape-only NaN placeholders otherwise; the fp32
    master weights live in the chunks' shards (see ``state_dict``).
    """

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
        default = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = device or (dims.device if dims is not None else default)
        self.world = dims.dp if dims is not None else 1
        self.group = dims.dp_group if dims is not None and dims.dp > 1 else None
        self.rank = torch.distributed.get_rank(self.group) if self.group is not None else 0
        self.scaler = LossScaler(cfg)
        self.params = dict(module.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        names = {id(p): n for n, p in self.params.items()}
        # tied weights appear once in the chunks but under every name in a plain state_dict
        self.aliases = {n: names[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if n not in self.params}
        self.hook_modules = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        self.module_params = [[names[id(p)] for p in m.parameters(recurse=False)] for m in self.hook_modules]
        for buf_module in module.modules():  # buffers are small and always on the device
            for key, buf in buf_module._buffers.items():
                if buf is not None:
                    buf_module._buffers[key] = buf.to(self.device)
        self.budget = self._budget()
        self.order: list[str] = []
        self._seen: set[str] = set()
        self._first_forward_done = False
        self._tokens: list[hooks.CallToken] = []
        self._tracked: list[list[torch.Tensor]] = []
        self._backward_pending = False  # a forward built a graph whose backward is not finished
        self._build(list(self.params), {n: p.detach() for n, p in self.params.items()}, {})
        self._handles = hooks.install(self, self.hook_modules)
        for name, param in self.params.items():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(name)))

    # -- construction ---------------------------------------------------------------------------
    def _budget(self) -> float:
        if self.cfg.device_budget_bytes:
            return float(self.cfg.device_budget_bytes)
        if self.device.type == "cuda":
            return float(torch.cuda.mem_get_info(self.device)[0])
        return math.inf

    def _build(self, order: list[str], values: dict[str, torch.Tensor], moments: dict[str, dict]) -> None:
        """(Re)build the chunks in ``order`` from full per-parameter values and optimizer moments."""
        old = getattr(self, "manager", None)
        expected = {s.name for c in getattr(self, "chunks", []) for i, s in enumerate(c.slots) if i in c.expected}
        lr = self.lr if hasattr(self, "adam") else self.ocfg.lr
        specs = plan_chunks(
            [(n, self.params[n]) for n in order],
            shapes=self.shapes,
            decays=lambda n: self.ocfg.decays(self.shapes[n]),
            chunk_numel=self.cfg.chunk_numel,
            min_num_chunks=self.cfg.min_num_chunks,
            max_chunk_numel=self.cfg.max_chunk_numel,
            align=8 * self.world,
        )
        self.chunks = [
            Chunk(i, spec, dtype=self.dtype, world=self.world, rank=self.rank, device=self.device)
            for i, spec in enumerate(specs)
        ]
        for chunk in self.chunks:
            names = [s.name for s in chunk.slots]
            full = chunk.flatten({n: values[n] for n in names}, torch.float32 if chunk.trainable else self.dtype)
            shard = chunk.shard_of(full)
            chunk.shard = shard.to(self.dtype).clone()
            if chunk.trainable:
                chunk.master = nn.Parameter(shard.clone())
        self.manager = ChunkManager(self.chunks, self.cfg, device=self.device, group=self.group, budget=self.budget)
        if old is not None:  # one run, one accounting: keep the peak and the warm-up record
            self.manager.peak_bytes, self.manager.tracer = old.peak_bytes, old.tracer
        self._slot_of = {s.name: (c.index, i) for c in self.chunks for i, s in enumerate(c.slots)}
        for name in expected:  # a re-layout between forward and backward (the warm-up step)
            chunk_index, slot_index = self._slot_of[name]
            self.chunks[chunk_index].expected.add(slot_index)
        self._module_slots = [
            [self._slot_of[n] for n in names if self.params[n].requires_grad] for names in self.module_params
        ]
        self.manager.module_chunks = {
            i: sorted({self._slot_of[n][0] for n in names}) for i, names in enumerate(self.module_params)
        }
        # forward order of the chunks: what the ranks gather in, and reverse what they reduce in
        position = {name: i for i, name in enumerate(order)}
        first_use = sorted(self.chunks, key=lambda c: min(position[s.name] for s in c.slots))
        self.manager.gather_order = [c.index for c in first_use]
        self.manager.place()
        for chunk in self.chunks:
            if chunk.master is not None:
                init_state(chunk)
        self.reducer = GradReducer(self.manager, self.group, self.world, [c.index for c in reversed(first_use) if c.trainable])
        self.adam = ShardAdamW(self.chunks, self.ocfg)
        import_optim_state(self, moments)
        self.lr = lr
        self.layout_order = order

    def _grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            chunk_index, slot_index = self._slot_of[name]
            self.reducer.add(self.chunks[chunk_index], slot_index, param.grad)
            param.grad = None

        return hook

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype != torch.float32:
            cast = lambda x: x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            args, kwargs = tree_map(cast, (args, kwargs))
        warmup = self.manager.tracer.recording and self.device.type == "cpu"
        probe = self.manager.tracer.saved_tensor_hooks(self._is_model_data) if warmup else contextlib.nullcontext()
        # A forward without grad (evaluation between steps) must not move the clock that indexes
        # the warm-up trace: the next training forward would read another step's memory plan.
        clock = self.manager.clock
        with probe:
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
        if not self.cfg.reorder_after_warmup or order == self.layout_order:
            return
        values, moments = export_full(self)
        tracked = [self.named_from(flat) for flat in self._tracked]
        self._build(order, values, moments)
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
        return [self.chunks[i] for i in self.manager.module_chunks[module_index]]

    def pre_forward(self, module_index: int) -> None:
        if not self._first_forward_done:
            for name in self.module_params[module_index]:
                if name not in self._seen:
                    self._seen.add(name)
                    self.order.append(name)
        if torch.is_grad_enabled():  # these parameters' gradients are due in the coming backward
            for chunk_index, slot_index in self._module_slots[module_index]:
                self.chunks[chunk_index].expected.add(slot_index)
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
        result = optimizer_step(self)
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
        for chunk in self.chunks:
            if chunk.master is not None:
                chunk.master.grad.zero_()
            chunk.got_grad.zero_()
            chunk.grad_seen.clear()

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain consolidated state dict: fp32 master weights (compute copies of frozen ones), buffers."""
        values, _ = export_full(self, with_moments=False)
        values |= {alias: values[name] for alias, name in self.aliases.items()}
        return values | {n: b.detach().cpu() for n, b in self.module.named_buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights by name (optimizer moments are kept); buffers too."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
        _, moments = export_full(self)
        self._build(self.layout_order, {n: state[n] for n in self.params}, moments)
        for name, buf in self.module.named_buffers():
            if name in state:
                buf.copy_(state[name])

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
            out.update({k: v.clone() for k, v in chunk.unflatten(gather_full(self, chunk, source)).items()})
        return out | {alias: out[name] for alias, name in self.aliases.items()}

    def flat_from(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Shards shaped like ``master_tensors()`` from per-parameter tensors."""
        shards = []
        for chunk in self.chunks:
            if chunk.master is not None:
                full = chunk.flatten({s.name: named[s.name] for s in chunk.slots}, torch.float32)
                shards.append(chunk.shard_of(full).clone().to(chunk.master.device))
        return shards

    def save(self, folder) -> None:
        from ferryman.core.gemini.checkpoint import save_sharded

        save_sharded(self, folder)

    def load(self, folder) -> None:
        from ferryman.core.gemini.checkpoint import load_sharded

        load_sharded(self, folder)


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
