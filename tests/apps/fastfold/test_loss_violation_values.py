"""Structural violation terms (AF2 Suppl. 1.9.11, eq. 44-47) by value: hand-built peptides with
known answers, errors exactly at a limit, and every output of the three terms against a
plain-Python loop over bonds, atom pairs and residues (a second formula of the same rules) on a
distorted villin fragment, at the defaults and at other tolerances, one structure and a batch of
two. AF2's own ``all_atom`` functions, and the two places where its code differs from these rules,
are in parity/test_violation_losses.py."""

from __future__ import annotations

import math

import pytest
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.loss.violations import (
    between_residue_bond_and_angle,
    between_residue_clashes,
    find_structural_violations,
    violation_loss,
    within_residue_violations,
)

F64 = torch.float64
N, CA, C = 0, 1, 2
COS_CA_C_N = rc.between_res_cos_angles_ca_c_n[0]
STD_CA_C_N = rc.between_res_bond_length_stddev_c_n[0]  # AF2's code: the C-N bond's, not the angle's
COS_C_N_CA, STD_C_N_CA = rc.between_res_cos_angles_c_n_ca


# --- the second formula: loops over bonds, atom pairs and residues -------------------------------


def _sub(a, b):
    return [x - y for x, y in zip(a, b)]


def _norm(v, eps):
    return math.sqrt(eps + sum(x * x for x in v))


def ref_bonds(pos, mask, ridx, aatype, tol=12.0, eps=1e-6):
    p, m = pos.tolist(), mask.tolist()
    n = len(p)
    sums = {"c_n": [0.0, 0.0], "ca_c_n": [0.0, 0.0], "c_n_ca": [0.0, 0.0]}
    loss, flag = [0.0] * n, [0.0] * n
    for i in range(n - 1):
        linked = float(int(ridx[i + 1]) - int(ridx[i]) == 1)
        pro = int(aatype[i + 1]) == rc.restype_order["P"]
        length = rc.between_res_bond_length_c_n[int(pro)]
        std = rc.between_res_bond_length_stddev_c_n[int(pro)]
        bm = m[i][C] * m[i + 1][N] * linked
        am1, am2 = m[i][CA] * bm, bm * m[i + 1][CA]
        c_n_vec = _sub(p[i + 1][N], p[i][C])
        c_n = _norm(c_n_vec, eps)
        bond_err = math.sqrt(eps + (c_n - length) ** 2)
        c_ca = _sub(p[i][CA], p[i][C])
        n_ca = _sub(p[i + 1][CA], p[i + 1][N])
        cos1 = sum(a * b for a, b in zip(c_ca, c_n_vec)) / (_norm(c_ca, eps) * c_n)
        cos2 = -sum(a * b for a, b in zip(c_n_vec, n_ca)) / (c_n * _norm(n_ca, eps))
        err1, err2 = math.sqrt(eps + (cos1 - COS_CA_C_N) ** 2), math.sqrt(eps + (cos2 - COS_C_N_CA) ** 2)
        terms = [
            ("c_n", bm, bond_err, tol * std),
            ("ca_c_n", am1, err1, tol * STD_CA_C_N),
            ("c_n_ca", am2, err2, tol * STD_C_N_CA),
        ]
        bad = 0.0
        for key, w, err, limit in terms:
            sums[key][0] += w * max(0.0, err - limit)
            sums[key][1] += w
            loss[i] += 0.5 * w * max(0.0, err - limit)
            loss[i + 1] += 0.5 * w * max(0.0, err - limit)
            bad = max(bad, w * float(err > limit))
        flag[i], flag[i + 1] = max(flag[i], bad), max(flag[i + 1], bad)
    out = {f"{k}_loss_mean": s / (eps + w) for k, (s, w) in sums.items()}
    return {**out, "per_residue_loss_sum": loss, "per_residue_violation": flag}


def _radius(aatype, slot):
    names = rc.restype_name_to_atom14_names[rc.restype_1to3[rc.restypes[aatype]]] if aatype < 20 else [""] * 14
    return rc.van_der_waals_radius[names[slot][0]] if names[slot] else 0.0


