"""Regression: the tiny AF2 model, trained from the villin headpiece's sequence alone (a
single-sequence MSA) with the core loop on CPU, learns its structure to lDDT-Cα >= 0.8."""

from __future__ import annotations

import pytest
import torch

from ferryman.apps.fastfold.model import build_model
from ferryman.apps.fastfold.train.config import TrainPresetConfig
from ferryman.apps.fastfold.train.dataset import StructureDataset
from ferryman.apps.fastfold.train.step import evaluate, make_loss_fn
from ferryman.core.gemini.config import OptimConfig
from ferryman.core.training import TrainConfig, train

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb

STEPS = 600  # ~100 s on 2 CPU cores (cosine LR from 1e-2 after 50 warm-up steps)


@pytest.mark.slow
def test_tiny_model_overfits_villin_to_lddt_0_8(tmp_path):
    data = tmp_path / "structures"
    data.mkdir()
    (data / "villin.pdb").write_text(openmm_villin_pdb())
    # The whole chain (35 residues), no recycling, no BERT masking: the one example is the target.
    preset = TrainPresetConfig(model="tiny", crop_size=64, max_msa_clusters=1, max_extra_msa=1, max_recycle=0,
                               masked_msa_fraction=0.0)  # fmt: skip
    dataset = StructureDataset.from_folder(data, preset)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=STEPS, precision="fp32", device="cpu", schedule="cosine",
        warmup_steps=50, optim=OptimConfig(lr=1e-2, max_grad_norm=1.0), progress=False, plot=False, log_every=50,
    )  # fmt: skip
    result = train(cfg, lambda: build_model("tiny"), lambda: dataset, make_loss_fn(preset.weights))
    assert result.step == STEPS
    assert result.losses[-1] < result.losses[0] / 2
    metrics = evaluate(result.engine.module, dataset.example(0, seed=0), num_recycle=0)
    assert metrics["lddt_ca"] >= 0.8, metrics
    assert torch.isfinite(torch.tensor(result.losses)).all()
