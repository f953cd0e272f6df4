"""What sd-finetune adds to the core training loop: its model, its per-step work and its exports.

The core loop (ferryman.core.training.train) owns the steps: engine (plain PyTorch or Gemini),
learning-rate schedule, EMA with diffusers' warm-up, checkpoints and exact resume. A ``Run``
supplies the trained module, records each step's loss and learning rate (``on_step``), renders
validation grids every N steps, and writes the weights diffusers reads: unet/ (unet_ema/,
text_encoder/) or the LoRA file, into checkpoint-N/ folders and the final output.

Under data-parallel Gemini, reading the weights gathers every rank's shards (a collective), so
every rank calls the methods that read them and only rank 0 writes or renders.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferryman.apps.diffusion.lora import save_lora
from ferryman.apps.diffusion.loss import TrainModule
from ferryman.apps.diffusion.parts import prepare_model
from ferryman.core.errors import UserError


@dataclass(kw_only=True)
class Run:
    """The live state of one sd-finetune run, shared by the loop's hooks and the checkpoint store."""

    cfg: Any
    parts: Any
    out: Path
    device: torch.device
    rank: int = 0  # the global rank: rank 0 writes
    model: TrainModule | None = None  # the trained module; under Gemini its parameters are chunk views
    shadow: TrainModule | None = None  # host copy for exports when Gemini owns ``model``'s storage
    losses: list[float] = field(default_factory=list)  # every step's loss from step 1, resumed ones included
    lrs: list[float] = field(default_factory=list)

    def build_model(self) -> TrainModule:
        """The loop's model builder: freeze, add LoRA, place the frozen parts (the loop seeds first)."""
        model = prepare_model(self.cfg, self.parts, self.device)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("nothing to train: every parameter is frozen")
        self.model = model
        self.shadow = copy.deepcopy(model) if self.cfg.train.engine == "gemini" else None  # Gemini takes over model's storage
        return model

    def on_step(self, info) -> None:
        """After every update (core ``StepInfo``, on every rank): record it, render the validation grid when due."""
        self.losses.append(info.loss)
        self.lrs.append(info.lr)
        cfg = self.cfg
        if cfg.validation_prompts and cfg.validation_every and info.step % cfg.validation_every == 0:
            self.validate(f"step-{info.step:06d}.png", info.engine, info.ema_named())

    # -- weights ----------------------------------------------------------------------------------
    def weights(self, engine, ema_named: dict[str, torch.Tensor] | None = None) -> TrainModule:
        """A TrainModule holding the current weights, or the EMA ones when ``ema_named`` is given."""
        if self.shadow is None and ema_named is None:
            return self.model
        target = self.shadow if self.shadow is not None else self.model
        named = dict(engine.state_dict()) if self.shadow is not None else {}
        named |= ema_named or {}
        own = target.state_dict()
        target.load_state_dict({k: v for k, v in named.items() if k in own}, strict=False)
        return target

    @contextlib.contextmanager
    def ema_weights(self, engine, ema_named: dict[str, torch.Tensor] | None):
        """The EMA weights (if any) in a module, with the training weights put back afterwards."""
        if ema_named is None:
            yield self.weights(engine)
            return
        saved = None
        if self.shadow is None:  # plain engine: the EMA is copied into the live module, then undone
            saved = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        try:
            yield self.weights(engine, ema_named)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for name, param in self.model.named_parameters():
                        if name in saved:
                            param.copy_(saved[name])

    def validate(self, name: str, engine, ema_named: dict[str, torch.Tensor] | None) -> Path:
        from ferryman.apps.diffusion.validation import render_validation

        path = self.out / "validation" / name
        with self.ema_weights(engine, ema_named) as module:
            if self.rank == 0:
                render_validation(self, module, path)
        return path

    def export_weights(self, folder: Path, engine, ema_named: dict[str, torch.Tensor] | None) -> None:
        """Weights in the layout diffusers reads: unet/ (and text_encoder/, unet_ema/), or the LoRA file.

        Every rank calls it; rank 0 writes.
        """
        write = self.rank == 0
        if self.cfg.use_lora:  # the adapters only: the frozen base stays in --model
            with self.ema_weights(engine, ema_named) as module:
                if write:
                    save_lora(folder, module.unet, module.text_encoder)
            return
        module = self.weights(engine)
        if write:
            module.unet.save_pretrained(folder / "unet", safe_serialization=True)
            if module.text_encoder is not None:
                module.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        if ema_named is not None:
            with self.ema_weights(engine, ema_named) as averaged:
                if write:
                    averaged.unet.save_pretrained(folder / "unet_ema", safe_serialization=True)

    def checkpoint_state(self) -> dict[str, Any]:
        """The run's own fields of trainer_state.json; ``prediction_type`` is the target trained,
        which sd-generate samples checkpoint-N with (the base model's scheduler may say otherwise)."""
        cfg = self.cfg
        return {"losses": self.losses, "lrs": self.lrs, "base_model": str(Path(cfg.model).resolve()),
                "lora": cfg.use_lora, "train_text_encoder": cfg.train_text_encoder,
                "prediction_type": cfg.loss.prediction_type}

    def restore(self, state: dict[str, Any]) -> None:
        self.losses, self.lrs = list(state["losses"]), list(state["lrs"])
