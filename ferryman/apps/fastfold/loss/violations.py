"""Structural violation loss for fine-tuning (AF2 Suppl. 1.9.11, eq. 44-47), on atom14 positions.

Three terms, each a flat-bottom penalty that is zero inside a tolerance:
- peptide geometry between consecutive residues: C(i)-N(i+1) length and the CA-C-N / C-N-CA
  angles, more than ``tolerance_factor`` literature standard deviations off (Engh & Huber 1991);
- between-residue clashes: heavy atoms closer than the sum of their van der Waals radii minus
  ``overlap_tolerance`` (exempt: the C-N peptide bond and, as in AF2's code, atom14 slot 5
  against slot 5 of any two residues, meant for Cys SG-SG disulfides);
- within-residue distances outside the bounds of ``residue_constants.make_atom14_dists_bounds``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc

N14, CA14, C14 = 0, 1, 2  # atom14 slots shared by every residue type


def _dist(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.sqrt(eps + ((a - b) ** 2).sum(-1))


def _pad_both(x: Tensor) -> Tensor:
    """Per-bond values ``[*, N-1]`` -> per-residue ``[*, N]`` credited to both residues."""
    zero = torch.zeros_like(x[..., :1])
    return torch.cat([x, zero], -1) + torch.cat([zero, x], -1)


def between_residue_bond_and_angle(pos: Tensor, mask: Tensor, residue_index: Tensor, aatype: Tensor, *,
                                   tolerance_factor: float = 12.0, eps: float = 1e-6) -> dict[str, Tensor]:  # fmt: skip
    """Flat-bottom losses of the peptide bond and its two angles (eq. 44-45).

    pos ``[*, N, 14, 3]``, mask ``[*, N, 14]``, residue_index ``[*, N]``, aatype ``[*, N]``.
    """
    ca, c = pos[..., :-1, CA14, :], pos[..., :-1, C14, :]
    n_next, ca_next = pos[..., 1:, N14, :], pos[..., 1:, CA14, :]
    linked = ((residue_index[..., 1:] - residue_index[..., :-1]) == 1).to(pos.dtype)
    next_is_pro = (aatype[..., 1:] == rc.restype_order["P"]).to(pos.dtype)
    gt_len = rc.between_res_bond_length_c_n[0] * (1 - next_is_pro) + rc.between_res_bond_length_c_n[1] * next_is_pro
    gt_std = rc.between_res_bond_length_stddev_c_n[0] * (1 - next_is_pro) + rc.between_res_bond_length_stddev_c_n[1] * next_is_pro
    c_n = _dist(c, n_next, eps)
    bond_mask = mask[..., :-1, C14] * mask[..., 1:, N14] * linked
    bond_err = torch.sqrt(eps + (c_n - gt_len) ** 2)
    bond_loss = torch.relu(bond_err - tolerance_factor * gt_std)

    unit = lambda v, d: v / d[..., None]  # noqa: E731
    c_ca_u = unit(ca - c, _dist(ca, c, eps))
    c_n_u = unit(n_next - c, c_n)
    n_ca_u = unit(ca_next - n_next, _dist(ca_next, n_next, eps))
    angle_mask_1 = mask[..., :-1, CA14] * bond_mask
    angle_mask_2 = bond_mask * mask[..., 1:, CA14]
    cos_1, _ = rc.between_res_cos_angles_ca_c_n
    cos_2, std_2 = rc.between_res_cos_angles_c_n_ca
    # AF2's code (all_atom.between_residue_bond_loss, followed by OpenFold) scores the CA-C-N angle
    # with the C-N bond's standard deviation (0.014), not the angle's own (0.0311) that the
    # supplement implies; the official weights were trained with it, so it is kept.
    std_1 = rc.between_res_bond_length_stddev_c_n[0]
    err_1 = torch.sqrt(eps + ((c_ca_u * c_n_u).sum(-1) - cos_1) ** 2)
    err_2 = torch.sqrt(eps + ((-c_n_u * n_ca_u).sum(-1) - cos_2) ** 2)
    loss_1, loss_2 = torch.relu(err_1 - tolerance_factor * std_1), torch.relu(err_2 - tolerance_factor * std_2)

    mean = lambda x, m: (x * m).sum(-1) / (eps + m.sum(-1))  # noqa: E731
    violated = torch.stack([
        bond_mask * (bond_err > tolerance_factor * gt_std),
        angle_mask_1 * (err_1 > tolerance_factor * std_1),
        angle_mask_2 * (err_2 > tolerance_factor * std_2),
    ]).amax(0)  # fmt: skip
    return {
        "c_n_loss_mean": mean(bond_loss, bond_mask),
        "ca_c_n_loss_mean": mean(loss_1, angle_mask_1),
        "c_n_ca_loss_mean": mean(loss_2, angle_mask_2),
        "per_residue_loss_sum": 0.5 * _pad_both(bond_loss * bond_mask + loss_1 * angle_mask_1 + loss_2 * angle_mask_2),
        "per_residue_violation": _pad_both(violated).clamp(max=1.0),
    }


def _atom14_radius(aatype: Tensor, dtype) -> Tensor:
    table = torch.zeros(21, 14, dtype=dtype)
    for r, letter in enumerate(rc.restypes):
        for i, name in enumerate(rc.restype_name_to_atom14_names[rc.restype_1to3[letter]]):
            if name:
                table[r, i] = rc.van_der_waals_radius[name[0]]
    return table.to(aatype.device)[aatype.long().clamp(max=20)]


def between_residue_clashes(pos: Tensor, mask: Tensor, residue_index: Tensor, aatype: Tensor, *,
                            overlap_tolerance: float = 1.5, eps: float = 1e-10) -> dict[str, Tensor]:  # fmt: skip
    """Clash loss between atoms of different residues (eq. 46); per-atom sums ``[*, N, 14]``."""
    n = pos.shape[-3]
    flat, fmask = pos.flatten(-3, -2), mask.flatten(-2)  # [*, N*14, 3], [*, N*14]
    radius = _atom14_radius(aatype, pos.dtype).flatten(-2)
    res = torch.arange(n, device=pos.device).repeat_interleave(14)
    slot = torch.arange(14, device=pos.device).repeat(n)
    ridx = residue_index.repeat_interleave(14, dim=-1)
    d = torch.sqrt(eps + ((flat[..., :, None, :] - flat[..., None, :, :]) ** 2).sum(-1))  # [*, A, A]
    pair = (res[:, None] < res[None, :]).to(pos.dtype) * fmask[..., :, None] * fmask[..., None, :]
    peptide = (slot[:, None] == C14) & (slot[None, :] == N14) & ((ridx[..., None, :] - ridx[..., :, None]) == 1)
    # Disulfides: AF2 exempts atom14 slot 5 (Cys SG) against slot 5 of any two residues, whatever
    # their types (all_atom.between_residue_clash_loss; OpenFold does the same); so does this.
    sg = rc.restype_name_to_atom14_names["CYS"].index("SG")
    disulfide = (slot[:, None] == sg) & (slot[None, :] == sg)
    pair = pair * (~peptide).to(pos.dtype) * (~disulfide).to(pos.dtype)
    lower = radius[..., :, None] + radius[..., None, :]
    err = pair * torch.relu(lower - overlap_tolerance - d)
    per_atom = (err.sum(-1) + err.sum(-2)).unflatten(-1, (n, 14))
    clash = pair * (d < lower - overlap_tolerance).to(pos.dtype)
    per_atom_clash = torch.maximum(clash.amax(-1), clash.amax(-2)).unflatten(-1, (n, 14))
    return {
        "mean_loss": err.sum((-2, -1)) / (1e-6 + pair.sum((-2, -1))),
        "per_atom_loss_sum": per_atom,
        "per_atom_clash": per_atom_clash,
    }


def within_residue_violations(pos: Tensor, mask: Tensor, aatype: Tensor, *, overlap_tolerance: float = 1.5,
                              tolerance_factor: float = 12.0, eps: float = 1e-10) -> dict[str, Tensor]:  # fmt: skip
    """Intra-residue distances outside [lower, upper] bounds (eq. 47); per-atom ``[*, N, 14]``."""
    bounds = rc.make_atom14_dists_bounds(overlap_tolerance, tolerance_factor)
    idx = aatype.long().clamp(max=20)
    lower = torch.as_tensor(bounds["lower_bound"], dtype=pos.dtype, device=pos.device)[idx]  # [*, N, 14, 14]
    upper = torch.as_tensor(bounds["upper_bound"], dtype=pos.dtype, device=pos.device)[idx]
    d = torch.sqrt(eps + ((pos[..., :, None, :] - pos[..., None, :, :]) ** 2).sum(-1))
    pair = mask[..., :, None] * mask[..., None, :] * (1 - torch.eye(14, dtype=pos.dtype, device=pos.device))
    pair = pair * ((lower + upper) > 0).to(pos.dtype)  # slots the residue type does not have
    err = pair * (torch.relu(lower - d) + torch.relu(d - upper))
    bad = pair * ((d < lower) | (d > upper)).to(pos.dtype)
    # Both orderings of each pair are in err and each is credited to both atoms, as in AF2.
    return {"per_atom_loss_sum": err.sum(-1) + err.sum(-2), "per_atom_violation": bad.amax(-1)}


def find_structural_violations(pos: Tensor, mask: Tensor, residue_index: Tensor, aatype: Tensor, *,
                               tolerance_factor: float = 12.0, overlap_tolerance: float = 1.5) -> dict:  # fmt: skip
    """All three terms and a per-residue violation flag ``[*, N]`` (AF2's ``find_structural_violations``)."""
    bonds = between_residue_bond_and_angle(pos, mask, residue_index, aatype, tolerance_factor=tolerance_factor)
    clashes = between_residue_clashes(pos, mask, residue_index, aatype, overlap_tolerance=overlap_tolerance)
    within = within_residue_violations(pos, mask, aatype, overlap_tolerance=overlap_tolerance,
                                       tolerance_factor=tolerance_factor)  # fmt: skip
    per_residue = torch.stack([
        bonds["per_residue_violation"], clashes["per_atom_clash"].amax(-1), within["per_atom_violation"].amax(-1),
    ]).amax(0)  # fmt: skip
    return {"bonds": bonds, "clashes": clashes, "within": within, "per_residue_violation": per_residue}


def violation_loss(violations: dict, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """AF2's L_viol ``[*]``: the three peptide terms plus clash and within-residue losses per atom."""
    bonds = violations["bonds"]
    per_atom = violations["clashes"]["per_atom_loss_sum"] + violations["within"]["per_atom_loss_sum"]
    return (bonds["c_n_loss_mean"] + bonds["ca_c_n_loss_mean"] + bonds["c_n_ca_loss_mean"]
            + per_atom.sum((-2, -1)) / (eps + mask.sum((-2, -1))))  # fmt: skip
