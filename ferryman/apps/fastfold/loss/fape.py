"""Frame aligned point error (AF2 Suppl. Alg. 28) and the backbone / side-chain FAPE losses
(Suppl. 1.9.2-1.9.3, Alg. 20 lines 17 and 28).

Frames are ``Rigid`` (``rot [*, F, 3, 3]``, ``trans [*, F, 3]``, local -> global); points are
``[*, P, 3]`` in Angstrom.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.rigid import Rigid


def fape(pred_frames: Rigid, true_frames: Rigid, frames_mask: Tensor, pred_points: Tensor, true_points: Tensor,
         points_mask: Tensor, *, clamp_distance: float | None = 10.0, length_scale: float = 10.0,
         eps: float = 1e-4) -> Tensor:  # fmt: skip
    """Mean over (frame, point) pairs of |T_i^-1 x_j - T_i^true^-1 x_j^true|, clamped and scaled:
    ``[*]``. ``clamp_distance=None`` gives the unclamped loss."""
    local_pred = pred_frames.unsqueeze(-1).invert_apply(pred_points[..., None, :, :])  # [*, F, P, 3]
    local_true = true_frames.unsqueeze(-1).invert_apply(true_points[..., None, :, :])
    err = torch.sqrt(((local_pred - local_true) ** 2).sum(-1) + eps)  # [*, F, P]
    if clamp_distance is not None:
        err = err.clamp(max=clamp_distance)
    err = err / length_scale
    pair_mask = frames_mask[..., :, None] * points_mask[..., None, :]
    return (err * pair_mask).sum((-2, -1)) / (eps + frames_mask.sum(-1) * points_mask.sum(-1))


def backbone_fape_loss(pred_frames: Rigid, true_frames: Rigid, frames_mask: Tensor, *,
                       clamp_distance: float = 10.0, use_clamped: Tensor | float = 0.9) -> Tensor:  # fmt: skip
    """Backbone FAPE on the Cα positions of the backbone frames (Alg. 20 line 17).

    ``pred_frames`` may carry a leading structure-module layer dim ``[num_layers, *, N]``; the loss
    is averaged over it. AF2 clamps in 90% of the training batches (Suppl. 1.11.5): pass
    ``use_clamped`` [*] (1 clamped, 0 not) per batch, or a fraction to get the expectation.
    """
    extra = len(pred_frames.shape) - len(true_frames.shape)
    for _ in range(extra):
        true_frames, frames_mask = true_frames.unsqueeze(0), frames_mask[None]
    args = (pred_frames, true_frames, frames_mask, pred_frames.trans, true_frames.trans, frames_mask)
    clamped = fape(*args, clamp_distance=clamp_distance)
    unclamped = fape(*args, clamp_distance=None)
    loss = clamped * use_clamped + unclamped * (1 - use_clamped)
    return loss.mean(dim=tuple(range(extra))) if extra else loss


def atom14_swap_tables(device) -> tuple[Tensor, Tensor]:
    """Per residue type: the atom14 permutation that swaps symmetric atoms ``[21, 14]`` and a mask
    of the atoms that are ambiguous ``[21, 14]`` (AF2 Suppl. 1.9.3, Table 3)."""
    perm = torch.arange(14).repeat(21, 1)
    ambiguous = torch.zeros(21, 14)
    for res, swaps in rc.residue_atom_renaming_swaps.items():
        names = rc.restype_name_to_atom14_names[res]
        r = rc.restype_order[rc.restype_3to1[res]]
        for a, b in swaps.items():
            i, j = names.index(a), names.index(b)
            perm[r, i], perm[r, j] = j, i
            ambiguous[r, i] = ambiguous[r, j] = 1.0
    return perm.to(device), ambiguous.to(device)


def rename_symmetric_atoms(aatype: Tensor, pred_atom14: Tensor, true_atom14: Tensor,
                           true_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Alg. 26 renameSymmetricGroundTruthAtoms: per residue, swap the names of symmetric true atoms
    when that brings the true inter-atom distances closer to the predicted ones.

    aatype ``[*, N]``, positions ``[*, N, 14, 3]``, mask ``[*, N, 14]``. Returns the renamed true
    positions and mask and ``alt_naming_is_better`` ``[*, N]``.
    """
    perm_table, amb_table = atom14_swap_tables(aatype.device)
    perm, ambiguous = perm_table[aatype.long()], amb_table[aatype.long()].to(true_atom14.dtype)  # [*, N, 14]
    alt_pos = torch.gather(true_atom14, -2, perm[..., None].expand(*perm.shape, 3))
    alt_mask = torch.gather(true_mask, -1, perm)

    def dists(x: Tensor) -> Tensor:
        flat = x.flatten(-3, -2)  # [*, N*14, 3]
        return torch.sqrt(((flat[..., :, None, :] - flat[..., None, :, :]) ** 2).sum(-1) + 1e-10)

    pred_d, true_d, alt_d = dists(pred_atom14), dists(true_atom14), dists(alt_pos)
    flat_mask, flat_amb = true_mask.flatten(-2), ambiguous.flatten(-2)  # [*, N*14]
    # Distances from each ambiguous atom to every unambiguous atom decide the naming.
    weight = flat_mask[..., :, None] * flat_mask[..., None, :] * flat_amb[..., :, None] * (1 - flat_amb[..., None, :])
    per_res = _per_residue_errors(pred_d, true_d, alt_d, weight, true_mask.shape[-2])
    alt_better = (per_res[1] < per_res[0]).to(true_atom14.dtype)  # [*, N]
    pick = alt_better[..., None]
    renamed = true_atom14 * (1 - pick[..., None]) + alt_pos * pick[..., None]
    return renamed, true_mask * (1 - pick) + alt_mask * pick, alt_better


