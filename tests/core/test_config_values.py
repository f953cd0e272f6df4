"""Typed configs, value by value: every conversion a file or a ``--set`` may need, and every refused
value with its whole one-line message (the text is the product: it names the key, what was
expected and what was given)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ferryman.core.config import (
    apply_overrides,
    from_dict,
    load_config,
    merge,
    parse_override,
    save_config,
)
from ferryman.core.errors import ConfigError


class Level(enum.Enum):
    LOW = "low"


@dataclass(kw_only=True)
class Leaf:
    depth: int = 1
    tag: str = "t"


@dataclass(kw_only=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    leaf: Leaf = field(default_factory=Leaf)


@dataclass(kw_only=True)
class Cfg:
    name: str = "run"
    steps: int = 10
    bf16: bool = False
    out: Path = Path("out")
    count: int | None = None
    key: int | str = 0
    level: Literal[1, 2] = 1
    mode: Literal["a", "b"] = "a"
    one: tuple[int] = (0,)
    names: tuple[str, ...] = ("x",)
    anything: list = field(default_factory=list)
    layers: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict[str, int] = field(default_factory=dict)
    ids: dict[int, float] = field(default_factory=dict)
    kind: Level = Level.LOW
    optim: Optim = field(default_factory=Optim)
    maybe: Optim | None = field(default_factory=Optim)
    absent: Leaf | None = None


@dataclass(kw_only=True)
class Order:
    zeta: int = 1
    alpha: str = "a"


@dataclass(kw_only=True)
class Required:
    size: int


@dataclass(kw_only=True)
class Holder:
    inner: Required


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --- values a file may hold -------------------------------------------------------------------


def test_file_values_are_converted_to_the_annotated_types():
    cfg = from_dict(Cfg, {"steps": 3.0, "level": 2, "names": ["p", "q", "r"], "anything": [1, "a"],
                          "one": [7], "ids": {"3": 0.5}, "optim": {"lr": 2, "betas": [0.5, 0.6]}})  # fmt: skip
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.level == 2
    assert cfg.names == ("p", "q", "r") and type(cfg.names) is tuple
    assert cfg.anything == [1, "a"] and cfg.one == (7,)
    assert cfg.ids == {3: 0.5}
    assert cfg.optim.lr == 2.0 and type(cfg.optim.lr) is float and cfg.optim.betas == (0.5, 0.6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": 3}, "name: expected a string, got 3"),
        ({"out": 3}, "out: expected a path, got 3"),
        ({"bf16": "maybe"}, "bf16: expected true or false, got 'maybe'"),
        ({"steps": 2.5}, "steps: expected an integer, got 2.5"),
        ({"optim": {"lr": True}}, "optim.lr: expected a number, got True"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected 2 values, got [0.9]"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected a number, got 'x'"),
        ({"optim": {"leaf": {"depth": "deep"}}}, "optim.leaf.depth: expected an integer, got 'deep'"),
        ({"optim": {"leaf": 3}}, "optim.leaf: expected a mapping of Leaf fields, got 3"),
        ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr' (did you mean 'lr'?); Optim has: lr, betas, leaf"),
        ({"layers": 3}, "layers: expected list, got 3"),
        ({"layers": [1, "x"]}, "layers[1]: expected an integer, got 'x'"),
        ({"names": ["a", 2]}, "names[1]: expected a string, got 2"),
        ({"extra": 3}, "extra: expected a mapping, got 3"),
        ({"extra": {"a": "z"}}, "extra.a: expected an integer, got 'z'"),
        ({"ids": {"x": 1.0}}, "ids.x: expected an integer, got 'x'"),
        ({"count": "many"}, "count: expected int or NoneType, got 'many'"),
        ({"mode": "c"}, "mode: expected one of 'a', 'b', got 'c'"),
        ({"level": 3}, "level: expected one of 1, 2, got 3"),
        ({"kind": "low"}, "kind: expected Level, got 'low'"),
        ({"stpes": 1}, "unknown config key 'stpes' (did you mean 'steps'?); Cfg has: name, steps, bf16, out, count, "
                       "key, level, mode, one, names, anything, layers, extra, ids, kind, optim, maybe, absent"),
    ],
)
def test_refused_file_values_name_the_key(data, message):
    assert _error(from_dict, Cfg, data) == message


def test_a_mapping_of_the_wrong_kind_and_missing_required_fields():
    assert _error(from_dict, Cfg, [1, 2]) == "Cfg: expected a mapping, got list"
    assert _error(from_dict, Cfg, [1, 2], where="run") == "run: expected a mapping, got list"
    assert _error(from_dict, Required, {}) == (
        "Required: Required.__init__() missing 1 required keyword-only argument: 'size'")
    assert _error(from_dict, Holder, {"inner": {}}) == (
        "inner: Required.__init__() missing 1 required keyword-only argument: 'size'")
    assert _error(from_dict, Required, {"size": "x"}, where="top") == "top.size: expected an integer, got 'x'"


def test_an_unknown_key_with_nothing_close_lists_the_fields():
    assert _error(from_dict, Leaf, {"zzz": 1}) == "unknown config key 'zzz'; Leaf has: depth, tag"
    assert _error(apply_overrides, Optim(), ["leaf.qqq=1"]) == (
        "--set leaf.qqq=1: unknown config key 'leaf.qqq'; Leaf has: depth, tag")


# --- --set overrides --------------------------------------------------------------------------


def test_each_override_converts_its_string():
    cfg = apply_overrides(Cfg(), ["key=abc", "level=2", "steps=1_000", "count=1__000", "names=p, q,r",
                                  "optim.lr=1e-4", "maybe.lr=0.5", "maybe.leaf.tag=z", "absent.depth=4",
                                  "name=a=b", "ids.7=2.5"])  # fmt: skip
    assert cfg.key == "abc" and apply_overrides(Cfg(), ["key=12"]).key == 12  # int first, then str
    assert cfg.level == 2 and type(cfg.level) is int
    assert cfg.steps == 1000 and cfg.count == 1000  # digit-group underscores are dropped, wherever they are
    assert cfg.names == ("p", "q", "r")
    assert cfg.optim.lr == 1e-4
    assert cfg.maybe == Optim(lr=0.5, leaf=Leaf(tag="z"))  # an optional config merges key by key
    assert cfg.absent == Leaf(depth=4)
    assert cfg.name == "a=b"  # the first '=' ends the key
    assert cfg.ids == {7: 2.5}


def test_parse_override_splits_the_dotted_key():
    assert parse_override("optim.leaf.depth=3") == (["optim", "leaf", "depth"], "3")
    assert parse_override(" steps =a=b") == (["steps"], "a=b")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("count=many", "--set count=many: count: expected int or NoneType, got 'many'"),
        ("level=3", "--set level=3: level: expected one of 1, 2, got '3'"),
        ("extra=3", "--set extra=3: extra: expected a mapping, got '3'"),
        ("extra.a=x", "--set extra.a=x: extra.a: expected an integer, got 'x'"),
        ("optim.lr=fast", "--set optim.lr=fast: optim.lr: expected a number, got 'fast'"),
        ("maybe.lrr=1", "--set maybe.lrr=1: unknown config key 'maybe.lrr' (did you mean 'lr'?); "
                        "Optim has: lr, betas, leaf"),
        ("one=1,2", "--set one=1,2: one: expected 1 values, got ['1', '2']"),
        ("=3", "--set '=3': expected KEY=VALUE, e.g. --set optim.lr=1e-4"),
    ],
)
def test_refused_overrides_name_the_set_and_the_key(override, message):
    assert _error(apply_overrides, Cfg(), [override]) == message


def test_an_optional_config_keeps_its_other_nested_values():
    base = Cfg(maybe=Optim(lr=0.25, leaf=Leaf(depth=5, tag="k")))
    cfg = apply_overrides(base, ["maybe.leaf.tag=z"])
    assert cfg.maybe == Optim(lr=0.25, leaf=Leaf(depth=5, tag="z"))


# --- merge --------------------------------------------------------------------------------------


def test_merge_lays_a_mapping_over_a_config():
    cfg = merge(Cfg(optim=Optim(lr=0.5)), {"optim": {"leaf": {"depth": 3}}, "steps": 4})
    assert cfg.optim == Optim(lr=0.5, leaf=Leaf(depth=3)) and cfg.steps == 4 and cfg.name == "run"
    assert _error(merge, Cfg(), {"steps": "x"}) == "steps: expected an integer, got 'x'"
    assert _error(merge, Optim(), {"lr": "x"}, where="optim") == "optim.lr: expected a number, got 'x'"
    assert _error(merge, Cfg(), [1]) == "Cfg: expected a mapping, got [1]"
    assert _error(merge, Optim(), 3, where="optim") == "optim: expected a mapping, got 3"
    # A base built in code with a wrong type is caught when the config is built, under its name.
    assert _error(merge, Leaf(depth="x"), {}, where="leaf") == "leaf.depth: expected an integer, got 'x'"


# --- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_files_keep_the_field_order(tmp_path, suffix):
    path = save_config(Order(zeta=2), tmp_path / f"c{suffix}")
    assert path.read_text() == "zeta: 2\nalpha: a\n"  # declaration order, not sorted
    assert load_config(Order, path) == Order(zeta=2)


def test_json_files_are_indented_by_two(tmp_path):
    path = save_config(Leaf(depth=2, tag="a"), tmp_path / "c.json")
    assert path.read_text() == '{\n  "depth": 2,\n  "tag": "a"\n}\n'
    assert json.loads(path.read_text()) == {"depth": 2, "tag": "a"}
    assert load_config(Leaf, path) == Leaf(depth=2, tag="a")


def test_a_broken_file_is_named_with_the_first_line_of_the_parser_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    assert _error(load_config, Cfg, bad) == f"config file {bad} is not valid YAML/JSON: while parsing a flow sequence"
