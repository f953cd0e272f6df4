"""Typed configs for sd-finetune and sd-generate (saved as config.yaml beside every run)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.apps.diffusion.loss import LossConfig
from ferryman.core.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
MEMORY_MODES = ("plain", "gemini-auto", "gemini-offload")


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""
    caption_column: str = "text"
    image_column: str = ""  # empty: the first of file_name, image, path, file that exists
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    on_bad: str = "skip"  # a missing/unreadable image: "skip" (counted) or "error"
    num_workers: int = 0
    # DreamBooth (Ruiz et al. 2023): every image under `path` gets `instance_prompt`; class images
    # from `class_path` get `class_prompt` and feed the prior-preservation term.
    instance_prompt: str = ""
    class_path: str = ""
    class_prompt: str = ""

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution={self.resolution} must be a positive multiple of 8")
        if self.on_bad not in ("skip", "error"):
            raise ConfigError(f"data.on_bad={self.on_bad!r} must be 'skip' or 'error'")
        if bool(self.class_path) != bool(self.class_prompt):
            raise ConfigError("data.class_path and data.class_prompt go together (DreamBooth prior preservation)")
        if self.class_path and not self.instance_prompt:
            raise ConfigError("DreamBooth needs data.instance_prompt when data.class_path is set")


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 0  # 0: full finetune, no LoRA
    alpha: float = 0.0  # 0: same as rank (scale 1)

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha < 0:
            raise ConfigError("lora.rank and lora.alpha must be >= 0")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything one sd-finetune run needs; flags set the common fields, --set the rest."""

    model: str = ""
    out: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_text_encoder: bool = False
    max_steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    ema: bool = False
    ema_decay: float = 0.9999
    precision: str = "fp32"  # of the UNet's compute (autocast) and the frozen modules' weights
    gradient_checkpointing: bool = False
    memory: str = "plain"  # plain | gemini-auto | gemini-offload (Gemini placement of the trained model)
    offload_frozen: bool = False  # keep VAE / frozen text encoder on the host between uses
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500  # 0: no intermediate checkpoints
    checkpoints_total_limit: int = 0  # 0: keep all
    resume: str = ""  # "", "latest" or a checkpoint-N folder
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0: only at the end (when prompts are given)
    validation_inference_steps: int = 25
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.memory not in MEMORY_MODES:
            raise ConfigError(f"memory={self.memory!r} must be one of {MEMORY_MODES}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} must be 'constant' or 'cosine'")
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("checkpoint_every", "checkpoints_total_limit", "validation_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in [0, 1)")

    @property
    def use_lora(self) -> bool:
        return self.lora.rank > 0


@dataclass(kw_only=True)
class GenerateConfig:
    model: str = ""
    out: str = ""
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    lora: str = ""  # a folder or file with LoRA weights to load onto the model
    num_images: int = 1  # per prompt
    height: int = 0  # 0: the model's native size
    width: int = 0
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = ""  # "": the model's own; or ddim, euler, euler-a, dpm++, pndm
    precision: str = "fp16"  # fp16 on GPU; on CPU it falls back to fp32
    attention: str = "sdpa"  # sdpa (torch fused) | ferryman (ferryman.kernels) | eager
    offload: str = "none"  # none | model (one component on the device at a time) | sequential
    vae_tiling: bool = False
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.offload not in ("none", "model", "sequential"):
            raise ConfigError(f"offload={self.offload!r} must be none, model or sequential")
        if self.attention not in ("sdpa", "ferryman", "eager"):
            raise ConfigError(f"attention={self.attention!r} must be sdpa, ferryman or eager")
        if self.num_images < 1 or self.steps < 1:
            raise ConfigError("num_images and steps must be >= 1")
        if self.height % 8 or self.width % 8:
            raise ConfigError(f"height={self.height} and width={self.width} must be multiples of 8")
