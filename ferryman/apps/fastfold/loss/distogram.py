"""Distogram loss (AF2 Suppl. 1.9.8): cross-entropy of binned pseudo-beta distances."""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.model.config import HeadsConfig
from ferryman.apps.fastfold.model.heads import bin_edges

# The distogram head's binning (AF2 config: 64 bins, 63 inner edges from 2.3125 to 21.6875 Angstrom).
_HEADS = HeadsConfig()
FIRST_BREAK, LAST_BREAK, NUM_BINS = _HEADS.distogram_first_break, _HEADS.distogram_last_break, _HEADS.distogram_bins


def distogram_bins(pseudo_beta: Tensor, *, first_break: float = FIRST_BREAK, last_break: float = LAST_BREAK,
                   num_bins: int = NUM_BINS) -> Tensor:  # fmt: skip
    """True bin index ``[*, N, N]`` of every pairwise distance of ``pseudo_beta`` ``[*, N, 3]``."""
    edges = bin_edges(first_break, last_break, num_bins, device=pseudo_beta.device, dtype=pseudo_beta.dtype)
    d2 = ((pseudo_beta[..., :, None, :] - pseudo_beta[..., None, :, :]) ** 2).sum(-1, keepdim=True)
    return (d2 > edges**2).sum(-1)


def distogram_loss(logits: Tensor, pseudo_beta: Tensor, pseudo_beta_mask: Tensor, *, first_break: float = FIRST_BREAK,
                   last_break: float = LAST_BREAK, eps: float = 1e-6) -> Tensor:  # fmt: skip
    """Mean cross-entropy ``[*]`` over residue pairs where both pseudo-beta atoms exist.

    logits ``[*, N, N, num_bins]``, pseudo_beta ``[*, N, 3]``, pseudo_beta_mask ``[*, N]``.
    """
    target = distogram_bins(pseudo_beta.float(), first_break=first_break, last_break=last_break,
                            num_bins=logits.shape[-1])  # fmt: skip
    ce = -torch.gather(torch.log_softmax(logits.float(), -1), -1, target[..., None])[..., 0]  # [*, N, N]
    pair_mask = pseudo_beta_mask[..., :, None] * pseudo_beta_mask[..., None, :]
    return (ce * pair_mask).sum((-2, -1)) / (eps + pair_mask.sum((-2, -1)))
