"""Structural violations (AF2 Suppl. 1.9.11) on villin: the real structure is clean, and the
per-residue flags agree with the independent numpy checker in relax/violations.py (atom37)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.loss.violations import find_structural_violations, violation_loss


def _villin():
    pytest.importorskip("openmm")
    from tests.apps.fastfold._structures import villin_protein

    return villin_protein()


def _atom14(prot):
    aatype = torch.as_tensor(prot.aatype).long()
    idx = torch.as_tensor(rc.restype_atom14_to_atom37)[aatype]
    slots = torch.as_tensor(rc.restype_atom14_mask, dtype=torch.float64)[aatype]
    pos37 = torch.as_tensor(prot.atom_positions, dtype=torch.float64)
    mask37 = torch.as_tensor(prot.atom_mask, dtype=torch.float64)
    pos = torch.gather(pos37, 1, idx[..., None].expand(*idx.shape, 3))
    mask = torch.gather(mask37, 1, idx) * slots
    return pos * mask[..., None], mask, torch.as_tensor(prot.residue_index).long(), aatype


def _reference_flags(prot):
    from ferryman.apps.fastfold.relax.violations import find_violations

    return find_violations(prot.atom_positions, prot.atom_mask, prot.aatype, prot.residue_index)["per_residue"]


def test_real_villin_has_no_violations():
    pos, mask, ridx, aatype = _atom14(_villin())
    v = find_structural_violations(pos, mask, ridx, aatype)
    assert v["per_residue_violation"].sum().item() == 0
    assert violation_loss(v, mask).item() < 1e-3


def test_flags_match_relax_checker_on_distorted_villin():
    from tests.apps.fastfold._structures import perturb_side_chains

    prot = _villin()
    bad = perturb_side_chains(prot, scale=0.3, seed=5)
    pos37 = bad.atom_positions.copy()
    pos37[20:] += np.array([2.5, 0.0, 0.0], np.float32)  # break the 19-20 peptide bond
    bad = type(bad)(**{**vars(bad), "atom_positions": pos37})
    pos, mask, ridx, aatype = _atom14(bad)
    ours = find_structural_violations(pos, mask, ridx, aatype)["per_residue_violation"].bool().numpy()
    theirs = _reference_flags(bad)
    assert 5 <= theirs.sum() <= 30  # a mix of clean and violating residues
    # The reference checks bond lengths only between residues; ours adds the two peptide angles.
    np.testing.assert_array_equal(ours | theirs, ours)
    bonds = find_structural_violations(pos, mask, ridx, aatype)["bonds"]["per_residue_violation"].bool().numpy()
    np.testing.assert_array_equal(ours & ~bonds, theirs & ~bonds)
    assert bonds[19] and bonds[20]


def test_violation_loss_gradient_pushes_clashing_atoms_apart():
    pos, mask, ridx, aatype = _atom14(_villin())
    pos = pos.clone()
    pos[10, 1] = pos[5, 1] + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)  # CA onto CA
    pos.requires_grad_(True)
    loss = violation_loss(find_structural_violations(pos, mask, ridx, aatype), mask)
    assert loss.item() > 0.01
    loss.backward()
    sep = (pos[10, 1] - pos[5, 1]).detach()
    # Gradient descent on pos[10, CA] moves it away from pos[5, CA].
    assert torch.dot(-pos.grad[10, 1], sep).item() > 0
