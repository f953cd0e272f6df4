"""Masked MSA loss (AF2 Suppl. 1.9.9): BERT-style cross-entropy at the masked MSA positions."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_msa_loss(logits: Tensor, true_msa: Tensor, bert_mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Mean cross-entropy ``[*]`` over masked positions.

    logits ``[*, N_seq, N_res, 23]`` (20 amino acids, X, gap, mask token), true_msa
    ``[*, N_seq, N_res]`` class indices, bert_mask ``[*, N_seq, N_res]`` (1 where the input was masked).
    """
    logp = torch.log_softmax(logits.float(), -1)
    ce = -torch.gather(logp, -1, true_msa.long()[..., None])[..., 0]
    mask = bert_mask.to(ce.dtype)
    return (ce * mask).sum((-2, -1)) / (eps + mask.sum((-2, -1)))
