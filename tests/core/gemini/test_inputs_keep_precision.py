"""Gemini runs the forward under autocast, as the plain engine does: the model's fp32 inputs
(timesteps, coordinates) reach it unrounded."""

import pytest
import torch
from torch import nn

from ferryman.core.gemini import GeminiConfig, gemini
from ferryman.core.optim import OptimConfig
from ferryman.core.training.plain import PlainEngine


class _Echo(nn.Module):
    """Returns what it was given, next to a Linear so that autocast has an op to lower."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        return t, self.lin(x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fp32_inputs_are_not_rounded_to_the_compute_precision(precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    t, x = torch.tensor([999.0, 537.3, 0.1234567]), torch.randn(3, 4)
    engine = gemini(_Echo(), GeminiConfig(precision=precision, min_num_chunks=1), OptimConfig(), device=torch.device("cpu"))
    seen, out = engine(x, t)
    assert torch.equal(seen, t)  # 537.3 would be 536 in bf16
    assert out.dtype == dtype  # the Linear still ran in the compute precision
    plain_seen, plain_out = PlainEngine(_Echo(), OptimConfig(), dtype, torch.device("cpu"))(x, t)
    assert torch.equal(plain_seen, seen) and plain_out.dtype == out.dtype
