"""The head losses, torsion and FAPE by value (AF2 Suppl. 1.9.1-1.9.10): hand-computed answers,
bins of distances that lie exactly on an edge, configurations other than the defaults (bins,
clamp distances, weights, eps, resolution gates at and around their limits), batches whose
members differ, and masks that drop entries."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ferryman.apps.fastfold import metrics
from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.loss.distogram import distogram_bins, distogram_loss
from ferryman.apps.fastfold.loss.experimentally_resolved import experimentally_resolved_loss
from ferryman.apps.fastfold.loss.fape import (
    atom14_swap_tables,
    backbone_fape_loss,
    fape,
    rename_symmetric_atoms,
    sidechain_fape_loss,
)
from ferryman.apps.fastfold.loss.masked_msa import masked_msa_loss
from ferryman.apps.fastfold.loss.plddt import lddt_bins, plddt_loss
from ferryman.apps.fastfold.loss.tm import aligned_error_bins, tm_loss
from ferryman.apps.fastfold.loss.torsion import supervised_chi_loss, torsion_angle_loss

F64 = torch.float64
# Resolutions at, inside and outside AF2's [0.1, 3.0] A window, exact in float64.
RESOLUTIONS = torch.tensor([0.1, 3.0, 1.0, 3.5, 0.05], dtype=F64)
INSIDE = [1.0, 1.0, 1.0, 0.0, 0.0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- distogram -----------------------------------------------------------------------------------


def test_distogram_bins_of_distances_on_the_edges_at_another_binning():
    """2-22 A in 64 bins: the edges are not binary fractions; a float64 distance equal to edge k is
    not above it, so it lands in bin k (AF2 counts the edges strictly below)."""
    edges = [2.0 + 20.0 * k / 62 for k in range(63)]
    pts = torch.zeros(64, 3, dtype=F64)
    pts[1:, 0] = torch.linspace(2.0, 22.0, 63, dtype=F64)
    assert pts[1:, 0].tolist() == pytest.approx(edges, rel=1e-15)
    bins = distogram_bins(pts, first_break=2.0, last_break=22.0, num_bins=64)
    assert bins[0, 1:].tolist() == list(range(63))
    bins = distogram_bins(pts * 1.0000001, first_break=2.0, last_break=22.0, num_bins=64)
    assert bins[0, 1:].tolist() == list(range(1, 64))  # just past each edge


def _hand_bins(pts, first, last, num_bins):
    edges = [first + (last - first) * k / (num_bins - 2) for k in range(num_bins - 1)]
    d = torch.cdist(pts.double(), pts.double())
    return torch.tensor([[sum(x > e for e in edges) for x in row] for row in d.tolist()])


def test_distogram_loss_at_another_binning_and_over_a_batch():
    gen = _gen(0)
    pts = 4.0 * torch.randn(2, 9, 3, generator=gen)
    logits = torch.randn(2, 9, 9, 16, generator=gen)
    mask = torch.ones(2, 9)
    mask[0, 2] = mask[1, 5] = mask[1, 7] = 0.0
    out = distogram_loss(logits, pts, mask, first_break=3.0, last_break=10.0)
    assert out.shape == (2,)
    for b in range(2):
        target = _hand_bins(pts[b], 3.0, 10.0, 16)
        assert target.max() == 15 and len(target.unique()) > 8
        keep = (mask[b][:, None] * mask[b][None, :]).bool()
        expected = F.cross_entropy(logits[b][keep], target[keep])
        assert out[b].item() == pytest.approx(expected.item(), rel=1e-5)


# --- experimentally resolved, masked MSA ---------------------------------------------------------


def test_experimentally_resolved_gates_by_resolution_over_a_batch():
    gen = _gen(1)
    aatype = torch.randint(0, 20, (5, 6), generator=gen)
    exists = torch.as_tensor(rc.restype_atom37_mask, dtype=F64)[aatype]  # a float64 mask
    exists[2, 1] = 0.0
    resolved = exists * (torch.rand(5, 6, 37, generator=gen, dtype=F64) < 0.7)
    logits = torch.randn(5, 6, 37, generator=gen)
    out = experimentally_resolved_loss(logits, resolved, exists, resolution=RESOLUTIONS)
    assert out.shape == (5,) and out.dtype == torch.float32
    for b in range(5):
        sel = exists[b].bool()
        full = F.binary_cross_entropy_with_logits(logits[b][sel], resolved[b][sel].float())
        assert out[b].item() == pytest.approx(INSIDE[b] * full.item(), rel=1e-5)
    narrow = experimentally_resolved_loss(logits, resolved, exists, resolution=RESOLUTIONS,
                                          min_resolution=1.0, max_resolution=3.5)  # fmt: skip
    assert [x > 0 for x in narrow.tolist()] == [False, True, True, True, False]


def test_masked_msa_loss_is_float32_for_a_float64_mask():
    gen = _gen(2)
    logits = torch.randn(4, 5, 23, generator=gen)
    true = torch.randint(0, 23, (4, 5), generator=gen)
    bert = (torch.rand(4, 5, generator=gen) < 0.5).to(F64)
    out = masked_msa_loss(logits, true, bert)
    assert out.dtype == torch.float32
    sel = bert.bool()
    assert out.item() == pytest.approx(F.cross_entropy(logits[sel], true[sel]).item(), rel=1e-5)


# --- pLDDT ---------------------------------------------------------------------------------------


def _chain(gen, n=12):
    """A random walk of Cα-like points 3.8 A apart."""
    steps = torch.randn(n, 3, generator=gen, dtype=F64)
    return torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), 0)


def test_lddt_bins_leave_out_masked_residues():
    gen = _gen(3)
    true = _chain(gen)
    pred = true + 0.8 * torch.randn(true.shape, generator=gen, dtype=F64)
    mask = torch.ones(12, dtype=F64)
    mask[4] = 0.0
    garbage = true.clone()
    garbage[4] = torch.tensor([1.0, 2.0, 3.0], dtype=F64)  # an absent residue's placeholder
    keep = mask.bool()
    expected = (metrics.lddt(pred[keep], true[keep], per_residue=True) * 50).floor().long()
    assert torch.equal(lddt_bins(pred, garbage, mask)[keep], expected)


def test_plddt_loss_over_a_batch_with_other_bins_masks_and_gates():
    gen = _gen(4)
    true = torch.stack([_chain(gen) for _ in range(5)])
    pred = true + torch.randn(true.shape, generator=gen, dtype=F64)
    mask = torch.ones(5, 12, dtype=F64)
    mask[1, 3] = mask[2, 0] = mask[2, 11] = 0.0
    logits = torch.randn(5, 12, 10, generator=gen)
    out = plddt_loss(logits, pred, true, mask, resolution=RESOLUTIONS)
    assert out.shape == (5,) and out.dtype == torch.float32
    for b in range(5):
        keep = mask[b].bool()
        score = metrics.lddt(pred[b][keep], true[b][keep], per_residue=True)
        target = (score * 10).floor().clamp(max=9).long()
        assert len(target.unique()) > 2
        expected = F.cross_entropy(logits[b][keep], target)
        assert out[b].item() == pytest.approx(INSIDE[b] * expected.item(), rel=1e-5)
    narrow = plddt_loss(logits, pred, true, mask, resolution=RESOLUTIONS, min_resolution=1.0, max_resolution=3.5)
    assert [x > 0 for x in narrow.tolist()] == [False, True, True, True, False]


# --- TM / PAE ------------------------------------------------------------------------------------


def _frames(trans):
    rot = torch.eye(3, dtype=F64).expand(*trans.shape[:-1], 3, 3).clone()
    return Rigid(rot, trans)


def test_aligned_error_bins_of_errors_on_the_edges_at_another_max_bin():
    """0-20 A in 64 bins (edges not binary fractions): frame j moved by exactly edge j-1 from its
    true place gives e_0j on that edge, which is not above it: bin j-1."""
    shift = torch.zeros(64, 3, dtype=F64)
    shift[1:, 0] = torch.linspace(0.0, 20.0, 63, dtype=F64)
    bins = aligned_error_bins(_frames(shift), _frames(torch.zeros(64, 3, dtype=F64)), 64, 20.0)
    assert bins[0, 1:].tolist() == list(range(63))


def _random_frames(gen, shape):
    q = torch.randn(*shape, 4, generator=gen, dtype=F64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))  # fmt: skip
    return Rigid(rot, 6.0 * torch.randn(*shape, 3, generator=gen, dtype=F64))


def _hand_aligned_error(pred: Rigid, true: Rigid):
    """e_ij = |R_i^T (x_j - t_i) - R'_i^T (x'_j - t'_i)| by loops."""
    n = pred.trans.shape[0]
    out = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            a = pred.rot[i].T @ (pred.trans[j] - pred.trans[i])
            b = true.rot[i].T @ (true.trans[j] - true.trans[i])
            out[i, j] = (a - b).norm()
    return out


