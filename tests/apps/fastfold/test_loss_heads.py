"""Torsion, distogram, masked-MSA, pLDDT and experimentally-resolved losses (AF2 Suppl. 1.9.1,
1.9.6, 1.9.8-1.9.10): hand-checked values and parity with torch's own cross-entropies."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ferryman.apps.fastfold import metrics
from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles
from ferryman.apps.fastfold.loss.distogram import distogram_bins, distogram_loss
from ferryman.apps.fastfold.loss.experimentally_resolved import experimentally_resolved_loss
from ferryman.apps.fastfold.loss.masked_msa import masked_msa_loss
from ferryman.apps.fastfold.loss.plddt import lddt_bins, plddt_loss
from ferryman.apps.fastfold.loss.torsion import supervised_chi_loss, torsion_angle_loss


def _villin_torsions():
    pytest.importorskip("openmm")
    from tests.apps.fastfold._structures import villin_protein

    prot = villin_protein()
    aatype = torch.as_tensor(prot.aatype).long()
    pos = torch.as_tensor(prot.atom_positions, dtype=torch.float64)
    return atom37_to_torsion_angles(aatype, pos, torch.as_tensor(prot.atom_mask, dtype=torch.float64)), pos


def test_torsion_loss_zero_at_truth_or_its_pi_flip_and_norm_term():
    t, _ = _villin_torsions()
    true, alt, mask = t["torsion_angles_sin_cos"], t["alt_torsion_angles_sin_cos"], t["torsion_angles_mask"]
    assert torsion_angle_loss(true, true, alt, mask, angle_norm_weight=0.0).item() < 1e-6
    assert torsion_angle_loss(alt, true, alt, mask, angle_norm_weight=0.0).item() < 1e-6
    # Scaling keeps the angle: only the norm term remains, |2.5 - 1| averaged = 1.5.
    scaled = torsion_angle_loss(2.5 * true, true, alt, mask)
    assert scaled.item() == pytest.approx(0.02 * 1.5, rel=1e-4)


def test_torsion_loss_opposite_angle_costs_four():
    t, _ = _villin_torsions()
    true, mask = t["torsion_angles_sin_cos"], t["torsion_angles_mask"]
    phi_only = torch.zeros_like(mask)
    phi_only[:, 1] = mask[:, 1]  # phi is not pi-periodic: its flip is a different angle
    loss = torsion_angle_loss(-true, true, true, phi_only, angle_norm_weight=0.0)
    assert loss.item() == pytest.approx(4.0, rel=1e-4)


def test_supervised_chi_loss_uses_only_chi_angles_and_keeps_layer_dim():
    t, _ = _villin_torsions()
    true, alt, mask = t["torsion_angles_sin_cos"], t["alt_torsion_angles_sin_cos"], t["torsion_angles_mask"]
    pred = true.clone()
    pred[:, :3] = -pred[:, :3]  # wrong backbone torsions do not count ...
    assert supervised_chi_loss(pred, true, alt, mask).item() < 1e-5
    pred[:, 3] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # ... wrong chi1 does
    layers = torch.stack([true, pred])
    out = supervised_chi_loss(layers, true, alt, mask)
    assert out.shape == (2,) and out[0].item() < 1e-5 < out[1].item()


def test_distogram_bins_by_hand():
    pts = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    bins = distogram_bins(pts)
    # edges 2.3125 + 0.3125 k, k = 0..62: 2 Å -> bin 0, 3 Å -> bin 3 (above 2.3125, 2.625, 2.9375),
    # 30 Å -> the last bin 63; self-distances -> bin 0.
    assert bins[0, 1].item() == 0 and bins[0, 2].item() == 3 and bins[0, 3].item() == 63
    assert torch.equal(bins, bins.T) and bins.diagonal().eq(0).all()


def test_distogram_loss_matches_cross_entropy_on_villin():
    _, pos = _villin_torsions()
    cb = pos[:, rc.atom_order["CA"]].float()
    mask = torch.ones(35)
    mask[[3, 20]] = 0
    logits = torch.randn(35, 35, 64, generator=torch.Generator().manual_seed(0))
    ours = distogram_loss(logits, cb, mask)
    keep = mask[:, None] * mask[None, :]
    ce = F.cross_entropy(logits.reshape(-1, 64), distogram_bins(cb).reshape(-1), reduction="none")
    assert ours.item() == pytest.approx((ce * keep.reshape(-1)).sum().item() / keep.sum().item(), rel=1e-5)


def test_masked_msa_loss_matches_cross_entropy_on_masked_positions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, 23, generator=gen)
    true = torch.randint(0, 22, (2, 5, 7), generator=gen)
    bert = (torch.rand(2, 5, 7, generator=gen) < 0.15).float()
    ours = masked_msa_loss(logits, true, bert)
    for b in range(2):
        sel = bert[b].bool()
        assert ours[b].item() == pytest.approx(F.cross_entropy(logits[b][sel], true[b][sel]).item(), rel=1e-5)


def test_plddt_loss_targets_lddt_bins_without_structure_gradient():
    _, pos = _villin_torsions()
    true_ca = pos[:, 1].float()
    pred_ca = (true_ca + torch.randn(35, 3, generator=torch.Generator().manual_seed(2))).requires_grad_()
    mask = torch.ones(35)
    assert lddt_bins(true_ca, true_ca, mask).eq(49).all()
    target = (metrics.lddt(pred_ca.detach(), true_ca, per_residue=True) * 50).floor().long()
    assert torch.equal(lddt_bins(pred_ca, true_ca, mask), target)
    logits = torch.randn(35, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = plddt_loss(logits, pred_ca, true_ca, mask)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    loss.backward()
    assert pred_ca.grad is None and logits.grad.abs().sum() > 0
    gated = plddt_loss(logits, pred_ca, true_ca, mask, resolution=torch.tensor(3.5))
    assert gated.item() == 0.0


def test_experimentally_resolved_loss_over_existing_atoms():
    gen = torch.Generator().manual_seed(4)
    aatype = torch.randint(0, 20, (6,), generator=gen)
    exists = torch.as_tensor(rc.restype_atom37_mask)[aatype]
    resolved = exists * (torch.rand(6, 37, generator=gen) < 0.8)
    logits = torch.randn(6, 37, generator=gen)
    ours = experimentally_resolved_loss(logits, resolved, exists)
    sel = exists.bool()
    expected = F.binary_cross_entropy_with_logits(logits[sel], resolved[sel].float())
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert experimentally_resolved_loss(logits, resolved, exists, resolution=torch.tensor(0.05)).item() == 0.0


def test_tm_loss_bins_and_parity_with_cross_entropy():
    from ferryman.apps.fastfold.common.rigid import Rigid
    from ferryman.apps.fastfold.loss.tm import aligned_error_bins, tm_loss

    _, pos = _villin_torsions()
    n, ca, c = (pos[:, rc.atom_order[a]] for a in ("N", "CA", "C"))
    true = Rigid.from_3_points(c, ca, n)
    assert aligned_error_bins(true, true).eq(0).all()
    # Moving residue 4's frame by 5.16 Å makes every e_i4 (i != 4) 5.16 Å: the 11 edges 0, 0.5 ... 5.0
    # lie below it -> bin 11; e_44 stays 0 (the frame moves with its own point).
    shifted = Rigid(true.rot.clone(), true.trans.clone())
    shifted.trans[4] += torch.tensor([3.0, 4.2, 0.0], dtype=torch.float64)
    bins = aligned_error_bins(shifted, true)
    assert bins[0, 4].item() == 11 and bins[4, 4].item() == 0 and bins[0, 1].item() == 0
    logits = torch.randn(35, 35, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.ones(35, dtype=torch.float64)
    ours = tm_loss(logits, shifted, true, mask)
    expected = F.cross_entropy(logits.reshape(-1, 64), bins.reshape(-1))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
