"""Official AlphaFold-Multimer parameters (``params_model_{1..5}_multimer_v3.npz``) in and out.

The multimer files follow the monomer layout (``weights.py``) with three differences:

- module paths of the multimer-only modules: the chain-relative encoding lives under
  ``evoformer/~_relative_encoding/``, the template pair features, query norm and pair stack under
  ``evoformer/template_embedding/single_template_embedding/`` (the stack as
  ``template_embedding_iteration``), and the structure module's attention has separate
  ``{q,k,v}_scalar_projection`` ``[c_s, H, C]`` and ``{q,k,v}_point_projection/point_projection``
  ``[c_s, H, 3 P]`` arrays;
- scalar template features (``template_pair_embedding_{1,4..7}``) have weight vectors ``[c_t]``;
- the v3 triangle multiplications are fused (AF2 v2.3 ``fuse_projection_weights``): one
  ``projection`` and one ``gate`` ``[c_z, 2 c]`` hold the left then the right half, and the
  norms are ``left_norm_input`` and ``center_norm``.

The table is the monomer table of the same model with those renames and shapes; fused arrays are
split when read and joined when written, so the model keeps one set of module names.
"""

from __future__ import annotations

import os
import re

import numpy as np
from torch import nn

from ferryman.apps.fastfold.weights import PREFIX, Entry, load_table, to_official
from ferryman.apps.fastfold.weights import official_table as monomer_table
from ferryman.core.io import atomic_path

_SINGLE = "evoformer/template_embedding/single_template_embedding/"
# official path from the monomer rules -> the multimer's (first match wins)
_RENAMES = (
    ("evoformer/relative_encoding/", "evoformer/~_relative_encoding/"),
    (_SINGLE + "template_pair_stack/__layer_stack_no_state/", _SINGLE + "template_embedding_iteration/"),
    ("evoformer/template_pair_embedding_", _SINGLE + "template_pair_embedding_"),
    ("evoformer/query_embedding_norm", _SINGLE + "query_embedding_norm"),
    ("evoformer/output_linear", "evoformer/template_embedding/output_linear"),
)
_SCALAR_FEATURES = re.compile(r"template_pair_embedding_[14567]//weights$")
_TRIMUL = re.compile(r"^(?P<module>.*/triangle_multiplication_(?:incoming|outgoing))/(?P<child>[^/]+)//(?P<name>\w+)$")
_FUSED_LINEARS = ("projection", "gate")  # fused name; unfused: left_<name>, right_<name>
_FUSED_NORMS = {"left_norm_input": "layer_norm_input", "center_norm": "center_layer_norm"}


def _rename(key: str) -> str:
    path = key.removeprefix(PREFIX)
    for old, new in _RENAMES:
        if path.startswith(old):
            return PREFIX + new + path[len(old) :]
    return key


def _shape(key: str, entry: Entry, model: nn.Module) -> tuple[int, ...]:
    """The per-layer official shape where the multimer's differs from a plain linear's."""
    s = model.cfg.structure
    if _SCALAR_FEATURES.search(key):
        return (entry.shape[-1],)
    if re.search(r"_scalar_projection//weights$", key):
        return (entry.shape[0], s.num_heads, s.c_hidden_scalar)
    if "_point_projection/point_projection//" in key:
        per_head = entry.shape[-1] // s.num_heads
        return (entry.shape[0], s.num_heads, per_head) if key.endswith("weights") else (s.num_heads, per_head)
    return entry.shape


def official_table(model: nn.Module) -> dict[str, Entry]:
    """Every official multimer key of ``model`` (unfused names) with its shape and parameters."""
    table = {}
    for key, entry in monomer_table(model).items():
        key = _rename(key)
        entry.key, entry.shape = key, _shape(key, entry, model)
        table[key] = entry
    return table


def unfuse(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """v3's fused triangle-multiplication arrays as the left/right ones the model holds."""
    out = {}
    for key, value in arrays.items():
        match = _TRIMUL.match(key)
        child = match.group("child") if match else None
        if child in _FUSED_LINEARS:
            half = value.shape[-1] // 2
            out[f"{match['module']}/left_{child}//{match['name']}"] = value[..., :half]
            out[f"{match['module']}/right_{child}//{match['name']}"] = value[..., half:]
        elif child in _FUSED_NORMS:
            out[f"{match['module']}/{_FUSED_NORMS[child]}//{match['name']}"] = value
        else:
            out[key] = value
    return out


def fuse(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``unfuse``: the layout AF2 v2.3 writes for multimer v3."""
    out, norms = {}, {v: k for k, v in _FUSED_NORMS.items()}
    for key, value in arrays.items():
        match = _TRIMUL.match(key)
        child = match.group("child") if match else None
        if child is not None and child.startswith("left_") and child[5:] in _FUSED_LINEARS:
            right = arrays[f"{match['module']}/right_{child[5:]}//{match['name']}"]
            out[f"{match['module']}/{child[5:]}//{match['name']}"] = np.concatenate([value, right], axis=-1)
        elif child is not None and child.startswith("right_") and child[6:] in _FUSED_LINEARS:
            continue
        elif child in norms:
            out[f"{match['module']}/{norms[child]}//{match['name']}"] = value
        else:
            out[key] = value
    return out


def official_params(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as the official multimer v3 key -> array dict (fused)."""
    return fuse({key: to_official(entry) for key, entry in official_table(model).items()})


def save_official_params(model: nn.Module, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **official_params(model))


def load_official_params(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official multimer ``.npz`` strictly (every key mapped, none left over, shapes
    checked); any mismatch is one UserError naming the keys."""
    from ferryman.core.files import load_npz

    arrays = unfuse(load_npz(path, "AlphaFold-Multimer parameter file"))
    load_table(official_table(model), arrays, f"{path}: parameters do not fit this multimer model preset")


def model_from_official_params(cfg, path: str | os.PathLike, *, run=None) -> nn.Module:
    """A multimer model for ``cfg`` built on the meta device, filled from the official npz (in
    fp32; a bf16 trunk is rounded once, after) and set up to run as ``run`` (``RunOptions``) says."""
    import torch

    from ferryman.apps.fastfold.model import apply_run_options, build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    load_official_params(model, path)
    return apply_run_options(model, run or model.run_options).eval()