def test_tm_loss_over_a_batch_with_masks_gates_and_another_max_bin():
    gen = _gen(5)
    true = _random_frames(gen, (5, 7))
    w = 0.15 * torch.randn(5, 7, 3, generator=gen, dtype=F64)  # small rotations, 1.5 A moves
    skew = torch.zeros(5, 7, 3, 3, dtype=F64)
    skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = -w[..., 2], w[..., 1], -w[..., 0]
    skew = skew - skew.transpose(-1, -2)
    pred = Rigid(true.rot @ torch.linalg.matrix_exp(skew), true.trans + 1.5 * torch.randn(5, 7, 3, generator=gen, dtype=F64))
    mask = torch.ones(5, 7, dtype=F64)
    mask[0, 6] = mask[2, 1] = 0.0
    logits = torch.randn(5, 7, 7, 32, generator=gen)
    out = tm_loss(logits, pred, true, mask, resolution=RESOLUTIONS, max_error_bin=15.0)
    assert out.shape == (5,)
    edges = [15.0 * k / 30 for k in range(31)]
    for b in range(5):
        err = _hand_aligned_error(Rigid(pred.rot[b], pred.trans[b]), Rigid(true.rot[b], true.trans[b]))
        target = torch.tensor([[sum(x > e for e in edges) for x in row] for row in err.tolist()])
        assert len(target.unique()) > 10
        keep = (mask[b][:, None] * mask[b][None, :]).bool()
        expected = F.cross_entropy(logits[b][keep], target[keep])
        assert out[b].item() == pytest.approx(INSIDE[b] * expected.item(), rel=1e-5)
    narrow = tm_loss(logits, pred, true, mask, resolution=RESOLUTIONS, min_resolution=1.0, max_resolution=3.5)
    assert [x > 0 for x in narrow.tolist()] == [False, True, True, True, False]


