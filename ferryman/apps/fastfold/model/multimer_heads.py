"""Interface pTM (ipTM) of AlphaFold-Multimer (Evans et al. 2021, Suppl. 7.9; AF2
``confidence.predicted_tm_score(interface=True)``) and its ranking confidence.

ipTM is pTM with each alignment frame i scoring only residues j of other chains: the expected TM
term of pair (i, j) counts where ``asym_id[i] != asym_id[j]``, normalised over those j, and the
best frame wins. d0 still comes from the whole complex's length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ferryman.apps.fastfold.model.primitives import row_slices

IPTM_WEIGHT = 0.8  # AF2 ranks multimer models by 0.8 ipTM + 0.2 pTM


def _bin_centers(breaks: Tensor) -> Tensor:
    step = breaks[1] - breaks[0]
    centers = breaks + step / 2
    return torch.cat([centers, centers[-1:] + step])


def interface_tm(row_logits: Callable[[slice], Tensor], breaks: Tensor, asym_id: Tensor,
                 residue_weights: Tensor | None = None, chunk_size: int | None = None,
                 eps: float = 1e-8) -> Tensor:  # fmt: skip
    """ipTM from aligned-error logits ``row_logits(rows)`` ``[rows, N, bins]``, one row block of
    alignment frames at a time (the ``[N, N, bins]`` logits need never exist whole)."""
    n = asym_id.shape[0]
    weights = torch.ones(n, device=asym_id.device) if residue_weights is None else residue_weights.float()
    clipped = torch.clamp(weights.sum(), min=19.0)
    d0 = 1.24 * (clipped - 15) ** (1.0 / 3) - 1.8
    tm_per_bin = 1.0 / (1 + (_bin_centers(breaks.float()) / d0) ** 2)
    per_alignment = torch.empty(n, device=asym_id.device)
    for rows in row_slices(n, chunk_size):
        probs = torch.softmax(row_logits(rows).float(), dim=-1)  # [rows, N, bins]
        other_chain = (asym_id[rows, None] != asym_id[None, :]).float()  # [rows, N]
        pair_weights = other_chain * weights[rows, None] * weights[None, :]
        normed = pair_weights / (eps + pair_weights.sum(-1, keepdim=True))
        per_alignment[rows] = ((probs * tm_per_bin).sum(-1) * other_chain * normed).sum(-1)
    return per_alignment[(per_alignment * weights).argmax()]


def ranking_confidence(iptm: Tensor | float, ptm: Tensor | float) -> Tensor | float:
    return IPTM_WEIGHT * iptm + (1 - IPTM_WEIGHT) * ptm
