"""Both engines implement the ``Engine`` protocol member by member, and trainable state crosses engines."""

import inspect

import pytest
import torch
from torch import nn

from ferryman.core.gemini import GeminiConfig, GeminiEngine, gemini
from ferryman.core.optim import OptimConfig
from ferryman.core.training import Engine, PlainEngine
from ferryman.core.training.trainable import load_trainable, save_trainable

MEMBERS = [m for m in vars(Engine) if not m.startswith("_") or m == "__call__"]
ATTRIBUTES = list(Engine.__annotations__)


def _defined(cls, name):
    """The member as the class itself defines it (not a fallback from object or a __getattr__)."""
    for klass in cls.__mro__:
        if klass is object:
            break
        if name in vars(klass):
            return vars(klass)[name]
    return None


@pytest.mark.parametrize("cls", [PlainEngine, GeminiEngine])
def test_every_protocol_method_is_defined_with_the_protocol_signature(cls):
    for name in MEMBERS:
        want, have = vars(Engine)[name], _defined(cls, name)
        assert have is not None, f"{cls.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(have, property) and have.fset is not None, f"{cls.__name__}.{name} must be a settable property"
        elif callable(want):
            assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def _engines() -> list:
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    return [PlainEngine(_model(), optim, torch.float32, torch.device("cpu")),
            gemini(_model(), GeminiConfig(placement="static", precision="fp32", min_num_chunks=2), optim)]


def test_engines_have_the_protocol_attributes():
    for engine in _engines():
        for name in ATTRIBUTES:
            assert name in dir(engine), f"{type(engine).__name__} lacks the attribute {name}"


@pytest.mark.parametrize(("source", "target"), [(0, 1), (1, 0)])
def test_trainable_state_moves_between_engines_bit_for_bit(tmp_path, source, target):
    engines = _engines()
    writer, reader = engines[source], engines[target]
    for _ in range(2):
        writer.backward(writer(torch.randn(4, 8)).square().mean())
        writer.step()
        writer.zero_grad()
    save_trainable(writer, tmp_path)
    load_trainable(reader, tmp_path)
    want, got = writer.export_trainable(), reader.export_trainable()
    assert all(torch.equal(want.values[n], got.values[n]) for n in want.values)
    for name, moment in want.moments.items():
        assert moment["step"] == got.moments[name]["step"] == 2.0
        assert all(torch.equal(moment[k], got.moments[name][k]) for k in ("exp_avg", "exp_avg_sq"))
    batch = torch.randn(4, 8)
    assert torch.equal(writer(batch), reader(batch))