# --- torsion -------------------------------------------------------------------------------------


def _torsion_inputs(seed, batch=()):
    gen = _gen(seed)
    shape = (*batch, 4, 7)
    angle = torch.rand(shape, generator=gen, dtype=F64) * 2 * math.pi
    true = torch.stack([angle.sin(), angle.cos()], -1)
    flip = torch.rand(shape, generator=gen) < 0.5  # pi-periodic torsions: the flipped angle is as good
    alt = torch.where(flip[..., None], -true, true)
    pred_angle = angle + 0.6 * torch.randn(shape, generator=gen, dtype=F64) + math.pi * (torch.rand(shape, generator=gen) < 0.3)
    scale = 0.5 + torch.rand(shape, generator=gen, dtype=F64)  # unnormalised: |pred| from 0.5 to 1.5
    pred = torch.stack([pred_angle.sin(), pred_angle.cos()], -1) * scale[..., None]
    mask = (torch.rand(shape, generator=gen) < 0.8).to(F64)
    return pred, true, alt, mask


def _hand_torsion(pred, true, alt, mask, *, angles, angle_weight, norm_weight, eps):
    """Alg. 27 by loops: the angle term over `angles`, the norm term over all seven."""
    num, den, norm_num, norm_den = 0.0, 0.0, 0.0, 0.0
    for r in range(pred.shape[0]):
        for k in range(7):
            s, c = pred[r, k].tolist()
            norm = math.sqrt(s * s + c * c + eps)
            u = (s / norm, c / norm)
            err = min(sum((a - b) ** 2 for a, b in zip(u, true[r, k].tolist())),
                      sum((a - b) ** 2 for a, b in zip(u, alt[r, k].tolist())))  # fmt: skip
            m = mask[r, k].item()
            if k in angles:
                num, den = num + m * err, den + m
            norm_num, norm_den = norm_num + m * abs(norm - 1), norm_den + m
    return angle_weight * num / (eps + den) + norm_weight * norm_num / (eps + norm_den)


