"""Real structures for fastfold tests: the villin headpiece OpenMM ships (N68H, 35 residues)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VILLIN_SEQUENCE = "LSDEDFKAVFGMTRSAFANLPLWKQQHLKKEKGLF"

# Amber/CHARMM names in OpenMM's file -> PDB names.
_RESNAMES = {"HIE": "HIS", "HID": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS"}
_ATOMNAMES = {"OC1": "O", "OC2": "OXT", "OT1": "O", "OT2": "OXT"}


def openmm_villin_pdb() -> str:
    """Heavy atoms of the protein in openmm/app/data/test.pdb, chain A, water and ions removed."""
    import openmm.app

    path = Path(openmm.app.__file__).parent / "data" / "test.pdb"
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("ATOM"):
            continue
        resname = line[17:20].strip()
        atom = line[12:16].strip()
        if resname in ("HOH", "WAT", "SOL", "Cl", "CL", "NA", "Na") or atom.startswith("H") or atom[:1].isdigit():
            continue
        resname = _RESNAMES.get(resname, resname)
        atom = _ATOMNAMES.get(atom, atom)
        name = atom if len(atom) == 4 else f" {atom}"
        lines.append(f"{line[:12]}{name:<4} {resname:>3} A{line[22:54]}{1.0:>6.2f}{0.0:>6.2f}          {atom[0]:>2}")
    return "\n".join(lines) + "\nEND\n"


def villin_protein():
    from ferryman.apps.fastfold.output.protein import from_pdb_string

    prot = from_pdb_string(openmm_villin_pdb())
    assert prot.sequence == VILLIN_SEQUENCE, prot.sequence
    return prot


def perturb_side_chains(prot, *, scale: float, seed: int):
    """Move every side-chain atom beyond CB randomly by ~`scale` Å (backbone and CB untouched)."""
    from ferryman.apps.fastfold.common import residue_constants as rc

    rng = np.random.default_rng(seed)
    keep = [rc.atom_order[a] for a in ("N", "CA", "C", "O", "CB", "OXT")]
    side = np.ones((rc.atom_type_num,), bool)
    side[keep] = False
    noise = rng.normal(scale=scale, size=prot.atom_positions.shape).astype(np.float32)
    positions = prot.atom_positions + noise * side[None, :, None] * prot.atom_mask[..., None]
    return type(prot)(**{**vars(prot), "atom_positions": positions})
