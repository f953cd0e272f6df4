"""Typed configs of the opensora app: model, diffusion, data, training and sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ferryman.core.errors import ConfigError
from ferryman.core.optim import OptimConfig
from ferryman.core.training.config import TrainConfig as CoreTrainConfig
from ferryman.kernels.backend import BACKENDS


@dataclass(kw_only=True)
class STDiTConfig:
    """Sizes of an STDiT (Open-Sora 1.0-1.2): latent channels, patch, width, depth, heads, text width.

    ``depth`` counts spatial-temporal pairs: the model has ``depth`` spatial and ``depth``
    temporal blocks, alternating. ``caption_channels`` is the text encoder's width (T5-XXL: 4096)
    and ``model_max_length`` the number of text tokens (Open-Sora 1.0: 120, 1.2: 300).
    """

    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 120
    class_dropout_prob: float = 0.1
    qk_norm: bool = True
    base_size: int = 16  # latent patches per side at which the spatial positional grid is unscaled
    attention_backend: str = "auto"
    norm_backend: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_heads must be even (sin-cos embeddings)")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size={self.patch_size} must be three positive sizes (t, h, w)")
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if min(self.depth, self.in_channels, self.caption_channels, self.model_max_length) < 1:
            raise ConfigError("model.depth, in_channels, caption_channels and model_max_length must be >= 1")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model.class_dropout_prob={self.class_dropout_prob} must lie in [0, 1)")
        for name in ("attention_backend", "norm_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} must be one of {', '.join(BACKENDS)}")


@dataclass(kw_only=True)
class DiffusionConfig:
    """Rectified flow (Open-Sora 1.2) or DDPM (Ho et al. 2020, Open-Sora 1.0).

    Rectified flow: t ~ logit-normal(loc, scale); with ``timestep_shift`` t is moved towards noise
    for larger inputs, t' = r t / (1 + (r - 1) t) with r = sqrt(H W / base_resolution) *
    sqrt(T_latent / base_num_frames) * shift_scale (Open-Sora 1.2 ``timestep_transform``).
    """

    kind: str = "rflow"
    num_timesteps: int = 1000
    logit_normal_loc: float = 0.0
    logit_normal_scale: float = 1.0
    timestep_shift: bool = True
    base_resolution: int = 512 * 512
    base_num_frames: int = 1
    shift_scale: float = 1.0
    beta_start: float = 1e-4  # DDPM linear schedule
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ("rflow", "ddpm"):
            raise ConfigError(f"diffusion.kind={self.kind!r} must be 'rflow' or 'ddpm'")
        if self.num_timesteps < 1 or self.logit_normal_scale <= 0 or self.shift_scale <= 0:
            raise ConfigError("diffusion.num_timesteps, logit_normal_scale and shift_scale must be positive")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("diffusion needs 0 < beta_start < beta_end < 1")


@dataclass(kw_only=True)
class Bucket:
    """One bucket: frames of about ``resolution``^2 pixels, ``num_frames`` long, ``batch_size`` per batch."""

    resolution: int = 256
    num_frames: int = 16
    batch_size: int = 1

    def __post_init__(self) -> None:
        if min(self.resolution, self.num_frames, self.batch_size) < 1:
            raise ConfigError(f"bucket {self}: resolution, num_frames and batch_size must be >= 1")


@dataclass(kw_only=True)
class DataConfig:
    """Where the clips are and how they are cut into buckets.

    A clip joins the bucket of the largest resolution it covers, the aspect ratio (height/width)
    nearest its own, and the longest ``num_frames`` (at ``frame_stride``) it holds.
    """

    csv: Path | None = None
    root: Path | None = None  # clip paths are relative to it; default: the CSV's folder
    backend: str = "pyav"
    frame_stride: int = 1
    buckets: list[Bucket] = field(default_factory=lambda: [Bucket(resolution=256, num_frames=16, batch_size=1)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5625, 0.75, 1.0, 1.3333, 1.7778])
    size_multiple: int = 16  # VAE downsampling x patch size: bucket sides are multiples of it
    random_crop: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("pyav", "decord"):
            raise ConfigError(f"data.backend={self.backend!r} must be 'pyav' or 'decord'")
        if self.frame_stride < 1 or self.size_multiple < 1 or self.num_workers < 0:
            raise ConfigError("data.frame_stride and data.size_multiple must be >= 1, data.num_workers >= 0")
        if not self.buckets:
            raise ConfigError("data.buckets is empty: give at least one {resolution, num_frames, batch_size}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ConfigError("data.aspect_ratios must be positive height/width ratios")


def _preset(name: str) -> STDiTConfig:
    from .presets import model_preset  # presets import this module

    return model_preset(name)


def _default_train() -> CoreTrainConfig:
    # EMA 0.999 rather than Open-Sora's 0.9999: runs of a few thousand steps should sample from
    # averaged weights, not from weights still close to the initialisation.
    return CoreTrainConfig(out_dir="opensora-run", max_steps=100, precision="bf16", ema_decay=0.999,
                           optim=OptimConfig(lr=1e-4), schedule="constant", ckpt_every=50)


@dataclass(kw_only=True)
class OpenSoraConfig:
    """Everything ``opensora train`` needs; saved as opensora.yaml in the run folder.

    ``train`` is the core loop's config (steps, precision, engine "plain" or "gemini", optimizer,
    EMA, checkpoints, resume). ``sp`` ranks share each sample's patches (sequence parallelism);
    the remaining ranks of a torchrun job are data parallel.
    """

    preset: str = "debug"
    model: STDiTConfig = field(default_factory=lambda: _preset("debug"))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: CoreTrainConfig = field(default_factory=_default_train)
    text_encoder: Path | None = None  # local transformers folder with a T5 encoder and its tokenizer
    vae: Path | None = None  # local diffusers folder with an AutoencoderKL (or a video VAE)
    text_cache: Path | None = None  # on-disk cache of caption features
    vae_micro_batch: int = 8  # frames (per-frame VAE) or clips (video VAE) per VAE call
    vae_sample: bool = True  # latents drawn from the VAE posterior (Open-Sora); False: its mean
    sp: int = 1

    def __post_init__(self) -> None:
        if self.sp < 1 or self.vae_micro_batch < 1:
            raise ConfigError("sp and vae_micro_batch must be >= 1")
