"""Training targets from experimental structures: PDB or mmCIF files read with Biopython into the
atom37 layout (AF2 Suppl. 1.2.1). Unreadable files are skipped and counted, never a crash."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.core.errors import UserError

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
# Names some force fields and PDB files use for standard residues.
_RESNAME_ALIASES = {"MSE": "MET", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HIE": "HIS", "HID": "HIS", "HIP": "HIS"}
# CHARMM/Amber names of the C-terminal oxygens (OpenMM and MD files) -> PDB names.
_ATOM_ALIASES = {"OT1": "O", "OT2": "OXT", "OC1": "O", "OC2": "OXT"}


@dataclass(kw_only=True)
class Chain:
    """One protein chain: aatype ``[N]`` (0..20), atom_positions ``[N, 37, 3]`` (Å), atom_mask
    ``[N, 37]``, residue_index ``[N]``; resolution in Å (0 when the file does not say)."""

    name: str
    aatype: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    residue_index: np.ndarray
    resolution: float = 0.0
    source: str = ""  # the file's stem, which names its alignment

    @property
    def sequence(self) -> str:
        return "".join(rc.restypes_with_x[a] for a in self.aatype)

    def __len__(self) -> int:
        return int(self.aatype.shape[0])


def _parser(path: Path):
    from Bio.PDB import MMCIFParser, PDBParser

    if path.suffix.lower() in (".cif", ".mmcif"):
        return MMCIFParser(QUIET=True)
    return PDBParser(QUIET=True)


def _resolution(structure, path: Path) -> float:
    value = structure.header.get("resolution") if hasattr(structure, "header") else None
    if value is None and path.suffix.lower() in (".cif", ".mmcif"):
        from Bio.PDB.MMCIF2Dict import MMCIF2Dict

        raw = MMCIF2Dict(str(path)).get("_refine.ls_d_res_high", ["?"])[0]
        value = None if raw in ("?", ".") else raw
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _chain_arrays(chain) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[int]]:
    aatype, positions, masks, numbers = [], [], [], []
    for residue in chain:
        hetero, number, _ = residue.get_id()
        resname = _RESNAME_ALIASES.get(residue.get_resname(), residue.get_resname())
        if hetero.strip() and resname not in rc.restype_3to1:
            continue  # water, ligands
        one = rc.restype_3to1.get(resname, "X")
        pos = np.zeros((rc.atom_type_num, 3), np.float32)
        mask = np.zeros((rc.atom_type_num,), np.float32)
        for atom in residue:
            name = _ATOM_ALIASES.get(atom.get_name(), atom.get_name())
            if resname == "MET" and name == "SE":
                name = "SD"
            if name in rc.atom_order:
                pos[rc.atom_order[name]] = atom.get_coord()
                mask[rc.atom_order[name]] = 1.0
        if not mask[rc.atom_order["CA"]]:
            continue
        aatype.append(rc.restype_order.get(one, rc.unk_restype_index))
        positions.append(pos)
        masks.append(mask)
        numbers.append(number)
    return aatype, positions, masks, numbers


def read_structure(path: str | Path, chain_id: str | None = None) -> Chain:
    """The first protein chain of ``path`` (or ``chain_id``) from its first model."""
    path = Path(path)
    try:
        structure = _parser(path).get_structure(path.stem, str(path))
        models = list(structure)
    except Exception as exc:  # Biopython raises many kinds on malformed files
        raise UserError(f"{path}: cannot read the structure ({type(exc).__name__}: {exc})") from exc
    if not models:
        raise UserError(f"{path}: no models in the file")
    for chain in models[0]:
        if chain_id is not None and chain.id != chain_id:
            continue
        aatype, positions, masks, numbers = _chain_arrays(chain)
        if aatype:
            return Chain(
                name=f"{path.stem}_{chain.id}" if chain.id.strip() else path.stem,
                aatype=np.asarray(aatype, np.int64), atom_positions=np.stack(positions),
                atom_mask=np.stack(masks), residue_index=np.asarray(numbers, np.int64),
                resolution=_resolution(structure, path), source=path.stem,
            )  # fmt: skip
    which = f"chain {chain_id!r}" if chain_id else "a protein chain"
    raise UserError(f"{path}: no {which} with Cα atoms")


def load_structures(folder: str | Path, *, min_length: int = 1) -> tuple[list[Chain], list[tuple[Path, str]]]:
    """Every readable structure in ``folder`` and the (path, reason) of each file skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of structures")
    chains, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in STRUCTURE_SUFFIXES):
        try:
            chain = read_structure(path)
        except UserError as exc:
            skipped.append((path, str(exc)))
            continue
        if len(chain) < min_length:
            skipped.append((path, f"{path}: {len(chain)} residues, fewer than {min_length}"))
            continue
        chains.append(chain)
    for _, reason in skipped:
        log.warning("skipped %s", reason)
    return chains, skipped
