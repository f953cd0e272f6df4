"""The shared training flags and config resolution: one meaning per flag, validation once."""

import json
from dataclasses import dataclass, field

import click
import pytest
import torch
from click.testing import CliRunner

from ferryman.core.cli import MEMORY_MODES, FerrymanCommand, resolve_config, train_flags, train_options
from ferryman.core.config import from_dict, save_config, to_dict
from ferryman.core.errors import ConfigError
from ferryman.core.training import TrainConfig


@dataclass(kw_only=True)
class _Pair:
    """Two settings that only make sense together (like DreamBooth's class folder and prompt)."""

    folder: str = ""
    prompt: str = ""
    width: int = 8

    def __post_init__(self):
        if bool(self.folder) != bool(self.prompt):
            raise ConfigError("folder and prompt go together")
        if self.width % 8:
            raise ConfigError(f"width={self.width} must be a multiple of 8")


@dataclass(kw_only=True)
class _App:
    pair: _Pair = field(default_factory=_Pair)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_related_settings_may_come_from_different_sources(tmp_path):
    (tmp_path / "half.yaml").write_text("pair:\n  folder: class/\n")
    cfg = resolve_config(_App(), config_file=tmp_path / "half.yaml", flags={"pair.prompt": "a dog"})
    assert (cfg.pair.folder, cfg.pair.prompt) == ("class/", "a dog")
    cfg = resolve_config(_App(), config_file=None, flags={"pair.folder": "c/"}, overrides=("pair.prompt=a dog",))
    assert cfg.pair.prompt == "a dog"
    with pytest.raises(ConfigError, match="folder and prompt go together"):
        resolve_config(_App(), config_file=None, flags={"pair.folder": "c/"})


def test_the_final_value_is_checked_not_an_intermediate_one():
    cfg = resolve_config(_App(), config_file=None, flags={"pair.width": 33}, overrides=("pair.width=32",))
    assert cfg.pair.width == 32
    with pytest.raises(ConfigError, match="width=33 must be a multiple of 8"):
        resolve_config(_App(), config_file=None, flags={"pair.width": 33})


def test_a_bad_value_names_where_it_came_from(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml: train.max_steps: expected an integer"):
        resolve_config(_App(), config_file=tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"--set train.grad_accum=x: train.grad_accum: expected an integer"):
        resolve_config(_App(), config_file=None, overrides=("train.grad_accum=x",))


@click.command(cls=FerrymanCommand)
@train_options()
def _trainer(config_file, overrides, **flags):
    cfg = resolve_config(_App(), config_file=config_file, flags=train_flags(flags), overrides=overrides)
    assert not flags, f"train_flags left {flags}"
    click.echo(json.dumps(to_dict(cfg.train)))


def _train_config(args: list[str]) -> TrainConfig:
    result = CliRunner().invoke(_trainer, args)
    assert result.exit_code == 0, result.output
    return from_dict(TrainConfig, json.loads(result.output))


def test_each_shared_flag_sets_its_train_config_field():
    cfg = _train_config(["--max-steps", "7", "--checkpoint-every", "3", "--resume", "latest", "--precision", "fp32",
                         "--grad-accum", "4", "--lr", "2e-4"])
    assert (cfg.max_steps, cfg.ckpt_every, cfg.resume, cfg.precision, cfg.grad_accum) == (7, 3, "latest", "fp32", 4)
    assert cfg.optim.lr == pytest.approx(2e-4)
    default = TrainConfig()
    assert _train_config([]) == default  # no flag given: nothing changes


@pytest.mark.parametrize("mode", list(MEMORY_MODES))
def test_memory_modes(mode):
    cfg = _train_config(["--memory", mode])
    if mode == "plain":
        assert cfg.engine == "plain"
    else:
        assert cfg.engine == "gemini"
        assert cfg.gemini.placement == ("auto" if mode == "gemini-auto" else "static")
    if mode == "gemini-offload":
        assert cfg.gemini.param_host_fraction == cfg.gemini.optim_host_fraction == 1.0


def test_flags_win_over_the_config_file_and_set_wins_over_flags(tmp_path):
    save_config(_App(train=TrainConfig(max_steps=50, grad_accum=2)), tmp_path / "run.yaml")
    cfg = _train_config(["--config", str(tmp_path / "run.yaml"), "--max-steps", "60", "--set", "train.max_steps=70"])
    assert (cfg.max_steps, cfg.grad_accum) == (70, 2)


def test_a_bad_flag_value_is_one_line():
    result = CliRunner().invoke(_trainer, ["--grad-accum", "0"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "grad_accum" in result.output


@pytest.mark.parametrize("args", [["--grad-accum", "two"], ["--bogus"], ["--memory", "cloud"]])
def test_usage_errors_are_one_line_too(args):
    result = CliRunner().invoke(_trainer, args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    assert "--help" in result.output


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ConfigError(f"photos/{i}.jpg: cannot decode image (image file is truncated)")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_user_error_in_a_data_loader_worker_is_one_line(workers):
    """PyTorch re-raises a worker's exception as its type with the worker's traceback for a message;
    the user still gets the one line, whether the data comes from the main process or a worker."""

    @click.command(cls=FerrymanCommand)
    def read():
        for _ in torch.utils.data.DataLoader(_Unreadable(), num_workers=workers):
            pass

    result = CliRunner().invoke(read, [])
    assert result.exit_code == 2
    assert result.output == "Error: photos/0.jpg: cannot decode image (image file is truncated)\n"
