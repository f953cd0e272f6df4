"""predict() under DAP on 2 gloo ranks: rank 0 alone writes, and the structure matches one process."""

from pathlib import Path

import numpy as np
import pytest

from ferryman.core.parallel import run_distributed

DATA = Path(__file__).parents[3] / "data" / "fastfold"

OPTIONS = dict(
    random_weights=True, msa_mode="single-sequence", models=["model_1_ptm"], relax=False, plots=False, kernels="torch", num_recycles=1,
    max_msa_clusters=6, max_extra_msa=6, msa_dir=DATA / "msas", progress=False, seed=3,
)  # fmt: skip


def _predict_on_rank(rank: int, world_size: int, out: str) -> dict:
    from ferryman.apps.fastfold.predict import predict
    from ferryman.core.parallel import init_parallel

    dims = init_parallel(dap=world_size)
    return predict([DATA / "hbb_human.fasta"], out, dims=dims, **OPTIONS)


def _ca(pdb: Path) -> np.ndarray:
    from Bio.PDB import PDBParser

    structure = PDBParser(QUIET=True).get_structure("x", pdb)
    return np.array([r["CA"].coord for r in structure[0]["A"]])


@pytest.mark.distributed
def test_dap_prediction_matches_single_process(tmp_path):
    from ferryman.apps.fastfold.predict import predict

    single, dap = tmp_path / "single", tmp_path / "dap"
    predict([DATA / "hbb_human.fasta"], single, **OPTIONS)
    results = run_distributed(_predict_on_rank, 2, str(dap))
    assert results[0]["HBB_HUMAN"]["order"] == ["model_1_ptm"]
    assert "order" not in results[1]["HBB_HUMAN"]  # rank 1 computed but wrote nothing
    assert results[0]["HBB_HUMAN"]["mean_plddt"] == pytest.approx(results[1]["HBB_HUMAN"]["mean_plddt"])
    single_ca = _ca(single / "HBB_HUMAN" / "ranked_0.pdb")
    dap_ca = _ca(dap / "HBB_HUMAN" / "ranked_0.pdb")
    assert np.abs(single_ca - dap_ca).max() < 1e-2  # PDB keeps 3 decimals; sums differ in order only
    assert sorted(p.name for p in (dap / "HBB_HUMAN").iterdir()) == sorted(
        p.name for p in (single / "HBB_HUMAN").iterdir()
    )
