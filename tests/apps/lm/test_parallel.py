"""Two gloo processes (torchrun's environment) equal one process reading the same global batch.

Each process reads its rows of every global batch (``BlockLoader``); the plain engine averages the
gradients with DDP, Gemini shards chunks, gradients and AdamW state over the two (ZeRO) and gathers
them for the output, which rank 0 writes from both ranks' shards. The gradients are summed in
another order, so losses and weights agree to a few fp32 ulps (of the largest weight: a small
weight carries the rounding of the model's scale), not bit for bit; Adam's eps is 1e-4 so that a
weight whose gradient is zero but for rounding does not move by a whole learning rate either way.
"""

import pytest
import torch

from ferryman.apps.lm.train import finetune
from tests.tolerance import approx, resolution

from .conftest import lm_config

MEMORIES = ("plain", "gemini-auto")


def _worker(rank, world_size, configs):
    out = {}
    for memory, cfg in configs.items():
        result = finetune(cfg, progress=False)
        chunks = getattr(result.engine, "chunks", [])
        sizes = (sum(c.shard_numel for c in chunks), sum(c.numel for c in chunks))
        out[memory] = (result.losses, result.evals, result.engine.state_dict(), result.is_main, sizes)
    return out


def _config(models, sample_data, out, memory, batch_size):
    return lm_config(models["llama"], out, sample_data / "sums.txt", memory=memory, max_steps=3, max_grad_norm=0.0,
                     eps=1e-4, batch_size=batch_size)


@pytest.mark.distributed
def test_two_processes_equal_one_with_the_same_global_batch(models, sample_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from ferryman.core.parallel import run_distributed

    one = {m: finetune(_config(models, sample_data, tmp_path / f"one-{m}", m, 2), progress=False) for m in MEMORIES}
    configs = {m: _config(models, sample_data, tmp_path / f"two-{m}", m, 1) for m in MEMORIES}
    ranks = run_distributed(_worker, 2, configs, timeout_s=300)
    for memory in MEMORIES:
        expected = one[memory].engine.state_dict()
        scale = max(v.abs().max().item() for v in expected.values())
        for rank, runs in enumerate(ranks):
            losses, evals, state, is_main, _ = runs[memory]
            assert is_main == (rank == 0)
            assert losses == approx(one[memory].losses, ulps=8), (memory, rank)
            assert [e["eval_loss"] for e in evals] == approx([e["eval_loss"] for e in one[memory].evals], ulps=8)
            for name, value in expected.items():
                torch.testing.assert_close(state[name], value, rtol=0, atol=8 * resolution() * scale, msg=f"{memory} {name}")
        written = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"two-{memory}")).state_dict()
        for name, value in written.items():
            assert torch.equal(value, ranks[0][memory][2][name]), (memory, name)
    for runs in ranks:  # ZeRO: each rank keeps half of every chunk
        shard, full = runs["gemini-auto"][4]
        assert 2 * shard == full > 0
