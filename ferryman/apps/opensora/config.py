"""Typed configs of the opensora app: model sizes, run options, diffusion, data and training.

Every config is a frozen keyword-only dataclass: a changed setting is a new config
(``dataclasses.replace``), never an edit of one already built. ``resolve`` builds the config of a
command from its sources (preset, config file, flags, ``--set``), the preset first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferryman.core.config import layered, nest, override_layers, parse_override, read_mapping, to_dict
from ferryman.core.errors import ConfigError
from ferryman.core.optim import OptimConfig
from ferryman.core.training.config import TrainConfig as CoreTrainConfig
from ferryman.kernels.backend import BACKENDS

from .model.config import STDiTConfig
from .presets import model_preset

APP_CONFIG = "opensora.yaml"  # a run's saved config, in its run folder

__all__ = ["APP_CONFIG", "Bucket", "DataConfig", "DiffusionConfig", "OpenSoraConfig", "RuntimeConfig", "STDiTConfig", "resolve"]


@dataclass(kw_only=True, frozen=True)
class RuntimeConfig:
    """How a built STDiT runs; none of it changes the weights, so a checkpoint loads under any of it.

    ``attention_backend``/``norm_backend``: the fused Triton kernels or the PyTorch references
    (``auto``: Triton on CUDA). ``grad_checkpointing``: recompute each block in the backward pass.
    """

    attention_backend: str = "auto"
    norm_backend: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("attention_backend", "norm_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ConfigError(f"runtime.{name}={getattr(self, name)!r} must be one of {', '.join(BACKENDS)}")


@dataclass(kw_only=True, frozen=True)
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
    # Share of training captions replaced by the learned null caption, so that classifier-free
    # guidance has an unconditioned prediction to push away from (Open-Sora's class_dropout_prob).
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"diffusion.caption_dropout={self.caption_dropout} must lie in [0, 1)")
        if self.kind not in ("rflow", "ddpm"):
            raise ConfigError(f"diffusion.kind={self.kind!r} must be 'rflow' or 'ddpm'")
        if self.num_timesteps < 1 or self.logit_normal_scale <= 0 or self.shift_scale <= 0:
            raise ConfigError("diffusion.num_timesteps, logit_normal_scale and shift_scale must be positive")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("diffusion needs 0 < beta_start < beta_end < 1")


@dataclass(kw_only=True, frozen=True)
class Bucket:
    """One bucket: frames of about ``resolution``^2 pixels, ``num_frames`` long, ``batch_size`` per batch."""

    resolution: int = 256
    num_frames: int = 16
    batch_size: int = 1

    def __post_init__(self) -> None:
        if min(self.resolution, self.num_frames, self.batch_size) < 1:
            raise ConfigError(f"bucket {self}: resolution, num_frames and batch_size must be >= 1")


@dataclass(kw_only=True, frozen=True)
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


def _default_train() -> CoreTrainConfig:
    # EMA 0.999 rather than Open-Sora's 0.9999: runs of a few thousand steps should sample from
    # averaged weights, not from weights still close to the initialisation.
    # config_file="": the run folder holds one config, opensora.yaml (APP_CONFIG), that --config reads back
    return CoreTrainConfig(out_dir="opensora-run", max_steps=100, precision="bf16", ema_decay=0.999, config_file="",
                           optim=OptimConfig(lr=1e-4), schedule="constant", ckpt_every=50)


@dataclass(kw_only=True, frozen=True)
class OpenSoraConfig:
    """Everything ``opensora train`` needs; saved as opensora.yaml in the run folder.

    ``train`` is the core loop's config (steps, precision, engine "plain" or "gemini", optimizer,
    EMA, checkpoints, resume). ``sp`` ranks share each sample's patches (sequence parallelism);
    the remaining ranks of a torchrun job are data parallel.
    """

    preset: str = "debug"  # the sizes ``model`` started from (see ``resolve``)
    model: STDiTConfig = field(default_factory=lambda: model_preset("debug"))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
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


# Fields that older run folders kept under ``model`` (sizes and run options were one section).
_MOVED = {"attention_backend": ("runtime", "attention_backend"), "norm_backend": ("runtime", "norm_backend"),
          "grad_checkpointing": ("runtime", "grad_checkpointing"), "class_dropout_prob": ("diffusion", "caption_dropout")}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config mapping in today's sections (a run folder from before the split still samples)."""
    model = data.get("model")
    if not isinstance(model, dict) or not set(model) & set(_MOVED):
        return data
    out = {**data, "model": {k: v for k, v in model.items() if k not in _MOVED}}
    for old, (section, name) in _MOVED.items():
        if old in model and isinstance(out.get(section, {}), dict):
            out[section] = {**out.get(section, {}), name: model[old]}
    return out


def _explicit(data: dict[str, Any], preset: str) -> dict[str, Any]:
    """A config file's mapping without the model fields that merely repeat the file's own preset.

    A saved opensora.yaml lists every model size; those equal to its preset came from the preset,
    so a different preset chosen by flag or ``--set`` replaces them, while fields the user changed
    (they differ from the file's preset) still win.
    """
    own, model = data.get("preset"), data.get("model")
    if own is None or str(own) == preset or not isinstance(model, dict):
        return data
    try:
        implied = to_dict(model_preset(str(own)))
    except ConfigError:
        return data
    return {**data, "model": {k: v for k, v in model.items() if implied.get(k) != v}}


def resolve(*, config_file: Path | None = None, flags: dict[str, Any] | None = None,
            overrides: tuple[str, ...] = ()) -> OpenSoraConfig:
    """The config of a command: preset sizes <- config file <- flags <- ``--set``, validated once.

    The preset is settled first, from the last source naming one (the file's ``preset``, then
    ``flags["preset"]``, then ``--set preset=...``), and gives the model sizes whichever source
    named it; model fields given explicitly in any source override them. ``flags`` maps dotted
    keys to values, None meaning "not given".
    """
    flags = flags or {}
    data = migrate(read_mapping(config_file)) if config_file is not None else {}
    named = [data.get("preset"), flags.get("preset")]
    named += [value for key, value in map(parse_override, overrides) if key == ["preset"]]
    given = [str(name) for name in named if name is not None]
    preset = given[-1] if given else "debug"
    base = OpenSoraConfig(preset=preset, model=model_preset(preset))
    layers = [(f"config file {config_file}", _explicit(data, preset))] if config_file is not None else []
    for key, value in flags.items():
        if value is not None:
            layers.append(("", nest(key, str(value) if isinstance(value, Path) else value)))
    return layered(base, layers + override_layers(overrides))
