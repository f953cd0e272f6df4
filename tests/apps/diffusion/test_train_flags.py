"""sd-finetune takes the training flags every Ferryman app shares, with the core's meaning.

Each flag must land on the field of the embedded core TrainConfig that core/cli documents;
``--memory gemini-auto`` must really train on Gemini; ``--grad-accum 2`` with half the batch must
take the steps one full batch takes.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ferryman.apps.diffusion.cli import EMA_DECAY, finetune_main
from tests.tolerance import resolution

from .conftest import SAMPLES


@pytest.fixture
def captured(monkeypatch):
    """The FinetuneConfig the command hands to ``finetune``, without running it."""
    from ferryman.apps.diffusion import train

    seen = []

    def fake(cfg, *, progress=True):
        seen.append(cfg)
        return train.FinetuneResult(out=Path(cfg.out), is_main=False)

    monkeypatch.setattr(train, "finetune", fake)
    return seen


def _run(args, seen):
    result = CliRunner().invoke(finetune_main, ["--model", "m", "--data", "d", "--out", "o", *args])
    assert result.exit_code == 0, result.output
    return seen.pop()


def test_shared_flags_land_on_the_core_train_config(captured):
    cfg = _run(["--max-steps", "7", "--checkpoint-every", "3", "--resume", "latest", "--memory", "gemini-offload",
                "--precision", "bf16", "--grad-accum", "2", "--lr", "2e-4"], captured)
    train = cfg.train
    assert (train.max_steps, train.ckpt_every, train.resume, train.precision, train.grad_accum) == (7, 3, "latest", "bf16", 2)
    assert train.optim.lr == 2e-4 and train.out_dir == "o"
    assert (train.engine, train.gemini.placement, train.gemini.param_host_fraction,
            train.gemini.optim_host_fraction) == ("gemini", "static", 1.0, 1.0)
    # sd-finetune's own defaults (diffusers' script) stay where no flag was given
    assert (train.schedule, train.keep_last, train.optim.weight_decay, train.optim.no_decay_1d) == ("constant", 0, 1e-2, False)

    cfg = _run(["--memory", "gemini-auto", "--resume", "runs/x/checkpoint-20"], captured)
    assert (cfg.train.engine, cfg.train.gemini.placement, cfg.train.resume) == ("gemini", "auto", "runs/x/checkpoint-20")
    assert _run(["--memory", "plain"], captured).train.engine == "plain"


def test_set_reaches_the_core_fields_and_wins_over_flags(captured, tmp_path):
    assert _run(["--set", "train.optim.lr=1e-4"], captured).train.optim.lr == 1e-4
    assert _run(["--lr", "3e-4", "--set", "train.optim.lr=1e-4"], captured).train.optim.lr == 1e-4
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  max_steps: 5\n  ema_decay: 0.999\n  optim:\n    lr: 0.5\n")
    cfg = _run(["--config", str(config), "--max-steps", "9"], captured)
    assert (cfg.train.max_steps, cfg.train.optim.lr, cfg.train.ema_decay) == (9, 0.5, 0.999)
    assert _run(["--config", str(config), "--ema"], captured).train.ema_decay == 0.999  # --ema keeps a given decay
    assert _run(["--config", str(config), "--no-ema"], captured).train.ema_decay == 0.0
    assert _run(["--ema"], captured).train.ema_decay == EMA_DECAY
    assert _run(["--ema-decay", "0.95"], captured).train.ema_decay == 0.95
    assert _run([], captured).train.ema_decay == 0.0  # EMA off unless asked for
    result = CliRunner().invoke(finetune_main, ["--set", "max_steps=4"])  # the old flat key: refused, in one line
    assert result.exit_code == 2 and "unknown config key 'max_steps'" in result.output


def _final_unet(out):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").state_dict()


def _losses(out) -> list[float]:
    with open(out / "loss.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_grad_accum_with_half_the_batch_on_gemini_equals_the_full_batch(tiny_model, tmp_path):
    """Two steps; the accumulated run also proves --memory gemini-auto trains on Gemini. Adam's
    eps is 1e-4 for the reason test_parallel.py gives (gradients that are zero but for rounding)."""
    common = ["--model", str(tiny_model), "--data", str(SAMPLES), "--resolution", "32", "--center-crop",
              "--max-steps", "2", "--lr", "1e-3", "--no-progress", "--set", "train.optim.eps=1e-4"]
    runner = CliRunner()
    full, accum = tmp_path / "full", tmp_path / "accum"
    result = runner.invoke(finetune_main, [*common, "--out", str(full), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(finetune_main, [*common, "--out", str(accum), "--batch-size", "2", "--grad-accum", "2",
                                           "--memory", "gemini-auto", "--checkpoint-every", "2"])
    assert result.exit_code == 0, result.output
    state = json.loads((accum / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["engine"] == "gemini" and (accum / "checkpoint-2" / "engine" / "gemini.json").is_file()
    assert "8 images with captions" in result.output and "trained to step 2" in result.output
    # loss.csv keeps 6 digits: compare at that precision; the weights to 8 fp32 eps of the largest one
    assert _losses(accum) == pytest.approx(_losses(full), rel=1e-5)
    expected, actual = _final_unet(full), _final_unet(accum)
    scale = max(v.abs().max().item() for v in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=8 * resolution() * scale, msg=name)
