"""AlphaFold2 network (AF2 Suppl. algorithms), one file per paper module; AlphaFold-Multimer in the
same tree (``multimer.py`` and the ``multimer_*`` modules it swaps in).

``build_model`` makes a model from a preset name or a config; ``random_weights_model`` fills
every parameter with seeded random values, which tests and benchmarks use in place of trained
weights (AF2 zero-initialises final layers, which would make a fresh model trivially constant).
"""

from __future__ import annotations

import math

import torch

from ferryman.apps.fastfold.model.alphafold import AlphaFold
from ferryman.apps.fastfold.model.config import AlphaFoldConfig

__all__ = ["AlphaFold", "AlphaFoldConfig", "build_model", "random_weights_model", "randomize_"]


def build_model(preset_or_config: str | AlphaFoldConfig, **overrides) -> AlphaFold:
    """AlphaFold (AlphaFold-Multimer when ``multimer``) with AF2's initialisation from a preset
    name ('model_1_ptm', 'model_1_multimer_v3', 'tiny', ...) or a config."""
    if isinstance(preset_or_config, AlphaFoldConfig):
        cfg = preset_or_config
        for key, value in overrides.items():
            setattr(cfg, key, value)
        cfg.__post_init__()
    else:
        from ferryman.apps.fastfold.presets import get_preset

        cfg = get_preset(preset_or_config, **overrides)
    if cfg.multimer:
        from ferryman.apps.fastfold.model.multimer import AlphaFoldMultimer

        return AlphaFoldMultimer(cfg)
    return AlphaFold(cfg)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Seeded random values for every parameter: weights ~ N(0, scale^2 / fan_in), biases ~
    N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if id(p) in norm_scales:
            value = 1.0 + 0.1 * noise
        elif p.dim() >= 2:
            value = noise * scale / math.sqrt(p.shape[-1])
        else:
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))
    return model


def random_weights_model(preset_or_config: str | AlphaFoldConfig = "tiny", *, seed: int = 0, **overrides) -> AlphaFold:
    """``build_model`` followed by ``randomize_``; deterministic for a given seed."""
    return randomize_(build_model(preset_or_config, **overrides), seed=seed).eval()
