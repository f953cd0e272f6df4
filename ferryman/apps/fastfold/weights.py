"""Official AlphaFold2 parameters (``params_model_{1..5}[_ptm].npz``) in and out, and Ferryman's
own safetensors checkpoints.

Official keys are ``alphafold/alphafold_iteration/<module path>//<param name>``; Haiku linears
store ``weights`` as ``[in, out]``, attention projections as ``[in, heads, head_dim]``, and the
layers of a stack (48 Evoformer blocks, 4 extra-MSA blocks, 2 template pair blocks) stacked on a
leading axis. The model's modules carry AF2's names, so the table below is derived by walking the
parameters: only the module prefixes and a handful of parameter layouts need rules.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferryman.apps.fastfold.model.msa import OuterProductMean
from ferryman.apps.fastfold.model.primitives import Attention, GlobalAttention
from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path

PREFIX = "alphafold/alphafold_iteration/"

# torch module prefix -> official module path (first match wins); '#' marks a stacked layer axis.
_MODULE_PATHS = [
    ("input_embedder.", "evoformer/"),
    ("recycling_embedder.", "evoformer/"),
    ("extra_msa_embedder.", "evoformer/"),
    ("extra_msa_stack.blocks.#.", "evoformer/extra_msa_stack/"),
    ("evoformer.blocks.#.", "evoformer/evoformer_iteration/"),
    ("evoformer.", "evoformer/"),
    ("template_embedder.template_pair_stack.blocks.#.",
     "evoformer/template_embedding/single_template_embedding/template_pair_stack/__layer_stack_no_state/"),
    ("template_embedder.template_pair_stack.", "evoformer/template_embedding/single_template_embedding/"),
    ("template_embedder.embedding2d.", "evoformer/template_embedding/single_template_embedding/embedding2d."),
    ("template_embedder.attention.", "evoformer/template_embedding/attention."),
    ("template_embedder.", "evoformer/"),
    ("structure_module.", "structure_module/"),
    ("", ""),
]  # fmt: skip
_ATTENTION_NAMES = {"query_w": "query_w", "key_w": "key_w", "value_w": "value_w", "gating": "gating", "output": "output"}


@dataclass
class Entry:
    """One official array and the torch parameters (one per stacked layer) it holds."""

    key: str
    params: list[nn.Parameter]
    shape: tuple[int, ...]  # per layer, in the official layout
    transpose: bool  # official = param.T.reshape(shape); else param.reshape(shape)
    stacked: bool = False  # layers stacked on a leading axis

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (len(self.params), *self.shape) if self.stacked else self.shape


def _split_layer(name: str) -> tuple[str, int | None]:
    match = re.search(r"\.blocks\.(\d+)\.", name)
    if match is None:
        return name, None
    return name[: match.start()] + ".blocks.#." + name[match.end() :], int(match.group(1))


def _official_module_path(torch_path: str) -> str:
    for prefix, official in _MODULE_PATHS:
        if torch_path.startswith(prefix):
            rest = torch_path[len(prefix) :].replace("pair_stack.", "")
            return (official + rest).replace(".", "/")
    raise AssertionError(torch_path)


def _layout(parent: nn.Module, child_name: str, attr: str, p: torch.Tensor) -> tuple[bool, str, tuple, bool]:
    """(key hangs off the parent?, official param name, per-layer official shape, transpose) for
    parameter ``attr`` of the linear or LayerNorm ``parent.<child_name>``."""
    child = parent.get_submodule(child_name)
    weight = attr == "weight"
    if isinstance(parent, Attention | GlobalAttention) and child_name in _ATTENTION_NAMES:
        h, d = parent.num_heads, parent.c_hidden
        if child_name == "output":
            return (True, "output_w", (h, d, p.shape[0]), True) if weight else (True, "output_b", tuple(p.shape), False)
        if child_name == "gating":
            return (True, "gating_w", (p.shape[1], h, d), True) if weight else (True, "gating_b", (h, d), False)
        if isinstance(parent, GlobalAttention) and child_name in ("key_w", "value_w"):
            return True, child_name, (p.shape[1], d), True
        return True, child_name, (p.shape[1], h, d), True
    if isinstance(parent, OuterProductMean) and child_name == "output":
        c = parent.c_hidden
        return (True, "output_w", (c, c, p.shape[0]), True) if weight else (True, "output_b", tuple(p.shape), False)
    if child_name == "feat_2d_weights":
        return True, "feat_2d_weights", (p.shape[1], p.shape[0]), True
    if isinstance(child, nn.LayerNorm):
        return False, "scale" if weight else "offset", tuple(p.shape), False
    return (False, "weights", (p.shape[1], p.shape[0]), True) if weight else (False, "bias", tuple(p.shape), False)


def official_table(model: nn.Module) -> dict[str, Entry]:
    """Every official key of ``model``'s architecture with its shape and torch parameters."""
    table: dict[str, Entry] = {}
    for name, p in model.named_parameters():
        owner_path, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_path)
        if isinstance(owner, nn.Linear | nn.LayerNorm):
            parent_path, child_name = owner_path.rsplit(".", 1)
            on_parent, official_name, shape, transpose = _layout(
                model.get_submodule(parent_path), child_name, attr, p
            )
            module_path = parent_path if on_parent else owner_path
        else:  # a bare parameter such as trainable_point_weights
            module_path, official_name, shape, transpose = owner_path, attr, tuple(p.shape), False
        pattern, layer = _split_layer(module_path + ".")
        key = f"{PREFIX}{_official_module_path(pattern).rstrip('/')}//{official_name}"
        if key not in table:
            table[key] = Entry(key, [], shape, transpose, stacked=layer is not None)
        table[key].params.append(p)
    return table


