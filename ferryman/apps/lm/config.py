"""Typed configs of `ferryman finetune` (saved as config.yaml in every run) and `ferryman generate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.core.errors import ConfigError
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.optim import OptimConfig
from ferryman.core.training import TrainConfig

SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class DataConfig:
    """Text to train on: a .txt, .jsonl or .parquet file, or a folder of them.

    A .txt file is one document. A .jsonl line or parquet row holds ``text_field``, or
    ``prompt_field`` and ``completion_field`` (the loss then covers the completion only, unless
    ``train_on_prompt``). Documents are tokenized, each closed with the end-of-sequence token,
    concatenated and cut into blocks of ``seq_len`` tokens (the remainder is dropped), as
    transformers' run_clm.py packs them. ``eval_fraction`` of the blocks are held out for the
    evaluation loss, unless ``eval_path`` names held-out text of its own.
    """

    path: str = ""
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    train_on_prompt: bool = False
    seq_len: int = 512
    eval_fraction: float = 0.05
    eval_path: str = ""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} (--seq-len) must be at least 2: a block predicts its next tokens")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} (--eval-fraction) must lie in [0, 1)")
        if not self.text_field or not self.prompt_field or not self.completion_field:
            raise ConfigError("data.text_field, data.prompt_field and data.completion_field must not be empty")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) through peft; rank 0 trains every weight instead."""

    rank: int = 0
    alpha: float = 0.0  # 0: twice the rank (a scale of 2, the usual LLM recipe)
    dropout: float = 0.0
    targets: str = "all-linear"  # peft's target_modules: "all-linear" (every Linear but the output layer) or names, comma-separated

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.rank and lora.alpha must be >= 0 and lora.dropout in [0, 1)")
        if not self.targets.strip():
            raise ConfigError("lora.targets must name modules, or be 'all-linear'")

    @property
    def scale_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


def finetune_train() -> TrainConfig:
    """The core loop's defaults for causal LM finetuning, Hugging Face Trainer's recipe: AdamW
    betas (0.9, 0.999), eps 1e-8, no weight decay, gradients clipped at norm 1.0; here with a
    cosine decay to 10% after the warm-up, bf16 compute with fp32 master weights, a checkpoint where
    the run stops and the last two kept.

    Gemini keeps its chunks in the model's registration order: repacking them in the order the
    first step used them gathers the whole model on every rank once, which the lazy loading
    avoids, and a decoder's modules run in registration order anyway. config.yaml is written by
    the app (it holds more than the loop's config).
    """
    optim = OptimConfig(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
    return TrainConfig(
        out_dir="", max_steps=1000, precision="bf16", engine="plain", optim=optim, schedule="cosine",
        gemini=GeminiConfig(precision="bf16", reorder_after_warmup=False), warmup_steps=0, min_lr_ratio=0.1,
        ckpt_every=0, ckpt_at_end=True, keep_last=2, log_every=1, plot=True, config_file="",
    )


@dataclass(kw_only=True)
class FinetuneConfig:
    """One `ferryman finetune` run. The model folder, data, adapters and outputs are the app's
    fields; steps, learning rate, engine (--memory), precision, checkpoints, resume, seed and
    device are the core loop's, under ``train``. The output folder is ``train.out_dir``."""

    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=finetune_train)
    batch_size: int = 8  # blocks per process and micro-batch: one update sees batch_size x grad_accum x processes
    gradient_checkpointing: bool = False
    eval_every: int = 0  # evaluate every N updates; 0: only at the end
    save_dtype: str = "auto"  # weights of the output: auto (the base model's dtype), fp32, bf16, fp16
    max_shard_mb: int = 2000  # output shards of at most this many MB (10^6 bytes)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} (--batch-size) must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} (--eval-every) must be >= 0")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype={self.save_dtype!r} (--save-dtype) must be one of {', '.join(SAVE_DTYPES)}")
        if self.max_shard_mb < 1:
            raise ConfigError(f"max_shard_mb={self.max_shard_mb} must be >= 1")
        if self.train.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision={self.train.precision!r} must be fp32 or bf16 (fp16 loss scaling is not offered here)")

    @property
    def out(self) -> str:
        return self.train.out_dir

    @property
    def use_lora(self) -> bool:
        return self.lora.rank > 0


@dataclass(kw_only=True)
class GenerateConfig:
    model: str = ""  # a finetune output, a transformers model folder, or a LoRA adapter folder
    base: str = ""  # LoRA: the base model folder (default: the one the adapter names)
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} (--max-new-tokens) must be >= 1")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r} must be fp32 or bf16")