@pytest.mark.parametrize("kw", [{}, {"angle_norm_weight": 0.3, "eps": 0.05}])
def test_torsion_angle_loss_by_hand(kw):
    pred, true, alt, mask = _torsion_inputs(6)
    ref = {"angle_norm_weight": 0.02, "eps": 1e-6, **kw}
    expected = _hand_torsion(pred, true, alt, mask, angles=range(7), angle_weight=1.0,
                             norm_weight=ref["angle_norm_weight"], eps=ref["eps"])  # fmt: skip
    assert torsion_angle_loss(pred, true, alt, mask, **kw).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kw", [{}, {"chi_weight": 2.0, "angle_norm_weight": 0.3, "eps": 0.05}])
def test_supervised_chi_loss_by_hand(kw):
    pred, true, alt, mask = _torsion_inputs(7)
    ref = {"chi_weight": 0.5, "angle_norm_weight": 0.01, "eps": 1e-6, **kw}
    expected = _hand_torsion(pred, true, alt, mask, angles=range(3, 7), angle_weight=ref["chi_weight"],
                             norm_weight=ref["angle_norm_weight"], eps=ref["eps"])  # fmt: skip
    assert supervised_chi_loss(pred, true, alt, mask, **kw).item() == pytest.approx(expected, rel=1e-10)


def test_torsion_losses_over_a_batch():
    pred, true, alt, mask = _torsion_inputs(8, batch=(3,))
    tors, chi = torsion_angle_loss(pred, true, alt, mask), supervised_chi_loss(pred, true, alt, mask)
    assert tors.shape == chi.shape == (3,)
    for b in range(3):
        args = pred[b], true[b], alt[b], mask[b]
        assert tors[b].item() == pytest.approx(
            _hand_torsion(*args, angles=range(7), angle_weight=1.0, norm_weight=0.02, eps=1e-6), rel=1e-10)
        assert chi[b].item() == pytest.approx(
            _hand_torsion(*args, angles=range(3, 7), angle_weight=0.5, norm_weight=0.01, eps=1e-6), rel=1e-10)


# --- FAPE ----------------------------------------------------------------------------------------


def _pair_fape(d: float, clamp: float | None, scale: float = 10.0) -> float:
    """Two frames at the identity, the second's origin `d` A off along x: two pairs of error 0
    (sqrt(eps) each) and two of error d, over 4 pairs (+ eps)."""
    far = math.sqrt(d * d + 1e-4)
    far = far if clamp is None else min(far, clamp)
    return (2 * math.sqrt(1e-4) + 2 * far) / scale / (1e-4 + 4)


def test_backbone_fape_clamps_at_ten_by_default_or_where_told():
    true = _frames(torch.zeros(2, 3, dtype=F64))
    pred = _frames(torch.tensor([[0.0, 0.0, 0.0], [25.0, 0.0, 0.0]], dtype=F64))
    mask = torch.ones(2, dtype=F64)
    assert backbone_fape_loss(pred, true, mask, use_clamped=1.0).item() == pytest.approx(_pair_fape(25, 10), rel=1e-9)
    assert backbone_fape_loss(pred, true, mask, use_clamped=0.0).item() == pytest.approx(_pair_fape(25, None), rel=1e-9)
    assert backbone_fape_loss(pred, true, mask).item() == pytest.approx(
        0.9 * _pair_fape(25, 10) + 0.1 * _pair_fape(25, None), rel=1e-9)
    assert backbone_fape_loss(pred, true, mask, clamp_distance=5.0, use_clamped=1.0).item() == pytest.approx(
        _pair_fape(25, 5), rel=1e-9)


