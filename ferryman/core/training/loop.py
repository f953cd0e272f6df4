"""The one training loop: an app hands it a model builder, a data-loader builder and a loss function.

    result = train(cfg, build_model=lambda: Net(...), build_loader=lambda: loader,
                   loss_fn=lambda engine, batch: criterion(engine(batch["x"]), batch["y"]))

``loss_fn`` calls the engine like the model and returns the loss (or ``(loss, {name: value})``
to log more). With data parallelism (``dims``), ``build_loader`` gives each rank its own part of
the data (e.g. a DistributedSampler); the loop averages the logged loss over ranks. The loop owns
device and precision, the plain or Gemini engine, gradient accumulation, clipping, the LR
schedule, the weight EMA, checkpoints, exact resume, metrics, the loss plot, the progress bar and
the saved config.

Apps plug in between steps with ``on_step(info)`` (validation images, their own logs) and choose
the checkpoint layout with ``checkpoints=`` (a ``CheckpointStore`` subclass). A loader that has
``state_dict()``/``load_state_dict()`` (JSON-able state, e.g. a position in an endless stream)
is resumed from its state instead of by replaying the epoch's batches.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from ferryman.core.config import save_config
from ferryman.core.errors import UserError
from ferryman.core.gemini import gemini
from ferryman.core.parallel import ParallelDims
from ferryman.core.runtime import parse_dtype, pick_device
from ferryman.core.training.checkpoint import CheckpointStore, rng_state, set_rng_state
from ferryman.core.training.config import TrainConfig
from ferryman.core.training.engine import Engine
from ferryman.core.training.metrics import MetricsLog, plot_losses
from ferryman.core.training.plain import PlainEngine
from ferryman.core.training.schedule import EMA, ema_decay_at, lr_at

LossFn = Callable[[Engine, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: list[float]  # one per update made by this call
    out_dir: Path
    engine: Engine
    ema_state_dict: dict[str, torch.Tensor] | None
    last_checkpoint: Path | None


@dataclasses.dataclass
class StepInfo:
    """What ``on_step`` is given after each update; it runs on every rank, before the update's
    checkpoint is written, so anything it draws from the global RNG is in the saved state."""

    step: int  # updates done so far
    loss: float  # this update's loss (mean over accumulation and data-parallel ranks)
    lr: float  # the learning rate this update used
    record: dict[str, Any]  # this update's metrics line
    engine: Engine
    ema: EMA | None
    is_last: bool  # the last update of this call
    rank: int

    def ema_named(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights by parameter name, or None without EMA (a collective under data-parallel Gemini)."""
        return _ema_named(self.engine, self.ema)


def _ema_named(engine: Engine, ema: EMA | None) -> dict[str, torch.Tensor] | None:
    if ema is None:
        return None
    # Gemini's named_from also returns its frozen chunks: an average of frozen weights is moot
    keep = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in engine.named_from(ema.shadow).items() if k in keep}


def build_engine(model: nn.Module, cfg: TrainConfig, dims: ParallelDims | None = None) -> Engine:
    """The plain or Gemini engine for ``model``, as the config says."""
    device = pick_device(cfg.device, dims)
    if cfg.engine == "gemini":
        gcfg = dataclasses.replace(cfg.gemini, precision=cfg.precision)
        return gemini(model, gcfg, cfg.optim, dims, device=device)
    return PlainEngine(model, cfg.optim, parse_dtype(cfg.precision), device, dims)


class _Batches:
    """Endless micro-batches over epochs; each epoch's order is seeded so a resume can replay it."""

    def __init__(self, loader: Iterable, seed: int, epoch: int = 0, skip: int = 0, state: Any = None) -> None:
        self.loader, self.seed = loader, seed
        self.epoch, self.index = epoch, 0
        if state is not None and self.stateful:  # the loader seeks itself: no replay
            loader.load_state_dict(state)
            self.index, skip = skip, 0
        self._it = self._start()
        for _ in range(skip):
            self.next()

    @property
    def stateful(self) -> bool:
        return hasattr(self.loader, "state_dict") and hasattr(self.loader, "load_state_dict")

    def position(self) -> dict[str, Any]:
        where = {"epoch": self.epoch, "batch_in_epoch": self.index}
        return where | ({"loader": self.loader.state_dict()} if self.stateful else {})

    def _start(self) -> Iterator:
        # The sampler draws its seed from the global RNG on the first batch: seed that draw, then
        # put the global RNG back so dropout and friends are untouched by data loading.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            it = iter(self.loader)
            first = next(it, _END)
        if first is _END:
            raise UserError("the data loader yielded no batches (is the dataset empty or the batch size too big?)")
        return _chain(first, it)

    def next(self) -> Any:
        batch = next(self._it, _END)
        if batch is _END:
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._start()
            batch = next(self._it)
        self.index += 1
        return batch


_END = object()