def to_official(entry: Entry) -> np.ndarray:
    arrays = []
    for p in entry.params:
        t = p.detach().float().cpu()
        t = t.T if entry.transpose else t
        arrays.append(t.reshape(entry.shape).numpy())
    return np.stack(arrays) if entry.stacked else arrays[0]


def from_official(entry: Entry, array: np.ndarray) -> None:
    layers = list(array) if entry.stacked else [array]
    with torch.no_grad():
        for p, a in zip(entry.params, layers):
            t = torch.from_numpy(np.ascontiguousarray(a)).float()
            t = t.reshape(p.shape[::-1]).T if entry.transpose else t.reshape(p.shape)
            p.copy_(t.to(p.dtype))


def describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(k.removeprefix(PREFIX) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_official_params(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official AF2 ``.npz`` into ``model`` strictly: every key mapped, none left over,
    every shape checked. Any mismatch raises one UserError naming the offending keys."""
    from ferryman.core.files import load_npz

    arrays = load_npz(path, "AlphaFold parameter file")  # every member's CRC checked: bit flips fail here
    load_table(official_table(model), arrays, f"{path}: parameters do not fit this model preset")


def load_table(table: dict[str, Entry], arrays: dict[str, np.ndarray], failure: str) -> None:
    """Copy ``arrays`` into the parameters of ``table`` strictly: every key mapped, none left over,
    every shape checked first; any mismatch is one UserError (``failure``: what, and where)."""
    missing = sorted(set(table) - set(arrays))
    unexpected = sorted(set(arrays) - set(table))
    bad_shape = [k for k in sorted(set(table) & set(arrays)) if tuple(arrays[k].shape) != table[k].full_shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {describe_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {describe_keys(unexpected)}")
    if bad_shape:
        detail = [f"{k.removeprefix(PREFIX)} {tuple(arrays[k].shape)} != {table[k].full_shape}" for k in bad_shape]
        problems.append(f"{len(bad_shape)} shape mismatch(es): {describe_keys(detail)}")
    if problems:
        raise UserError(f"{failure}; " + "; ".join(problems))
    for key, entry in table.items():
        from_official(entry, arrays[key])


def model_from_official_params(preset_or_config, path: str | os.PathLike, *, run=None, **overrides) -> nn.Module:
    """Build the model for a preset without initialising it, then load the official ``.npz`` and
    set it up to run as ``run`` (a ``RunOptions``; default: as ``build_model`` chooses) says.

    The strict load writes every parameter, so the random initialisation (seconds for the 93M
    parameters) is skipped.
    """
    from ferryman.apps.fastfold.model import apply_run_options, build_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(preset_or_config, **overrides)
    model = model.to_empty(device="cpu")
    load_official_params(model, path)  # into fp32 parameters: a bf16 trunk is rounded once, after
    return apply_run_options(model, run or model.run_options).eval()


def official_params(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as the official key -> array dict."""
    return {key: to_official(entry) for key, entry in official_table(model).items()}


def save_official_params(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's parameters in the official ``.npz`` layout (atomically)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **official_params(model))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, config=None) -> None:
    """Ferryman checkpoint: safetensors with the config as JSON metadata (written atomically)."""
    from safetensors.torch import save_file

    metadata = {"format": "ferryman.fastfold"}
    if config is not None:
        metadata["config"] = json.dumps(asdict(config))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a Ferryman safetensors checkpoint strictly; returns its metadata."""
    from ferryman.core.files import check_safetensors, load_safetensors

    header = check_safetensors(path, "fastfold checkpoint")
    state = load_safetensors(path, "fastfold checkpoint")
    _load_strict(model, state, path)
    return dict(header.get("__metadata__") or {})


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path, *, tied_ok: bool = False) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if tied_ok:  # safetensors' save_model drops the second name of a tied tensor
        pointers = {p.data_ptr() for k, p in expected.items() if k in state}
        missing = [k for k in missing if expected[k].data_ptr() not in pointers]
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or resized:
        raise UserError(
            f"{path}: checkpoint does not fit this model; missing: {describe_keys(missing) or 'none'}; "
            f"unexpected: {describe_keys(unexpected) or 'none'}; different shape: {describe_keys(resized) or 'none'}"
        )
    model.load_state_dict(state, strict=False)


def load_training_checkpoint(model: nn.Module, folder: str | os.PathLike) -> str:
    """Weights of a ``fastfold train`` checkpoint folder: the plain engine's model.safetensors,
    then the weight EMA over it when the run kept one (AF2 evaluates with the EMA). Returns which."""
    from ferryman.core.files import load_safetensors

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: no model.safetensors in this checkpoint (a Gemini checkpoint? predict reads "
                        "checkpoints of --memory plain runs)")  # fmt: skip
    _load_strict(model, load_safetensors(weights, "fastfold checkpoint weights"), weights, tied_ok=True)
    ema = folder / "ema.safetensors"
    if not ema.is_file():
        return "model"
    state = load_safetensors(ema, "fastfold checkpoint EMA weights")
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise UserError(f"{ema}: EMA weights that this model does not have: {describe_keys(unknown)}")
    model.load_state_dict(state, strict=False)
    return "ema"