def test_backbone_fape_over_layers_and_a_batch():
    true = _frames(torch.zeros(3, 2, 3, dtype=F64))  # [batch 3, N 2]
    d = torch.tensor([[4.0, 12.0, 30.0], [1.0, 8.0, 50.0]], dtype=F64)  # [layers 2, batch 3]
    trans = torch.zeros(2, 3, 2, 3, dtype=F64)
    trans[..., 1, 0] = d
    out = backbone_fape_loss(_frames(trans), true, torch.ones(3, 2, dtype=F64), use_clamped=1.0)
    assert out.shape == (3,)
    for b in range(3):
        expected = (_pair_fape(d[0, b].item(), 10) + _pair_fape(d[1, b].item(), 10)) / 2
        assert out[b].item() == pytest.approx(expected, rel=1e-9)
    flat = backbone_fape_loss(_frames(trans[0]), true, torch.ones(3, 2, dtype=F64), use_clamped=0.5)
    assert flat.shape == (3,)
    for b in range(3):
        x = d[0, b].item()
        assert flat[b].item() == pytest.approx(0.5 * _pair_fape(x, 10) + 0.5 * _pair_fape(x, None), rel=1e-9)


def test_fape_over_a_batch_with_different_masks():
    gen = _gen(9)
    pred, true = _random_frames(gen, (2, 5)), _random_frames(gen, (2, 5))
    pts_p, pts_t = torch.randn(2, 6, 3, generator=gen, dtype=F64), torch.randn(2, 6, 3, generator=gen, dtype=F64)
    fmask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=F64)
    pmask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=F64)
    out = fape(pred, true, fmask, pts_p, pts_t, pmask)
    for b in range(2):
        num = 0.0
        for i in range(5):
            for j in range(6):
                a = pred.rot[b, i].T @ (pts_p[b, j] - pred.trans[b, i])
                t = true.rot[b, i].T @ (pts_t[b, j] - true.trans[b, i])
                num += fmask[b, i].item() * pmask[b, j].item() * min(math.sqrt(((a - t) ** 2).sum().item() + 1e-4), 10.0)
        expected = num / 10.0 / (1e-4 + fmask[b].sum().item() * pmask[b].sum().item())
        assert out[b].item() == pytest.approx(expected, rel=1e-9)


def test_swap_tables_are_af2_table_3():
    perm, amb = atom14_swap_tables("cpu")
    assert perm.shape == amb.shape == (21, 14)
    expected_perm = torch.arange(14).repeat(21, 1)
    expected_amb = torch.zeros(21, 14)
    for res, pairs in {"D": [(6, 7)], "E": [(7, 8)], "F": [(6, 7), (8, 9)], "Y": [(6, 7), (8, 9)]}.items():
        r = rc.restype_order[res]
        for i, j in pairs:
            expected_perm[r, i], expected_perm[r, j] = j, i
            expected_amb[r, i] = expected_amb[r, j] = 1.0
    assert torch.equal(perm, expected_perm) and torch.equal(amb, expected_amb)


def _villin14():
    pytest.importorskip("openmm")
    from tests.apps.fastfold._structures import villin_protein

    prot = villin_protein()
    aatype = torch.as_tensor(prot.aatype).long()
    idx = torch.as_tensor(rc.restype_atom14_to_atom37)[aatype]
    mask = torch.as_tensor(rc.restype_atom14_mask, dtype=F64)[aatype]
    pos37 = torch.as_tensor(prot.atom_positions, dtype=F64)
    return aatype, torch.gather(pos37, 1, idx[..., None].expand(*idx.shape, 3)) * mask[..., None], mask


def _hand_renaming(aatype, pred, true, mask):
    """Alg. 26 per residue: the summed |pred - true| distance errors from the residue's ambiguous
    atoms to every unambiguous atom of the chain, for the true naming and the swapped one."""
    swaps = {rc.restype_order[rc.restype_3to1[res]]: [(rc.restype_name_to_atom14_names[res].index(a),
                                                        rc.restype_name_to_atom14_names[res].index(b))
                                                       for a, b in pairs.items()]
             for res, pairs in rc.residue_atom_renaming_swaps.items()}  # fmt: skip
    unamb = mask.bool().clone()
    for r, t in enumerate(aatype.tolist()):
        for i, j in swaps.get(t, []):
            unamb[r, i] = unamb[r, j] = False
    pred_u, true_u = pred[unamb], true[unamb]
    better = []
    for r, t in enumerate(aatype.tolist()):
        if t not in swaps:
            better.append(0.0)
            continue
        amb = [k for pair in swaps[t] for k in pair]
        alt = list(amb)
        for i, j in swaps[t]:
            alt[amb.index(i)], alt[amb.index(j)] = j, i
        d_pred = torch.cdist(pred[r, amb], pred_u)
        err_true = (d_pred - torch.cdist(true[r, amb], true_u)).abs().sum().item()
        err_alt = (d_pred - torch.cdist(true[r, alt], true_u)).abs().sum().item()
        better.append(float(err_alt < err_true))
    return torch.tensor(better, dtype=F64)


