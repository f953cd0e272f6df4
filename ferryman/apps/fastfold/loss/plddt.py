"""pLDDT loss (AF2 Suppl. 1.9.6): cross-entropy of the predicted lDDT-Cα bins against the
per-residue lDDT-Cα of the final predicted structure, with no gradient into the structure."""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.metrics import lddt


def lddt_bins(pred_ca: Tensor, true_ca: Tensor, ca_mask: Tensor, num_bins: int = 50) -> Tensor:
    """Bin index ``[*, N]`` of each residue's lDDT-Cα (15 Å cutoff), bins of width 1/num_bins."""
    score = lddt(pred_ca.detach().float(), true_ca.float(), ca_mask, cutoff=15.0, per_residue=True)
    return (score * num_bins).floor().clamp(max=num_bins - 1).long()


def plddt_loss(logits: Tensor, pred_ca: Tensor, true_ca: Tensor, ca_mask: Tensor, *, resolution: Tensor | None = None,
               min_resolution: float = 0.1, max_resolution: float = 3.0, eps: float = 1e-10) -> Tensor:  # fmt: skip
    """Mean cross-entropy ``[*]`` over residues with a true Cα; structures whose resolution lies
    outside [min_resolution, max_resolution] Å contribute zero (AF2 trains pLDDT on those only).

    logits ``[*, N, num_bins]``, Cα positions ``[*, N, 3]``, ca_mask ``[*, N]``, resolution ``[*]``.
    """
    target = lddt_bins(pred_ca, true_ca, ca_mask, logits.shape[-1])
    ce = -torch.gather(torch.log_softmax(logits.float(), -1), -1, target[..., None])[..., 0]  # [*, N]
    mask = ca_mask.to(ce.dtype)
    loss = (ce * mask).sum(-1) / (eps + mask.sum(-1))
    if resolution is not None:
        loss = loss * ((resolution >= min_resolution) & (resolution <= max_resolution)).to(loss.dtype)
    return loss
