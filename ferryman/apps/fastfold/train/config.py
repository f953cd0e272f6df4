"""Training presets of AlphaFold2 (Jumper et al. 2021, Suppl. 1.11 and Table 4) and ``debug``.

Table 4: initial training crops 256 residues, 128 MSA clusters, 1024 extra sequences, learning
rate 1e-3 after a linear warm-up, 78k steps of 128 samples; fine-tuning crops 384 residues with
512 clusters and 5120 extra sequences at half the learning rate, and switches on the violation
and experimentally-resolved losses. Both clip gradients at global norm 0.1 and keep a 0.999
weight EMA; recycling iterations are drawn uniformly from 0..3 per step (Suppl. 1.10).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ferryman.apps.fastfold.data.transforms import InputConfig
from ferryman.apps.fastfold.loss import LossWeights
from ferryman.apps.fastfold.train.crop import CROP_MODES
from ferryman.core.errors import ConfigError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import TrainConfig

TRAIN_PRESETS = ("debug", "initial", "finetune")


@dataclass(kw_only=True)
class TrainPresetConfig:
    """What the data pipeline and the loss do per step; the model preset is a name of presets.py."""

    model: str = "model_1_ptm"
    crop_size: int = 256
    crop_mode: str = "contiguous"  # contiguous | spatial
    max_msa_clusters: int = 128
    max_extra_msa: int = 1024
    max_recycle: int = 3  # each step runs uniform(0..max_recycle) recycling iterations
    fape_clamp_prob: float = 0.9  # Suppl. 1.11.5: 10% of the batches use unclamped backbone FAPE
    masked_msa_fraction: float = 0.15
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if self.crop_size < 1 or self.max_msa_clusters < 1 or self.max_extra_msa < 0 or self.max_recycle < 0:
            raise ConfigError("crop_size and max_msa_clusters must be >= 1, max_extra_msa and max_recycle >= 0")
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"crop_mode={self.crop_mode!r} must be one of {', '.join(CROP_MODES)}")
        if not 0.0 <= self.fape_clamp_prob <= 1.0:
            raise ConfigError(f"fape_clamp_prob={self.fape_clamp_prob} must lie in [0, 1]")

    def input_config(self) -> InputConfig:
        return InputConfig(max_msa_clusters=self.max_msa_clusters, max_extra_msa=self.max_extra_msa,
                           max_templates=0, masked_msa_replace_fraction=self.masked_msa_fraction)  # fmt: skip


@dataclass(kw_only=True)
class FastfoldTrainConfig:
    """A whole ``fastfold train`` run: data, the preset and the core loop's settings."""

    data: str = ""
    msa_dir: str | None = None  # alignments named <structure stem>.a3m/.sto; single sequence otherwise
    dap: int = 1  # dynamic axial parallelism group size (processes started with torchrun)
    activation_checkpointing: bool = False
    kernels: str | None = None  # auto | triton | torch (Triton kernels or the PyTorch reference); None: the model preset's
    preset: TrainPresetConfig = field(default_factory=TrainPresetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.kernels not in (None, "auto", "triton", "torch"):
            raise ConfigError(f"kernels={self.kernels!r} must be 'auto', 'triton' or 'torch'")
        if self.dap < 1:
            raise ConfigError(f"dap={self.dap} must be at least 1")


def _finetune_weights() -> LossWeights:
    return LossWeights(experimentally_resolved=0.01, violation=1.0, tm=0.1)


def train_preset(name: str) -> FastfoldTrainConfig:
    """The run config of a training preset: 'debug', 'initial' or 'finetune'."""
    optim = OptimConfig(lr=1e-3, max_grad_norm=0.1)
    if name == "initial":
        preset = TrainPresetConfig()
        train = TrainConfig(max_steps=78_000, warmup_steps=1000, optim=optim, ema_decay=0.999, schedule="constant")
    elif name == "finetune":
        preset = TrainPresetConfig(crop_size=384, max_msa_clusters=512, max_extra_msa=5120, weights=_finetune_weights())
        optim = dataclasses.replace(optim, lr=5e-4)
        train = TrainConfig(max_steps=12_000, optim=optim, ema_decay=0.999, schedule="constant")
    elif name == "debug":
        preset = TrainPresetConfig(model="debug", crop_size=64, max_msa_clusters=16, max_extra_msa=32, max_recycle=1)
        train = TrainConfig(max_steps=20, precision="fp32", optim=OptimConfig(lr=1e-3, max_grad_norm=1.0),
                            schedule="constant", ckpt_every=10)  # fmt: skip
    else:
        raise ConfigError(f"unknown training preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    # one config per run folder: fastfold_train.yaml, the whole run, which --config reads back
    return FastfoldTrainConfig(preset=preset, train=dataclasses.replace(train, config_file=""))
