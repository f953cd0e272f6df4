"""Gemini's fp16 loss scaler moves like torch.amp.GradScaler, so its state means the same in both
engines (trainable-only checkpoints hand it from one to the other)."""

import random

import torch

from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.optim import LossScaler


def test_scale_and_calm_steps_follow_torch_grad_scaler_step_by_step():
    interval = 3
    ours = LossScaler(GeminiConfig(precision="fp16", loss_scale_growth_interval=interval))
    scale, tracker = torch.tensor([ours.scale]), torch.tensor([0], dtype=torch.int32)
    rng = random.Random(0)
    for _ in range(60):
        overflow = rng.random() < 0.2
        ours.update(overflow)
        # the kernel torch.amp.GradScaler.update runs: doubles after `interval` calm steps, halves on inf
        torch._amp_update_scale_(scale, tracker, torch.tensor([float(overflow)]), 2.0, 0.5, interval)
        assert (ours.scale, ours.calm_steps) == (scale.item(), tracker.item())


def test_the_default_growth_interval_is_torchs():
    assert GeminiConfig().loss_scale_growth_interval == torch.amp.GradScaler("cpu")._growth_interval
