"""All-atom geometry: torsion angles from atom37 coordinates and atom positions from torsions.

AF2 Suppl. Alg. 24 (computeAllAtomCoordinates), Alg. 25 (makeRotX) and 1.9.1 (torsion angles).
The seven torsions are ordered pre-omega, phi, psi, chi1..chi4 and encoded as (sin, cos).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.rigid import Rigid, rot_x


def _gather_rows(array, aatype: Tensor, dtype=None) -> Tensor:
    return torch.as_tensor(array, device=aatype.device, dtype=dtype)[aatype]


def _chi_atom_indices(aatype: Tensor) -> Tensor:
    table = torch.zeros(21, 4, 4, dtype=torch.long)
    table[:20] = torch.as_tensor(rc.chi_angles_atom_indices)
    return table.to(aatype.device)[aatype]  # [*, N, 4, 4]


def _backbone_torsion_atoms(pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Atom positions ``[*, N, 3, 4, 3]`` and masks ``[*, N, 3]`` of pre-omega, phi and psi."""
    prev_pos = torch.cat([torch.zeros_like(pos[..., :1, :, :]), pos[..., :-1, :, :]], dim=-3)
    prev_mask = torch.cat([torch.zeros_like(mask[..., :1, :]), mask[..., :-1, :]], dim=-2)
    n, ca, c, o = (rc.atom_order[a] for a in ("N", "CA", "C", "O"))
    pre_omega = torch.stack([prev_pos[..., ca, :], prev_pos[..., c, :], pos[..., n, :], pos[..., ca, :]], -2)
    phi = torch.stack([prev_pos[..., c, :], pos[..., n, :], pos[..., ca, :], pos[..., c, :]], -2)
    psi = torch.stack([pos[..., n, :], pos[..., ca, :], pos[..., c, :], pos[..., o, :]], -2)
    masks = torch.stack(
        [
            prev_mask[..., ca] * prev_mask[..., c] * mask[..., n] * mask[..., ca],
            prev_mask[..., c] * mask[..., n] * mask[..., ca] * mask[..., c],
            mask[..., n] * mask[..., ca] * mask[..., c] * mask[..., o],
        ],
        dim=-1,
    )
    return torch.stack([pre_omega, phi, psi], dim=-3), masks


