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
    plddt: np.ndarray, remarks: list[str] | None = None, chain_index: np.ndarray | None = None,
) -> Protein:
    """Model outputs (0-based residue_index, per-residue pLDDT) -> Protein with pLDDT B-factors;
    ``chain_index`` (0 = chain A) for complexes."""
    plddt = np.asarray(plddt, np.float32)
    return Protein(
        atom_positions=np.asarray(atom_positions, np.float32),
        aatype=np.asarray(aatype, np.int64),
        atom_mask=np.asarray(atom_mask, np.float32),
        residue_index=np.asarray(residue_index, np.int64) + 1,
        b_factors=np.repeat(plddt[:, None], rc.atom_type_num, axis=1),
        chain_index=None if chain_index is None else np.asarray(chain_index, np.int32),
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


def _gemmi_structure(prot: Protein, block: str):
    """The protein as a gemmi Structure: one polymer entity per chain, label_seq_id = residue number."""
    import gemmi

    st = gemmi.Structure()
    st.name = block
    model = gemmi.Model(1)
    chains: dict[int, gemmi.Chain] = {}
    for i in range(prot.aatype.shape[0]):
        c = int(prot.chain_index[i])
        chains.setdefault(c, gemmi.Chain(CHAIN_IDS[c]))
        residue = gemmi.Residue()
        residue.name = _resname(int(prot.aatype[i]))
        residue.seqid = gemmi.SeqId(int(prot.residue_index[i]), " ")
        residue.label_seq = int(prot.residue_index[i])
        residue.subchain = CHAIN_IDS[c]
        residue.entity_id = str(c + 1)
        residue.entity_type = gemmi.EntityType.Polymer
        for j, atom_name in enumerate(rc.atom_types):
            if prot.atom_mask[i, j] < 0.5:
                continue
            atom = gemmi.Atom()
            atom.name, atom.element = atom_name, gemmi.Element(atom_name[0])
            atom.pos = gemmi.Position(*map(float, prot.atom_positions[i, j]))
            atom.occ, atom.b_iso = 1.0, float(prot.b_factors[i, j])
            residue.add_atom(atom)
        chains[c].add_residue(residue)
    for c in sorted(chains):
        model.add_chain(chains[c])
        entity = gemmi.Entity(str(c + 1))
        entity.entity_type, entity.polymer_type = gemmi.EntityType.Polymer, gemmi.PolymerType.PeptideL
        entity.subchains = [CHAIN_IDS[c]]
        entity.full_sequence = [r.name for r in chains[c]]
        st.entities.append(entity)
    st.add_model(model)
    return st


def _plddt_per_residue(prot: Protein) -> np.ndarray:
    """The pLDDT of each residue: its CA's B-factor (every atom of a residue carries the same)."""
    return prot.b_factors[:, rc.atom_order["CA"]].astype(np.float64)


def to_mmcif(prot: Protein, name: str = "prediction") -> str:
    """mmCIF written by gemmi, with pLDDT as ModelCIF quality metrics as AlphaFold2 v2.3 and the
    AlphaFold DB write them: ``_ma_qa_metric`` (global and local pLDDT), the global mean in
    ``_ma_qa_metric_global`` and one ``_ma_qa_metric_local`` row per residue; B-factors hold
    pLDDT too. Remarks (e.g. the random-weights warning) go to ``_struct.title``."""
    block_name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "prediction"
    doc = _gemmi_structure(prot, block_name).make_mmcif_document()
    block = doc.sole_block()
    plddt = _plddt_per_residue(prot)
    block.set_pair("_struct.entry_id", block_name)
    block.set_pair("_struct.title", _quoted("; ".join(prot.remarks) or "Ferryman fastfold prediction"))
    block.set_mmcif_category("_software", {"pdbx_ordinal": ["1"], "name": ["Ferryman fastfold"],
                                           "classification": ["other"], "type": ["package"],
                                           "description": ["Structure prediction (AlphaFold2 model)"]})  # fmt: skip
    block.set_mmcif_category("_ma_qa_metric", {
        "id": ["1", "2"], "mode": ["global", "local"], "name": ["pLDDT", "pLDDT"], "software_group_id": ["1", "1"],
        "type": ["pLDDT", "pLDDT"],
    })  # fmt: skip
    block.set_mmcif_category("_ma_qa_metric_global", {
        "metric_id": ["1"], "metric_value": [f"{plddt.mean():.2f}" if len(plddt) else "0"], "model_id": ["1"],
        "ordinal_id": ["1"],
    })  # fmt: skip
    block.set_mmcif_category("_ma_qa_metric_local", {
        "label_asym_id": [CHAIN_IDS[int(c)] for c in prot.chain_index],
        "label_comp_id": [_resname(int(a)) for a in prot.aatype],
        "label_seq_id": [str(int(r)) for r in prot.residue_index],
        "metric_id": ["2"] * len(plddt),
        "metric_value": [f"{p:.2f}" for p in plddt],
        "model_id": ["1"] * len(plddt),
        "ordinal_id": [str(i + 1) for i in range(len(plddt))],
    })  # fmt: skip
    return doc.as_string()


def _quoted(text: str) -> str:
    import gemmi

    return gemmi.cif.quote(text)


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
