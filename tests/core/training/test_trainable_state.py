"""load_trainable must refuse tensors whose shapes differ from the run's parameters.

Without the check the plain path's ``param.copy_`` broadcasts, so adapters of rank 1 would load
into a rank-4 run without a word (every row the same) and AdamW would step with moments of the
wrong shape.
"""

import pytest
import torch
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.gemini import OptimConfig
from ferryman.core.training import PlainEngine
from ferryman.core.training.trainable import load_trainable, save_trainable


def _engine(rank: int) -> PlainEngine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, rank, bias=False), nn.Linear(rank, 8, bias=False))  # a LoRA pair
    return PlainEngine(model, OptimConfig(lr=1e-2), torch.float32, torch.device("cpu"))


def test_trainable_state_of_another_shape_is_refused(tmp_path):
    saved = _engine(1)
    saved.backward(saved(torch.randn(2, 8)).square().mean())
    saved.step()
    save_trainable(saved, tmp_path)
    with pytest.raises(UserError, match="shape"):
        load_trainable(_engine(4), tmp_path)
