"""Typed configs for sd-finetune and sd-generate (saved as config.yaml beside every run)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.apps.diffusion.loss import LossConfig
from ferryman.core.errors import ConfigError
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.optim import OptimConfig
from ferryman.core.training import TrainConfig

PRECISIONS = ("fp32", "fp16", "bf16")


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


def finetune_train() -> TrainConfig:
    """sd-finetune's defaults for the core loop, the recipe of diffusers' text-to-image example
    (train_text_to_image.py and the command its README gives): lr 1e-5 held constant after the
    warm-up, AdamW betas (0.9, 0.999) decaying every parameter (norm scales and biases too) by
    1e-2, gradients clipped at norm 1.0, a checkpoint every 500 steps and all of them kept, EMA
    off (``--ema``: EMAModel's 0.9999 with its warm-up), fp32.

    sd-finetune writes its own config.yaml, loss curve and final output, so the loop's are off.
    """
    optim = OptimConfig(lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, no_decay_1d=False, max_grad_norm=1.0)
    return TrainConfig(
        out_dir="", max_steps=1000, precision="fp32", engine="plain", gemini=GeminiConfig(precision="fp32"),
        optim=optim, schedule="constant", warmup_steps=0, min_lr_ratio=0.0, ema_decay=0.0, ema_warmup=True,
        ckpt_every=500, ckpt_at_end=False, keep_last=0, log_every=10, plot=False, config_file="",
    )


@dataclass(kw_only=True)
class FinetuneConfig:
    """One sd-finetune run: the model, data, objective and outputs are sd-finetune's own fields;
    steps, learning rate, engine, precision, EMA, checkpoints, resume, seed and device are the
    core loop's (``train``, a TrainConfig with sd-finetune's defaults). The output folder is
    ``train.out_dir``."""

    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=finetune_train)
    train_text_encoder: bool = False
    batch_size: int = 1  # per process and micro-batch: one update sees batch_size x grad_accum x processes
    gradient_checkpointing: bool = False
    offload_frozen: bool = False  # keep VAE / frozen text encoder on the host between uses
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0: only at the end (when prompts are given)
    validation_inference_steps: int = 25

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.validation_every < 0 or self.validation_inference_steps < 1:
            raise ConfigError("validation_every must be >= 0 and validation_inference_steps >= 1")

    @property
    def out(self) -> str:
        return self.train.out_dir

    @property
    def use_lora(self) -> bool:
        return self.lora.rank > 0

    @property
    def use_ema(self) -> bool:
        return self.train.ema_decay > 0


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