def test_renaming_matches_alg_26_per_residue_over_a_batch():
    B = 12
    aatype, true, mask = _villin14()
    gen = _gen(10)
    preds = []
    for k in range(B):  # noise from 0.3 to 2 A: close calls among the 8 symmetric residues of each
        pred = true + (0.3 + 0.15 * k) * torch.randn(true.shape, generator=gen, dtype=F64) * mask[..., None]
        for r in range(35):  # the prediction names some symmetric atoms the other way
            if aatype[r] in (rc.restype_order["D"], rc.restype_order["F"]) and torch.rand((), generator=gen) < 0.5:
                pred[r, [6, 7]] = pred[r, [7, 6]]
        preds.append(pred)
    pred = torch.stack(preds)
    batch = lambda x: x.expand(B, *x.shape)  # noqa: E731
    renamed, renamed_mask, better = rename_symmetric_atoms(batch(aatype), pred, batch(true), batch(mask))
    assert better.shape == (B, 35)
    for k in range(B):
        expected = _hand_renaming(aatype, pred[k], true, mask)
        assert torch.equal(better[k], expected), k
        perm, _ = atom14_swap_tables("cpu")
        swapped = torch.gather(true, 1, perm[aatype][..., None].expand(35, 14, 3))
        torch.testing.assert_close(renamed[k], torch.where(expected.bool()[:, None, None], swapped, true))
    assert 0 < better.sum() < (better.new_tensor([float(t in (2, 3, 6, 13, 18)) for t in aatype.tolist()]).sum() * B)
    torch.testing.assert_close(renamed_mask, batch(mask))


def test_renaming_swaps_the_mask_with_the_atoms():
    aatype, true, mask = _villin14()
    asp = int((aatype == rc.restype_order["D"]).nonzero()[0])
    pred = true.clone()
    pred[asp, [6, 7]] = pred[asp, [7, 6]]
    mask = mask.clone()
    mask[asp, 7] = 0.0  # OD2 unresolved in the ground truth ...
    _, renamed_mask, better = rename_symmetric_atoms(aatype, pred, true, mask)
    assert better[asp].item() == 1.0
    assert renamed_mask[asp, 6].item() == 0.0 and renamed_mask[asp, 7].item() == 1.0  # ... is now OD1


def _group_frames(aatype, pos14):
    from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles, torsion_angles_to_frames

    idx37 = torch.as_tensor(rc.restype_atom37_to_atom14)[aatype]
    mask37 = torch.as_tensor(rc.restype_atom37_mask, dtype=F64)[aatype]
    pos37 = torch.gather(pos14, 1, idx37[..., None].expand(*idx37.shape, 3)) * mask37[..., None]
    tors = atom37_to_torsion_angles(aatype, pos37, mask37, placeholder_for_undefined=True)
    n, ca, c = (pos37[:, rc.atom_order[a]] for a in ("N", "CA", "C"))
    bb = Rigid.from_3_points(c, ca, n)
    return (torsion_angles_to_frames(aatype, bb, tors["torsion_angles_sin_cos"]),
            torsion_angles_to_frames(aatype, bb, tors["alt_torsion_angles_sin_cos"]))  # fmt: skip


def _group_exists(aatype):
    table = torch.zeros(21, 8, dtype=F64)
    table[:, [0, 3]] = 1.0
    table[:20, 4:] = torch.as_tensor(rc.chi_angles_mask, dtype=F64)[:20]
    return table[aatype]