def ref_clashes(pos, mask, ridx, aatype, overlap=1.5, eps=1e-10):
    p, m = pos.tolist(), mask.tolist()
    n = len(p)
    per_atom = [[0.0] * 14 for _ in range(n)]
    clash = [[0.0] * 14 for _ in range(n)]
    total, pairs = 0.0, 0.0
    sg = rc.restype_name_to_atom14_names["CYS"].index("SG")
    for i in range(n):
        for j in range(i + 1, n):
            for a in range(14):
                for b in range(14):
                    w = m[i][a] * m[j][b]
                    if w == 0.0:
                        continue
                    if a == C and b == N and int(ridx[j]) - int(ridx[i]) == 1:
                        continue  # the peptide bond
                    if a == sg and b == sg:
                        continue  # AF2: slot 5 against slot 5 (Cys SG-SG) of any residue types
                    lower = _radius(int(aatype[i]), a) + _radius(int(aatype[j]), b)
                    d = math.sqrt(eps + sum(x * x for x in _sub(p[i][a], p[j][b])))
                    e = w * max(0.0, lower - overlap - d)
                    total, pairs = total + e, pairs + w
                    per_atom[i][a] += e
                    per_atom[j][b] += e
                    if d < lower - overlap:
                        clash[i][a] = clash[j][b] = 1.0
    return {"mean_loss": total / (1e-6 + pairs), "per_atom_loss_sum": per_atom, "per_atom_clash": clash}


def ref_within(pos, mask, aatype, overlap=1.5, tol=12.0, eps=1e-10):
    bounds = rc.make_atom14_dists_bounds(overlap, tol)
    p, m = pos.tolist(), mask.tolist()
    per_atom = [[0.0] * 14 for _ in p]
    bad = [[0.0] * 14 for _ in p]
    for r in range(len(p)):
        t = min(int(aatype[r]), 20)
        lo, hi = bounds["lower_bound"][t].tolist(), bounds["upper_bound"][t].tolist()  # float32 values, exactly
        for a in range(14):
            for b in range(14):
                if a == b or m[r][a] * m[r][b] == 0.0 or lo[a][b] + hi[a][b] <= 0:
                    continue
                d = math.sqrt(eps + sum(x * x for x in _sub(p[r][a], p[r][b])))
                e = max(0.0, lo[a][b] - d) + max(0.0, d - hi[a][b])
                per_atom[r][a] += e  # each ordered pair credits both of its atoms
                per_atom[r][b] += e
                if d < lo[a][b] or d > hi[a][b]:
                    bad[r][a] = 1.0
    return {"per_atom_loss_sum": per_atom, "per_atom_violation": bad}


def _close(ours, ref):
    torch.testing.assert_close(ours, torch.as_tensor(ref, dtype=F64), rtol=1e-10, atol=1e-12)


# --- inputs --------------------------------------------------------------------------------------


def _villin_fragment(n=12):
    pytest.importorskip("openmm")
    from tests.apps.fastfold._structures import villin_protein

    prot = villin_protein()
    aatype = torch.as_tensor(prot.aatype[:n]).long()
    idx = torch.as_tensor(rc.restype_atom14_to_atom37)[aatype]
    slots = torch.as_tensor(rc.restype_atom14_mask, dtype=F64)[aatype]
    pos37 = torch.as_tensor(prot.atom_positions[:n], dtype=F64)
    mask = torch.gather(torch.as_tensor(prot.atom_mask[:n], dtype=F64), 1, idx) * slots
    pos = torch.gather(pos37, 1, idx[..., None].expand(*idx.shape, 3)) * mask[..., None]
    return pos, mask, torch.as_tensor(prot.residue_index[:n]).long(), aatype


