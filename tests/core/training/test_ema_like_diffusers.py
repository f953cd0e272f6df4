"""The loop's EMA warm-up against diffusers' EMAModel itself (not against ema_decay_at).

diffusers' EMAModel.step increments optimization_step first and get_decay(1) returns 0.0 (the
shadow becomes the weights of the first update); from update 2 on both give k / (9 + k).
"""

import pytest
import torch

from ferryman.core.training import train
from tests.core.training.test_loop import Net, _cfg, _loader, _loss
from tests.tolerance import assert_close


def test_ema_warmup_matches_diffusers_emamodel(tmp_path):
    training_utils = pytest.importorskip("diffusers.training_utils")
    weights = []

    def on_step(info):
        weights.append([t.clone() for t in info.engine.master_tensors()])

    cfg = _cfg(tmp_path, "plain", max_steps=2, grad_accum=1, ema_warmup=True, plot=False, ckpt_at_end=False)
    torch.manual_seed(0)
    reference = Net()  # the loop seeds the same way before build_model: the same initial weights
    result = train(cfg, Net, _loader, _loss, on_step=on_step)
    ema = training_utils.EMAModel(reference.parameters(), decay=0.9)  # (1 + s) / (10 + s) warm-up, s = step - 1
    for now in weights:
        with torch.no_grad():
            for param, value in zip(reference.parameters(), now):
                param.copy_(value)
        ema.step(reference.parameters())
    for (name, _), expected in zip(reference.named_parameters(), ema.shadow_params):
        assert_close(result.ema_state_dict[name], expected, ulps=4)
