"""A predicted protein in the atom37 layout, and its PDB and mmCIF text (pLDDT in the B-factors).

Residue numbers are 1-based as in AF2's `protein.from_prediction` (model residue_index + 1).
Writers return text; `write_pdb`/`write_mmcif` write it atomically (temporary name, then rename).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.core.io import write_text

CHAIN_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(kw_only=True)
class Protein:
    """atom_positions [N, 37, 3] Å, aatype [N], atom_mask [N, 37], residue_index [N] (1-based),
    b_factors [N, 37], chain_index [N]."""

    atom_positions: np.ndarray
    aatype: np.ndarray
    atom_mask: np.ndarray
    residue_index: np.ndarray
    b_factors: np.ndarray
    chain_index: np.ndarray | None = None
    remarks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.aatype.shape[0]
        if self.atom_positions.shape != (n, rc.atom_type_num, 3) or self.atom_mask.shape != (n, rc.atom_type_num):
            raise ValueError(f"Protein: atom arrays must be [{n}, 37(, 3)], got {self.atom_positions.shape}")
        if self.chain_index is None:
            self.chain_index = np.zeros((n,), np.int32)
        if int(np.max(self.chain_index, initial=0)) >= len(CHAIN_IDS):
            raise ValueError(f"Protein: at most {len(CHAIN_IDS)} chains can be written")

    @property
    def sequence(self) -> str:
        return "".join(rc.restypes_with_x[a] for a in self.aatype)


def from_prediction(
    *, aatype: np.ndarray, residue_index: np.ndarray, atom_positions: np.ndarray, atom_mask: np.ndarray,
    plddt: np.ndarray, remarks: list[str] | None = None,
) -> Protein:
    """Model outputs (0-based residue_index, per-residue pLDDT) -> Protein with pLDDT B-factors."""
    plddt = np.asarray(plddt, np.float32)
    return Protein(
        atom_positions=np.asarray(atom_positions, np.float32),
        aatype=np.asarray(aatype, np.int64),
        atom_mask=np.asarray(atom_mask, np.float32),
        residue_index=np.asarray(residue_index, np.int64) + 1,
        b_factors=np.repeat(plddt[:, None], rc.atom_type_num, axis=1),
        remarks=list(remarks or []),
    )


def _resname(aatype: int) -> str:
    return rc.resnames[aatype] if aatype < len(rc.resnames) else rc.unk_restype


def _atoms(prot: Protein):
    """(residue i, resname, atom name, element, xyz, b) for each present atom in PDB order."""
    for i in range(prot.aatype.shape[0]):
        resname = _resname(int(prot.aatype[i]))
        for j, atom_name in enumerate(rc.atom_types):
            if prot.atom_mask[i, j] < 0.5:
                continue
            yield i, resname, atom_name, atom_name[0], prot.atom_positions[i, j], float(prot.b_factors[i, j])


def to_pdb(prot: Protein) -> str:
    """PDB text: fixed columns, TER after each chain, B-factor column = per-atom b_factors."""
    out = io.StringIO()
    for remark in prot.remarks:
        out.write(f"REMARK 250 {remark}"[:80] + "\n")
    serial = 1
    last_chain = None
    last_res = None
    for i, resname, atom_name, element, xyz, b in _atoms(prot):
        chain = CHAIN_IDS[int(prot.chain_index[i])]
        if last_chain is not None and chain != last_chain:
            out.write(_ter(serial, last_res, last_chain))
            serial += 1
        name = atom_name if len(atom_name) == 4 else f" {atom_name}"
        out.write(
            f"{'ATOM':<6}{serial:>5} {name:<4}{'':1}{resname:>3} {chain:>1}{int(prot.residue_index[i]):>4}{'':1}   "
            f"{xyz[0]:>8.3f}{xyz[1]:>8.3f}{xyz[2]:>8.3f}{1.00:>6.2f}{b:>6.2f}          {element:>2}{'':2}\n"
        )
        serial += 1
        last_chain, last_res = chain, (resname, int(prot.residue_index[i]))
    if last_res is not None:
        out.write(_ter(serial, last_res, last_chain))
    out.write("END\n")
    return out.getvalue()


def _ter(serial: int, res: tuple[str, int], chain: str) -> str:
    return f"{'TER':<6}{serial:>5}      {res[0]:>3} {chain:>1}{res[1]:>4}\n"


def _cif_value(value: str) -> str:
    return f"'{value}'" if (" " in value or not value) else value


def to_mmcif(prot: Protein, name: str = "prediction") -> str:
    """mmCIF text with entity, sequence and atom_site categories readable by Biopython/gemmi."""
    block = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "prediction"
    lines = [f"data_{block}", "#", f"_entry.id {block}", "#"]
    for remark in prot.remarks:
        lines.append(f"# {remark}")
    lines += ["loop_", "_entity_poly_seq.entity_id", "_entity_poly_seq.num", "_entity_poly_seq.mon_id", "_entity_poly_seq.hetero"]
    for i, a in enumerate(prot.aatype):
        lines.append(f"{int(prot.chain_index[i]) + 1} {int(prot.residue_index[i])} {_resname(int(a))} n")
    lines += ["#", "loop_", "_struct_asym.id", "_struct_asym.entity_id"]
    for c in sorted({int(c) for c in prot.chain_index}):
        lines.append(f"{CHAIN_IDS[c]} {c + 1}")
    columns = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "label_asym_id", "label_entity_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy", "B_iso_or_equiv", "pdbx_formal_charge", "auth_seq_id", "auth_comp_id", "auth_asym_id", "auth_atom_id", "pdbx_PDB_model_num"]
    lines += ["#", "loop_", *[f"_atom_site.{c}" for c in columns]]
    for serial, (i, resname, atom_name, element, xyz, b) in enumerate(_atoms(prot), start=1):
        chain = CHAIN_IDS[int(prot.chain_index[i])]
        resnum = int(prot.residue_index[i])
        lines.append(
            f"ATOM {serial} {element} {_cif_value(atom_name)} . {resname} {chain} {int(prot.chain_index[i]) + 1} "
            f"{resnum} ? {xyz[0]:.3f} {xyz[1]:.3f} {xyz[2]:.3f} 1.00 {b:.2f} ? {resnum} {resname} {chain} "
            f"{_cif_value(atom_name)} 1"
        )
    lines.append("#")
    return "\n".join(lines) + "\n"


def write_pdb(prot: Protein, path: str | Path) -> Path:
    write_text(path, to_pdb(prot))
    return Path(path)


def write_mmcif(prot: Protein, path: str | Path, name: str = "prediction") -> Path:
    write_text(path, to_mmcif(prot, name))
    return Path(path)


def from_pdb_string(text: str, *, chain_id: str | None = None) -> Protein:
    """Heavy atoms of standard residues (hydrogens and waters dropped) -> Protein; B-factors kept."""
    from Bio.PDB import PDBParser

    structure = PDBParser(QUIET=True).get_structure("x", io.StringIO(text))
    model = next(iter(structure))
    aatype, positions, masks, resnums, bfs, chains = [], [], [], [], [], []
    chain_order: dict[str, int] = {}
    for chain in model:
        if chain_id is not None and chain.id != chain_id:
            continue
        for residue in chain:
            if residue.id[0] != " ":
                continue
            letter = rc.restype_3to1.get(residue.get_resname(), "X")
            xyz = np.zeros((rc.atom_type_num, 3), np.float32)
            mask = np.zeros((rc.atom_type_num,), np.float32)
            b = np.zeros((rc.atom_type_num,), np.float32)
            for atom in residue:
                if atom.get_id() in rc.atom_order:
                    k = rc.atom_order[atom.get_id()]
                    xyz[k], mask[k], b[k] = atom.coord, 1.0, atom.bfactor
            aatype.append(rc.restype_order_with_x[letter])
            positions.append(xyz)
            masks.append(mask)
            resnums.append(residue.id[1])
            bfs.append(b)
            chains.append(chain_order.setdefault(chain.id, len(chain_order)))
    return Protein(
        atom_positions=np.array(positions, np.float32).reshape(-1, rc.atom_type_num, 3),
        aatype=np.array(aatype, np.int64),
        atom_mask=np.array(masks, np.float32).reshape(-1, rc.atom_type_num),
        residue_index=np.array(resnums, np.int64),
        b_factors=np.array(bfs, np.float32).reshape(-1, rc.atom_type_num),
        chain_index=np.array(chains, np.int32),
    )