def _distorted(seed: int):
    """Villin 1-12 (L S D E D F K A V F G M) with every kind of violation: noisy residues 2-5 (bonds, angles,
    within-residue bounds, a non-bonded pair too close), a clash across the chain (7 onto 3), one between neighbours that is not
    the peptide bond (4 CB onto 5 CB), C of 0 onto N of 2 (not bonded), a chain break after 6 and
    a missing atom; residues 9-12 stay clean."""
    pos, mask, ridx, aatype = _villin_fragment()
    gen = torch.Generator().manual_seed(seed)
    pos = pos.clone()
    pos[2:6] += 0.35 * torch.randn(pos[2:6].shape, generator=gen, dtype=F64)
    pos[7, 4] = pos[3, 1] + torch.tensor([0.9, 0.3, -0.2], dtype=F64)
    pos[5, 4] = pos[4, 4] + torch.tensor([0.4, 1.1, 0.1], dtype=F64)
    pos[2, N] = pos[0, C] + torch.tensor([0.2, -1.2, 0.5], dtype=F64)
    pos[2, 6] = pos[2, N] + torch.tensor([0.5, 0.9, -0.6], dtype=F64)  # Asp OD1 1.2 A from its own N
    ridx = ridx.clone()
    ridx[7:] += 3  # a chain break between residues 6 and 7
    mask = mask.clone()
    mask[3, CA] = 0.0
    return pos * mask[..., None], mask, ridx, aatype


# --- hand-built peptides -------------------------------------------------------------------------


def _dipeptide(length: float, next_type: str = "A", residues: int = 2):
    """N, CA, C of `residues` residues in the xy-plane: every C-N bond `length` long along +x, both
    peptide angles at their literature means (so only the bond can be off)."""
    pos = torch.zeros(residues, 14, 3, dtype=F64)
    mask = torch.zeros(residues, 14, dtype=F64)
    mask[:, :3] = 1.0
    to_ca = 1.46 * torch.tensor([-COS_C_N_CA, math.sqrt(1 - COS_C_N_CA**2), 0.0], dtype=F64)  # N -> CA
    from_c = 1.52 * torch.tensor([COS_CA_C_N, math.sqrt(1 - COS_CA_C_N**2), 0.0], dtype=F64)  # C -> CA
    for r in range(residues):
        pos[r, CA] = pos[r, N] + to_ca
        pos[r, C] = pos[r, CA] - from_c
        if r + 1 < residues:
            pos[r + 1, N] = pos[r, C] + torch.tensor([length, 0.0, 0.0], dtype=F64)
    aatype = torch.full((residues,), rc.restype_order["A"])
    aatype[1:] = rc.restype_order[next_type]
    return pos, mask, torch.arange(residues), aatype


def _bond_loss(length: float, ideal: float, std: float, tol: float = 12.0, eps: float = 1e-6) -> float:
    c_n = math.sqrt(eps + length**2)
    return max(0.0, math.sqrt(eps + (c_n - ideal) ** 2) - tol * std)


def test_a_stretched_peptide_bond_costs_its_excess_over_twelve_sigma():
    # 1.629 A is 0.300 A over 1.329: 0.300 - 12 * 0.014 = 0.132 (the angles are at their means).
    pos, mask, ridx, aatype = _dipeptide(1.629)
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    expected = _bond_loss(1.629, 1.329, 0.014)
    assert expected == pytest.approx(0.132, abs=1e-5)
    assert out["c_n_loss_mean"].item() == pytest.approx(expected, rel=1e-6)
    assert out["ca_c_n_loss_mean"].item() == 0.0 and out["c_n_ca_loss_mean"].item() == 0.0
    # Each residue of the bond gets half of it.
    _close(out["per_residue_loss_sum"], [expected / 2, expected / 2])
    _close(out["per_residue_violation"], [1.0, 1.0])
    # 12.5 sigma off: over 12 (the default), inside 13.
    pos, *_ = _dipeptide(1.329 + 12.5 * 0.014)
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    assert out["c_n_loss_mean"].item() > 0 and out["per_residue_violation"].tolist() == [1.0, 1.0]
    assert find_structural_violations(pos, mask, ridx, aatype)["per_residue_violation"].tolist() == [1.0, 1.0]
    relaxed = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=13.0)
    assert relaxed["c_n_loss_mean"].item() == 0.0 and relaxed["per_residue_violation"].tolist() == [0.0, 0.0]


