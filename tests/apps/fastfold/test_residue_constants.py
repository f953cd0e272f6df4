"""Residue constants: alphabets, atom layouts and the idealised geometry behind them."""

from __future__ import annotations

import numpy as np
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import frames_to_atom14_positions, torsion_angles_to_frames
from ferryman.apps.fastfold.common.rigid import Rigid


def test_alphabets_and_sizes():
    assert len(rc.restypes) == 20 and len(rc.atom_types) == 37 and rc.atom_type_num == 37
    assert rc.restypes_with_x[20] == "X" and rc.restypes_with_x_and_gap[21] == "-"
    assert rc.restype_1to3["W"] == "TRP" and rc.restype_3to1["TRP"] == "W"
    # Residue order is alphabetical by three-letter code.
    assert [rc.restype_1to3[r] for r in rc.restypes] == sorted(rc.restype_1to3.values())
    assert rc.atom_order["CA"] == 1 and rc.atom_order["OXT"] == 36


def test_hhblits_mapping():
    mapping = rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE
    assert len(mapping) == 22 and sorted(mapping) == list(range(22))
    for letter in "ACDEFGHIKLMNPQRSTVWY":
        assert mapping[rc.HHBLITS_AA_TO_ID[letter]] == rc.restype_order[letter]
    assert mapping[rc.HHBLITS_AA_TO_ID["-"]] == 21 and mapping[rc.HHBLITS_AA_TO_ID["X"]] == 20
    assert rc.HHBLITS_AA_TO_ID["B"] == rc.HHBLITS_AA_TO_ID["D"] and rc.HHBLITS_AA_TO_ID["U"] == rc.HHBLITS_AA_TO_ID["C"]
    onehot = rc.sequence_to_onehot("ACZ", rc.restype_order_with_x, map_unknown_to_x=True)
    assert onehot.argmax(-1).tolist() == [0, 4, 20]


def test_atom14_layout_covers_each_residue_once():
    for res, names in rc.restype_name_to_atom14_names.items():
        assert len(names) == 14
        real = [n for n in names if n]
        assert len(real) == len(set(real))
        if res != "UNK":
            assert real[:4] == ["N", "CA", "C", "O"]
            assert set(real) == {a for a, _, _ in rc.rigid_group_atom_positions[res]}
    assert rc.STANDARD_ATOM_MASK.sum(-1).tolist() == [len(rc.residue_atoms[rc.restype_1to3[r]]) for r in rc.restypes] + [0]


def test_chi_tables_agree():
    for i, r in enumerate(rc.restypes):
        res = rc.restype_1to3[r]
        assert sum(rc.chi_angles_mask[i]) == len(rc.chi_angles_atoms[res])
        for k, quad in enumerate(rc.chi_angles_atoms[res]):
            assert [rc.atom_types[j] for j in rc.chi_angles_atom_indices[i, k]] == quad
    assert rc.chi_pi_periodic[rc.restype_order["D"]] == [0.0, 1.0, 0.0, 0.0]


def _ideal_residues(chi: float) -> torch.Tensor:
    aatype = torch.arange(20)
    angles = torch.zeros(20, 7, 2)
    angles[..., 0], angles[..., 1] = np.sin(chi), np.cos(chi)
    frames = torsion_angles_to_frames(aatype, Rigid.identity((20,)), angles)
    return frames_to_atom14_positions(aatype, frames)  # [20, 14, 3]


def test_rigid_groups_reproduce_engh_huber_bonds():
    """Building each residue from its rigid groups gives the literature bond lengths, whatever the
    side-chain torsions (within 0.06 A: AF2's idealised groups are rounded averages)."""
    bonds, _, _ = rc.load_stereo_chemical_props()
    for chi in (np.pi / 3, -2.0):
        pos = _ideal_residues(chi)
        for i, r in enumerate(rc.restypes):
            names = rc.restype_name_to_atom14_names[rc.restype_1to3[r]]
            for bond in bonds[rc.restype_1to3[r]]:
                if {bond.atom1_name, bond.atom2_name} == {"CD", "N"}:
                    continue  # proline's ring closes only at its real chi angles
                a, b = names.index(bond.atom1_name), names.index(bond.atom2_name)
                length = torch.linalg.vector_norm(pos[i, a] - pos[i, b]).item()
                assert abs(length - bond.length) < 0.06, (r, bond, length)


def test_atom14_bounds_are_symmetric_and_ordered():
    bounds = rc.make_atom14_dists_bounds()
    lower, upper = bounds["lower_bound"], bounds["upper_bound"]
    assert lower.shape == (21, 14, 14)
    np.testing.assert_array_equal(lower, lower.transpose(0, 2, 1))
    assert (upper >= lower).all()
    ala = rc.restype_order["A"]
    n, ca, cb = 0, 1, 4
    assert abs(lower[ala, n, ca] - (1.459 - 15 * 0.020)) < 1e-5  # a bond: mean - 15 stddev
    assert abs(lower[ala, n, cb] - 2.4) > 0.1  # N-CB spans an angle: a virtual bond, not a clash bound
    clash = rc.van_der_waals_radius["O"] + rc.van_der_waals_radius["C"] - 1.5
    assert abs(lower[ala, 3, 4] - clash) < 1e-5 and upper[ala, 3, 4] > 1e9  # O and CB are not bonded
