"""Typed configs: file round trips and --set overrides with clear errors."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ferryman.core.config import apply_overrides, from_dict, load_config, save_config, to_dict
from ferryman.core.errors import ConfigError


@dataclass(kw_only=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "cosine"


@dataclass(kw_only=True)
class Run:
    name: str = "run"
    steps: int = 10
    bf16: bool = False
    chunk_size: int | None = None
    out: Path = Path("out")
    layers: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict[str, int] = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_file(tmp_path, suffix):
    cfg = Run(name="x", steps=3, bf16=True, chunk_size=64, layers=[4], optim=Optim(lr=2e-4, schedule="constant"))
    path = save_config(cfg, tmp_path / f"config{suffix}")
    assert load_config(Run, path) == cfg
    assert to_dict(load_config(Run, path))["optim"]["betas"] == [0.9, 0.999]


def test_overrides_are_typed():
    cfg = apply_overrides(
        Run(),
        ["steps=7", "bf16=yes", "optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "chunk_size=none", "layers=3,5,8", "out=/tmp/o"],
    )
    assert cfg.steps == 7 and cfg.bf16 is True and cfg.chunk_size is None
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.layers == [3, 5, 8] and cfg.out == Path("/tmp/o")
    assert apply_overrides(Run(), ["chunk_size=128"]).chunk_size == 128
    assert apply_overrides(Run(), ["extra.a=1", "extra.b=2"]).extra == {"a": 1, "b": 2}  # mappings merge


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stpes=3", r"unknown config key 'stpes' \(did you mean 'steps'\?\)"),
        ("optim.lrr=3", r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"),
        ("steps=three", r"--set steps=three: steps: expected an integer, got 'three'"),
        ("bf16=maybe", r"bf16: expected true or false"),
        ("optim.schedule=linear", r"optim.schedule: expected one of 'constant', 'cosine'"),
        ("optim.betas=[0.9]", r"optim.betas: expected 2 values"),
        ("steps", r"expected KEY=VALUE"),
        ("steps=0", r"steps must be at least 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Run(), [override])


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_config(Run, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Run, bad)
    with pytest.raises(ConfigError, match=r"optim: expected a mapping of Optim fields"):
        from_dict(Run, {"optim": 3})


def test_validation_runs_on_load(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 0}')
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        load_config(Run, path)
