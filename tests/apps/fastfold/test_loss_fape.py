"""FAPE (AF2 Suppl. Alg. 28) on the real villin headpiece: backbone frames from N, CA, C; side
chains through the atom14 layout and the rigid-group frames of common/all_atom.py."""

from __future__ import annotations

import math

import pytest
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles, torsion_angles_to_frames
from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.loss.fape import (
    backbone_fape_loss,
    fape,
    rename_symmetric_atoms,
    sidechain_fape_loss,
)


def _villin():
    pytest.importorskip("openmm")
    from tests.apps.fastfold._structures import villin_protein

    prot = villin_protein()
    return torch.as_tensor(prot.aatype).long(), torch.as_tensor(prot.atom_positions, dtype=torch.float64)


def _backbone(pos37: torch.Tensor) -> Rigid:
    n, ca, c = (pos37[..., rc.atom_order[a], :] for a in ("N", "CA", "C"))
    return Rigid.from_3_points(c, ca, n)  # AF2's backbone group: C on -x, CA origin, N in the xy-plane


def _rotation(axis, angle: float) -> torch.Tensor:
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _move(pos: torch.Tensor, axis=(0.3, -1.0, 0.6), angle=2.3, shift=(15.0, -4.0, 30.0)) -> torch.Tensor:
    return pos @ _rotation(axis, angle).T + torch.tensor(shift, dtype=torch.float64)


