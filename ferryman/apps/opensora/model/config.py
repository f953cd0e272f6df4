"""The sizes of an STDiT: everything that decides its parameters and their shapes, nothing else.

How a built model runs (kernel backend, activation checkpointing, sequence parallelism) is not
here: ``RuntimeConfig`` in the app's config carries it and ``runtime.apply_runtime`` /
``parallel.parallelize`` apply it to a built model from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferryman.core.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class STDiTConfig:
    """Sizes of an STDiT (Open-Sora 1.0-1.2): latent channels, patch, width, depth, heads, text width.

    ``depth`` counts spatial-temporal pairs: the model has ``depth`` spatial and ``depth``
    temporal blocks, alternating. ``caption_channels`` is the text encoder's width (T5-XXL: 4096)
    and ``model_max_length`` the number of text tokens (Open-Sora 1.0: 120, 1.2: 300), which is
    also the length of the learned null caption.
    """

    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 120
    qk_norm: bool = True
    base_size: int = 16  # latent patches per side at which the spatial positional grid is unscaled

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_heads must be even (sin-cos embeddings)")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size={self.patch_size} must be three positive sizes (t, h, w)")
        # frozen: the one normalisation of a constructed config (a list from YAML becomes a tuple)
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if min(self.depth, self.in_channels, self.caption_channels, self.model_max_length) < 1:
            raise ConfigError("model.depth, in_channels, caption_channels and model_max_length must be >= 1")
        if self.mlp_ratio <= 0 or self.base_size < 1:
            raise ConfigError("model.mlp_ratio must be positive and model.base_size >= 1")