def test_a_bond_before_proline_has_the_cis_trans_length_and_spread():
    # Before proline the ideal is 1.341 +- 0.016: 1.629 is 0.288 over, 0.288 - 0.192 = 0.096.
    pos, mask, ridx, aatype = _dipeptide(1.629, next_type="P")
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    assert out["c_n_loss_mean"].item() == pytest.approx(_bond_loss(1.629, 1.341, 0.016), rel=1e-6)
    assert out["c_n_loss_mean"].item() == pytest.approx(0.096, abs=1e-5)
    # And at tolerance 3: 0.288 - 0.048 = 0.240 (the proline spread again, not 0.014).
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=3.0)
    assert out["c_n_loss_mean"].item() == pytest.approx(_bond_loss(1.629, 1.341, 0.016, tol=3.0), rel=1e-6)
    # A bond that only the non-proline spread tolerates: 1.341 + 0.17 is 10.6 sigma before proline.
    pos, *_ = _dipeptide(1.341 + 0.17, next_type="P")
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    assert out["c_n_loss_mean"].item() == 0.0 and out["per_residue_violation"].tolist() == [0.0, 0.0]


def test_a_chain_break_or_a_missing_atom_is_not_a_bond():
    pos, mask, ridx, aatype = _dipeptide(4.0, residues=3)
    flat = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    one = _bond_loss(4.0, 1.329, 0.014)
    assert flat["c_n_loss_mean"].item() == pytest.approx(one, rel=1e-6)
    # The middle residue has two violated bonds: its flag stays 1, its loss gets both halves.
    _close(flat["per_residue_violation"], [1.0, 1.0, 1.0])
    _close(flat["per_residue_loss_sum"], [one / 2, one, one / 2])
    broken = between_residue_bond_and_angle(pos, mask, torch.tensor([0, 1, 5]), aatype)
    _close(broken["per_residue_violation"], [1.0, 1.0, 0.0])
    _close(broken["per_residue_loss_sum"], [one / 2, one / 2, 0.0])
    no_n = mask.clone()
    no_n[2, N] = 0.0
    out = between_residue_bond_and_angle(pos, no_n, ridx, aatype)
    _close(out["per_residue_violation"], [1.0, 1.0, 0.0])
    assert out["c_n_loss_mean"].item() == pytest.approx(one, rel=1e-6)
    no_c = mask.clone()
    no_c[1, C] = 0.0
    out = between_residue_bond_and_angle(pos, no_c, ridx, aatype)
    _close(out["per_residue_violation"], [1.0, 1.0, 0.0])


# --- against the loops ---------------------------------------------------------------------------


@pytest.mark.parametrize("tol,eps", [(12.0, 1e-6), (8.0, 1e-2)])
def test_bonds_and_angles_match_the_loops(tol, eps):
    pos, mask, ridx, aatype = _distorted(0)
    kw = {} if tol == 12.0 else {"tolerance_factor": tol, "eps": eps}
    ours = between_residue_bond_and_angle(pos, mask, ridx, aatype, **kw)
    ref = ref_bonds(pos, mask, ridx, aatype, tol, eps)
    assert 0 < sum(ref["per_residue_violation"]) < len(ref["per_residue_violation"])
    assert ref["ca_c_n_loss_mean"] > 0 and ref["c_n_ca_loss_mean"] > 0 and ref["c_n_loss_mean"] > 0
    for key, value in ref.items():
        _close(ours[key], value)


@pytest.mark.parametrize("overlap", [1.5, 0.6])
def test_clashes_match_the_loops(overlap):
    pos, mask, ridx, aatype = _distorted(1)
    kw = {} if overlap == 1.5 else {"overlap_tolerance": overlap}
    ours = between_residue_clashes(pos, mask, ridx, aatype, **kw)
    ref = ref_clashes(pos, mask, ridx, aatype, overlap)
    assert ref["mean_loss"] > 0
    for key, value in ref.items():
        _close(ours[key], value)


