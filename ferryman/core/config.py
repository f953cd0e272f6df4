"""Typed dataclass configs: save to and load from YAML/JSON, and ``--set key=value`` overrides.

Configs are keyword-only dataclasses with type hints; nested configs are dataclass fields. Values
read from files or the command line are converted to the annotated type and checked, and an
unknown key or a value of the wrong type is a ConfigError naming the key. After conversion the
dataclass is constructed anew, so its own ``__post_init__`` validation runs too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ferryman.core.errors import ConfigError
from ferryman.core.io import write_text

T = TypeVar("T")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-safe dict of a config (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from a file or a command-line string) to the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if is_none and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        _fail(where, " or ".join(_type_name(a) for a in args), value)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        _fail(where, "one of " + ", ".join(repr(a) for a in args), value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(where, f"a mapping of {tp.__name__} fields", value)
        return from_dict(tp, value, where=where)
    if origin in (list, tuple) or tp in (list, tuple):
        return _coerce_sequence(value, tp, origin or tp, args, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(where, "a mapping", value)
        kt, vt = args or (Any, Any)
        return {coerce(k, kt, f"{where}.{k}"): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, where)


def _coerce_sequence(value: Any, tp: Any, container: type, args: tuple, where: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        _fail(where, _type_name(tp), value)
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            _fail(where, f"{len(args)} values", value)
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if container is tuple else items


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        _fail(where, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        _fail(where, "an integer", value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        _fail(where, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(where, "a string", value)
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        _fail(where, "a path", value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    _fail(where, _type_name(tp), value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    path = f"{where}.{key}" if where else key
    return ConfigError(f"unknown config key '{path}'{hint}; {cls.__name__} has: {', '.join(known)}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a mapping, converting every value to its annotated type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, where)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (.yaml/.yml) or JSON (anything else), atomically."""
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    write_text(path, text)
    return path


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping stored in a YAML or JSON config file, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_mapping(path))


def merge(cfg: T, data: dict[str, Any], *, where: str = "") -> T:
    """``cfg`` with the keys of ``data`` (possibly nested) replaced, validated as in ``from_dict``."""
    return layered(cfg, [("", data)], where=where)


def layered(base: T, layers: list[tuple[str, dict[str, Any]]], *, where: str = "") -> T:
    """``base`` with each ``(label, mapping)`` layer laid over it in turn, then built once.

    Each value is checked against its annotated type as its layer is applied (an unknown key or a
    wrong type names the layer's label, e.g. the config file or the ``--set`` that gave it), but
    the dataclasses' own cross-field checks run only on the final config: two settings that must
    go together may come from different layers.
    """
    tree = to_dict(base)
    for label, data in layers:
        try:
            _lay(tree, data, type(base), where)
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}" if label else str(err)) from None
    return from_dict(type(base), tree, where=where)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass ``tp`` is, or is an Optional of."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _lay(tree: dict[str, Any], data: dict[str, Any], cls: type, where: str) -> None:
    """Write ``data`` into ``tree`` (a ``to_dict`` form of ``cls``), type-checking each value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, where)
        path = f"{where}.{key}" if where else key
        tp, old = hints[key], tree.get(key)
        sub = _dataclass_in(tp)
        if sub is not None and isinstance(value, dict) and isinstance(old, dict):
            _lay(old, value, sub, path)
        elif isinstance(old, dict) and isinstance(value, dict):  # mapping fields merge key by key
            tree[key] = to_dict(coerce({**old, **value}, tp, path))
        else:
            tree[key] = to_dict(coerce(value, tp, path))


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], "value")."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    return key.strip().split("."), value


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """``nest("a.b", 1)`` -> ``{"a": {"b": 1}}``."""
    nested: Any = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    return nested


def override_layers(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """One layer per ``--set key=value`` (dotted keys reach nested configs)."""
    layers = []
    for text in overrides:
        path, value = parse_override(text)
        layers.append((f"--set {text}", nest(".".join(path), value)))
    return layers


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply ``key=value`` strings to ``cfg``; the result is validated once, after all of them."""
    return layered(cfg, override_layers(overrides))
