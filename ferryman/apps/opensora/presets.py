"""STDiT size presets, from a CPU-sized debug model up to Open-Sora's STDiT-XL/2 (about 1.2B parameters).

The XL sizes are Open-Sora's ``STDiT-XL/2`` / ``STDiT3-XL/2`` (hidden 1152, depth 28, 16 heads,
patch (1, 2, 2), T5-XXL text features of width 4096; configs/opensora*/train in hpcaitech/Open-Sora,
following DiT-XL/2 of Peebles & Xie 2023, Table 1). With separate spatial and temporal blocks, each
with cross-attention, XL/2 here has 1.21B parameters (Open-Sora 1.2 reports 1.1B for STDiT3-XL/2). S/2 and B/2 take
DiT's S and B widths. ``debug`` and ``tiny`` exist for tests and CPU trials.
"""

from __future__ import annotations

from ferryman.core.errors import ConfigError

from .model.config import STDiTConfig

_SIZES: dict[str, dict] = {
    # name: hidden, depth (spatial-temporal pairs), heads, caption width, text tokens
    "debug": dict(hidden_size=32, depth=1, num_heads=2, caption_channels=32, model_max_length=16),
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=16),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, caption_channels=4096, model_max_length=120),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, caption_channels=4096, model_max_length=120),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, caption_channels=4096, model_max_length=300),
}


def model_preset(name: str, **overrides) -> STDiTConfig:
    """The STDiTConfig of a preset, with size fields overridden by keyword."""
    if name not in _SIZES:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(_SIZES)}")
    return STDiTConfig(**{**_SIZES[name], "patch_size": (1, 2, 2), **overrides})
