"""Regression: the first losses of the ``debug`` training preset on the villin headpiece (fp32, CPU,
seed 0) against values stored when the training pipeline was written. A change here means the
data pipeline, the model's initialisation, the loss or the optimizer changed its numbers."""

from __future__ import annotations

import pytest

from ferryman.apps.fastfold.train.config import train_preset
from ferryman.apps.fastfold.train.run import run

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb

# fastfold train --preset debug, 3 steps on villin (torch 2.13 CPU, PyTorch reference kernels); the loss falls step by step.
DEBUG_LOSSES = [9.195919036865234, 8.986371040344238, 8.869972229003906]


def test_debug_preset_loss_curve_matches_stored_values(tmp_path):
    data = tmp_path / "structures"
    data.mkdir()
    (data / "villin.pdb").write_text(openmm_villin_pdb())
    cfg = train_preset("debug")
    cfg.data, cfg.train.out_dir = str(data), str(tmp_path / "run")
    cfg.kernels = "torch"  # the reference ops: the Triton interpreter would take minutes on CPU
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.progress, cfg.train.plot = 3, 0, False, False
    result, _ = run(cfg)
    assert result.losses == pytest.approx(DEBUG_LOSSES, rel=1e-4)
