"""Structural violations of an atom37 structure (AF2 Suppl. 1.9.11), in numpy for the relax loop.

A residue is violating when it takes part in a between-residue clash (heavy atoms closer than the
sum of their van der Waals radii minus 1.5 Å), a broken peptide bond (C-N length more than 12
standard deviations from ideal), or an intra-residue distance outside its bounds.
"""

from __future__ import annotations

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc

OVERLAP_TOLERANCE = 1.5
VIOLATION_TOLERANCE_FACTOR = 12.0

_RADIUS = np.array([rc.van_der_waals_radius[a[0]] for a in rc.atom_types], np.float32)
_C, _N, _SG = rc.atom_order["C"], rc.atom_order["N"], rc.atom_order["SG"]


def _intra_bounds() -> tuple[np.ndarray, np.ndarray]:
    """[21, 37, 37] lower/upper distance bounds re-indexed from AF2's atom14 tables."""
    b14 = rc.make_atom14_dists_bounds(OVERLAP_TOLERANCE, VIOLATION_TOLERANCE_FACTOR)
    lower = np.zeros((21, 37, 37), np.float32)
    upper = np.full((21, 37, 37), 1e10, np.float32)
    for r, letter in enumerate(rc.restypes):
        names = rc.restype_name_to_atom14_names[rc.restype_1to3[letter]]
        idx = [(i, rc.atom_order[n]) for i, n in enumerate(names) if n]
        for i, a in idx:
            for j, b in idx:
                if i != j:
                    lower[r, a, b] = b14["lower_bound"][r, i, j]
                    upper[r, a, b] = b14["upper_bound"][r, i, j]
    return lower, upper


_LOWER, _UPPER = _intra_bounds()


def _same_chain(chain_index: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros((n,), np.int64) if chain_index is None else np.asarray(chain_index)


def between_residue_clashes(positions: np.ndarray, mask: np.ndarray, residue_index: np.ndarray,
                            chain_index: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """[N] bool: residue has a heavy atom clashing with an atom of another residue (the peptide
    bond between consecutive residues of one chain is not a clash)."""
    n = positions.shape[0]
    flat = positions.reshape(-1, 3)
    present = mask.reshape(-1) > 0.5
    res_of = np.repeat(np.arange(n), rc.atom_type_num)
    atom_of = np.tile(np.arange(rc.atom_type_num), n)
    idx = np.nonzero(present)[0]
    xyz, res, atom = flat[idx], res_of[idx], atom_of[idx]
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)  # [A, A]
    allowed = _RADIUS[atom][:, None] + _RADIUS[atom][None] - OVERLAP_TOLERANCE
    pair = res[:, None] < res[None]  # each unordered pair of different residues once
    chain = _same_chain(chain_index, n)[res]
    consecutive = (residue_index[res][None] - residue_index[res][:, None] == 1) & (chain[None] == chain[:, None])
    peptide = consecutive & (atom[:, None] == _C) & (atom[None] == _N)
    disulfide = (atom[:, None] == _SG) & (atom[None] == _SG)
    clash = pair & ~peptide & ~disulfide & (dist < allowed)
    flagged = np.zeros((n,), bool)
    a, b = np.nonzero(clash)
    flagged[res[a]] = True
    flagged[res[b]] = True
    return flagged


def peptide_bond_violations(positions: np.ndarray, mask: np.ndarray, aatype: np.ndarray, residue_index: np.ndarray,
                            chain_index: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """[N] bool: the C(i)-N(i+1) bond length is outside 12 stddev of ideal (Pro has its own ideal);
    there is no bond between the last residue of a chain and the first of the next."""
    n = positions.shape[0]
    flagged = np.zeros((n,), bool)
    if n < 2:
        return flagged
    length = np.linalg.norm(positions[:-1, _C] - positions[1:, _N], axis=-1)
    is_pro = aatype[1:] == rc.restype_order["P"]
    ideal = np.where(is_pro, rc.between_res_bond_length_c_n[1], rc.between_res_bond_length_c_n[0])
    stddev = np.where(is_pro, rc.between_res_bond_length_stddev_c_n[1], rc.between_res_bond_length_stddev_c_n[0])
    same_chain = np.diff(_same_chain(chain_index, n)) == 0
    valid = (mask[:-1, _C] * mask[1:, _N] > 0.5) & (np.diff(residue_index) == 1) & same_chain
    bad = valid & (np.abs(length - ideal) > VIOLATION_TOLERANCE_FACTOR * stddev)
    flagged[:-1] |= bad
    flagged[1:] |= bad
    return flagged


def within_residue_violations(positions: np.ndarray, mask: np.ndarray, aatype: np.ndarray) -> np.ndarray:
    """[N] bool: an intra-residue atom pair is closer or farther than its bounds allow."""
    dist = np.linalg.norm(positions[:, :, None] - positions[:, None], axis=-1)  # [N, 37, 37]
    pair_mask = (mask[:, :, None] * mask[:, None]) > 0.5
    restype = np.minimum(aatype, 20)
    lower, upper = _LOWER[restype], _UPPER[restype]
    bad = pair_mask & ((dist < lower) | (dist > upper)) & (lower + upper > 0)
    return bad.any(axis=(1, 2))


def find_violations(positions: np.ndarray, mask: np.ndarray, aatype: np.ndarray, residue_index: np.ndarray,
                    chain_index: np.ndarray | None = None) -> dict:  # fmt: skip
    """Per-residue violation flags and counts, as AF2's relax loop reports them."""
    clashes = between_residue_clashes(positions, mask, residue_index, chain_index)
    bonds = peptide_bond_violations(positions, mask, aatype, residue_index, chain_index)
    within = within_residue_violations(positions, mask, aatype)
    per_residue = clashes | bonds | within
    return {
        "per_residue": per_residue,
        "num_residue_violations": int(per_residue.sum()),
        "num_clashing_residues": int(clashes.sum()),
        "num_peptide_bond_violations": int(bonds.sum()),
        "num_within_residue_violations": int(within.sum()),
    }
