"""The one training loop shared by the apps, its engines, checkpoints, EMA and metrics."""

from ferryman.core.training.checkpoint import CheckpointStore
from ferryman.core.training.config import TrainConfig
from ferryman.core.training.engine import Engine
from ferryman.core.training.loop import StepInfo, TrainResult, build_engine, train
from ferryman.core.training.plain import PlainEngine

__all__ = ["CheckpointStore", "Engine", "PlainEngine", "StepInfo", "TrainConfig", "TrainResult", "build_engine", "train"]