def atom37_to_torsion_angles(
    aatype: Tensor, all_atom_positions: Tensor, all_atom_mask: Tensor, *, placeholder_for_undefined: bool = False
) -> dict[str, Tensor]:
    """Torsion angles of each residue from atom37 coordinates (AF2 Suppl. 1.9.1).

    aatype ``[*, N]``, positions ``[*, N, 37, 3]``, mask ``[*, N, 37]``. Returns
    ``torsion_angles_sin_cos`` and ``alt_torsion_angles_sin_cos`` ``[*, N, 7, 2]`` (the alternative
    flips pi-periodic chis) and ``torsion_angles_mask`` ``[*, N, 7]``.
    """
    aatype = aatype.long().clamp(max=rc.unk_restype_index)
    pos, mask = all_atom_positions, all_atom_mask.to(all_atom_positions.dtype)
    bb_pos, bb_mask = _backbone_torsion_atoms(pos, mask)
    chi_idx = _chi_atom_indices(aatype)  # [*, N, 4, 4]
    flat_idx = chi_idx.flatten(-2)  # [*, N, 16]
    chi_pos = torch.gather(pos, -2, flat_idx[..., None].expand(*flat_idx.shape, 3)).unflatten(-2, (4, 4))
    chi_atom_mask = torch.gather(mask, -1, flat_idx).unflatten(-1, (4, 4)).prod(-1)
    chi_mask = _gather_rows([*rc.chi_angles_mask, [0.0] * 4], aatype, pos.dtype) * chi_atom_mask
    torsion_pos = torch.cat([bb_pos, chi_pos], dim=-3)  # [*, N, 7, 4, 3]
    torsion_mask = torch.cat([bb_mask, chi_mask], dim=-1)  # [*, N, 7]

    frames = Rigid.from_3_points(torsion_pos[..., 1, :], torsion_pos[..., 2, :], torsion_pos[..., 0, :])
    fourth = frames.invert_apply(torsion_pos[..., 3, :])  # [*, N, 7, 3]
    sin_cos = torch.stack([fourth[..., 2], fourth[..., 1]], dim=-1)
    sin_cos = sin_cos / torch.sqrt((sin_cos**2).sum(-1, keepdim=True) + 1e-8)
    # A torsion whose first two atoms coincide (both absent: the pre-omega of a residue without a
    # predecessor) has no frame. Exact arithmetic gives (0, 0); with fused multiply-adds the
    # rounding residual of the collinear frame is normalised into a random unit vector (AF2 under
    # XLA on FMA hardware, docs/fidelity.md), so the value is pinned whatever compiles this.
    no_frame = (torsion_pos[..., 0, :] == torsion_pos[..., 1, :]).all(-1)  # [*, N, 7]
    sin_cos = sin_cos.masked_fill(no_frame[..., None], 0.0)
    # psi is defined through O, which sits opposite the atom that defines psi in the paper.
    sign = sin_cos.new_tensor([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    sin_cos = sin_cos * sign[:, None]
    periodic = _gather_rows(rc.chi_pi_periodic, aatype, pos.dtype)
    mirror = torch.cat([torch.ones_like(periodic[..., :3]), 1.0 - 2.0 * periodic], dim=-1)
    alt_sin_cos = sin_cos * mirror[..., None]
    if placeholder_for_undefined:
        placeholder = torch.zeros_like(sin_cos)
        placeholder[..., 0] = 1.0
        keep = torsion_mask[..., None]
        sin_cos = sin_cos * keep + placeholder * (1 - keep)
        alt_sin_cos = alt_sin_cos * keep + placeholder * (1 - keep)
    return {
        "torsion_angles_sin_cos": sin_cos,
        "alt_torsion_angles_sin_cos": alt_sin_cos,
        "torsion_angles_mask": torsion_mask,
    }


def torsion_angles_to_frames(aatype: Tensor, backbone: Rigid, angles_sin_cos: Tensor) -> Rigid:
    """Global frames of the 8 rigid groups ``[*, N, 8]`` (AF2 Suppl. Alg. 24 lines 2-10).

    backbone: backbone-to-global frames ``[*, N]``; angles_sin_cos ``[*, N, 7, 2]``.
    """
    aatype = aatype.long()
    default = Rigid.from_tensor_4x4(
        _gather_rows(rc.restype_rigid_group_default_frame, aatype, angles_sin_cos.dtype)
    )  # [*, N, 8]
    sin = torch.cat([torch.zeros_like(angles_sin_cos[..., :1, 0]), angles_sin_cos[..., 0]], dim=-1)
    cos = torch.cat([torch.ones_like(angles_sin_cos[..., :1, 1]), angles_sin_cos[..., 1]], dim=-1)
    frames = default.compose_rot(rot_x(sin, cos))  # each group relative to its parent
    # chi2..chi4 hang off the previous chi group; everything else off the backbone.
    to_backbone = [frames[..., i] for i in range(5)]
    for i in range(5, 8):
        to_backbone.append(to_backbone[i - 1].compose(frames[..., i]))
    stacked = Rigid(
        torch.stack([f.rot for f in to_backbone], dim=-3), torch.stack([f.trans for f in to_backbone], dim=-2)
    )
    return backbone.unsqueeze(-1).compose(stacked)


def frames_to_atom14_positions(aatype: Tensor, group_frames: Rigid) -> Tensor:
    """Atom14 positions ``[*, N, 14, 3]`` from the rigid-group frames (AF2 Suppl. Alg. 24 line 11)."""
    aatype = aatype.long()
    group = _gather_rows(rc.restype_atom14_to_rigid_group, aatype)  # [*, N, 14]
    rot = torch.gather(
        group_frames.rot, -3, group[..., None, None].expand(*group.shape, 3, 3)
    )  # [*, N, 14, 3, 3]
    trans = torch.gather(group_frames.trans, -2, group[..., None].expand(*group.shape, 3))
    literature = _gather_rows(rc.restype_atom14_rigid_group_positions, aatype, trans.dtype)
    positions = Rigid(rot, trans).apply(literature)
    mask = _gather_rows(rc.restype_atom14_mask, aatype, trans.dtype)
    return positions * mask[..., None]
