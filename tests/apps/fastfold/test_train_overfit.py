"""Regression: the tiny AF2 model, trained from the villin headpiece's sequence alone (a
single-sequence MSA) by `fastfold train`'s run on the core loop on CPU, learns its structure to
lDDT-Cα >= 0.8; and `fastfold predict --params <that run>` then predicts villin from its
sequence (scored independently: Biopython reads ranked_0.pdb, biotite computes lDDT-Cα).

One training run serves both tests (module fixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import VILLIN_SEQUENCE, openmm_villin_pdb

STEPS = 600  # ~100 s on 2 CPU cores (cosine LR from 1e-2 after 50 warm-up steps)
PREDICT_LDDT_BOUND = 0.9  # measured 0.988 (CPU, 2 cores); the training crop is the whole chain


@pytest.fixture(scope="module")
def villin_run(tmp_path_factory):
    from ferryman.apps.fastfold.train.config import FastfoldTrainConfig, TrainPresetConfig
    from ferryman.apps.fastfold.train.run import run
    from ferryman.core.optim import OptimConfig
    from ferryman.core.training import TrainConfig

    root = tmp_path_factory.mktemp("villin")
    (root / "structures").mkdir()
    (root / "structures" / "villin.pdb").write_text(openmm_villin_pdb())
    # The whole chain (35 residues), no recycling, no BERT masking: the one example is the target.
    preset = TrainPresetConfig(model="tiny", crop_size=64, max_msa_clusters=1, max_extra_msa=1, max_recycle=0,
                               masked_msa_fraction=0.0)  # fmt: skip
    train = TrainConfig(
        out_dir=str(root / "run"), max_steps=STEPS, precision="fp32", device="cpu", schedule="cosine",
        warmup_steps=50, optim=OptimConfig(lr=1e-2, max_grad_norm=1.0), progress=False, plot=False, log_every=50,
    )  # fmt: skip
    result, dataset = run(FastfoldTrainConfig(data=str(root / "structures"), preset=preset, train=train))
    return root, result, dataset


@pytest.mark.slow
def test_tiny_model_overfits_villin_to_lddt_0_8(villin_run):
    from ferryman.apps.fastfold.train.step import evaluate

    _, result, dataset = villin_run
    assert result.step == STEPS
    assert result.losses[-1] < result.losses[0] / 2
    metrics = evaluate(result.engine.module, dataset.example(0, seed=0), num_recycle=0)
    assert metrics["lddt_ca"] >= 0.8, metrics
    assert torch.isfinite(torch.tensor(result.losses)).all()


def _ca_array(path_or_text):
    """Cα atoms of chain A read by Biopython, as a biotite AtomArray."""
    import io

    import biotite.structure as struc
    from Bio.PDB import PDBParser

    handle = io.StringIO(path_or_text) if "\n" in str(path_or_text) else str(path_or_text)
    chain = PDBParser(QUIET=True).get_structure("x", handle)[0]["A"]
    cas = [r["CA"] for r in chain if r.id[0] == " "]
    atoms = struc.AtomArray(len(cas))
    atoms.coord = np.array([a.coord for a in cas], np.float32)
    atoms.res_id = np.arange(1, len(cas) + 1)
    atoms.atom_name[:], atoms.element[:], atoms.chain_id[:] = "CA", "C", "A"
    return atoms


@pytest.mark.slow
def test_predict_with_the_trained_run_recovers_villin(villin_run, tmp_path):
    import biotite.structure as struc

    from ferryman.apps.fastfold.cli import main

    root, _, _ = villin_run
    fasta = tmp_path / "villin.fasta"
    fasta.write_text(f">villin\n{VILLIN_SEQUENCE}\n")
    args = ["predict", str(fasta), "--params", str(root / "run"), "--msa-mode", "single-sequence", "--no-relax",
            "--no-plots", "--kernels", "torch", "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ranked = Path(tmp_path / "out" / "villin" / "ranked_0.pdb")
    predicted, true = _ca_array(ranked), _ca_array(openmm_villin_pdb())
    assert len(predicted) == len(true) == 35
    score = float(struc.lddt(true, predicted))
    print(f"lDDT-Ca of ranked_0.pdb against the true structure: {score:.3f}")
    assert score >= PREDICT_LDDT_BOUND, score