def test_sidechain_fape_takes_the_alternative_frames_where_the_naming_is_swapped():
    """A prediction equal to the truth except for Asp OD1/OD2 named the other way (and its chi2
    frame turned by pi): after renaming, the alternative frames of that Asp are the truth, and
    the loss is the floor sqrt(eps) / 10 of a perfect prediction."""
    aatype, true, mask = _villin14()
    asp = int((aatype == rc.restype_order["D"]).nonzero()[0])
    pred = true.clone()
    pred[asp, [6, 7]] = pred[asp, [7, 6]]
    frames, alt_frames = _group_frames(aatype, true)
    # The prediction's frames: the true ones, the alternative ones of that Asp (its chi2 + pi).
    pred_frames = Rigid(frames.rot.clone(), frames.trans.clone())
    pred_frames.rot[asp], pred_frames.trans[asp] = alt_frames.rot[asp], alt_frames.trans[asp]
    assert not torch.allclose(frames.rot[asp], alt_frames.rot[asp])
    renamed, renamed_mask, better = rename_symmetric_atoms(aatype, pred, true, mask)
    loss = sidechain_fape_loss(pred_frames, pred, frames, alt_frames, _group_exists(aatype), renamed, renamed_mask, better)
    assert loss.item() == pytest.approx(math.sqrt(1e-4) / 10.0, rel=1e-6)


@pytest.mark.parametrize("kw", [{}, {"clamp_distance": 4.0, "length_scale": 2.5}])
def test_sidechain_fape_of_one_atom_far_off(kw):
    """The true frames as the prediction and one atom 30 A off: every frame sees that atom 30 A
    off (clamped), every other pair sqrt(eps)."""
    aatype, true, mask = _villin14()
    frames, alt_frames = _group_frames(aatype, true)
    pred = true.clone()
    pred[9, 5] += torch.tensor([18.0, 24.0, 0.0], dtype=F64)
    groups = _group_exists(aatype)
    no_alt = torch.zeros(35, dtype=F64)
    loss = sidechain_fape_loss(frames, pred, frames, alt_frames, groups, true, mask, no_alt, **kw)
    clamp, scale = kw.get("clamp_distance", 10.0), kw.get("length_scale", 10.0)
    nf, na = groups.sum().item(), mask.sum().item()
    far = min(math.sqrt(900.0 + 1e-4), clamp)
    expected = nf * ((na - 1) * math.sqrt(1e-4) + far) / scale / (1e-4 + nf * na)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_renaming_by_summed_absolute_distance_errors_in_a_close_call():
    """An Asp with only OD1/OD2 and a Gly with N and CA: the four distances decide. By hand (with
    the true distances of OD1, OD2 to N, CA and the predicted ones), the summed absolute errors
    are 2.234 for the true naming and 2.176 for the swapped one: a close call that a squared or a
    smoothed error, or distances with an offset, would decide the other way."""
    aatype = torch.tensor([rc.restype_order["D"], rc.restype_order["G"]])
    true = torch.zeros(2, 14, 3, dtype=F64)
    pred = torch.zeros(2, 14, 3, dtype=F64)
    mask = torch.zeros(2, 14, dtype=F64)
    mask[0, 6] = mask[0, 7] = mask[1, 0] = mask[1, 1] = 1.0
    slots = [(0, 6), (0, 7), (1, 0), (1, 1)]
    for (r, a), t, p in zip(slots, [[1.8, 1.7, 2.2], [3.8, 2.2, 1.4], [0.9, 0.5, 0.6], [3.6, 1.2, 1.9]],
                            [[2.4, 1.2, 3.2], [3.8, 2.8, 2.1], [1.9, 0.7, 1.0], [3.1, 0.9, 2.4]]):  # fmt: skip
        true[r, a], pred[r, a] = torch.tensor(t, dtype=F64), torch.tensor(p, dtype=F64)
    dp = torch.cdist(pred[0, 6:8], pred[1, :2])
    e_true = (dp - torch.cdist(true[0, 6:8], true[1, :2])).abs().sum().item()
    e_alt = (dp - torch.cdist(true[0, [7, 6]], true[1, :2])).abs().sum().item()
    assert (round(e_true, 3), round(e_alt, 3)) == (2.234, 2.176)
    renamed, _, better = rename_symmetric_atoms(aatype, pred, true, mask)
    assert better.tolist() == [1.0, 0.0]
    torch.testing.assert_close(renamed[0, 6:8], true[0, [7, 6]])