def _per_residue_errors(pred_d: Tensor, true_d: Tensor, alt_d: Tensor, weight: Tensor, n: int) -> Tensor:
    """Summed distance errors of each residue's ambiguous atoms to all unambiguous atoms, for the
    true and the alternative naming: ``[2, *, N]``."""
    out = []
    for ref in (true_d, alt_d):
        e = torch.sqrt((pred_d - ref) ** 2 + 1e-10) * weight  # [*, N*14, N*14]
        out.append(e.unflatten(-2, (n, 14)).sum((-2, -1)))
    return torch.stack(out)


def sidechain_fape_loss(pred_frames: Rigid, pred_atom14: Tensor, true_frames: Rigid, alt_true_frames: Rigid,
                        frames_mask: Tensor, true_atom14: Tensor, atom14_mask: Tensor, alt_naming_is_better: Tensor,
                        *, clamp_distance: float = 10.0, length_scale: float = 10.0) -> Tensor:  # fmt: skip
    """All-atom FAPE over the 8 rigid-group frames and the 14 atoms of every residue (Alg. 20
    line 28), with the ground truth renamed per Alg. 26.

    pred_frames / true_frames / alt_true_frames ``[*, N, 8]``, frames_mask ``[*, N, 8]``;
    pred_atom14 ``[*, N, 14, 3]``, true_atom14 and atom14_mask already renamed (see
    ``rename_symmetric_atoms``); alt_naming_is_better ``[*, N]`` picks the alternative true frames.
    """
    pick = alt_naming_is_better[..., None, None]  # [*, N, 1, 1]
    true_rot = true_frames.rot * (1 - pick[..., None]) + alt_true_frames.rot * pick[..., None]
    true_trans = true_frames.trans * (1 - pick) + alt_true_frames.trans * pick
    flat = lambda r: Rigid(r.rot.flatten(-4, -3), r.trans.flatten(-3, -2))  # noqa: E731 [*, N*8]
    return fape(
        flat(pred_frames), flat(Rigid(true_rot, true_trans)), frames_mask.flatten(-2),
        pred_atom14.flatten(-3, -2), true_atom14.flatten(-3, -2), atom14_mask.flatten(-2),
        clamp_distance=clamp_distance, length_scale=length_scale,
    )  # fmt: skip
