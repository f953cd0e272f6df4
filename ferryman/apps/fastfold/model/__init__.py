"""AlphaFold2 network (AF2 Suppl. algorithms), one file per paper module; AlphaFold-Multimer in the
same tree (``multimer.py`` and the ``multimer_*`` modules it swaps in).

``build_model`` makes a model from a preset name or a config; ``random_weights_model`` fills
every parameter with seeded random values, which tests and benchmarks use in place of trained
weights (AF2 zero-initialises final layers, which would make a fresh model trivially constant).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ferryman.apps.fastfold.model.alphafold import AlphaFold
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.options import RunOptions, apply_run_options

__all__ = ["AlphaFold", "AlphaFoldConfig", "RunOptions", "apply_run_options", "build_model", "random_weights_model",
           "randomize_"]  # fmt: skip


def build_model(preset_or_config: str | AlphaFoldConfig, *, run: RunOptions | None = None, **overrides) -> AlphaFold:
    """AlphaFold (AlphaFold-Multimer when ``multimer``) with AF2's initialisation from a preset
    name ('model_1_ptm', 'model_1_multimer_v3', 'tiny', ...) or a config, with ``overrides``
    replacing config fields, set up to run as ``run`` says (default: the preset's
    ``presets.run_options`` for a name, ``RunOptions()`` for a config)."""
    from ferryman.apps.fastfold import presets

    if isinstance(preset_or_config, AlphaFoldConfig):
        cfg = dataclasses.replace(preset_or_config, **overrides)
        run = run or RunOptions()
    else:
        cfg = presets.get_preset(preset_or_config, **overrides)
        run = run or presets.run_options(preset_or_config)
    if cfg.multimer:
        from ferryman.apps.fastfold.model.multimer import AlphaFoldMultimer

        return apply_run_options(AlphaFoldMultimer(cfg), run)
    return apply_run_options(AlphaFold(cfg), run)


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


def random_weights_model(preset_or_config: str | AlphaFoldConfig = "tiny", *, seed: int = 0,
                         run: RunOptions | None = None, **overrides) -> AlphaFold:  # fmt: skip
    """``build_model`` followed by ``randomize_``; deterministic for a given seed."""
    model = build_model(preset_or_config, **overrides)
    # Drawn in fp32 whatever the precision, so a bf16 model holds the same weights, rounded.
    randomize_(model, seed=seed)
    return apply_run_options(model, run or model.run_options).eval()
