"""Torsion-angle loss (AF2 Suppl. 1.9.1, Alg. 27 torsionAngleLoss) and AF2's supervised chi loss.

Angles are (sin, cos) pairs ``[*, N, 7, 2]`` ordered pre-omega, phi, psi, chi1..chi4; the
prediction is unnormalised (the structure module's raw output).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(values: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    mask = mask.expand_as(values)
    return (values * mask).sum((-2, -1)) / (eps + mask.sum((-2, -1)))


def torsion_angle_loss(pred_unnormalized: Tensor, true: Tensor, alt_true: Tensor, mask: Tensor, *,
                       angle_norm_weight: float = 0.02, eps: float = 1e-6) -> Tensor:  # fmt: skip
    """Alg. 27: squared chord distance to the closer of the true and the pi-flipped alternative
    angle, plus ``angle_norm_weight`` times the mean deviation of |pred| from 1: ``[*]``.

    ``pred_unnormalized`` may carry extra leading dims (structure-module layers) over ``true``
    ``[*, N, 7, 2]`` and ``mask`` ``[*, N, 7]``; the result keeps them.
    """
    norm = torch.sqrt((pred_unnormalized**2).sum(-1) + eps)  # [*, N, 7]
    pred = pred_unnormalized / norm[..., None]
    err = torch.minimum(((pred - true) ** 2).sum(-1), ((pred - alt_true) ** 2).sum(-1))
    return _masked_mean(err, mask, eps) + angle_norm_weight * _masked_mean((norm - 1).abs(), mask, eps)


def supervised_chi_loss(pred_unnormalized: Tensor, true: Tensor, alt_true: Tensor, mask: Tensor, *,
                        chi_weight: float = 0.5, angle_norm_weight: float = 0.01, eps: float = 1e-6) -> Tensor:  # fmt: skip
    """The torsion loss as AF2 trains it (``supervised_chi`` config): the angle term over the
    four chi angles weighted by ``chi_weight``, the norm term over all seven torsions."""
    chi = slice(3, 7)
    norm = torch.sqrt((pred_unnormalized**2).sum(-1) + eps)
    pred = pred_unnormalized / norm[..., None]
    err = torch.minimum(((pred - true) ** 2).sum(-1), ((pred - alt_true) ** 2).sum(-1))[..., chi]
    chi_mask = mask[..., chi]
    return chi_weight * _masked_mean(err, chi_mask, eps) + angle_norm_weight * _masked_mean((norm - 1).abs(), mask, eps)
