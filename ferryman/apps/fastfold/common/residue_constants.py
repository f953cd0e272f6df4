"""Residue-level constants of AlphaFold2: residue and atom alphabets, idealised rigid-group
geometry, chi angles, stereochemistry for violation checks, and the HHblits alphabet mapping.

The numbers are physical facts as AlphaFold2 uses them (AF2 Suppl. 1.2.1, Table 1 and 1.8;
Engh & Huber 1991 bond lengths/angles; Bondi van der Waals radii). Indexing follows AF2 so that
official weights and features line up: residue types sorted by three-letter code, 37 atom types
(``atom_types``) and the compact 14-slot layout (``restype_name_to_atom14_names``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# --- residue alphabets -------------------------------------------------------------------------

# Alphabetical by three-letter code; AF2's aatype index.
restypes = list("ARNDCQEGHILKMFPSTWYV")
restype_order = {r: i for i, r in enumerate(restypes)}
restype_num = len(restypes)  # 20
unk_restype_index = restype_num  # 20, also 'X'

restypes_with_x = [*restypes, "X"]  # the 21-letter alphabet
restype_order_with_x = {r: i for i, r in enumerate(restypes_with_x)}
restypes_with_x_and_gap = [*restypes, "X", "-"]  # the 22-letter MSA alphabet
restype_order_with_x_and_gap = {r: i for i, r in enumerate(restypes_with_x_and_gap)}

_THREE = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
restype_1to3 = dict(zip(restypes, _THREE))
restype_3to1 = {v: k for k, v in restype_1to3.items()}
unk_restype = "UNK"
resnames = [*_THREE, unk_restype]
resname_to_idx = {name: i for i, name in enumerate(resnames)}

# HHblits/a3m alphabet: 20 amino acids alphabetical by one-letter code, then X and gap. Ambiguity
# codes collapse: B->D, Z->E, U->C, J/O->X.
HHBLITS_AA_TO_ID = {aa: i for i, aa in enumerate("ACDEFGHIKLMNPQRSTVWY")}
HHBLITS_AA_TO_ID.update({"B": 2, "Z": 3, "U": 1, "J": 20, "O": 20, "X": 20, "-": 21})
ID_TO_HHBLITS_AA = {i: aa for i, aa in enumerate("ACDEFGHIKLMNPQRSTVWYX-")}
# Index i of the HHblits alphabet -> index in restypes_with_x_and_gap.
MAP_HHBLITS_AATYPE_TO_OUR_AATYPE = tuple(
    restypes_with_x_and_gap.index(ID_TO_HHBLITS_AA[i]) for i in range(len(restypes_with_x_and_gap))
)


def sequence_to_onehot(sequence: str, mapping: dict[str, int], map_unknown_to_x: bool = False) -> np.ndarray:
    """One-hot ``[len(sequence), num_classes]`` int32 encoding of ``sequence`` under ``mapping``.

    Unknown letters map to ``mapping['X']`` when ``map_unknown_to_x`` is set and raise otherwise.
    """
    num_classes = max(mapping.values()) + 1
    if sorted(set(mapping.values())) != list(range(num_classes)):
        raise ValueError("mapping values must be 0..num_classes-1 without gaps")
    out = np.zeros((len(sequence), num_classes), dtype=np.int32)
    for i, aa in enumerate(sequence):
        if aa in mapping:
            out[i, mapping[aa]] = 1
        elif map_unknown_to_x and aa.isalpha() and aa.isupper():
            out[i, mapping["X"]] = 1
        else:
            raise ValueError(f"invalid residue letter {aa!r} at position {i}")
    return out


# --- atoms -------------------------------------------------------------------------------------

atom_types = ["N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT"]
atom_order = {a: i for i, a in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37

_ATOM14 = {
    "ALA": "N CA C O CB",
    "ARG": "N CA C O CB CG CD NE CZ NH1 NH2",
    "ASN": "N CA C O CB CG OD1 ND2",
    "ASP": "N CA C O CB CG OD1 OD2",
    "CYS": "N CA C O CB SG",
    "GLN": "N CA C O CB CG CD OE1 NE2",
    "GLU": "N CA C O CB CG CD OE1 OE2",
    "GLY": "N CA C O",
    "HIS": "N CA C O CB CG ND1 CD2 CE1 NE2",
    "ILE": "N CA C O CB CG1 CG2 CD1",
    "LEU": "N CA C O CB CG CD1 CD2",
    "LYS": "N CA C O CB CG CD CE NZ",
    "MET": "N CA C O CB CG SD CE",
    "PHE": "N CA C O CB CG CD1 CD2 CE1 CE2 CZ",
    "PRO": "N CA C O CB CG CD",
    "SER": "N CA C O CB OG",
    "THR": "N CA C O CB OG1 CG2",
    "TRP": "N CA C O CB CG CD1 CD2 NE1 CE2 CE3 CZ2 CZ3 CH2",
    "TYR": "N CA C O CB CG CD1 CD2 CE1 CE2 CZ OH",
    "VAL": "N CA C O CB CG1 CG2",
    "UNK": "",
}
# Compact 14-slot atom layout per residue; empty names pad to 14.
restype_name_to_atom14_names = {
    res: (names.split() + [""] * 14)[:14] for res, names in _ATOM14.items()
}
# Heavy atoms per residue (no OXT), PDB names.
residue_atoms = {res: [a for a in names if a] for res, names in restype_name_to_atom14_names.items() if res != "UNK"}

# Atom names that are interchangeable by symmetry (AF2 Suppl. 1.9.3, Table 3).
residue_atom_renaming_swaps = {
    "ASP": {"OD1": "OD2"},
    "GLU": {"OE1": "OE2"},
    "PHE": {"CD1": "CD2", "CE1": "CE2"},
    "TYR": {"CD1": "CD2", "CE1": "CE2"},
}

# Van der Waals radii in Angstrom, by element (first letter of the atom name).
van_der_waals_radius = {"C": 1.7, "N": 1.55, "O": 1.52, "S": 1.8}


# --- chi angles ----------------------------------------------------------------------------------

_CHI = {
    "ALA": "",
    "ARG": "N CA CB CG; CA CB CG CD; CB CG CD NE; CG CD NE CZ",  # chi5 is planar, ignored
    "ASN": "N CA CB CG; CA CB CG OD1",
    "ASP": "N CA CB CG; CA CB CG OD1",
    "CYS": "N CA CB SG",
    "GLN": "N CA CB CG; CA CB CG CD; CB CG CD OE1",
    "GLU": "N CA CB CG; CA CB CG CD; CB CG CD OE1",
    "GLY": "",
    "HIS": "N CA CB CG; CA CB CG ND1",
    "ILE": "N CA CB CG1; CA CB CG1 CD1",
    "LEU": "N CA CB CG; CA CB CG CD1",
    "LYS": "N CA CB CG; CA CB CG CD; CB CG CD CE; CG CD CE NZ",
    "MET": "N CA CB CG; CA CB CG SD; CB CG SD CE",
    "PHE": "N CA CB CG; CA CB CG CD1",
    "PRO": "N CA CB CG; CA CB CG CD",
    "SER": "N CA CB OG",
    "THR": "N CA CB OG1",
    "TRP": "N CA CB CG; CA CB CG CD1",
    "TYR": "N CA CB CG; CA CB CG CD1",
    "VAL": "N CA CB CG1",
}
# Four atoms defining each chi dihedral, chi1..chi4 (a subset for shorter side chains).
chi_angles_atoms = {res: [q.split() for q in s.split(";")] if s else [] for res, s in _CHI.items()}
# [20, 4] 1.0 where the residue has that chi angle, in restypes order.
chi_angles_mask = [[1.0 if k < len(chi_angles_atoms[r]) else 0.0 for k in range(4)] for r in _THREE]
# [21, 4] 1.0 where a rotation by pi leaves the side chain unchanged (AF2 Suppl. 1.9.1).
_PI_PERIODIC = {"ASP": 1, "GLU": 2, "PHE": 1, "TYR": 1}
chi_pi_periodic = [[1.0 if _PI_PERIODIC.get(r) == k else 0.0 for k in range(4)] for r in resnames]
# [20, 4, 4] atom37 indices of the chi atoms, zero-padded.
chi_angles_atom_indices = np.array(
    [[[atom_order[a] for a in q] for q in chi_angles_atoms[r]] + [[0, 0, 0, 0]] * (4 - len(chi_angles_atoms[r])) for r in _THREE]
)

# --- rigid groups --------------------------------------------------------------------------------

# Idealised atom positions in the frame of their rigid group (AF2 Suppl. 1.8, Table 2). Groups:
# 0 backbone, 1 pre-omega (empty), 2 phi (hydrogens only), 3 psi, 4..7 chi1..chi4. Positions are
# relative to the end atom of the group's rotation axis; x along the axis, the dihedral-defining
# atom in the xy-plane with y > 0. Format per residue: "atom group x y z; ...".
_RIGID_GROUP_ATOMS = """
ALA: N 0 -0.525 1.363 0.000; CA 0 0.000 0.000 0.000; C 0 1.526 -0.000 -0.000; CB 0 -0.529 -0.774 -1.205; O 3 0.627 1.062 0.000
ARG: N 0 -0.524 1.362 -0.000; CA 0 0.000 0.000 0.000; C 0 1.525 -0.000 -0.000; CB 0 -0.524 -0.778 -1.209; O 3 0.626 1.062 0.000; CG 4 0.616 1.390 -0.000; CD 5 0.564 1.414 0.000; NE 6 0.539 1.357 -0.000; NH1 7 0.206 2.301 0.000; NH2 7 2.078 0.978 -0.000; CZ 7 0.758 1.093 -0.000
ASN: N 0 -0.536 1.357 0.000; CA 0 0.000 0.000 0.000; C 0 1.526 -0.000 -0.000; CB 0 -0.531 -0.787 -1.200; O 3 0.625 1.062 0.000; CG 4 0.584 1.399 0.000; ND2 5 0.593 -1.188 0.001; OD1 5 0.633 1.059 0.000
ASP: N 0 -0.525 1.362 -0.000; CA 0 0.000 0.000 0.000; C 0 1.527 0.000 -0.000; CB 0 -0.526 -0.778 -1.208; O 3 0.626 1.062 -0.000; CG 4 0.593 1.398 -0.000; OD1 5 0.610 1.091 0.000; OD2 5 0.592 -1.101 -0.003
CYS: N 0 -0.522 1.362 -0.000; CA 0 0.000 0.000 0.000; C 0 1.524 0.000 0.000; CB 0 -0.519 -0.773 -1.212; O 3 0.625 1.062 -0.000; SG 4 0.728 1.653 0.000
GLN: N 0 -0.526 1.361 -0.000; CA 0 0.000 0.000 0.000; C 0 1.526 0.000 0.000; CB 0 -0.525 -0.779 -1.207; O 3 0.626 1.062 -0.000; CG 4 0.615 1.393 0.000; CD 5 0.587 1.399 -0.000; NE2 6 0.593 -1.189 -0.001; OE1 6 0.634 1.060 0.000
GLU: N 0 -0.528 1.361 0.000; CA 0 0.000 0.000 0.000; C 0 1.526 -0.000 -0.000; CB 0 -0.526 -0.781 -1.207; O 3 0.626 1.062 0.000; CG 4 0.615 1.392 0.000; CD 5 0.600 1.397 0.000; OE1 6 0.607 1.095 -0.000; OE2 6 0.589 -1.104 -0.001
GLY: N 0 -0.572 1.337 0.000; CA 0 0.000 0.000 0.000; C 0 1.517 -0.000 -0.000; O 3 0.626 1.062 -0.000
HIS: N 0 -0.527 1.360 0.000; CA 0 0.000 0.000 0.000; C 0 1.525 0.000 0.000; CB 0 -0.525 -0.778 -1.208; O 3 0.625 1.063 0.000; CG 4 0.600 1.370 -0.000; CD2 5 0.889 -1.021 0.003; ND1 5 0.744 1.160 -0.000; CE1 5 2.030 0.851 0.002; NE2 5 2.145 -0.466 0.004
ILE: N 0 -0.493 1.373 -0.000; CA 0 0.000 0.000 0.000; C 0 1.527 -0.000 -0.000; CB 0 -0.536 -0.793 -1.213; O 3 0.627 1.062 -0.000; CG1 4 0.534 1.437 -0.000; CG2 4 0.540 -0.785 -1.199; CD1 5 0.619 1.391 0.000
LEU: N 0 -0.520 1.363 0.000; CA 0 0.000 0.000 0.000; C 0 1.525 -0.000 -0.000; CB 0 -0.522 -0.773 -1.214; O 3 0.625 1.063 -0.000; CG 4 0.678 1.371 0.000; CD1 5 0.530 1.430 -0.000; CD2 5 0.535 -0.774 1.200
LYS: N 0 -0.526 1.362 -0.000; CA 0 0.000 0.000 0.000; C 0 1.526 0.000 0.000; CB 0 -0.524 -0.778 -1.208; O 3 0.626 1.062 -0.000; CG 4 0.619 1.390 0.000; CD 5 0.559 1.417 0.000; CE 6 0.560 1.416 0.000; NZ 7 0.554 1.387 0.000
MET: N 0 -0.521 1.364 -0.000; CA 0 0.000 0.000 0.000; C 0 1.525 0.000 0.000; CB 0 -0.523 -0.776 -1.210; O 3 0.625 1.062 -0.000; CG 4 0.613 1.391 -0.000; SD 5 0.703 1.695 0.000; CE 6 0.320 1.786 -0.000
PHE: N 0 -0.518 1.363 0.000; CA 0 0.000 0.000 0.000; C 0 1.524 0.000 -0.000; CB 0 -0.525 -0.776 -1.212; O 3 0.626 1.062 -0.000; CG 4 0.607 1.377 0.000; CD1 5 0.709 1.195 -0.000; CD2 5 0.706 -1.196 0.000; CE1 5 2.102 1.198 -0.000; CE2 5 2.098 -1.201 -0.000; CZ 5 2.794 -0.003 -0.001
PRO: N 0 -0.566 1.351 -0.000; CA 0 0.000 0.000 0.000; C 0 1.527 -0.000 0.000; CB 0 -0.546 -0.611 -1.293; O 3 0.621 1.066 0.000; CG 4 0.382 1.445 0.000; CD 5 0.477 1.424 0.000
SER: N 0 -0.529 1.360 -0.000; CA 0 0.000 0.000 0.000; C 0 1.525 -0.000 -0.000; CB 0 -0.518 -0.777 -1.211; O 3 0.626 1.062 -0.000; OG 4 0.503 1.325 0.000
THR: N 0 -0.517 1.364 0.000; CA 0 0.000 0.000 0.000; C 0 1.526 0.000 -0.000; CB 0 -0.516 -0.793 -1.215; O 3 0.626 1.062 0.000; CG2 4 0.550 -0.718 -1.228; OG1 4 0.472 1.353 0.000
TRP: N 0 -0.521 1.363 0.000; CA 0 0.000 0.000 0.000; C 0 1.525 -0.000 0.000; CB 0 -0.523 -0.776 -1.212; O 3 0.627 1.062 0.000; CG 4 0.609 1.370 -0.000; CD1 5 0.824 1.091 0.000; CD2 5 0.854 -1.148 -0.005; CE2 5 2.186 -0.678 -0.007; CE3 5 0.622 -2.530 -0.007; NE1 5 2.140 0.690 -0.004; CH2 5 3.028 -2.890 -0.013; CZ2 5 3.283 -1.543 -0.011; CZ3 5 1.715 -3.389 -0.011
TYR: N 0 -0.522 1.362 0.000; CA 0 0.000 0.000 0.000; C 0 1.524 -0.000 -0.000; CB 0 -0.522 -0.776 -1.213; O 3 0.627 1.062 -0.000; CG 4 0.607 1.382 -0.000; CD1 5 0.716 1.195 -0.000; CD2 5 0.713 -1.194 -0.001; CE1 5 2.107 1.200 -0.002; CE2 5 2.104 -1.201 -0.003; OH 5 4.168 -0.002 -0.005; CZ 5 2.791 -0.001 -0.003
VAL: N 0 -0.494 1.373 -0.000; CA 0 0.000 0.000 0.000; C 0 1.527 -0.000 -0.000; CB 0 -0.533 -0.795 -1.213; O 3 0.627 1.062 -0.000; CG1 4 0.540 1.429 -0.000; CG2 4 0.533 -0.776 1.203
"""


def _parse_rigid_groups() -> dict[str, list[tuple[str, int, tuple[float, float, float]]]]:
    table = {}
    for line in _RIGID_GROUP_ATOMS.strip().splitlines():
        res, rest = line.split(":")
        entries = []
        for item in rest.split(";"):
            name, group, x, y, z = item.split()
            entries.append((name, int(group), (float(x), float(y), float(z))))
        table[res] = entries
    return table


rigid_group_atom_positions = _parse_rigid_groups()

# Engh & Huber bond lengths (Angstrom, mean and stddev) and bond angles (degrees), per residue;
# AF2 uses them for the violation terms (Suppl. 1.9.11).
_BOND_LENGTHS = """
ALA: CA-CB 1.520 0.021, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
ARG: CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.515 0.025, CD-NE 1.460 0.017, NE-CZ 1.326 0.013, CZ-NH1 1.326 0.013, CZ-NH2 1.326 0.013, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
ASN: CA-CB 1.527 0.026, CB-CG 1.506 0.023, CG-OD1 1.235 0.022, CG-ND2 1.324 0.025, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
ASP: CA-CB 1.535 0.022, CB-CG 1.513 0.021, CG-OD1 1.249 0.023, CG-OD2 1.249 0.023, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
CYS: CA-CB 1.526 0.013, CB-SG 1.812 0.016, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
GLU: CA-CB 1.535 0.022, CB-CG 1.517 0.019, CG-CD 1.515 0.015, CD-OE1 1.252 0.011, CD-OE2 1.252 0.011, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
GLN: CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.506 0.023, CD-OE1 1.235 0.022, CD-NE2 1.324 0.025, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
GLY: N-CA 1.456 0.015, CA-C 1.514 0.016, C-O 1.232 0.016
HIS: CA-CB 1.535 0.022, CB-CG 1.492 0.016, CG-ND1 1.369 0.015, CG-CD2 1.353 0.017, ND1-CE1 1.343 0.025, CD2-NE2 1.415 0.021, CE1-NE2 1.322 0.023, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
ILE: CA-CB 1.544 0.023, CB-CG1 1.536 0.028, CB-CG2 1.524 0.031, CG1-CD1 1.500 0.069, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
LEU: CA-CB 1.533 0.023, CB-CG 1.521 0.029, CG-CD1 1.514 0.037, CG-CD2 1.514 0.037, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
LYS: CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.520 0.034, CD-CE 1.508 0.025, CE-NZ 1.486 0.025, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
MET: CA-CB 1.535 0.022, CB-CG 1.509 0.032, CG-SD 1.807 0.026, SD-CE 1.774 0.056, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
PHE: CA-CB 1.535 0.022, CB-CG 1.509 0.017, CG-CD1 1.383 0.015, CG-CD2 1.383 0.015, CD1-CE1 1.388 0.020, CD2-CE2 1.388 0.020, CE1-CZ 1.369 0.019, CE2-CZ 1.369 0.019, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
PRO: CA-CB 1.531 0.020, CB-CG 1.495 0.050, CG-CD 1.502 0.033, CD-N 1.474 0.014, N-CA 1.468 0.017, CA-C 1.524 0.020, C-O 1.228 0.020
SER: CA-CB 1.525 0.015, CB-OG 1.418 0.013, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
THR: CA-CB 1.529 0.026, CB-OG1 1.428 0.020, CB-CG2 1.519 0.033, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
TRP: CA-CB 1.535 0.022, CB-CG 1.498 0.018, CG-CD1 1.363 0.014, CG-CD2 1.432 0.017, CD1-NE1 1.375 0.017, NE1-CE2 1.371 0.013, CD2-CE2 1.409 0.012, CD2-CE3 1.399 0.015, CE2-CZ2 1.393 0.017, CE3-CZ3 1.380 0.017, CZ2-CH2 1.369 0.019, CZ3-CH2 1.396 0.016, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
TYR: CA-CB 1.535 0.022, CB-CG 1.512 0.015, CG-CD1 1.387 0.013, CG-CD2 1.387 0.013, CD1-CE1 1.389 0.015, CD2-CE2 1.389 0.015, CE1-CZ 1.381 0.013, CE2-CZ 1.381 0.013, CZ-OH 1.374 0.017, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
VAL: CA-CB 1.543 0.021, CB-CG1 1.524 0.021, CB-CG2 1.524 0.021, N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019
"""
_BOND_ANGLES = """
ALA: N-CA-CB 110.1 1.4, CB-CA-C 110.1 1.5, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
ARG: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-CD 111.6 2.6, CG-CD-NE 111.8 2.1, CD-NE-CZ 123.6 1.4, NE-CZ-NH1 120.3 0.5, NE-CZ-NH2 120.3 0.5, NH1-CZ-NH2 119.4 1.1, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
ASN: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-ND2 116.7 2.4, CB-CG-OD1 121.6 2.0, ND2-CG-OD1 121.9 2.3, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
ASP: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-OD1 118.3 0.9, CB-CG-OD2 118.3 0.9, OD1-CG-OD2 123.3 1.9, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
CYS: N-CA-CB 110.8 1.5, CB-CA-C 111.5 1.2, CA-CB-SG 114.2 1.1, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
GLU: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-CD 114.2 2.7, CG-CD-OE1 118.3 2.0, CG-CD-OE2 118.3 2.0, OE1-CD-OE2 123.3 1.2, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
GLN: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-CD 111.6 2.6, CG-CD-OE1 121.6 2.0, CG-CD-NE2 116.7 2.4, OE1-CD-NE2 121.9 2.3, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
GLY: N-CA-C 113.1 2.5, CA-C-O 120.6 1.8
HIS: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.6 1.7, CB-CG-ND1 123.2 2.5, CB-CG-CD2 130.8 3.1, CG-ND1-CE1 108.2 1.4, ND1-CE1-NE2 109.9 2.2, CE1-NE2-CD2 106.6 2.5, NE2-CD2-CG 109.2 1.9, CD2-CG-ND1 106.0 1.4, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
ILE: N-CA-CB 110.8 2.3, CB-CA-C 111.6 2.0, CA-CB-CG1 111.0 1.9, CB-CG1-CD1 113.9 2.8, CA-CB-CG2 110.9 2.0, CG1-CB-CG2 111.4 2.2, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
LEU: N-CA-CB 110.4 2.0, CB-CA-C 110.2 1.9, CA-CB-CG 115.3 2.3, CB-CG-CD1 111.0 1.7, CB-CG-CD2 111.0 1.7, CD1-CG-CD2 110.5 3.0, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
LYS: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 2.2, CB-CG-CD 111.6 2.6, CG-CD-CE 111.9 3.0, CD-CE-NZ 111.7 2.3, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
MET: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.3 1.7, CB-CG-SD 112.4 3.0, CG-SD-CE 100.2 1.6, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
PHE: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.9 2.4, CB-CG-CD1 120.8 0.7, CB-CG-CD2 120.8 0.7, CD1-CG-CD2 118.3 1.3, CG-CD1-CE1 120.8 1.1, CG-CD2-CE2 120.8 1.1, CD1-CE1-CZ 120.1 1.2, CD2-CE2-CZ 120.1 1.2, CE1-CZ-CE2 120.0 1.8, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
PRO: N-CA-CB 103.3 1.2, CB-CA-C 111.7 2.1, CA-CB-CG 104.8 1.9, CB-CG-CD 106.5 3.9, CG-CD-N 103.2 1.5, CA-N-CD 111.7 1.4, N-CA-C 112.1 2.6, CA-C-O 120.2 2.4
SER: N-CA-CB 110.5 1.5, CB-CA-C 110.1 1.9, CA-CB-OG 111.2 2.7, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
THR: N-CA-CB 110.3 1.9, CB-CA-C 111.6 2.7, CA-CB-OG1 109.0 2.1, CA-CB-CG2 112.4 1.4, OG1-CB-CG2 110.0 2.3, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
TRP: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.7 1.9, CB-CG-CD1 127.0 1.3, CB-CG-CD2 126.6 1.3, CD1-CG-CD2 106.3 0.8, CG-CD1-NE1 110.1 1.0, CD1-NE1-CE2 109.0 0.9, NE1-CE2-CD2 107.3 1.0, CE2-CD2-CG 107.3 0.8, CG-CD2-CE3 133.9 0.9, NE1-CE2-CZ2 130.4 1.1, CE3-CD2-CE2 118.7 1.2, CD2-CE2-CZ2 122.3 1.2, CE2-CZ2-CH2 117.4 1.0, CZ2-CH2-CZ3 121.6 1.2, CH2-CZ3-CE3 121.2 1.1, CZ3-CE3-CD2 118.8 1.3, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
TYR: N-CA-CB 110.6 1.8, CB-CA-C 110.4 2.0, CA-CB-CG 113.4 1.9, CB-CG-CD1 121.0 0.6, CB-CG-CD2 121.0 0.6, CD1-CG-CD2 117.9 1.1, CG-CD1-CE1 121.3 0.8, CG-CD2-CE2 121.3 0.8, CD1-CE1-CZ 119.8 0.9, CD2-CE2-CZ 119.8 0.9, CE1-CZ-CE2 119.8 1.6, CE1-CZ-OH 120.1 2.7, CE2-CZ-OH 120.1 2.7, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
VAL: N-CA-CB 111.5 2.2, CB-CA-C 111.4 1.9, CA-CB-CG1 110.9 1.5, CA-CB-CG2 110.9 1.5, CG1-CB-CG2 110.9 1.6, N-CA-C 111.0 2.7, CA-C-O 120.1 2.1
"""

# Peptide bond C(i)-N(i+1): general value, then the value when residue i+1 is proline.
between_res_bond_length_c_n = [1.329, 1.341]
between_res_bond_length_stddev_c_n = [0.014, 0.016]
# Cosines of the angles across the peptide bond: (mean, stddev).
between_res_cos_angles_c_n_ca = [-0.5203, 0.0353]  # 121.352 +- 2.315 degrees
between_res_cos_angles_ca_c_n = [-0.4473, 0.0311]  # 116.568 +- 1.995 degrees
ca_ca = 3.80209737096  # CA-CA distance for a trans peptide


@dataclass(frozen=True)
class Bond:
    atom1_name: str
    atom2_name: str
    length: float
    stddev: float


@dataclass(frozen=True)
class BondAngle:
    atom1_name: str
    atom2_name: str
    atom3_name: str
    angle_rad: float
    stddev: float


def _parse_table(text: str) -> dict[str, list[tuple[list[str], float, float]]]:
    table: dict[str, list[tuple[list[str], float, float]]] = {}
    for line in text.strip().splitlines():
        res, rest = line.split(":")
        table[res] = [(atoms.split("-"), float(m), float(s)) for atoms, m, s in (e.split() for e in rest.split(","))]
    return table


def _virtual_bond(b1: Bond, b2: Bond, angle: BondAngle) -> Bond:
    # The 1-3 distance across an angle by the law of cosines, with first-order error propagation.
    gamma = angle.angle_rad
    length = float(np.sqrt(b1.length**2 + b2.length**2 - 2 * b1.length * b2.length * np.cos(gamma)))
    d_gamma = b1.length * b2.length * np.sin(gamma) / length
    d_b1 = (b1.length - b2.length * np.cos(gamma)) / length
    d_b2 = (b2.length - b1.length * np.cos(gamma)) / length
    stddev = float(np.sqrt((d_gamma * angle.stddev) ** 2 + (d_b1 * b1.stddev) ** 2 + (d_b2 * b2.stddev) ** 2))
    return Bond(angle.atom1_name, angle.atom3_name, length, stddev)


@functools.cache
def load_stereo_chemical_props() -> tuple[
    dict[str, list[Bond]], dict[str, list[Bond]], dict[str, list[BondAngle]]
]:
    """(bonds, virtual bonds spanning each angle, bond angles) per residue name; UNK has none."""
    bonds = {r: [Bond(a[0], a[1], m, s) for a, m, s in v] for r, v in _parse_table(_BOND_LENGTHS).items()}
    angles = {
        r: [BondAngle(a[0], a[1], a[2], np.deg2rad(m), np.deg2rad(s)) for a, m, s in v]
        for r, v in _parse_table(_BOND_ANGLES).items()
    }
    virtual = {}
    for res, res_angles in angles.items():
        lookup = {frozenset((b.atom1_name, b.atom2_name)): b for b in bonds[res]}
        virtual[res] = [
            _virtual_bond(
                lookup[frozenset((a.atom1_name, a.atom2_name))], lookup[frozenset((a.atom2_name, a.atom3_name))], a
            )
            for a in res_angles
        ]
    for table in (bonds, virtual, angles):
        table["UNK"] = []
    return bonds, virtual, angles


def make_atom14_dists_bounds(overlap_tolerance: float = 1.5, bond_length_tolerance_factor: float = 15) -> dict:
    """[21, 14, 14] lower/upper bounds and stddevs of intra-residue atom distances (AF2 Suppl. 1.9.11).

    Non-bonded pairs must stay apart by the sum of van der Waals radii minus the tolerance; bonded
    and angle-spanning pairs must stay within ``bond_length_tolerance_factor`` stddevs of ideal.
    """
    lower = np.zeros([21, 14, 14], np.float32)
    upper = np.zeros([21, 14, 14], np.float32)
    stddev = np.zeros([21, 14, 14], np.float32)
    bonds, virtual, _ = load_stereo_chemical_props()
    for restype, letter in enumerate(restypes):
        resname = restype_1to3[letter]
        names = restype_name_to_atom14_names[resname]
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if a and b and i != j:
                    lower[restype, i, j] = van_der_waals_radius[a[0]] + van_der_waals_radius[b[0]] - overlap_tolerance
                    upper[restype, i, j] = 1e10
        for bond in bonds[resname] + virtual[resname]:
            i, j = names.index(bond.atom1_name), names.index(bond.atom2_name)
            for p, q in ((i, j), (j, i)):
                lower[restype, p, q] = bond.length - bond_length_tolerance_factor * bond.stddev
                upper[restype, p, q] = bond.length + bond_length_tolerance_factor * bond.stddev
                stddev[restype, p, q] = bond.stddev
    return {"lower_bound": lower, "upper_bound": upper, "stddev": stddev}


# --- derived arrays ------------------------------------------------------------------------------


def _make_standard_atom_mask() -> np.ndarray:
    mask = np.zeros([restype_num + 1, atom_type_num], dtype=np.int32)  # UNK row stays zero
    for i, res in enumerate(_THREE):
        for name in residue_atoms[res]:
            mask[i, atom_order[name]] = 1
    return mask


# [21, 37] 1 where the residue type has that heavy atom (OXT excluded).
STANDARD_ATOM_MASK = _make_standard_atom_mask()


def _make_atom14_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    to37 = np.zeros([21, 14], dtype=np.int64)
    to14 = np.zeros([21, 37], dtype=np.int64)
    mask14 = np.zeros([21, 14], dtype=np.float32)
    for i, res in enumerate(resnames):
        for j, name in enumerate(restype_name_to_atom14_names[res]):
            if name:
                to37[i, j] = atom_order[name]
                to14[i, atom_order[name]] = j
                mask14[i, j] = 1.0
    return to37, to14, mask14


# [21, 14] atom37 index of each atom14 slot; [21, 37] atom14 slot of each atom37 type (0 if absent);
# [21, 14] 1.0 for occupied atom14 slots.
restype_atom14_to_atom37, restype_atom37_to_atom14, restype_atom14_mask = _make_atom14_maps()
restype_atom37_mask = STANDARD_ATOM_MASK.astype(np.float32)


def _rigid_4x4(ex: np.ndarray, ey: np.ndarray, translation: np.ndarray) -> np.ndarray:
    # Gram-Schmidt frame with x along ex and ey in the xy-plane.
    ex = ex / np.linalg.norm(ex)
    ey = ey - np.dot(ey, ex) * ex
    ey = ey / np.linalg.norm(ey)
    m = np.eye(4)
    m[:3, :3] = np.stack([ex, ey, np.cross(ex, ey)], axis=1)
    m[:3, 3] = translation
    return m


def _make_rigid_group_constants() -> dict[str, np.ndarray]:
    """Per residue type: rigid group of each atom, its literature position, and each group's
    default frame relative to its parent group (AF2 Suppl. Alg. 24 inputs)."""
    to_group37 = np.zeros([21, 37], dtype=np.int64)
    pos37 = np.zeros([21, 37, 3], dtype=np.float32)
    to_group14 = np.zeros([21, 14], dtype=np.int64)
    pos14 = np.zeros([21, 14, 3], dtype=np.float32)
    frames = np.zeros([21, 8, 4, 4], dtype=np.float32)
    for r, res in enumerate(_THREE):
        positions = {}
        for name, group, xyz in rigid_group_atom_positions[res]:
            positions[name] = np.array(xyz)
            to_group37[r, atom_order[name]] = group
            pos37[r, atom_order[name]] = xyz
            j = restype_name_to_atom14_names[res].index(name)
            to_group14[r, j] = group
            pos14[r, j] = xyz
        frames[r, 0] = frames[r, 1] = np.eye(4)  # backbone; pre-omega is a placeholder identity
        frames[r, 2] = _rigid_4x4(positions["N"] - positions["CA"], np.array([1.0, 0.0, 0.0]), positions["N"])
        frames[r, 3] = _rigid_4x4(positions["C"] - positions["CA"], positions["CA"] - positions["N"], positions["C"])
        chis = chi_angles_atoms[res]
        if chis:
            a, b, c = (positions[n] for n in chis[0][:3])
            frames[r, 4] = _rigid_4x4(c - b, a - b, c)
        for k in range(1, len(chis)):
            # Each later chi axis starts at the origin of the previous chi frame.
            end = positions[chis[k][2]]
            frames[r, 4 + k] = _rigid_4x4(end, np.array([-1.0, 0.0, 0.0]), end)
    return {
        "atom37_to_rigid_group": to_group37,
        "atom37_rigid_group_positions": pos37,
        "atom14_to_rigid_group": to_group14,
        "atom14_rigid_group_positions": pos14,
        "rigid_group_default_frame": frames,
    }


_RIGID = _make_rigid_group_constants()
restype_atom37_to_rigid_group = _RIGID["atom37_to_rigid_group"]  # [21, 37]
restype_atom37_rigid_group_positions = _RIGID["atom37_rigid_group_positions"]  # [21, 37, 3]
restype_atom14_to_rigid_group = _RIGID["atom14_to_rigid_group"]  # [21, 14]
restype_atom14_rigid_group_positions = _RIGID["atom14_rigid_group_positions"]  # [21, 14, 3]
restype_rigid_group_default_frame = _RIGID["rigid_group_default_frame"]  # [21, 8, 4, 4]
