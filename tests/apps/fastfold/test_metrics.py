"""Structure metrics on the real villin headpiece, against independent implementations.

The second structure is villin with a known deterministic distortion (``_distorted``): the
C-terminal half is rotated by 35 degrees about a hinge at residue 17's Cα, then every Cα gets
seeded Gaussian noise of 0.4 Å. References: biotite's ``biotite.structure.lddt`` and tmtools'
``tm_align`` (TM-align's C code).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ferryman.apps.fastfold import metrics
from tests.apps.fastfold._structures import VILLIN_SEQUENCE, villin_protein


def _villin_ca() -> torch.Tensor:
    pytest.importorskip("openmm")
    prot = villin_protein()
    return torch.as_tensor(prot.atom_positions[:, 1], dtype=torch.float64)  # [35, 3]


def _rotation(axis, angle: float) -> torch.Tensor:
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _distorted(ca: torch.Tensor, *, hinge: int = 17, degrees: float = 35.0, noise: float = 0.4) -> torch.Tensor:
    rot = _rotation([1.0, 0.5, -0.3], math.radians(degrees))
    out = ca.clone()
    out[hinge:] = (ca[hinge:] - ca[hinge]) @ rot.T + ca[hinge]
    gen = torch.Generator().manual_seed(7)
    return out + noise * torch.randn(ca.shape, generator=gen, dtype=torch.float64)


def _rigid_motion(x: torch.Tensor) -> torch.Tensor:
    return x @ _rotation([0.2, -1.0, 0.7], 2.1).T + torch.tensor([12.0, -3.0, 40.0], dtype=torch.float64)


def _biotite_ca(coords: torch.Tensor):
    struc = pytest.importorskip("biotite.structure")
    atoms = struc.AtomArray(len(coords))
    atoms.coord = coords.numpy().astype(np.float32)
    atoms.res_id = np.arange(1, len(coords) + 1)
    atoms.atom_name = np.full(len(coords), "CA")
    atoms.element = np.full(len(coords), "C")
    atoms.chain_id = np.full(len(coords), "A")
    return atoms


def test_lddt_is_one_for_identical_and_rigidly_moved_structures():
    ca = _villin_ca()
    assert metrics.lddt(ca, ca).item() == pytest.approx(1.0, abs=1e-9)
    assert metrics.lddt(_rigid_motion(ca), ca).item() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(metrics.lddt(ca, ca, per_residue=True), torch.ones(35, dtype=torch.float64))


def test_lddt_matches_biotite_on_villin():
    """Pooled (biotite ``aggregation='all'``) and per-residue (``'residue'``) lDDT-Cα of
    (distorted villin vs villin), 15 Å inclusion radius, 0.5/1/2/4 Å bins; agreement within 1e-3."""
    struc = pytest.importorskip("biotite.structure")
    ca = _villin_ca()
    for pred in (_distorted(ca), _distorted(ca, degrees=60.0, noise=1.0)):
        ref, sub = _biotite_ca(ca), _biotite_ca(pred)
        theirs_all = float(struc.lddt(ref, sub, aggregation="all"))
        theirs_res = np.asarray(struc.lddt(ref, sub, aggregation="residue"))
        ours_all = metrics.lddt(pred, ca).item()
        ours_res = metrics.lddt(pred, ca, per_residue=True).numpy()
        assert 0.3 < theirs_all < 0.95  # the distortion is neither trivial nor total
        assert ours_all == pytest.approx(theirs_all, abs=1e-3)
        np.testing.assert_allclose(ours_res, theirs_res, atol=1e-3)


def test_lddt_mask_drops_residues_and_batches():
    ca = _villin_ca()
    pred = _distorted(ca)
    mask = torch.ones(35, dtype=torch.float64)
    mask[5:9] = 0
    keep = mask.bool()
    masked = metrics.lddt(pred, ca, mask)
    assert masked.item() == pytest.approx(metrics.lddt(pred[keep], ca[keep]).item(), abs=1e-9)
    batch = metrics.lddt(torch.stack([pred, ca]), torch.stack([ca, ca]))
    assert batch.shape == (2,) and batch[1].item() == pytest.approx(1.0)


def test_rmsd_after_kabsch_undoes_rigid_motion_and_matches_biotite():
    struc = pytest.importorskip("biotite.structure")
    ca = _villin_ca()
    assert metrics.rmsd(_rigid_motion(ca), ca).item() < 1e-6
    pred = _rigid_motion(_distorted(ca))
    fitted, _ = struc.superimpose(_biotite_ca(ca), _biotite_ca(pred))
    theirs = float(struc.rmsd(_biotite_ca(ca), fitted))
    assert metrics.rmsd(pred, ca).item() == pytest.approx(theirs, abs=1e-3)
    assert metrics.rmsd(pred, ca, superpose=False).item() > 10.0


def test_tm_score_matches_tm_align_on_villin():
    """TM-score of a distorted villin against villin (reference length 35, d0 = 1.24(L-15)^(1/3)-1.8),
    compared with TM-align's ``tm_norm_chain2`` (normalised by the reference) in two ways:

    1. the formula: our TM-score without search, evaluated in TM-align's own superposition
       (its ``u``, ``t``), equals TM-align's score, for pairs where TM-align's alignment is the
       identity pairing (asserted: no gaps), so both sum over the same residue pairs;
    2. the search: our superposition search (seed fragments refined at d0 clipped to [4.5, 8] Å,
       as in the TM-score program) reaches TM-align's value within 1e-3 on those pairs.

    Larger distortions make TM-align shift the alignment by a residue (a different quantity:
    TM-align maximises over alignments too), so they are not compared.
    """
    tmtools = pytest.importorskip("tmtools")
    ca = _villin_ca()
    for degrees in (20.0, 30.0):
        pred = _rigid_motion(_distorted(ca, degrees=degrees, noise=0.3))
        res = tmtools.tm_align(pred.numpy(), ca.numpy(), VILLIN_SEQUENCE, VILLIN_SEQUENCE)
        assert "-" not in res.seqxA + res.seqyA
        assert 0.5 < res.tm_norm_chain2 < 0.9
        in_their_frame = pred @ torch.as_tensor(res.u).T + torch.as_tensor(res.t)
        assert metrics.tm_score(in_their_frame, ca, superpose=False).item() == pytest.approx(res.tm_norm_chain2, abs=1e-3)
        assert metrics.tm_score(pred, ca).item() == pytest.approx(res.tm_norm_chain2, abs=1e-3)
    assert metrics.tm_score(_rigid_motion(ca), ca).item() == pytest.approx(1.0, abs=1e-6)


def test_tm_score_without_search_uses_given_frame():
    ca = _villin_ca()
    moved = _rigid_motion(ca)
    assert metrics.tm_score(moved, ca, superpose=False).item() < 0.05
    assert metrics.tm_score(ca, ca, superpose=False).item() == pytest.approx(1.0)


def test_tm_d0_matches_the_published_formula():
    assert metrics.tm_d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)
    assert metrics.tm_d0(10) == 0.5


def test_gdt_ts_bounds_and_hand_checked_case():
    ca = _villin_ca()
    assert metrics.gdt_ts(_rigid_motion(ca), ca).item() == pytest.approx(1.0)
    # Residues 0-19 exact, residues 20-34 shifted 3 Å along x: at 1 Å the best superposition keeps
    # only the 20 exact residues; at 2 Å splitting the shift (about 1.3/1.7 Å) keeps all 35.
    pred = ca.clone()
    pred[20:, 0] += 3.0
    expected = (20 / 35 + 3) / 4
    assert metrics.gdt_ts(pred, ca).item() == pytest.approx(expected, abs=1e-6)
    hard = _distorted(ca, degrees=60.0, noise=1.0)
    assert 0.2 < metrics.gdt_ts(hard, ca).item() < metrics.gdt_ts(_distorted(ca), ca).item() < 1.0
