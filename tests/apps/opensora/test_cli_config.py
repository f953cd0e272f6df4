"""`opensora train` speaks the core's flag vocabulary; presets, config files, flags and --set meet in
one resolved config; the STDiT's files hold no collectives."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import ferryman.apps.opensora.train as train_module
from ferryman.apps.opensora.cli import main as opensora
from ferryman.apps.opensora.config import OpenSoraConfig, migrate, resolve
from ferryman.apps.opensora.presets import model_preset
from ferryman.core.cli import resolve_config, train_flags
from ferryman.core.config import from_dict, save_config

from .conftest import CLIPS

MODEL_DIR = Path(train_module.__file__).parent / "model"


def test_model_files_import_no_parallel_code():
    """DESIGN: models are math; parallelize() applies sequence parallelism from outside."""
    for path in sorted(MODEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("ferryman.core.parallel", "torch.distributed")), (path.name, name)


def test_presets_do_not_import_the_app_config():
    """config.py builds on presets.py, never the other way round (the old import cycle)."""
    tree = ast.parse((MODEL_DIR.parent / "presets.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "config" not in imported and "model.config" in imported


def _captured(monkeypatch) -> list[OpenSoraConfig]:
    """Make `opensora train` hand its resolved config over instead of training."""
    seen: list[OpenSoraConfig] = []
    monkeypatch.setattr(train_module, "run_train", lambda cfg, **_: seen.append(cfg))
    return seen


SHARED = {"max_steps": 7, "checkpoint_every": 3, "resume": "latest", "precision": "fp16", "grad_accum": 4, "lr": 0.25}


@pytest.mark.parametrize("memory", ["plain", "gemini-auto", "gemini-offload"])
def test_shared_training_flags_land_where_the_core_puts_them(monkeypatch, tmp_path, memory):
    seen = _captured(monkeypatch)
    args = ["train", "--out", str(tmp_path), "--max-steps", "7", "--checkpoint-every", "3", "--resume", "latest",
            "--precision", "fp16", "--grad-accum", "4", "--lr", "0.25", "--memory", memory]
    result = CliRunner().invoke(opensora, args)
    assert result.exit_code == 0, result.output
    got = seen[0].train
    # the core's own reading of the same flags, laid over the app's default TrainConfig
    expected = resolve_config(OpenSoraConfig().train, config_file=None, flags=train_flags({**SHARED, "memory": memory}, ""))
    assert dataclasses.replace(got, out_dir=expected.out_dir) == expected
    assert (got.max_steps, got.ckpt_every, got.resume, got.precision, got.grad_accum, got.optim.lr) == (7, 3, "latest", "fp16", 4, 0.25)
    assert got.engine == ("plain" if memory == "plain" else "gemini")
    if memory == "gemini-offload":
        assert (got.gemini.placement, got.gemini.param_host_fraction, got.gemini.optim_host_fraction) == ("static", 1.0, 1.0)
    if memory == "gemini-auto":
        assert got.gemini.placement == "auto"


@pytest.mark.parametrize("old", [["--steps", "3"], ["--gemini"], ["--no-gemini"], ["--resume"]])
def test_old_spellings_are_gone(monkeypatch, tmp_path, old):
    seen = _captured(monkeypatch)
    result = CliRunner().invoke(opensora, ["train", "--out", str(tmp_path), *old])
    assert result.exit_code == 2 and not seen
    assert "No such option" in result.output or "requires an argument" in result.output


def test_preset_sets_the_sizes_whichever_source_names_it_and_explicit_fields_win(tmp_path):
    tiny, debug = model_preset("tiny"), model_preset("debug")
    assert resolve(flags={"preset": "tiny"}).model == tiny
    assert resolve(overrides=("preset=tiny",)).model == tiny
    # an explicit size, given before or after the preset, overrides it; the rest stays the preset's
    for overrides in (("model.hidden_size=48", "preset=tiny"), ("preset=tiny", "model.hidden_size=48")):
        cfg = resolve(overrides=overrides)
        assert (cfg.preset, cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == ("tiny", 48, tiny.depth, tiny.num_heads)
    # a saved run config lists every size of its preset: another preset still replaces them ...
    saved = save_config(OpenSoraConfig(), tmp_path / "opensora.yaml")
    assert resolve(config_file=saved).model == debug
    assert resolve(config_file=saved, overrides=("preset=tiny",)).model == tiny
    assert resolve(config_file=saved, flags={"preset": "tiny"}).model == tiny
    # ... except a size the user changed in that run
    changed = save_config(dataclasses.replace(OpenSoraConfig(), model=model_preset("debug", depth=3)), tmp_path / "c.yaml")
    cfg = resolve(config_file=changed, overrides=("preset=tiny",))
    assert (cfg.model.depth, cfg.model.hidden_size) == (3, tiny.hidden_size)
    # a preset named only in a config file
    (tmp_path / "t.yaml").write_text("preset: tiny\n")
    assert resolve(config_file=tmp_path / "t.yaml").model == tiny


def test_configs_are_replaced_not_mutated():
    cfg = OpenSoraConfig()
    for target, field in ((cfg, "sp"), (cfg.model, "depth"), (cfg.runtime, "grad_checkpointing"), (cfg.data, "csv")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, field, None)


def test_run_folders_from_before_the_split_still_load(tmp_path):
    old = yaml.safe_load(yaml.safe_dump({"preset": "debug", "model": {"hidden_size": 32, "attention_backend": "torch",
                                          "grad_checkpointing": True, "class_dropout_prob": 0.0}}))
    cfg = from_dict(OpenSoraConfig, migrate(old))
    assert (cfg.runtime.attention_backend, cfg.runtime.grad_checkpointing, cfg.diffusion.caption_dropout) == ("torch", True, 0.0)


def _train(args, run, t5, vae):
    base = ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5), "--vae", str(vae), "--bucket", "32:8:2",
            "--precision", "fp32", "--out", str(run), "--set", "data.size_multiple=8", "--set", "train.progress=false",
            "--set", "train.plot=false", "--set", "runtime.attention_backend=torch", "--set", "runtime.norm_backend=torch"]
    return CliRunner().invoke(opensora, base + args)


def test_memory_gemini_offload_trains_on_gemini_and_resume_latest_continues_from_the_run_config(tmp_path, tiny_models):
    t5, vae = tiny_models
    run = tmp_path / "run"
    result = _train(["--max-steps", "2", "--memory", "gemini-offload", "--lr", "1e-3"], run, t5, vae)
    assert result.exit_code == 0, result.output
    step2 = run / "checkpoints" / "step-00000002"
    assert json.loads((step2 / "trainer.json").read_text())["engine"] == "gemini"
    assert (step2 / "gemini.json").is_file() and not (step2 / "model.safetensors").exists()
    saved = yaml.safe_load((run / "opensora.yaml").read_text())
    assert (saved["train"]["engine"], saved["train"]["gemini"]["param_host_fraction"]) == ("gemini", 1.0)
    # every other setting (csv, encoders, buckets, engine) comes from run/opensora.yaml
    result = CliRunner().invoke(opensora, ["train", "--out", str(run), "--resume", "latest", "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert json.loads((run / "checkpoints" / "step-00000003" / "trainer.json").read_text())["engine"] == "gemini"


def test_a_run_trained_with_relative_paths_samples_from_another_folder(tmp_path, tiny_models, monkeypatch):
    import shutil

    t5, vae = tiny_models
    work = tmp_path / "work"
    shutil.copytree(t5, work / "t5")
    shutil.copytree(vae, work / "vae")
    monkeypatch.chdir(work)
    assert _train(["--max-steps", "1"], "run", "t5", "vae").exit_code == 0
    saved = yaml.safe_load((work / "run" / "opensora.yaml").read_text())
    assert saved["text_encoder"] == str(work / "t5") and saved["train"]["out_dir"] == str(work / "run")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(opensora, ["sample", "--ckpt", str(work / "run"), "--prompt", "a red circle",
                                           "--num-frames", "2", "--resolution", "16", "--steps", "2", "--out", "s.mp4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.mp4").is_file()
