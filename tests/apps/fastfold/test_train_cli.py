"""``fastfold train`` end to end on a folder holding the real villin headpiece and a corrupt file."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main
from ferryman.apps.fastfold.train.config import TRAIN_PRESETS, train_preset

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import openmm_villin_pdb

_FAST = ["--preset", "debug", "--model", "tiny", "--crop-size", "24", "--max-recycle", "1", "--no-progress",
         "--set", "preset.max_msa_clusters=2", "--set", "preset.max_extra_msa=2"]  # fmt: skip


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_train_writes_checkpoints_metrics_and_curves_and_resumes(tmp_path):
    from PIL import Image

    data, out = tmp_path / "structures", tmp_path / "run"
    data.mkdir()
    (data / "villin.pdb").write_text(openmm_villin_pdb())
    (data / "corrupt.cif").write_text("data_corrupt\nloop_\n_atom_site.id\n1\n")
    result = _invoke(["train", "--data", str(data), "--out", str(out), "--max-steps", "3", "--checkpoint-every", "2", *_FAST])
    assert "1 unreadable file(s) skipped" in result.output
    summary = json.loads((out / "data.json").read_text())
    assert summary["num_skipped"] == 1 and "corrupt.cif" in summary["skipped"][0]
    assert summary["structures"] == ["villin_A"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0.0 <= r["lddt_ca"] <= 1.0 and r["fape"] > 0 and r["num_recycle"] in (0.0, 1.0)
    for png in ("loss.png", "lddt.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000002", "step-00000003"]
    saved = yaml.safe_load((out / "fastfold_train.yaml").read_text())
    assert saved["preset"]["model"] == "tiny" and saved["preset"]["crop_size"] == 24 and saved["train"]["max_steps"] == 3

    _invoke(["train", "--data", str(data), "--out", str(out), "--max-steps", "4", "--resume", "latest", *_FAST])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step-00000004").is_dir()


def test_train_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.pdb").write_text("")
    result = CliRunner().invoke(main, ["train", "--data", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "no readable structure files" in result.output and "1 skipped" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "not a folder of structures" in result.output


def test_presets_follow_af2_table_4():
    initial, finetune = train_preset("initial"), train_preset("finetune")
    assert (initial.preset.crop_size, initial.preset.max_msa_clusters, initial.preset.max_extra_msa) == (256, 128, 1024)
    assert (finetune.preset.crop_size, finetune.preset.max_msa_clusters, finetune.preset.max_extra_msa) == (384, 512, 5120)
    assert initial.preset.weights.violation == 0 and finetune.preset.weights.violation == 1.0
    assert finetune.train.optim.lr == initial.train.optim.lr / 2
    assert initial.train.optim.max_grad_norm == 0.1 and initial.train.ema_decay == 0.999
    assert set(TRAIN_PRESETS) == {"debug", "initial", "finetune"}


def _resolved(monkeypatch, tmp_path, *args: str):
    """The config `fastfold train` hands to the run, captured instead of training."""
    import types

    import ferryman.apps.fastfold.train.run as run_module

    seen = {}

    class Dataset(list):
        skipped = 0

    def fake_run(cfg, dims=None):
        seen["cfg"] = cfg
        return types.SimpleNamespace(step=0), Dataset([1])

    monkeypatch.setattr(run_module, "run", fake_run)
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    return result, seen.get("cfg")


def test_train_accepts_the_shared_training_flags_with_their_meaning(monkeypatch, tmp_path):
    result, cfg = _resolved(
        monkeypatch, tmp_path, "--max-steps", "7", "--checkpoint-every", "3", "--resume", "latest", "--precision", "bf16",
        "--grad-accum", "2", "--lr", "0.0005", "--memory", "gemini-offload", "--set", "train.seed=4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    t = cfg.train
    assert (t.max_steps, t.ckpt_every, t.resume, t.precision, t.grad_accum, t.optim.lr) == (7, 3, "latest", "bf16", 2, 5e-4)
    assert t.engine == "gemini" and t.gemini.placement == "static" and t.gemini.param_host_fraction == 1.0
    assert t.seed == 4 and cfg.preset.model == "debug"  # the preset resolved first, flags laid over it
    _, cfg = _resolved(monkeypatch, tmp_path, "--memory", "plain", "--preset", "initial")
    assert cfg.train.engine == "plain" and cfg.train.max_steps == 78_000 and cfg.preset.crop_size == 256


@pytest.mark.parametrize("old", ["--steps", "--ckpt-every", "--engine"])
def test_old_flag_spellings_are_gone(monkeypatch, tmp_path, old):
    result, cfg = _resolved(monkeypatch, tmp_path, old, "2")
    assert result.exit_code == 2 and cfg is None and "No such option" in result.output
