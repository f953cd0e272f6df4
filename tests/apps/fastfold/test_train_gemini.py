"""fastfold training under Gemini (chunked heterogeneous memory) equals plain PyTorch training in
fp32 within one process: moving parameters and optimizer state must not change the numbers."""

from __future__ import annotations

import pytest
import torch

from ferryman.apps.fastfold.train.config import train_preset
from ferryman.apps.fastfold.train.run import run

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb


def _train(data, out, engine: str):
    cfg = train_preset("debug")
    cfg.data, cfg.preset.model, cfg.preset.crop_size = str(data), "tiny", 16
    cfg.train.out_dir, cfg.train.engine, cfg.train.max_steps = str(out), engine, 3
    cfg.train.progress, cfg.train.plot, cfg.train.ckpt_every = False, False, 0
    result, _ = run(cfg)
    assert type(result.engine).__name__ == {"plain": "PlainEngine", "gemini": "GeminiEngine"}[engine]
    return result.losses, result.engine.state_dict()


def test_gemini_training_equals_plain(tmp_path):
    data = tmp_path / "structures"
    data.mkdir()
    (data / "villin.pdb").write_text(openmm_villin_pdb())
    plain_losses, plain_weights = _train(data, tmp_path / "plain", "plain")
    gemini_losses, gemini_weights = _train(data, tmp_path / "gemini", "gemini")
    assert gemini_losses == pytest.approx(plain_losses, rel=1e-5)
    # Adam turns gradients of ~1e-12 into full-size steps, so a bias whose gradient is rounding
    # noise may move by ~1e-6 differently; every update is up to lr * steps = 3e-3.
    for name, value in plain_weights.items():
        torch.testing.assert_close(gemini_weights[name], value, rtol=1e-5, atol=1e-5, msg=name)
