"""What one update of the plain engine reports and does, against values computed outside it: the
gradient norm before clipping, the gradients clipped to ``max_grad_norm`` (below 1, above the
norm, and 0 = off), the step's record with no gradient at all, and trainable-only checkpoints
and full checkpoints refused with the names and shapes their one-line messages promise, a full
fp16 checkpoint's loss scaler restored, and the EMA checkpoint of a weight tied under three names."""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import PlainEngine, train
from ferryman.core.training.trainable import load_trainable, save_trainable
from tests.core.training.test_loop import Net, _cfg
from tests.core.training.test_loop_values import _ordered_loader
from tests.core.training.test_plain_engine import _engine as _plain_engine
from tests.core.training.test_plain_engine import _steps

CPU = torch.device("cpu")
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _loss(module: nn.Module) -> torch.Tensor:
    return (10 * module(X)).square().sum()  # gradients far above norm 1


def _raw_grads() -> tuple[list[torch.Tensor], float]:
    """The gradients and their global L2 norm, from a second copy of the model (no engine)."""
    model = _model()
    _loss(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return grads, float(torch.cat([g.double().flatten() for g in grads]).norm())


@pytest.mark.parametrize("max_norm", [0.5, 0.0, 1e9])
def test_the_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_clipping_is_reported(max_norm):
    grads, raw = _raw_grads()
    assert raw > 100
    engine = PlainEngine(_model(), OptimConfig(lr=0.1, max_grad_norm=max_norm, betas=(0.9, 0.999)), torch.float32, CPU)
    engine.backward(_loss(engine))
    result = engine.step()
    assert set(result) == {"grad_norm", "skipped", "loss_scale"}
    assert result["grad_norm"] == pytest.approx(raw, rel=1e-6)  # before clipping, whatever the bound
    assert (result["skipped"], result["loss_scale"]) == (0.0, 1.0)  # fp32: no scaler
    # torch scales every gradient by max_norm / (norm + 1e-6) when that is below 1; 0 turns clipping off
    factor = max_norm / (raw + 1e-6) if 0 < max_norm < raw else 1.0
    for p, g in zip(engine.module.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-5, atol=0)
        # AdamW's first moment after one step: (1 - beta1) * the (clipped) gradient
        torch.testing.assert_close(engine.optimizer.state[p]["exp_avg"], 0.1 * g * factor, rtol=1e-5, atol=0)
    clipped = float(torch.cat([p.grad.double().flatten() for p in engine.module.parameters()]).norm())
    assert clipped == pytest.approx(min(raw, max_norm) if max_norm > 0 else raw, rel=1e-5)


def test_an_update_without_any_gradient_reports_norm_zero_and_moves_nothing():
    engine = PlainEngine(_model(), OptimConfig(lr=0.1, max_grad_norm=1.0, weight_decay=0.1), torch.float32, CPU)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    assert engine.step() == {"grad_norm": 0.0, "skipped": 0.0, "loss_scale": 1.0}
    assert all(torch.equal(p, before[n]) for n, p in engine.module.named_parameters())
    assert engine.stats() == {"loss_scale": 1.0}


def test_a_trainable_checkpoint_names_at_most_three_parameters_this_run_lacks(tmp_path):
    save_trainable(PlainEngine(nn.Sequential(nn.Linear(2, 2)), OptimConfig(), torch.float32, CPU), tmp_path)
    grown = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))  # six more
    with pytest.raises(UserError) as err:
        load_trainable(PlainEngine(grown, OptimConfig(), torch.float32, CPU), tmp_path)
    assert str(err.value) == (f"{tmp_path}: the trainable parameters differ from this run's (only in the "
                              "checkpoint: [], only in this run: ['1.bias', '1.weight', '2.bias'])")


def test_a_trainable_checkpoint_without_moments_and_of_another_shape_is_refused(tmp_path):
    """Written before the first update: the weights alone carry the shape."""
    save_trainable(PlainEngine(nn.Linear(4, 3), OptimConfig(), torch.float32, CPU), tmp_path)
    wider = PlainEngine(nn.Linear(4, 5), OptimConfig(), torch.float32, CPU)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: bias has shape \[3\] in the checkpoint but "
                                        r"\[5\] in this run \(was it written with another adapter rank or model\?\)$"):
        load_trainable(wider, tmp_path)


class ThreeTied(Net):
    """One weight under three names (input, output and a side layer), as a model may tie more than a pair."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.side = nn.Linear(6, 6)
        self.out.weight = self.side.weight = self.inp.weight


def test_the_ema_checkpoint_of_a_weight_tied_under_three_names_holds_all_three(tmp_path):
    """safetensors refuses tensors that share memory: every name after the first gets its own copy."""
    cfg = _cfg(tmp_path, "plain", max_steps=1, grad_accum=1, plot=False, ema_decay=0.5)
    result = train(cfg, ThreeTied, _ordered_loader, lambda engine, batch: engine(batch[0]).square().mean())
    saved = load_file(result.last_checkpoint / "ema.safetensors")
    assert set(saved) == {f"{layer}.{kind}" for layer in ("inp", "out", "side") for kind in ("weight", "bias")}
    for name in ("inp.weight", "out.weight", "side.weight"):
        assert torch.equal(saved[name], result.ema_state_dict["inp.weight"]), name


def test_a_full_fp16_checkpoint_restores_the_loss_scaler_and_the_moments(tmp_path):
    engine = _plain_engine(torch.float16)
    _steps(engine, 3, overflow_first=True)  # an overflow halves the scale; then two calm steps
    engine.save(tmp_path)
    resumed = _plain_engine(torch.float16)
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == engine.scaler.state_dict()
    assert (resumed.scaler.get_scale(), resumed.scaler.state_dict()["_growth_tracker"]) == (32768.0, 2)
    for p, q in zip(engine.module.parameters(), resumed.module.parameters(), strict=True):
        mine, theirs = engine.optimizer.state[p], resumed.optimizer.state[q]
        assert set(theirs) == {"step", "exp_avg", "exp_avg_sq"} and theirs["step"].dtype == torch.float32
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert _steps(resumed, 2) == _steps(engine, 2)


def test_a_full_checkpoint_of_a_larger_model_names_three_of_its_unexpected_weights(tmp_path):
    big = PlainEngine(nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]), OptimConfig(), torch.float32, CPU)
    big.save(tmp_path)
    small = PlainEngine(nn.Sequential(nn.Linear(2, 2)), OptimConfig(), torch.float32, CPU)
    with pytest.raises(UserError) as err:  # six unexpected weights: the first three, sorted
        small.load(tmp_path)
    assert str(err.value) == (f"{tmp_path}/model.safetensors does not fit this model: missing [], "
                              "unexpected ['1.bias', '1.weight', '2.bias']")


def test_named_views_refuse_a_list_of_another_length():
    """An EMA shadow from another model must not be paired with this model's names by position."""
    engine = PlainEngine(_model(), OptimConfig(), torch.float32, CPU)
    flat = engine.master_tensors()
    assert set(engine.named_from(flat)) == {"weight", "bias"}
    with pytest.raises(ValueError, match="zip"):
        engine.named_from(flat[:1])
    with pytest.raises(ValueError, match="zip"):
        engine.named_from([*flat, flat[0]])
