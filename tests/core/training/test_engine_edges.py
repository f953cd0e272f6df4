"""The plain engine and trainable-only state at their edges: the autocast dtype each precision
computes in, keyword arguments reaching the model, a parameter left out of an update staying where
it is, files written into folders that do not exist yet, and the frozen-base fingerprint's
tolerance (0.1 % of the larger sum, at least 1e-3) on both sides of its bound."""

import json
import warnings

import pytest
import torch
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import PlainEngine
from ferryman.core.training.trainable import FORMAT, load_trainable, save_trainable

CPU = torch.device("cpu")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)  # used only when asked

    def forward(self, x, *, scale=1.0, side=False):
        out = self.lin(x) * scale
        return out + self.side(x) if side else out


def _engine(dtype=torch.float32, model=None, **optim) -> PlainEngine:
    torch.manual_seed(0)
    return PlainEngine(model or Scaled(), OptimConfig(lr=0.1, **optim), dtype, CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_forward_computes_in_the_engine_precision(dtype):
    engine = _engine(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 must not ask autocast for a dtype it does not support
        assert engine(torch.randn(2, 4)).dtype == dtype  # autocast to bf16/fp16, none for fp32


def test_keyword_arguments_reach_the_model():
    engine = _engine()
    x = torch.randn(2, 4)
    assert torch.equal(engine(x, scale=3.0), engine.module(x, scale=3.0))
    assert torch.equal(engine(x, side=True), engine.module(x, side=True))


def test_a_parameter_left_out_of_an_update_is_not_moved_by_it():
    engine = _engine(weight_decay=0.1)
    x = torch.randn(2, 4)
    engine.backward(engine(x, side=True).square().mean())  # both layers get gradients and moments
    engine.step()
    engine.zero_grad()
    side = engine.module.side.weight.detach().clone()
    engine.backward(engine(x).square().mean())  # the side layer takes no part
    engine.step()
    assert engine.module.side.weight.grad is None
    assert torch.equal(engine.module.side.weight, side)  # no momentum step, no weight decay


def test_state_is_written_into_folders_that_do_not_exist_yet(tmp_path):
    engine = _engine()
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine.step()
    engine.save(tmp_path / "full" / "nested")
    save_trainable(engine, tmp_path / "trainable" / "nested")
    assert (tmp_path / "full" / "nested" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "trainable" / "nested" / "trainable.json").read_text())
    assert meta["format"] == FORMAT == "ferryman-trainable-1" and meta["engine"] == "plain"


def _frozen_base(weight: float) -> PlainEngine:
    """A frozen 1x1 layer holding ``weight`` (its fingerprint sum) and a trained head."""
    base = nn.Linear(1, 1, bias=False).requires_grad_(False)
    base.weight.fill_(weight)
    return _engine(model=nn.Sequential(base, nn.Linear(1, 1)))


# (the frozen weight in this run, the sum the checkpoint recorded, accepted?)
EDGES = [
    (1000.0, 999.0, True),  # a difference of exactly 1e-3 x 1000: still the same base
    (1000.0, 998.9, False),
    (1000.0, 1000.5, True),
    (1000.0, 1001.0005, True),  # the bound is taken from the larger sum (the checkpoint's here)...
    (1000.0, 999.0005, True),  # ...or this run's
    (1000.0, 1002.5, False),
    (0.0, 0.0005, True),  # near zero the bound is 1e-3, not 0.1 % of nothing
    (0.0, 0.0015, False),
]


@pytest.mark.parametrize(("weight", "recorded", "accepted"), EDGES)
def test_the_frozen_fingerprint_tolerance_on_both_sides_of_its_bound(tmp_path, weight, recorded, accepted):
    save_trainable(_frozen_base(weight), tmp_path)
    meta = json.loads((tmp_path / "trainable.json").read_text())
    assert meta["frozen"] == {"0.weight": [[1, 1], weight]}
    meta["frozen"]["0.weight"][1] = recorded
    (tmp_path / "trainable.json").write_text(json.dumps(meta))
    if accepted:
        load_trainable(_frozen_base(weight), tmp_path)
    else:
        with pytest.raises(UserError, match=r"frozen base weights differ from the checkpoint's \(at 0\.weight\)"):
            load_trainable(_frozen_base(weight), tmp_path)
