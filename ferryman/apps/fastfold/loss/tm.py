"""Predicted aligned error / pTM loss (AF2 Suppl. 1.9.7): cross-entropy of the binned error of
residue j's Cα in the frame of residue i, between the predicted and the true backbone frames."""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.model.config import HeadsConfig
from ferryman.apps.fastfold.model.heads import bin_edges

# The PAE head's binning (AF2 config: 64 bins, 63 inner edges evenly spaced from 0 to 31 Angstrom).
MAX_ERROR_BIN, NUM_BINS = HeadsConfig().pae_max_error_bin, HeadsConfig().pae_bins


def aligned_error_bins(pred_frames: Rigid, true_frames: Rigid, num_bins: int = NUM_BINS,
                       max_error_bin: float = MAX_ERROR_BIN) -> Tensor:  # fmt: skip
    """Bin ``[*, N, N]`` of the aligned error e_ij = |T_i^-1 x_j - T_i^true^-1 x_j^true| (no gradient)."""
    pred_frames = Rigid(pred_frames.rot.detach(), pred_frames.trans.detach())
    local_pred = pred_frames.unsqueeze(-1).invert_apply(pred_frames.trans[..., None, :, :])  # [*, N, N, 3]
    local_true = true_frames.unsqueeze(-1).invert_apply(true_frames.trans[..., None, :, :])
    sq_err = ((local_pred - local_true) ** 2).sum(-1, keepdim=True)
    edges = bin_edges(0.0, max_error_bin, num_bins, device=sq_err.device, dtype=sq_err.dtype)
    return (sq_err > edges**2).sum(-1)


def tm_loss(logits: Tensor, pred_frames: Rigid, true_frames: Rigid, frames_mask: Tensor, *,
            resolution: Tensor | None = None, min_resolution: float = 0.1, max_resolution: float = 3.0,
            max_error_bin: float = MAX_ERROR_BIN, eps: float = 1e-8) -> Tensor:  # fmt: skip
    """Mean cross-entropy ``[*]`` over pairs of residues with true backbone frames.

    logits ``[*, N, N, num_bins]`` from the PAE head, frames ``[*, N]``, frames_mask ``[*, N]``.
    """
    target = aligned_error_bins(pred_frames, true_frames, logits.shape[-1], max_error_bin)
    ce = -torch.gather(torch.log_softmax(logits.float(), -1), -1, target[..., None])[..., 0]
    pair = frames_mask[..., :, None] * frames_mask[..., None, :]
    loss = (ce * pair).sum((-2, -1)) / (eps + pair.sum((-2, -1)))
    if resolution is not None:
        loss = loss * ((resolution >= min_resolution) & (resolution <= max_resolution)).to(loss.dtype)
    return loss