@pytest.mark.parametrize("overlap,tol", [(1.5, 12.0), (0.6, 3.0)])
def test_within_residue_bounds_match_the_loops(overlap, tol):
    pos, mask, _, aatype = _distorted(2)
    kw = {} if tol == 12.0 else {"overlap_tolerance": overlap, "tolerance_factor": tol}
    ours = within_residue_violations(pos, mask, aatype, **kw)
    ref = ref_within(pos, mask, aatype, overlap, tol)
    assert 0 < sum(map(sum, ref["per_atom_violation"])) < mask.sum().item()
    for key, value in ref.items():
        _close(ours[key], value)


def test_slot_5_pairs_alone_are_exempt_from_clashes():
    """Cys 0 and Cys 1 (SG-SG 2.05 A, a disulfide: exempt), their CBs 1.6 A apart (a clash), Cys 0's
    SG 1.8 A from Val 2's CB (a clash), and the CG1s of Val 2 and 3 1.7 A apart: slot 5 like SG, so
    exempt too, as in AF2's code (its disulfide mask is by slot, not residue type)."""
    cys, val = rc.restype_order["C"], rc.restype_order["V"]
    aatype = torch.tensor([cys, cys, val, val])
    pos = torch.zeros(4, 14, 3, dtype=F64)
    mask = torch.zeros(4, 14, dtype=F64)
    mask[:, 4:6] = 1.0
    pos[0, 5] = torch.tensor([0.0, 0.0, 0.0])
    pos[1, 5] = torch.tensor([2.05, 0.0, 0.0])
    pos[0, 4] = torch.tensor([-0.2, 3.0, 0.0])
    pos[1, 4] = torch.tensor([1.4, 3.0, 0.0])
    pos[2, 4] = torch.tensor([0.0, -1.8, 0.0])
    pos[2, 5] = torch.tensor([0.0, -5.0, 8.0])
    pos[3, 5] = torch.tensor([1.7, -5.0, 8.0])
    pos[3, 4] = torch.tensor([30.0, 0.0, 0.0])
    ridx = torch.tensor([0, 10, 20, 30])
    out = between_residue_clashes(pos, mask, ridx, aatype)
    cb_cb, sg_cb = 3.4 - 1.5 - 1.6, 3.5 - 1.5 - 1.8
    expected = torch.zeros(4, 14, dtype=F64)
    expected[0, 4] = expected[1, 4] = cb_cb
    expected[0, 5] = expected[2, 4] = sg_cb
    torch.testing.assert_close(out["per_atom_loss_sum"], expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out["per_atom_clash"], (expected > 0).to(F64))
    for key, value in ref_clashes(pos, mask, ridx, aatype).items():
        _close(out[key], value)


def test_an_unknown_residue_type_past_the_table_counts_as_unknown():
    """aatype 21 (the MSA alphabet's gap) is clamped to 20 (unknown): no radii, no bounds."""
    pos, mask, ridx, aatype = _distorted(3)
    past = aatype.clone()
    past[4] = 21
    unk = aatype.clone()
    unk[4] = 20
    for a, b in zip(find_structural_violations(pos, mask, ridx, past)["clashes"].values(),
                    find_structural_violations(pos, mask, ridx, unk)["clashes"].values()):  # fmt: skip
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(within_residue_violations(pos, mask, past)["per_atom_loss_sum"],
                               within_residue_violations(pos, mask, unk)["per_atom_loss_sum"])  # fmt: skip


def _ref_loss(pos, mask, ridx, aatype, tol=12.0, overlap=1.5, eps=1e-6):
    bonds = ref_bonds(pos, mask, ridx, aatype, tol)
    atoms = sum(map(sum, ref_clashes(pos, mask, ridx, aatype, overlap)["per_atom_loss_sum"]))
    atoms += sum(map(sum, ref_within(pos, mask, aatype, overlap, tol)["per_atom_loss_sum"]))
    return bonds["c_n_loss_mean"] + bonds["ca_c_n_loss_mean"] + bonds["c_n_ca_loss_mean"] + atoms / (
        eps + mask.sum().item())