def _chain(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean_over_ranks(value: float, dims: ParallelDims | None) -> float:
    if dims is None or dims.dp_group is None or dims.dp == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dims.device)
    dist.all_reduce(t, group=dims.dp_group)
    return t.item() / dims.dp


def train(
    cfg: TrainConfig,
    build_model: Callable[[], nn.Module],
    build_loader: Callable[[], Iterable],
    loss_fn: LossFn,
    *,
    dims: ParallelDims | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    checkpoints: CheckpointStore | None = None,
) -> TrainResult:
    """Train up to ``cfg.max_steps`` optimizer updates (resuming first if ``cfg.resume``); a
    checkpoint is written every ``ckpt_every`` updates and where this call stops (``ckpt_at_end``).

    ``on_step`` is called after every update (see ``StepInfo``); ``checkpoints`` defaults to
    ``CheckpointStore(out_dir / "checkpoints", keep_last=cfg.keep_last)``.
    """
    out = Path(cfg.out_dir)
    rank = dims.rank if dims is not None else 0
    store = checkpoints or CheckpointStore(out / "checkpoints", keep_last=cfg.keep_last)
    _seed_all(cfg.seed)  # every rank builds the same initial weights
    model = build_model()
    _seed_all(cfg.seed + 1000 * rank)  # but draws its own dropout noise
    engine = build_engine(model, cfg, dims)
    step, trainer, ema_named = 0, {}, None
    folder = store.resolve(cfg.resume) if cfg.resume else None
    if folder is None and not cfg.resume and (earlier := store.complete()):
        raise UserError(f"{store.root} holds checkpoints of an earlier run (newest {earlier[-1].name}); continue it "
                        "with resume=latest (--resume latest), or write this run elsewhere (--out)")
    if folder is not None:
        trainer, ema_named = store.load(folder, engine, rank=rank)
        step = trainer["step"]
    if rank == 0 and cfg.config_file:  # after a resume that worked: a failed one changes no file
        save_config(cfg, out / cfg.config_file)
    ema = EMA(engine.master_tensors(), cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and ema_named is not None:
        ema.shadow = engine.flat_from(ema_named)
    if ema is not None:
        engine.track(ema.shadow)  # Gemini repacks its chunks after the first forward
    restored = rng_state() if folder is not None else None
    batches = _Batches(build_loader(), cfg.seed, trainer.get("epoch", 0), trainer.get("batch_in_epoch", 0),
                       trainer.get("loader"))
    if restored is not None:  # replaying the epoch's batches drew from the global RNG (augmentation)
        set_rng_state(*restored)
    log = MetricsLog(out / "metrics.jsonl", start_step=step) if rank == 0 else None
    bar = _progress(cfg, step, rank)
    losses, last = [], None
    engine.train()
    end = min(cfg.max_steps, step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    while step < end:
        started = time.perf_counter()
        engine.lr = lr_at(
            step, base_lr=cfg.optim.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
        )
        loss, extra = _accumulate(engine, batches, loss_fn, cfg.grad_accum, engine.device)
        result = engine.step()
        engine.zero_grad()
        if ema is not None:
            if cfg.ema_warmup:
                ema.decay = ema_decay_at(cfg.ema_decay, step)
            ema.update(engine.master_tensors())
        step += 1
        loss = _mean_over_ranks(loss, dims)
        losses.append(loss)
        record = {"step": step, "loss": loss, "lr": engine.lr, **result, **extra, "step_s": time.perf_counter() - started}
        if log is not None and (step % cfg.log_every == 0 or step == end):
            log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{engine.lr:.2e}")
        if on_step is not None:
            on_step(StepInfo(step=step, loss=loss, lr=engine.lr, record=record, engine=engine, ema=ema,
                             is_last=step == end, rank=rank))
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or (cfg.ckpt_at_end and step == end):
            trainer = {"step": step, **batches.position(), "engine": cfg.engine}
            last = store.save(step, engine, _ema_named(engine, ema), trainer, rank=rank)
    if bar is not None:
        bar.close()
    if rank == 0 and cfg.plot and log is not None:
        plot_losses(log.read(), out / "loss.png")
    return TrainResult(step=step, losses=losses, out_dir=out, engine=engine, ema_state_dict=_ema_named(engine, ema),
                       last_checkpoint=last)


def _accumulate(engine: Engine, batches: _Batches, loss_fn: LossFn, accum: int, device: torch.device) -> tuple[float, dict]:
    total, extra = 0.0, {}
    for _ in range(accum):
        batch = tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batches.next())
        out = loss_fn(engine, batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        if engine.dtype != torch.float16 and not torch.isfinite(loss.detach()).all():  # fp16 skips the step
            raise UserError(f"loss became {loss.item()} at epoch {batches.epoch}, batch {batches.index}; lower optim.lr")
        engine.backward(loss / accum)
        total += loss.item() / accum
        for key, value in logs.items():
            extra[key] = extra.get(key, 0.0) + float(value) / accum
    return total, extra


def _progress(cfg: TrainConfig, step: int, rank: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
