"""The structural violation terms (AF2 Suppl. 1.9.11) against AlphaFold2's own ``all_atom``
functions, on a distorted villin fragment with bond, angle, clash and within-residue violations.

Two details follow AF2's code rather than the supplement, and are checked here: the CA-C-N angle
is scored with the standard deviation of the C-N bond length (0.014, not the angle's 0.0311), and
atom14 slot 5 against slot 5 of any two residues is exempt from clashes (meant for Cys SG-SG
disulfides)."""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.all_atom", reason="needs the parity extra (AlphaFold2's JAX code)")

import jax.numpy as jnp
import numpy as np
import torch
from alphafold.common import residue_constants as arc
from alphafold.model import all_atom

from ferryman.apps.fastfold.loss.violations import (
    between_residue_bond_and_angle,
    between_residue_clashes,
    within_residue_violations,
)
from tests.apps.fastfold.test_loss_violation_values import _distorted

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def structure():
    pos, mask, ridx, aatype = (x.float() if x.is_floating_point() else x for x in _distorted(0))
    af2 = tuple(jnp.asarray(x.numpy()) for x in (pos, mask, ridx, aatype))
    return (pos, mask, ridx, aatype), af2


def _close(ours: torch.Tensor, ref) -> None:
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_peptide_bond_and_c_n_ca_angle(structure):
    (pos, mask, ridx, aatype), (p, m, r, a) = structure
    ours = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    ref = all_atom.between_residue_bond_loss(p, m, r.astype(jnp.float32), a)
    assert float(ref["c_n_loss_mean"]) > 0 and float(ref["c_n_ca_loss_mean"]) > 0
    _close(ours["c_n_loss_mean"], ref["c_n_loss_mean"])
    _close(ours["c_n_ca_loss_mean"], ref["c_n_ca_loss_mean"])
    _close(ours["per_residue_violation"], ref["per_residue_violation_mask"])


def test_ca_c_n_angle(structure):
    (pos, mask, ridx, aatype), (p, m, r, a) = structure
    ours = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    ref = all_atom.between_residue_bond_loss(p, m, r.astype(jnp.float32), a)
    assert float(ref["ca_c_n_loss_mean"]) > 0  # the fragment's angles are violated: the value decides
    _close(ours["ca_c_n_loss_mean"], ref["ca_c_n_loss_mean"])


def _radius(aatype, mask):
    radius = np.zeros(mask.shape, np.float32)
    for res, t in enumerate(aatype.tolist()):
        for i, name in enumerate(arc.restype_name_to_atom14_names[arc.restype_1to3[arc.restypes[t]]]):
            if name:
                radius[res, i] = arc.van_der_waals_radius[name[0]]
    return jnp.asarray(radius * mask.numpy())


def test_clashes_per_atom(structure):
    (pos, mask, ridx, aatype), (p, m, r, _) = structure
    ours = between_residue_clashes(pos, mask, ridx, aatype)
    ref = all_atom.between_residue_clash_loss(p, m, _radius(aatype, mask), r)
    assert float(ref["per_atom_loss_sum"].sum()) > 0
    _close(ours["per_atom_loss_sum"], ref["per_atom_loss_sum"])
    _close(ours["per_atom_clash"], ref["per_atom_clash_mask"])


def test_clash_mean(structure):
    (pos, mask, ridx, aatype), (p, m, r, _) = structure
    ours = between_residue_clashes(pos, mask, ridx, aatype)
    ref = all_atom.between_residue_clash_loss(p, m, _radius(aatype, mask), r)
    _close(ours["mean_loss"], ref["mean_loss"])


def test_within_residue(structure):
    (pos, mask, _, aatype), (p, m, _, _) = structure
    bounds = arc.make_atom14_dists_bounds(1.5, 12.0)
    ours = within_residue_violations(pos, mask, aatype)
    ref = all_atom.within_residue_violations(p, m, jnp.asarray(bounds["lower_bound"][aatype.numpy()]),
                                             jnp.asarray(bounds["upper_bound"][aatype.numpy()]), 0.0)  # fmt: skip
    assert float(ref["per_atom_loss_sum"].sum()) > 0
    _close(ours["per_atom_loss_sum"], ref["per_atom_loss_sum"])
    _close(ours["per_atom_violation"], ref["per_atom_violations"])
