"""Per-residue atom layouts: atom14 <-> atom37 conversion, atom masks and pseudo-beta positions.

atom37 has one slot per atom type (``residue_constants.atom_types``); atom14 packs each residue's
heavy atoms into 14 slots (``restype_name_to_atom14_names``). Index tensors are gathered per
residue from ``aatype`` (0..20; 20 = unknown, which has no atoms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc


def _table(array, like: Tensor, dtype=None) -> Tensor:
    return torch.as_tensor(array, device=like.device, dtype=dtype)


def atom14_masks(aatype: Tensor) -> dict[str, Tensor]:
    """Gather-index and existence masks for ``aatype`` ``[*, N]``.

    Returns ``residx_atom14_to_atom37`` ``[*, N, 14]``, ``residx_atom37_to_atom14`` ``[*, N, 37]``,
    ``atom14_atom_exists`` ``[*, N, 14]`` and ``atom37_atom_exists`` ``[*, N, 37]`` (float), the
    feature names AF2 uses.
    """
    aatype = aatype.long().clamp(max=rc.unk_restype_index)
    return {
        "residx_atom14_to_atom37": _table(rc.restype_atom14_to_atom37, aatype)[aatype],
        "residx_atom37_to_atom14": _table(rc.restype_atom37_to_atom14, aatype)[aatype],
        "atom14_atom_exists": _table(rc.restype_atom14_mask, aatype, torch.float32)[aatype],
        "atom37_atom_exists": _table(rc.restype_atom37_mask, aatype, torch.float32)[aatype],
    }


def atom14_to_atom37(atom14: Tensor, aatype: Tensor) -> Tensor:
    """Scatter atom14 data ``[*, N, 14, ...]`` into the atom37 layout ``[*, N, 37, ...]``.

    Atom types the residue lacks are zero.
    """
    masks = atom14_masks(aatype)
    index = masks["residx_atom37_to_atom14"]  # [*, N, 37]
    extra = atom14.shape[index.dim() :]
    index = index.reshape(*index.shape, *([1] * len(extra))).expand(*index.shape, *extra)
    out = torch.gather(atom14, index.dim() - 1 - len(extra), index)
    exists = masks["atom37_atom_exists"].to(atom14.dtype)
    return out * exists.reshape(*exists.shape, *([1] * len(extra)))


def atom37_to_atom14(atom37: Tensor, aatype: Tensor) -> Tensor:
    """Gather atom37 data ``[*, N, 37, ...]`` into the atom14 layout ``[*, N, 14, ...]``."""
    masks = atom14_masks(aatype)
    index = masks["residx_atom14_to_atom37"]  # [*, N, 14]
    extra = atom37.shape[index.dim() :]
    index = index.reshape(*index.shape, *([1] * len(extra))).expand(*index.shape, *extra)
    out = torch.gather(atom37, index.dim() - 1 - len(extra), index)
    exists = masks["atom14_atom_exists"].to(atom37.dtype)
    return out * exists.reshape(*exists.shape, *([1] * len(extra)))


def pseudo_beta(aatype: Tensor, atom37: Tensor, atom37_mask: Tensor | None = None):
    """CB position (CA for glycine) ``[*, N, 3]``, and its mask when ``atom37_mask`` is given."""
    is_gly = aatype == rc.restype_order["G"]
    ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
    positions = torch.where(is_gly[..., None], atom37[..., ca, :], atom37[..., cb, :])
    if atom37_mask is None:
        return positions
    mask = torch.where(is_gly, atom37_mask[..., ca], atom37_mask[..., cb])
    return positions, mask.to(atom37.dtype)
