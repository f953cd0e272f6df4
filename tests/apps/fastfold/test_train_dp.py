"""``fastfold train`` under torchrun is data-parallel: 2 gloo ranks split each epoch's structures,
train like one process that accumulates the same global batch, and only rank 0 writes the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ferryman.apps.fastfold.train.config import TrainPresetConfig
from tests.tolerance import approx, assert_close

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb

_ARGS = ["--preset", "debug", "--model", "tiny", "--crop-size", "13", "--max-recycle", "0", "--no-progress",
         "--max-steps", "2", "--checkpoint-every", "1", "--device", "cpu", "--set", "train.plot=false",
         "--set", "preset.max_msa_clusters=3", "--set", "preset.max_extra_msa=3"]  # fmt: skip


def _structures(folder: Path) -> Path:
    """Two different chains: the villin headpiece and its first 24 residues."""
    folder.mkdir()
    pdb = openmm_villin_pdb()
    (folder / "villin.pdb").write_text(pdb)
    head = [line for line in pdb.splitlines() if line.startswith("ATOM") and int(line[22:26]) <= 24]
    (folder / "villin_head.pdb").write_text("\n".join(head) + "\nEND\n")
    return folder


def _cli_train(rank: int, world: int, data: str, out: str, *extra: str) -> str:
    from ferryman.apps.fastfold.cli import main

    result = CliRunner().invoke(main, ["train", "--data", data, "--out", out, *_ARGS, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _run(out: Path) -> tuple[list[float], list[float], torch.Tensor, set[str]]:
    """Logged losses and gradient norms, the last checkpoint's weights (one flat vector) and
    every file of the run folder."""
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    flat = torch.cat([weights[name].flatten() for name in sorted(weights)])
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], flat, files


@pytest.mark.distributed
def test_two_data_parallel_ranks_equal_one_process_over_the_global_batch(tmp_path):
    from ferryman.core.parallel import run_distributed

    data = str(_structures(tmp_path / "structures"))
    single_output = _cli_train(0, 1, data, str(tmp_path / "one"), "--grad-accum", "2")
    outputs = run_distributed(_cli_train, 2, data, str(tmp_path / "two"))
    (losses, norms, weights, files), (dp_losses, dp_norms, dp_weights, dp_files) = (
        _run(tmp_path / "one"), _run(tmp_path / "two"))  # fmt: skip

    assert len(losses) == 2 and losses[1] != losses[0]
    # the loss and the gradient (its norm: AdamW would hide a sum in place of the mean over ranks)
    # averaged over the ranks equal those averaged over the accumulated micro-batches
    assert dp_losses == approx(losses, ulps=16) and dp_norms == approx(norms, ulps=16)
    # within fp32 ulps of the largest weight: the gradients of some biases are rounding noise
    # (softmax is blind to a shift), which AdamW's normalisation turns into different small values
    assert_close(dp_weights, weights, ulps=16)
    # only rank 0 writes: the run folder is one process's, plus rank 1's RNG state in each checkpoint
    rank1 = {f"checkpoints/step-0000000{s}/rng-rank00001.{ext}" for s in (1, 2) for ext in ("safetensors", "json")}
    assert dp_files == files | rank1
    assert "trained 2 steps on 2 structure(s)" in outputs[0] and "trained" in single_output
    assert outputs[1] == ""


def test_data_parallel_ranks_take_their_own_share_of_every_epoch():
    """Rank r of R reads places r, R + r, ... of the one epoch order (with its seeds), padded so that
    every rank reads as many; with one rank it is the whole order."""
    from ferryman.apps.fastfold.train import dataset as ds

    class Probe(ds.StructureDataset):
        def example(self, index: int, seed: int):  # which chain, with which seed: no features needed
            return index, seed

    chains = ["a", "b", "c", "d", "e"]
    preset = TrainPresetConfig(model="tiny")

    def epoch(dp_rank: int, dp: int) -> list[tuple[int, int]]:
        torch.manual_seed(7)  # the loop seeds each epoch's iter
        return list(Probe(chains, preset, dp_rank=dp_rank, dp=dp))

    whole = epoch(0, 1)
    assert sorted(i for i, _ in whole) == [0, 1, 2, 3, 4] and len({s for _, s in whole}) == 5
    shares = [epoch(r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    assert [x for pair in zip(*shares) for x in pair][:5] == whole  # interleaved, they are the one order
    assert shares[1][-1][0] == whole[0][0]  # the sixth place repeats the first chain (new seed)
    assert epoch(1, 2) == shares[1]  # and it is the same every time the epoch is replayed
    assert np.all(np.diff([s for _, s in shares[0]]) == 2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        Probe(chains, preset, dp_rank=2, dp=2)


@pytest.mark.distributed
def test_dap_groups_split_the_global_batch_like_data_parallel_ranks(tmp_path):
    """--dap 2 on 4 ranks: 2 data-parallel groups of 2 DAP ranks. Each group reads its own share
    (both its DAP ranks the same examples), and the run equals one process over the global batch."""
    from ferryman.core.parallel import run_distributed

    data = str(_structures(tmp_path / "structures"))
    _cli_train(0, 1, data, str(tmp_path / "one"), "--grad-accum", "2")
    run_distributed(_cli_train, 4, data, str(tmp_path / "four"), "--dap", "2", timeout_s=240)
    (losses, norms, weights, _), (dp_losses, dp_norms, dp_weights, _) = _run(tmp_path / "one"), _run(tmp_path / "four")
    assert dp_losses == approx(losses, ulps=16) and dp_norms == approx(norms, ulps=16)
    assert_close(dp_weights, weights, ulps=16)
