"""Amber relaxation of the real villin headpiece with perturbed side chains (OpenMM + pdbfixer)."""

import numpy as np
import pytest

from ferryman.apps.fastfold.relax.amber import RelaxConfig, relax, select_platform
from ferryman.apps.fastfold.relax.violations import find_violations
from ferryman.core.errors import UserError

from ._structures import perturb_side_chains, villin_protein

pytest.importorskip("openmm")
pytest.importorskip("pdbfixer")


def _violations(prot):
    return find_violations(prot.atom_positions, prot.atom_mask, prot.aatype, prot.residue_index)


def test_crystal_like_villin_has_no_violations():
    assert _violations(villin_protein())["num_residue_violations"] == 0


def test_relax_removes_clashes_and_keeps_backbone():
    native = villin_protein()
    plddt = np.linspace(30, 90, native.aatype.shape[0]).astype(np.float32)
    native.b_factors = np.repeat(plddt[:, None], 37, axis=1)
    perturbed = perturb_side_chains(native, scale=0.8, seed=0)
    before = _violations(perturbed)
    assert before["num_clashing_residues"] > 0  # the perturbation really broke the structure

    result = relax(perturbed, RelaxConfig(platform="CPU"))

    assert result.final_energy < result.initial_energy
    assert result.ca_rmsd < 1.0
    after = _violations(result.protein)
    assert after["num_residue_violations"] == 0 and result.violations_after == 0
    # Same residues, every heavy atom present, pLDDT kept in the B-factors.
    assert np.array_equal(result.protein.aatype, native.aatype)
    heavy = native.atom_mask > 0
    assert np.all(result.protein.atom_mask[heavy] == 1)
    assert np.allclose(result.protein.b_factors[:, 1], plddt)
    # Restraints hold the backbone where it was; side chains moved back towards sane geometry.
    ca_shift = np.linalg.norm(result.protein.atom_positions[:, 1] - perturbed.atom_positions[:, 1], axis=-1)
    assert ca_shift.max() < 1.5
    assert "HETATM" not in result.pdb_with_hydrogens and " H " in result.pdb_with_hydrogens


def test_excluded_residues_are_unrestrained_and_reported():
    perturbed = perturb_side_chains(villin_protein(), scale=0.5, seed=1)
    result = relax(perturbed, RelaxConfig(platform="CPU", exclude_residues=[0, 1]))
    assert {0, 1} <= set(result.excluded_residues)
    assert result.final_energy < result.initial_energy


def test_bad_settings_and_platforms():
    with pytest.raises(ValueError, match="stiffness"):
        RelaxConfig(stiffness=-1.0)
    with pytest.raises(UserError, match="OpenMM platform 'NoSuchPlatform' is not available"):
        select_platform("NoSuchPlatform")
