"""A run stopped and resumed with --resume latest repeats the uninterrupted run exactly: losses,
held-out evaluations, every weight (full finetune under Gemini) and every adapter weight (LoRA
with trainable-only checkpoints, plain engine), and the logs keep one line per step."""

import json

import pytest
import torch

from ferryman.apps.lm.train import finetune

from .conftest import lm_config


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("memory", "lora_rank"), [("gemini-auto", 0), ("plain", 4)])
def test_resume_latest_repeats_the_uninterrupted_run(models, sample_data, tmp_path, memory, lora_rank):
    common = dict(memory=memory, lora_rank=lora_rank, max_steps=4, eval_every=1, ckpt_every=1)
    data = sample_data / "sums.jsonl"
    straight = finetune(lm_config(models["opt"], tmp_path / "straight", data, **common), progress=False)
    out = tmp_path / "resumed"
    first = finetune(lm_config(models["opt"], out, data, stop_after=3, **common), progress=False)
    # back to step 2 (as after a crash before step 3's checkpoint): step 3's log lines must not stay twice
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    second = finetune(lm_config(models["opt"], out, data, resume="latest", **common), progress=False)
    assert first.losses == straight.losses[:3]
    assert second.losses == straight.losses[2:]
    assert first.evals[:2] + second.evals == straight.evals
    want, got = straight.engine.export_trainable(), second.engine.export_trainable()
    for name, value in want.values.items():
        assert torch.equal(got.values[name], value), name
        assert torch.equal(got.moments[name]["exp_avg_sq"], want.moments[name]["exp_avg_sq"]), name
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in _lines(out / "eval.jsonl")] == [1, 2, 3, 4]
    assert _lines(out / "eval.jsonl") == _lines(tmp_path / "straight" / "eval.jsonl")


def test_a_stale_temporary_checkpoint_from_a_crash_is_not_resumed(models, sample_data, tmp_path):
    """A crash while writing step 3 leaves .tmp-step-00000003 (half a checkpoint): --resume latest
    continues from step 2 and the run rewrites step 3 in full."""
    out = tmp_path / "run"
    common = dict(max_steps=3, ckpt_every=1)
    straight = finetune(lm_config(models["opt"], tmp_path / "straight", sample_data / "sums.txt", **common), progress=False)
    finetune(lm_config(models["opt"], out, sample_data / "sums.txt", stop_after=2, **common), progress=False)
    stale = out / "checkpoints" / ".tmp-step-00000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    resumed = finetune(lm_config(models["opt"], out, sample_data / "sums.txt", resume="latest", **common), progress=False)
    assert resumed.losses == straight.losses[2:]
    assert not stale.exists() and (out / "checkpoints" / "step-00000003" / "trainer.json").is_file()
