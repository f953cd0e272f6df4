"""The step loop of sd-finetune, driving a core training engine (plain PyTorch or Gemini).

The core engines do the step mechanics (autocast, loss scaling, clipping, AdamW, Gemini chunk
placement); the learning-rate schedule and the flat-tensor EMA are core's too. This loop adds
what diffusers users expect between steps: checkpoint-N/ folders with diffusers-readable weights
and validation grids every N steps (core ``train()`` has no per-step hook for them yet).

Every step's randomness comes from the batch (its ``noise_seed``) and the learning rate is a pure
function of the step, so a run resumed from checkpoint-N repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ferryman.apps.diffusion.data import CaptionStream, stream_loader
from ferryman.core.training.schedule import EMA, lr_at


def ema_decay_at(decay: float, num_updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)): diffusers' EMAModel warm-up, so early averages follow training."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


@dataclass(kw_only=True)
class Run:
    """The live state of one sd-finetune run."""

    cfg: Any
    parts: Any
    model: torch.nn.Module  # the TrainModule; under Gemini its parameters are chunk views
    engine: Any  # ferryman.core PlainEngine or GeminiEngine wrapping ``model``
    loss_fn: Any
    stream: CaptionStream
    out: Path
    shadow: torch.nn.Module | None = None  # host copy for exports when Gemini owns ``model``'s storage
    ema: EMA | None = None
    # EMA weights by name until the first step of this process: Gemini repacks its chunks in the
    # order the first forward uses them, so flat EMA tensors can only be laid out after it.
    ema_named: dict[str, torch.Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def weights(self, ema: bool = False) -> torch.nn.Module:
        """A TrainModule holding the current (or EMA) weights, for exports and validation."""
        if self.shadow is None and not ema:
            return self.model
        target = self.shadow if self.shadow is not None else self.model
        named = self.engine.state_dict() if self.shadow is not None else {}
        if ema and self.ema is not None:
            named = {**named, **self.engine.named_from(self.ema.shadow)}
        if named:
            target.load_state_dict({k: v for k, v in named.items() if k in target.state_dict()}, strict=False)
        return target

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in a module, with the training weights put back afterwards."""
        if self.ema is None:
            yield self.weights()
            return
        saved = None
        if self.shadow is None:  # plain engine: the EMA is copied into the live module, then undone
            saved = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        try:
            yield self.weights(ema=True)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for name, param in self.model.named_parameters():
                        if name in saved:
                            param.copy_(saved[name])

    def validate(self, name: str) -> Path:
        from ferryman.apps.diffusion.validation import render_validation

        with self.ema_weights() as module:
            return render_validation(self, module, self.out / "validation" / name)


def lr_for(cfg, step: int) -> float:
    return lr_at(step, base_lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.lr_warmup_steps,
                 schedule=cfg.lr_schedule, min_lr_ratio=0.0)


def train_step(run: Run, batch: dict, lr: float) -> float:
    """One optimizer step on ``batch``; returns the loss."""
    engine = run.engine
    engine.lr = lr
    loss = run.loss_fn(engine, batch)
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(f"loss became {loss.item()} at step {len(run.losses) + 1}; "
                                 "lower --lr, or use bf16 instead of fp16")
    engine.backward(loss)
    engine.step()
    engine.zero_grad()
    if run.ema_named is not None:
        run.ema, run.ema_named = EMA(engine.flat_from(run.ema_named), run.cfg.ema_decay), None
    if run.ema is not None:
        run.ema.decay = ema_decay_at(run.cfg.ema_decay, len(run.losses))
        run.ema.update(engine.master_tensors())
    return float(loss.detach())


def run_steps(run: Run, *, progress: bool = True, summary: str = "") -> None:
    """Train from ``len(run.losses)`` to ``cfg.max_steps``, checkpointing and validating on the way."""
    from ferryman.apps.diffusion.train import checkpoint

    cfg = run.cfg
    start = len(run.losses)
    loader = stream_loader(run.stream, batch_size=cfg.batch_size, start_batch=start,
                           num_batches=max(0, cfg.max_steps - start), num_workers=cfg.data.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not progress, desc="sd-finetune", unit="step")
    if summary and progress:
        bar.write(f"data: {summary}")
    run.engine.train()
    for step, batch in enumerate(loader, start=start):
        lr = lr_for(cfg, step)
        run.losses.append(train_step(run, batch, lr))
        run.lrs.append(lr)
        done = step + 1
        bar.update(1)
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps:
            bar.set_postfix(loss=f"{run.losses[-1]:.4f}", lr=f"{lr:.2e}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint(run)
        if cfg.validation_prompts and cfg.validation_every and done % cfg.validation_every == 0:
            run.validate(f"step-{done:06d}.png")
    bar.close()