def _flags(pos, mask, ridx, aatype, tol=12.0, overlap=1.5):
    bonds = ref_bonds(pos, mask, ridx, aatype, tol)["per_residue_violation"]
    clash = ref_clashes(pos, mask, ridx, aatype, overlap)["per_atom_clash"]
    within = ref_within(pos, mask, aatype, overlap, tol)["per_atom_violation"]
    return [max(b, max(c), max(w)) for b, c, w in zip(bonds, clash, within)]


@pytest.mark.parametrize("tol,overlap", [(12.0, 1.5), (9.0, 1.0)])
def test_violation_loss_and_flags_match_the_loops(tol, overlap):
    pos, mask, ridx, aatype = _distorted(4)
    kw = {} if tol == 12.0 else {"tolerance_factor": tol, "overlap_tolerance": overlap}
    v = find_structural_violations(pos, mask, ridx, aatype, **kw)
    assert violation_loss(v, mask).item() == pytest.approx(_ref_loss(pos, mask, ridx, aatype, tol, overlap), rel=1e-10)
    flags = _flags(pos, mask, ridx, aatype, tol, overlap)
    assert 0 < sum(flags) < len(flags)
    _close(v["per_residue_violation"], flags)
    _close(v["bonds"]["per_residue_violation"], ref_bonds(pos, mask, ridx, aatype, tol)["per_residue_violation"])
    _close(v["clashes"]["per_atom_loss_sum"], ref_clashes(pos, mask, ridx, aatype, overlap)["per_atom_loss_sum"])
    _close(v["within"]["per_atom_loss_sum"], ref_within(pos, mask, aatype, overlap, tol)["per_atom_loss_sum"])
    # The terms enter with a plus sign each: the angle means alone are part of the sum.
    b = v["bonds"]
    assert b["ca_c_n_loss_mean"].item() > 0 and b["c_n_ca_loss_mean"].item() > 0


def test_a_batch_of_two_structures_is_two_structures():
    one, two = _distorted(5), _distorted(6)
    pos, mask, ridx, aatype = (torch.stack([a, b]) for a, b in zip(one, two))
    mask[1, 6] = 0.0  # the two masks differ
    pos = pos * mask[..., None]
    v = find_structural_violations(pos, mask, ridx, aatype)
    loss = violation_loss(v, mask)
    assert loss.shape == (2,)
    for k in range(2):
        args = pos[k], mask[k], ridx[k], aatype[k]
        assert loss[k].item() == pytest.approx(_ref_loss(*args), rel=1e-10)
        _close(v["per_residue_violation"][k], _flags(*args))
        for key, value in ref_bonds(*args).items():
            _close(v["bonds"][key][k], value)
        for key, value in ref_clashes(*args).items():
            _close(v["clashes"][key][k], value)
        for key, value in ref_within(args[0], args[1], args[3]).items():
            _close(v["within"][key][k], value)


def test_an_angle_alone_flags_both_residues():
    """Ideal bond length, CA of residue 0 turned so that CA-C-N is 30 degrees off: the angle term
    alone makes the violation (and only its own mean is non-zero)."""
    pos, mask, ridx, aatype = _dipeptide(1.329)
    theta = math.acos(COS_CA_C_N) + math.radians(30)
    pos[0, CA] = pos[0, C] + 1.52 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=F64)
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    assert out["c_n_loss_mean"].item() == 0.0 and out["c_n_ca_loss_mean"].item() == 0.0
    assert out["ca_c_n_loss_mean"].item() > 0 and out["per_residue_violation"].tolist() == [1.0, 1.0]
    pos, *_ = _dipeptide(1.329)
    theta = math.acos(-COS_C_N_CA) + math.radians(30)
    pos[1, CA] = pos[1, N] + 1.46 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=F64)
    out = between_residue_bond_and_angle(pos, mask, ridx, aatype)
    assert out["c_n_loss_mean"].item() == 0.0 and out["ca_c_n_loss_mean"].item() == 0.0
    assert out["c_n_ca_loss_mean"].item() > 0 and out["per_residue_violation"].tolist() == [1.0, 1.0]


