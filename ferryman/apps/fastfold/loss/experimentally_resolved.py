"""Experimentally-resolved loss (AF2 Suppl. 1.9.10): per-atom37 sigmoid cross-entropy of whether
each atom that the residue type has was resolved in the experiment (fine-tuning only)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def experimentally_resolved_loss(logits: Tensor, all_atom_mask: Tensor, atom37_exists: Tensor, *,
                                 resolution: Tensor | None = None, min_resolution: float = 0.1,
                                 max_resolution: float = 3.0, eps: float = 1e-8) -> Tensor:  # fmt: skip
    """Mean binary cross-entropy ``[*]`` over the atoms the residue types have.

    logits ``[*, N, 37]``; all_atom_mask ``[*, N, 37]`` (1 = resolved, the target);
    atom37_exists ``[*, N, 37]`` (1 = the residue type has this atom); resolution ``[*]`` gates
    structures outside [min_resolution, max_resolution] Å to zero as in AF2.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), all_atom_mask.float(), reduction="none")
    exists = atom37_exists.to(bce.dtype)
    loss = (bce * exists).sum((-2, -1)) / (eps + exists.sum((-2, -1)))
    if resolution is not None:
        loss = loss * ((resolution >= min_resolution) & (resolution <= max_resolution)).to(loss.dtype)
    return loss
