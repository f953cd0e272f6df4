"""The console scripts: help texts, `ferryman env`, one-line errors, --config/--set wiring."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ferryman.cli import main as ferryman_main
from ferryman.core.cli import FerrymanGroup, config_options, resolve_config
from ferryman.core.config import save_config
from ferryman.core.errors import UserError

SCRIPTS = ["ferryman", "fastfold", "opensora", "sd-finetune", "sd-generate"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_are_installed_and_show_help(script):
    path = shutil.which(script, path=str(Path(sys.executable).parent))
    assert path, f"{script} is not installed next to {sys.executable}; run `make install`"
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_env_report_names_versions_and_tools():
    result = CliRunner().invoke(ferryman_main, ["env", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["torch"].startswith("2.")
    assert set(info["tools"]) == {"jackhmmer", "hmmsearch", "hhblits", "hhsearch", "kalign"}
    assert set(info["apps"]) == {"kernels", "fastfold", "opensora", "diffusion", "lm"}
    text = CliRunner().invoke(ferryman_main, ["env"]).output
    assert "torch" in text and "external tools:" in text and "jackhmmer" in text


@dataclass(kw_only=True)
class _Sub:
    lr: float = 0.1


@dataclass(kw_only=True)
class _Cfg:
    steps: int = 1
    name: str = "a"
    sub: _Sub = field(default_factory=_Sub)


@click.group(cls=FerrymanGroup)
def _demo():
    pass


@_demo.command()
@click.option("--steps", type=int, default=None)
@config_options
def run(steps, config_file, overrides):
    cfg = resolve_config(_Cfg(), config_file=config_file, flags={"steps": steps}, overrides=overrides)
    click.echo(f"{cfg.steps} {cfg.name} {cfg.sub.lr}")


@_demo.command()
@click.argument("path")
def fail(path):
    raise UserError(f"{path}: not a FASTA file (line 1 does not start with '>')")


def test_config_file_flags_and_overrides_in_order(tmp_path):
    path = save_config(_Cfg(steps=5, name="file", sub=_Sub(lr=0.5)), tmp_path / "c.yaml")
    runner = CliRunner()
    assert runner.invoke(_demo, ["run", "--config", str(path)]).output.strip() == "5 file 0.5"
    out = runner.invoke(_demo, ["run", "--config", str(path), "--steps", "9", "--set", "sub.lr=0.25"]).output
    assert out.strip() == "9 file 0.25"


def test_user_errors_are_one_line_with_nonzero_exit():
    result = CliRunner().invoke(_demo, ["fail", "x.fasta"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: x.fasta: not a FASTA file (line 1 does not start with '>')"
    result = CliRunner().invoke(_demo, ["run", "--set", "sub.lrr=1"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "unknown config key 'sub.lrr'" in result.output


def _training_commands():
    from ferryman.apps.diffusion.cli import finetune_main
    from ferryman.apps.fastfold.cli import main as fastfold
    from ferryman.apps.opensora.cli import main as opensora

    return {"fastfold train": fastfold.commands["train"], "opensora train": opensora.commands["train"],
            "sd-finetune": finetune_main}


def test_every_training_command_takes_the_shared_flags_with_one_meaning():
    """The same flags, the same help text (so the same meaning), the same TrainConfig field: each app's
    own test checks that its flags land on the TrainConfig fields train_flags() names."""
    from ferryman.core.cli import train_options

    shared = {p.name: p for p in train_options()(lambda **kw: None).__click_params__}
    assert set(shared) >= {"max_steps", "checkpoint_every", "resume", "memory", "precision", "grad_accum", "lr",
                           "config_file", "overrides"}
    for name, command in _training_commands().items():
        params = {p.name: p for p in command.params}
        for key, reference in shared.items():
            assert key in params, f"{name} lacks --{key.replace('_', '-')}"
            assert params[key].opts == reference.opts, (name, key)
            if key != "precision":  # an app may narrow the precisions it trains in
                assert params[key].help == reference.help, (name, key)
        for old in ("--steps", "--ckpt-every", "--engine", "--gemini"):
            assert not any(old in p.opts for p in command.params), f"{name} still has {old}"