# --- exactly at a limit: not a violation (AF2 flags errors strictly past the tolerance) ------------


def _tol_at(err: float, std: float) -> float:
    """A tolerance factor t with t * std == err exactly in float64 (searched among neighbours)."""
    t = err / std
    for _ in range(400):
        if t * std == err:
            return t
        t = math.nextafter(t, math.inf if t * std < err else -math.inf)
    raise AssertionError("no tolerance factor hits the error exactly")


def test_a_bond_exactly_at_the_tolerance_is_not_flagged():
    """C-N 1.25 A with eps 0: the error 1.329 - 1.25 is exact (Sterbenz), the length is exact; the
    angles are at their means, so only the bond decides."""
    pos, mask, ridx, aatype = _dipeptide(1.25)
    pos = pos - pos[0, C]  # C at the origin (exactly), N at exactly (1.25, 0, 0)
    pos[1, CA] = pos[1, CA] - pos[1, N] + torch.tensor([1.25, 0.0, 0.0], dtype=F64)
    pos[1, N] = torch.tensor([1.25, 0.0, 0.0], dtype=F64)
    tol = _tol_at(1.329 - 1.25, 0.014)
    at = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=tol, eps=0.0)
    assert at["per_residue_violation"].tolist() == [0.0, 0.0]
    past = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=math.nextafter(tol, 0.0), eps=0.0)
    assert past["per_residue_violation"].tolist() == [1.0, 1.0]


def _exact_peptide(ca0, ca1):
    """C of residue 0 at the origin, its N-neighbour at (0.75, 1, 0) (bond 1.25 A, unit vector
    (0.6, 0.8, 0) up to rounding), the two CAs where given."""
    pos = torch.zeros(2, 14, 3, dtype=F64)
    mask = torch.zeros(2, 14, dtype=F64)
    mask[:, :3] = 1.0
    pos[1, N] = torch.tensor([0.75, 1.0, 0.0], dtype=F64)
    pos[0, CA], pos[1, CA] = torch.tensor(ca0, dtype=F64), pos[1, N] + torch.tensor(ca1, dtype=F64)
    pos[0, N], pos[1, C] = pos[0, CA] + 1.0, pos[1, CA] + 1.0
    return pos, mask, torch.arange(2), torch.full((2,), rc.restype_order["A"])


def test_an_angle_exactly_at_the_tolerance_is_not_flagged():
    # CA-C along +y (unit vector exact): cos(CA-C-N) = fl(0.8), its error fl(0.8) + 0.4473 rounded once.
    pos, mask, ridx, aatype = _exact_peptide([0.0, 1.5, 0.0], [-0.9, 1.1, 0.3])
    tol = _tol_at(0.8 - COS_CA_C_N, STD_CA_C_N)
    at = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=tol, eps=0.0)
    assert at["ca_c_n_loss_mean"].item() == 0.0 and at["per_residue_violation"].tolist() == [0.0, 0.0]
    past = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=math.nextafter(tol, 0.0), eps=0.0)
    assert past["per_residue_violation"].tolist() == [1.0, 1.0]
    # N-CA along +y: cos(C-N-CA) = -fl(0.8), its error fl(0.8) - 0.5203 (exact); CA-C-N at its mean.
    theta = math.atan2(0.8, 0.6) + math.acos(COS_CA_C_N)
    pos, mask, ridx, aatype = _exact_peptide([1.5 * math.cos(theta), 1.5 * math.sin(theta), 0.0], [0.0, 1.5, 0.0])
    tol = _tol_at(0.8 + COS_C_N_CA, STD_C_N_CA)
    at = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=tol, eps=0.0)
    assert at["per_residue_violation"].tolist() == [0.0, 0.0]
    past = between_residue_bond_and_angle(pos, mask, ridx, aatype, tolerance_factor=math.nextafter(tol, 0.0), eps=0.0)
    assert past["per_residue_violation"].tolist() == [1.0, 1.0]


