"""A fastfold training run split over 2 gloo ranks with DAP equals the same run in one process:
the losses of every step and the trained weights."""

from __future__ import annotations

import pytest
import torch

from ferryman.apps.fastfold.train.config import train_preset
from ferryman.core.parallel import run_distributed

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb


def _config(data: str, out: str, dap: int):
    cfg = train_preset("debug")
    cfg.data, cfg.dap = data, dap
    cfg.preset.model, cfg.preset.crop_size = "tiny", 13  # odd: each rank's shard is padded
    cfg.preset.max_msa_clusters, cfg.preset.max_extra_msa = 3, 3
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.progress, cfg.train.plot = out, 2, False, False
    cfg.train.device, cfg.train.ckpt_every = "cpu", 0
    return cfg


def _train_on_rank(rank: int, world: int, data: str, out: str) -> dict:
    from ferryman.apps.fastfold.train.run import run
    from ferryman.core.parallel import init_parallel

    torch.set_num_threads(1)
    dims = init_parallel(dap=world) if world > 1 else None
    result, _ = run(_config(data, out, world), dims)
    return {"losses": result.losses, "weights": result.engine.state_dict()}


@pytest.mark.distributed
def test_two_rank_dap_training_equals_one_process(tmp_path):
    data = tmp_path / "structures"
    data.mkdir()
    (data / "villin.pdb").write_text(openmm_villin_pdb())
    single = _train_on_rank(0, 1, str(data), str(tmp_path / "one"))
    ranks = run_distributed(_train_on_rank, 2, str(data), str(tmp_path / "two"))
    for result in ranks:
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
        for name, value in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-3, atol=1e-5, msg=name)
    assert single["losses"][1] != single["losses"][0]  # the step changed the weights
