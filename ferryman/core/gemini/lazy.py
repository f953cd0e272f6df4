"""Models built without their weights; each engine reads them from safetensors when it is built.

    with empty_weights():                                  # parameters on the meta device
        model = AutoModelForCausalLM.from_config(config)
    load_later(model, "model-folder")                      # names matched to files, nothing read
    engine = gemini(model, GeminiConfig(...))              # reads each chunk's tensors as it packs it

Gemini packs its chunks one at a time from the named tensors and keeps only this rank's shard of
each, so no rank ever holds the whole model in host memory: its peak is its own shards plus one
chunk. The plain engine reads each tensor straight onto its device. Until an engine reads them,
the parameters are shape-only placeholders (one NaN expanded to the shape: no storage), which
other code may wrap in the meantime (peft adds real LoRA weights beside them).

A folder is read as transformers writes it: ``model.safetensors``, or the shards named by
``model.safetensors.index.json``. A parameter is looked up under its own name, then with the
model's ``base_model_prefix`` removed or added (older checkpoints, e.g. OPT's and GPT-2's, were
saved from the base model). Pickle-based weight files are never read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.files import check_safetensors, reading

_DEFERRED = "_ferryman_deferred"  # attribute of a placeholder parameter: where its value waits


class WeightSource(Protocol):
    """Where deferred weights come from: safetensors files (``WeightFiles``), or any object that
    answers these (e.g. random values made on demand for a benchmark)."""

    source: object  # named in error messages

    def __contains__(self, key: str) -> bool: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str) -> torch.Tensor: ...


class WeightFiles:
    """The tensors of a safetensors file or of a folder's (index or every ``*.safetensors``), by key.

    Headers are checked when the files are named (truncation, overwritten headers); tensors are read
    one by one on demand.
    """

    def __init__(self, source: str | Path) -> None:
        source = Path(source)
        self.source = source
        self.where: dict[str, Path] = {}
        self.meta: dict[str, dict] = {}
        for path in self._files(source):
            header = check_safetensors(path, "weight file")
            for key, info in header.items():
                if key != "__metadata__":
                    self.where[key], self.meta[key] = path, info

    @staticmethod
    def _files(source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        index = source / "model.safetensors.index.json"
        if index.is_file():
            with reading(index, "weight index"):
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [source / name for name in sorted(set(weight_map.values()))]
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise UserError(f"{source}: no safetensors weights (model.safetensors or model.safetensors.index.json)")
        return files

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.where[key]
        with reading(path, "weight file"), safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)


class _Deferred:
    def __init__(self, files: WeightSource, key: str) -> None:
        self.files, self.key = files, key


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (buffers stay real).

    Each parameter is moved to meta as it is registered, so the host never holds more than the
    one tensor being registered. Buffers are kept because models compute some of them in
    ``__init__`` (rotary frequencies) and no file holds them.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _placeholder(param: nn.Parameter) -> nn.Parameter:
    value = torch.full((), float("nan"), dtype=param.dtype).expand(param.shape)
    return nn.Parameter(value, requires_grad=param.requires_grad)


def _candidates(name: str, prefix: str) -> list[str]:
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name.removeprefix(prefix + "."))
    elif prefix:
        names.append(f"{prefix}.{name}")
    return names


def load_later(model: nn.Module, source: str | Path | WeightSource) -> None:
    """Name, for each meta parameter of ``model``, the tensor of ``source`` (a safetensors file or
    folder, or a ``WeightSource``) that will fill it.

    Meta parameters become placeholders on the host; tied parameters stay tied. Persistent buffers
    found in the files are copied now (they are small). A parameter with no tensor, or one of
    another shape, is a ``UserError`` naming both.
    """
    files = WeightFiles(source) if isinstance(source, str | Path) else source
    prefix = getattr(model, "base_model_prefix", "") or ""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for local, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in replaced:
                key = _find(files, names[id(param)], prefix)
                if files.shape(key) != tuple(param.shape):
                    raise UserError(f"{files.source}: {key} has shape {list(files.shape(key))}, "
                                    f"the model's {names[id(param)][0]} {list(param.shape)}")
                new = _placeholder(param)
                setattr(new, _DEFERRED, _Deferred(files, key))
                replaced[id(param)] = new
            module._parameters[local] = replaced[id(param)]
    _load_buffers(model, files, prefix)


def _find(files: WeightSource, names: list[str], prefix: str) -> str:
    for name in names:
        for key in _candidates(name, prefix):
            if key in files:
                return key
    raise UserError(f"{files.source}: no tensor {names[0]} (nor {', '.join(names[1:] + _candidates(names[0], prefix)[1:]) or '-'}); "
                    "are these the weights of this model?")


def _load_buffers(model: nn.Module, files: WeightSource, prefix: str) -> None:
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, buf in model.named_buffers():
        key = next((k for k in _candidates(name, prefix) if k in files), None) if name in persistent else None
        if key is not None and buf.device.type == "meta":  # copy_ into a meta tensor does nothing: replace it
            owner, _, local = name.rpartition(".")
            model.get_submodule(owner)._buffers[local] = files.read(key).to(buf.dtype)
        elif key is not None:
            with torch.no_grad():
                buf.copy_(files.read(key))
        elif buf.device.type == "meta":
            raise UserError(f"{files.source}: no tensor for the buffer {name}, which the model built on the meta device")


def is_deferred(param: torch.Tensor) -> bool:
    return hasattr(param, _DEFERRED)


def take(param: torch.Tensor) -> torch.Tensor | None:
    """The deferred value of ``param``, read now (and forgotten: a parameter is filled once), or None."""
    deferred = param.__dict__.pop(_DEFERRED, None)
    return None if deferred is None else deferred.files.read(deferred.key)


class InitialValues(Mapping[str, torch.Tensor]):
    """Parameters' starting values by name: deferred ones read from their file when asked for,
    the others (e.g. adapters added after ``load_later``) as they are. What an engine builds from."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = params

    def __getitem__(self, name: str) -> torch.Tensor:
        param = self.params[name]
        value = take(param)
        return param.detach() if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def materialize(module: nn.Module, device: torch.device) -> None:
    """Fill every deferred parameter of ``module`` in place, reading each straight onto ``device``
    in the parameter's dtype (for engines that hold the whole model)."""
    for param in dict.fromkeys(module.parameters()):
        value = take(param)
        if value is not None:
            param.data = value.to(device=device, dtype=param.dtype)