def test_a_clash_exactly_at_the_overlap_limit_is_not_flagged():
    """Two CB atoms (1.7 A radii) of residues far apart, 3.4 - 1.5 A apart along x, eps 0."""
    ala = rc.restype_order["A"]
    pos = torch.zeros(2, 14, 3, dtype=F64)
    mask = torch.zeros(2, 14, dtype=F64)
    mask[:, 4] = 1.0
    limit = (1.7 + 1.7) - 1.5
    pos[1, 4, 0] = limit
    out = between_residue_clashes(pos, mask, torch.tensor([0, 5]), torch.tensor([ala, ala]), eps=0.0)
    assert out["per_atom_clash"].sum().item() == 0.0 and out["mean_loss"].item() == 0.0
    pos[1, 4, 0] = math.nextafter(limit, 0.0)
    out = between_residue_clashes(pos, mask, torch.tensor([0, 5]), torch.tensor([ala, ala]), eps=0.0)
    assert out["per_atom_clash"][:, 4].tolist() == [1.0, 1.0]


def test_a_distance_exactly_at_a_within_residue_bound_is_not_flagged():
    """Alanine N and CA exactly at the lower bound of their distance (residue 0) and exactly at the
    upper one (residue 1), eps 0; one step further each is a violation."""
    ala = rc.restype_order["A"]
    bounds = rc.make_atom14_dists_bounds(1.5, 12.0)
    lower, upper = float(bounds["lower_bound"][ala][N][CA]), float(bounds["upper_bound"][ala][N][CA])
    assert 0 < lower < upper
    pos = torch.zeros(2, 14, 3, dtype=F64)
    mask = torch.zeros(2, 14, dtype=F64)
    mask[:, [N, CA]] = 1.0
    aatype = torch.tensor([ala, ala])
    pos[0, CA, 0], pos[1, CA, 0] = lower, upper
    out = within_residue_violations(pos, mask, aatype, eps=0.0)
    assert out["per_atom_violation"].sum().item() == 0.0 and out["per_atom_loss_sum"].sum().item() == 0.0
    pos[0, CA, 0], pos[1, CA, 0] = math.nextafter(lower, 0.0), math.nextafter(upper, math.inf)
    out = within_residue_violations(pos, mask, aatype, eps=0.0)
    assert out["per_atom_violation"][:, [N, CA]].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_half_precision_positions_keep_their_dtype():
    """bf16 positions: the bounds and radii are cast to the positions' dtype, not left in float32."""
    pos, mask, ridx, aatype = _distorted(7)
    v = find_structural_violations(pos.to(torch.bfloat16), mask.to(torch.bfloat16), ridx, aatype)
    assert v["within"]["per_atom_loss_sum"].dtype == torch.bfloat16
    assert v["clashes"]["per_atom_loss_sum"].dtype == torch.bfloat16


def test_slots_a_residue_type_does_not_have_are_never_scored():
    """A mask that claims all 14 slots (positions of the absent ones left at the origin) scores
    the same within-residue terms as the residue type's own mask: absent slots have no bounds."""
    pos, _, _, aatype = _distorted(8)
    mask = torch.as_tensor(rc.restype_atom14_mask, dtype=F64)[aatype]
    full = torch.ones_like(mask)
    ours, ref = within_residue_violations(pos, full, aatype), within_residue_violations(pos, mask, aatype)
    real = mask.bool()
    torch.testing.assert_close(ours["per_atom_loss_sum"][real], ref["per_atom_loss_sum"][real])
    torch.testing.assert_close(ours["per_atom_loss_sum"][~real], torch.zeros((~real).sum().item(), dtype=F64))
    torch.testing.assert_close(ours["per_atom_violation"], ref["per_atom_violation"])


def test_bond_outputs_take_the_positions_dtype_whatever_the_masks():
    """float64 positions with a float32 atom mask (the features' dtype): every output is float64,
    as the positions are, including the per-residue flags."""
    pos, mask, ridx, aatype = _dipeptide(1.629)
    out = between_residue_bond_and_angle(pos, mask.float(), ridx, aatype)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, F64)
    assert out["per_residue_violation"].tolist() == [1.0, 1.0]
