"""The one training loop shared by the apps, its engines, checkpoints, EMA and metrics."""

from ferryman.core.training.config import TrainConfig
from ferryman.core.training.loop import TrainResult, build_engine, train
from ferryman.core.training.plain import PlainEngine

__all__ = ["PlainEngine", "TrainConfig", "TrainResult", "build_engine", "train"]
