"""The plain engine's own state: the fp16 loss scaler, eval mode, checkpoints written before any
step, and the one-line errors of its loaders (trainable-only and full checkpoints).

Each value is checked against what it must be for the inputs given, in both the fp16 setting (a
live loss scaler) and fp32 (none), so a scaler field read under the wrong key or a default that
differs from "no scaler" shows up.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import PlainEngine
from ferryman.core.training.trainable import load_trainable, save_trainable

CPU = torch.device("cpu")


def _engine(dtype=torch.float32, model=None) -> PlainEngine:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    return PlainEngine(model, OptimConfig(lr=1e-2), dtype, CPU)


def _steps(engine: PlainEngine, n: int, *, overflow_first: bool = False) -> list[float]:
    torch.manual_seed(2)  # the same dropout masks for every engine compared
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i in range(n):
        x = torch.randn(3, 4, generator=gen) * (1e4 if overflow_first and i == 0 else 1.0)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses


def test_fp16_scaler_state_is_exported_saved_and_restored(tmp_path):
    engine = _engine(torch.float16)
    _steps(engine, 3, overflow_first=True)  # an overflow halves the scale; then two calm steps
    assert engine.stats() == {"loss_scale": 32768.0}
    state = engine.export_trainable()
    assert (state.scale, state.calm_steps) == (32768.0, 2)

    folder = tmp_path / "run" / "checkpoint-2"  # parents are created
    save_trainable(engine, folder)
    meta = json.loads((folder / "trainable.json").read_text())
    assert meta["format"] == "ferryman-trainable-1" and meta["engine"] == "plain"
    assert meta["scaler"] == {"scale": 32768.0, "calm_steps": 2}
    assert meta["steps"] == {"0.weight": 2.0, "0.bias": 2.0, "2.weight": 2.0, "2.bias": 2.0}
    assert meta["frozen"] == {}

    resumed = _engine(torch.float16)
    load_trainable(resumed, folder)
    assert resumed.scaler.state_dict() == engine.scaler.state_dict()
    assert _steps(resumed, 2) == _steps(engine, 2)


def test_without_a_scaler_the_state_says_scale_one_and_no_calm_steps(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    assert engine.stats() == {"loss_scale": 1.0}
    state = engine.export_trainable()
    assert (state.scale, state.calm_steps) == (1.0, 0)


def test_eval_switches_dropout_off_and_train_back_on():
    engine = _engine()
    x = torch.ones(2, 4)
    assert engine.eval() is engine and not engine.module.training
    assert torch.equal(engine(x), engine(x))
    assert engine.train() is engine and engine.module.training


def test_state_dict_round_trip():
    engine, other = _engine(), _engine(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    _steps(engine, 1)
    other.load_state_dict(engine.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.module.parameters(), engine.module.parameters()))


def test_ema_views_come_back_in_fp32():
    engine = _engine()
    named = {n: p.detach().to(torch.bfloat16) for n, p in engine.module.named_parameters()}
    flat = engine.flat_from(named)
    assert [t.dtype for t in flat] == [torch.float32] * 4
    assert all(torch.equal(t, named[n].float()) for t, (n, _) in zip(flat, engine.named))


def test_checkpoints_of_an_engine_that_never_stepped(tmp_path):
    """A run checkpointed before its first update (or with a parameter no loss reached) has no
    optimizer state for some parameters; saving and resuming must still work."""
    engine = _engine()
    assert engine.export_trainable().moments == {}
    engine.save(tmp_path / "full" / "step-0")
    save_trainable(engine, tmp_path / "trainable")
    full, trainable = _engine(), _engine()
    full.load(tmp_path / "full" / "step-0")
    load_trainable(trainable, tmp_path / "trainable")
    assert _steps(full, 2) == _steps(trainable, 2) == _steps(engine, 2)


def _frozen_engine(first_layer: nn.Linear | None = None, *extra_frozen: nn.Module) -> PlainEngine:
    torch.manual_seed(0)
    model = nn.Sequential(first_layer or nn.Linear(4, 6, bias=False), nn.Linear(6, 2), *extra_frozen)
    model[0].requires_grad_(False)  # the frozen "base"
    for module in extra_frozen:
        module.requires_grad_(False)
    return PlainEngine(model, OptimConfig(lr=1e-2), torch.float32, CPU)


def test_trainable_checkpoint_refuses_another_frozen_base(tmp_path):
    engine = _frozen_engine()
    _steps_frozen(engine)
    save_trainable(engine, tmp_path)
    assert json.loads((tmp_path / "trainable.json").read_text())["frozen"] == {
        "0.weight": [[6, 4], pytest.approx(float(engine.module[0].weight.double().sum()))]}
    load_trainable(_frozen_engine(), tmp_path)  # the same base: fine

    other = _frozen_engine()
    with torch.no_grad():
        other.module[0].weight.mul_(1.5)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: this run's frozen base weights differ "
                                        r"from the checkpoint's \(at 0\.weight\); resume with the base model"):
        load_trainable(other, tmp_path)

    # Same numbers, transposed: the sum cannot tell, the shape must.
    first = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        first.weight.copy_(engine.module[0].weight.T)
    with pytest.raises(UserError, match=r"frozen base differs from the checkpoint's \(at 0\.weight\); resume with the base model the run started from$"):
        load_trainable(_frozen_engine(first), tmp_path)


def test_trainable_checkpoint_refuses_a_base_with_another_frozen_parameter(tmp_path):
    engine = _frozen_engine()
    save_trainable(engine, tmp_path)
    grown = _frozen_engine(None, nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"frozen base differs from the checkpoint's \(at 2\.bias\)"):
        load_trainable(grown, tmp_path)
    fewer = _frozen_engine()
    meta = json.loads((tmp_path / "trainable.json").read_text())
    meta["frozen"]["9.weight"] = [[1], 0.0]  # a frozen weight this run does not have
    (tmp_path / "trainable.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"frozen base differs from the checkpoint's \(at 9\.weight\)"):
        load_trainable(fewer, tmp_path)


def _steps_frozen(engine):
    engine.backward(engine(torch.randn(3, 4)).square().mean())
    engine.step()
    engine.zero_grad()


def test_trainable_checkpoint_errors_name_the_folder_and_the_parameters(tmp_path):
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: no trainable.json; not a trainable-only checkpoint$"):
        load_trainable(_engine(), tmp_path)

    wide = PlainEngine(nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)]), OptimConfig(), torch.float32, CPU)
    save_trainable(wide, tmp_path)
    narrow = PlainEngine(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, bias=False)), OptimConfig(), torch.float32, CPU)
    narrow.module.add_module("head", nn.Linear(4, 1))
    message = (f"{tmp_path}: the trainable parameters differ from this run's (only in the checkpoint: "
               "['1.bias', '2.bias', '2.weight'], only in this run: ['head.bias', 'head.weight'])")
    with pytest.raises(UserError) as err:  # at most three names of each kind: the message stays one line
        load_trainable(narrow, tmp_path)
    assert str(err.value) == message


def test_trainable_checkpoint_with_moments_of_another_shape_is_refused(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    save_trainable(engine, tmp_path)
    tensors = load_file(tmp_path / "trainable.safetensors")
    tensors["exp_avg.2.weight"] = torch.zeros(4, 2)  # the weight fits, its moment does not
    save_file(tensors, tmp_path / "trainable.safetensors")
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: 2\.weight has shape .* in this run \(was it "
                                        r"written with another adapter rank or model\?\)$"):
        load_trainable(_engine(), tmp_path)


def test_full_checkpoint_errors_name_the_file(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: no model.safetensors; not a checkpoint of the plain engine$"):
        engine.load(tmp_path)
    engine.save(tmp_path)
    frozen_head = _engine()
    frozen_head.module[2].bias.requires_grad_(False)
    frozen_head = PlainEngine(frozen_head.module, OptimConfig(), torch.float32, CPU)
    with pytest.raises(UserError) as err:
        frozen_head.load(tmp_path)
    assert str(err.value) == f"{tmp_path}/optimizer.json: the trainable parameters differ from this model's"


# safetensors' load_model returns the missing keys as sets: slicing one ended in a TypeError
# traceback instead of this one line (found by the mutation job).
def test_full_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    engine = _engine()
    _steps(engine, 1)
    engine.save(tmp_path)

    shorter = PlainEngine(nn.Sequential(nn.Linear(4, 4)), OptimConfig(), torch.float32, CPU)  # only unexpected keys
    with pytest.raises(UserError) as err:
        shorter.load(tmp_path)
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/model.safetensors does not fit this model: missing \[\], "
                        r"unexpected \['2\.(weight|bias)', '2\.(weight|bias)'\]", str(err.value))
    longer = PlainEngine(nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 2), nn.Linear(2, 2),
                                       nn.Linear(2, 2), nn.Linear(2, 2)), OptimConfig(), torch.float32, CPU)
    with pytest.raises(UserError) as err:  # only missing keys, six of them: three are named
        longer.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}/model.safetensors does not fit this model: missing [")
    assert len(re.findall(r"'[345]\.(weight|bias)'", str(err.value))) == 3
