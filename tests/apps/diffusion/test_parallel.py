"""sd-finetune data parallel: 2 gloo processes equal one process reading the same global batch.

Each of the 2 processes reads half of every global batch (data.Share) and keeps its rows of the
global batch's noise draw; DDP (plain) or Gemini's reduce-scatter averages the gradients. One
process with batch size 4 therefore takes the same steps, up to the summation order of the
gradients. The checkpoint (with EMA) and the validation render gather Gemini's shards on both
ranks while rank 0 writes: a collective called on rank 0 alone would hang here.

Adam's eps is 1e-4 instead of 1e-8 on both sides: some gradients are zero but for rounding (a
conv bias before a GroupNorm), and Adam's first step moves such a weight by +-lr whatever the
size of its gradient, so a different summation order flips it; with eps 1e-4 those moves stay
proportional to their (tiny) gradients. Every weight must then agree to 8 fp32 eps of the largest
weight of the model (about 1.0; measured: 1.5 eps at most): a small tensor such as a norm bias
moved from 0 carries the rounding of its gradient's sum, which is relative to the model's scale,
not its own.
"""

import json

import pytest
import torch

from ferryman.apps.diffusion.train import finetune
from tests.tolerance import approx, resolution

from .conftest import tiny_config

COMMON = dict(max_steps=2, ckpt_every=2, ema_decay=0.9, precision="fp32", eps=1e-4, validation_prompts=["a red circle"],
              validation_every=2, validation_inference_steps=2)


def _worker(rank, world_size, configs):
    results = {}
    for name, cfg in configs.items():
        result = finetune(cfg, progress=False)
        results[name] = (result.losses, result.model.state_dict(), result.is_main)
    return results


def _grad_norms(out) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from ferryman.core.parallel import run_distributed

    one = finetune(tiny_config(tiny_model, tmp_path / "one", batch_size=4, **COMMON), progress=False)
    configs = {memory: tiny_config(tiny_model, tmp_path / memory, batch_size=2, memory=memory, **COMMON)
               for memory in ("plain", "gemini-auto")}
    ranks = run_distributed(_worker, 2, configs, timeout_s=240)
    expected = one.model.state_dict()
    initial = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet").state_dict()
    moved = max((expected[f"unet.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3  # two steps moved the weights by far more than the tolerance below
    scale = max(value.abs().max().item() for value in expected.values())
    for rank, runs in enumerate(ranks):
        for memory, (losses, state, is_main) in runs.items():
            assert is_main == (rank == 0)
            assert losses == approx(one.losses, ulps=8), (rank, memory)
            for name, value in expected.items():  # the EMA weights: the run's result
                torch.testing.assert_close(state[name], value, rtol=0, atol=8 * resolution() * scale,
                                           msg=f"{rank} {memory} {name}")
    for memory in configs:
        out = tmp_path / memory
        # the gradient norm is taken before Adam normalises: a sum over ranks instead of a mean shows here
        assert _grad_norms(out) == approx(_grad_norms(tmp_path / "one"), ulps=64), memory
        written = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").state_dict()
        for name, value in written.items():
            assert torch.equal(value, ranks[0][memory][1][f"unet.{name}"]), (memory, name)
        assert (out / "checkpoint-2" / "unet_ema" / "config.json").is_file()
        assert (out / "validation" / "step-000002.png").is_file()