def _distort(pos37: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return pos37 + scale * torch.randn(pos37.shape, generator=gen, dtype=torch.float64)


def _bb_fape(pred37, true37, **kw) -> torch.Tensor:
    pred, true = _backbone(pred37), _backbone(true37)
    mask = torch.ones(pred.shape, dtype=torch.float64)
    return fape(pred, true, mask, pred.trans, true.trans, mask, **kw)


def test_fape_is_zero_for_identical_frames():
    _, pos = _villin()
    assert _bb_fape(pos, pos, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # With AF2's eps every pair contributes sqrt(eps) / length_scale.
    assert _bb_fape(pos, pos).item() == pytest.approx(math.sqrt(1e-4) / 10.0, rel=1e-6)


def test_fape_is_unchanged_by_global_rigid_transforms():
    _, pos = _villin()
    pred = _distort(pos)
    base = _bb_fape(pred, pos)
    assert base.item() > 0.05  # a 1 Å-per-coordinate distortion is visible
    both = _bb_fape(_move(pred), _move(pos))
    separate = _bb_fape(_move(pred), _move(pos, axis=(1.0, 0.2, 0.0), angle=-0.7, shift=(-8.0, 2.0, 1.0)))
    torch.testing.assert_close(both, base, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(separate, base, rtol=1e-9, atol=1e-9)


def test_fape_sees_the_mirror_image():
    """Unlike any distance-based score, FAPE tells a structure from its mirror image."""
    _, pos = _villin()
    mirror = pos * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    assert _bb_fape(mirror, pos).item() > 0.3


def test_fape_single_pair_by_hand_and_clamp():
    ident = Rigid.identity((1,), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    true_pt = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    for d in (3.0, 25.0):
        pred_pt = true_pt + torch.tensor([[0.0, d, 0.0]], dtype=torch.float64)
        unclamped = fape(ident, ident, one, pred_pt, true_pt, one, clamp_distance=None)
        clamped = fape(ident, ident, one, pred_pt, true_pt, one)
        assert unclamped.item() == pytest.approx(math.sqrt(d * d + 1e-4) / 10.0, rel=1e-3)
        assert clamped.item() == pytest.approx(min(math.sqrt(d * d + 1e-4), 10.0) / 10.0, rel=1e-3)


def test_fape_mask_ignores_missing_frames_and_points():
    _, pos = _villin()
    pred = pos.clone()
    pred[7] += 50.0  # a wildly wrong residue ...
    mask = torch.ones(35, dtype=torch.float64)
    mask[7] = 0.0  # ... that the ground truth does not have
    p, t = _backbone(pred), _backbone(pos)
    assert fape(p, t, mask, p.trans, t.trans, mask, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_backbone_loss_averages_layers_and_blends_clamping():
    _, pos = _villin()
    true = _backbone(pos)
    mask = torch.ones(35, dtype=torch.float64)
    layers = [_backbone(_distort(pos, s)) for s in (0.5, 4.0)]
    stacked = Rigid(torch.stack([r.rot for r in layers]), torch.stack([r.trans for r in layers]))
    per_layer = [backbone_fape_loss(r, true, mask, use_clamped=1.0) for r in layers]
    assert backbone_fape_loss(stacked, true, mask, use_clamped=1.0).item() == pytest.approx(
        sum(x.item() for x in per_layer) / 2, rel=1e-9
    )
    far = layers[1]
    clamped = backbone_fape_loss(far, true, mask, use_clamped=1.0)
    unclamped = backbone_fape_loss(far, true, mask, use_clamped=0.0)
    assert unclamped > clamped
    blend = backbone_fape_loss(far, true, mask)
    assert blend.item() == pytest.approx(0.9 * clamped.item() + 0.1 * unclamped.item(), rel=1e-9)


def _atom14(aatype, pos37):
    idx = torch.as_tensor(rc.restype_atom14_to_atom37)[aatype]  # [N, 14]
    mask = torch.as_tensor(rc.restype_atom14_mask, dtype=torch.float64)[aatype]
    return torch.gather(pos37, 1, idx[..., None].expand(*idx.shape, 3)) * mask[..., None], mask


def _group_frames(aatype, pos37):
    mask37 = torch.as_tensor(rc.restype_atom37_mask, dtype=torch.float64)[aatype]
    tors = atom37_to_torsion_angles(aatype, pos37, mask37, placeholder_for_undefined=True)
    bb = _backbone(pos37)
    return (
        torsion_angles_to_frames(aatype, bb, tors["torsion_angles_sin_cos"]),
        torsion_angles_to_frames(aatype, bb, tors["alt_torsion_angles_sin_cos"]),
    )


def test_renaming_undoes_a_swap_of_symmetric_atoms():
    aatype, pos = _villin()
    true14, mask14 = _atom14(aatype, pos)
    pred14 = true14.clone()
    asp = rc.restype_order["D"]
    first_asp = int((aatype == asp).nonzero()[0])
    names = rc.restype_name_to_atom14_names["ASP"]
    i, j = names.index("OD1"), names.index("OD2")
    pred14[first_asp, [i, j]] = pred14[first_asp, [j, i]]  # the prediction names OD1/OD2 the other way
    renamed, renamed_mask, alt_better = rename_symmetric_atoms(aatype, pred14, true14, mask14)
    assert alt_better.tolist() == [1.0 if r == first_asp else 0.0 for r in range(35)]
    torch.testing.assert_close(renamed, pred14)
    torch.testing.assert_close(renamed_mask, mask14)


def _group_exists(aatype):
    """AF2's rigid-group mask: backbone and psi groups always, chi groups where the residue has them."""
    table = torch.zeros(21, 8, dtype=torch.float64)
    table[:, [0, 3]] = 1.0
    table[:20, 4:] = torch.as_tensor(rc.chi_angles_mask, dtype=torch.float64)[:20]
    return table[aatype]


def test_sidechain_fape_zero_for_truth_and_invariant_to_motion():
    aatype, pos = _villin()
    true14, mask14 = _atom14(aatype, pos)
    frames, alt_frames = _group_frames(aatype, pos)
    group_mask = _group_exists(aatype)
    no_alt = torch.zeros(35, dtype=torch.float64)
    same = sidechain_fape_loss(frames, true14, frames, alt_frames, group_mask, true14, mask14, no_alt)
    assert same.item() == pytest.approx(math.sqrt(1e-4) / 10.0, rel=1e-3)

    pred37 = _distort(pos, 0.7)
    pred14, _ = _atom14(aatype, pred37)
    pred_frames, _ = _group_frames(aatype, pred37)
    renamed, renamed_mask, alt_better = rename_symmetric_atoms(aatype, pred14, true14, mask14)
    loss = sidechain_fape_loss(pred_frames, pred14, frames, alt_frames, group_mask, renamed, renamed_mask, alt_better)
    moved_frames, _ = _group_frames(aatype, _move(pred37))
    moved14, _ = _atom14(aatype, _move(pred37))
    moved = sidechain_fape_loss(moved_frames, moved14, frames, alt_frames, group_mask, renamed, renamed_mask, alt_better)
    assert loss.item() > 0.03
    torch.testing.assert_close(moved, loss, rtol=1e-9, atol=1e-9)
