"""Every bad TrainConfig value is refused with a message naming the field and what it accepts,
and every value at the edge of what is allowed is accepted."""

import pytest

from ferryman.core.errors import ConfigError
from ferryman.core.training import TrainConfig

BAD = [
    ({"precision": "fp8"}, "precision='fp8' is not one of ['bf16', 'fp16', 'fp32']"),
    ({"engine": "deepspeed"}, "engine='deepspeed' must be 'plain' or 'gemini'"),
    ({"schedule": "linear"}, "schedule='linear' must be 'cosine' or 'constant'"),
    ({"device": "tpu"}, "device='tpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cuda:x"}, "device='cuda:x' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"max_steps": 0}, "max_steps, grad_accum and log_every must be at least 1"),
    ({"grad_accum": 0}, "max_steps, grad_accum and log_every must be at least 1"),
    ({"log_every": 0}, "max_steps, grad_accum and log_every must be at least 1"),
    ({"ema_decay": 1.0}, "ema_decay=1.0 must lie in [0, 1)"),
    ({"ema_decay": -0.1}, "ema_decay=-0.1 must lie in [0, 1)"),
    ({"warmup_steps": -1}, "warmup_steps, ckpt_every, keep_last and stop_after must be >= 0"),
    ({"ckpt_every": -1}, "warmup_steps, ckpt_every, keep_last and stop_after must be >= 0"),
    ({"keep_last": -1}, "warmup_steps, ckpt_every, keep_last and stop_after must be >= 0"),
    ({"stop_after": -1}, "warmup_steps, ckpt_every, keep_last and stop_after must be >= 0"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5 must lie in [0, 1]"),
    ({"min_lr_ratio": -0.5}, "min_lr_ratio=-0.5 must lie in [0, 1]"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[str(f) for f, _ in BAD])
def test_a_bad_value_is_named_with_what_is_accepted(fields, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**fields)
    assert str(err.value) == message


@pytest.mark.parametrize("fields", [
    {"precision": "fp16"}, {"engine": "gemini"}, {"schedule": "constant"}, {"device": "cuda:1"}, {"device": "cpu"},
    {"device": "cuda"}, {"device": "auto"},
    {"max_steps": 1, "grad_accum": 1, "log_every": 1}, {"ema_decay": 0.0}, {"ema_decay": 0.9999},
    {"warmup_steps": 0, "ckpt_every": 0, "keep_last": 0, "stop_after": 0}, {"min_lr_ratio": 0.0}, {"min_lr_ratio": 1.0},
])
def test_values_at_the_edges_are_accepted(fields):
    cfg = TrainConfig(**fields)
    assert all(getattr(cfg, k) == v for k, v in fields.items())
