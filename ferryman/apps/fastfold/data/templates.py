"""Template features from a folder of mmCIF files (AF2 Suppl. 1.2.3).

Two searches, as in AF2: hmmsearch (the query alignment becomes a profile HMM with every query
column a match state, `hmmbuild --hand`, scanned against the observed sequences of the folder's
chains) or hhsearch against a PDB70-style HH-suite database (hits parsed from the .hhr file;
a hit whose sequence disagrees with the chain's observed residues is realigned with kalign).
Each hit maps query residues to template residues and their atom37 coordinates. AF2's filters apply: hits shorter than 10
aligned residues or covering <10% of the query are dropped, and so are near-copies of the query
(>95% coverage of an identical sequence), which would leak the answer. Without a folder, or with
no hits, the features are empty (T = 0).
"""

from __future__ import annotations

import gzip
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.features import FeatureDict, empty_template_features
from ferryman.apps.fastfold.data.msa import Msa, to_a3m
from ferryman.apps.fastfold.data.tools import HHSearch, Hmmsearch, Kalign
from ferryman.core.errors import UserError

_HIT_NAME = re.compile(r"^(?P<chain>\S+?)/(?P<start>\d+)-(?P<end>\d+)$")


@dataclass(kw_only=True)
class Chain:
    """Observed residues of one template chain: sequence, atom37 positions and masks."""

    name: str
    sequence: str
    positions: np.ndarray  # [L, 37, 3]
    mask: np.ndarray  # [L, 37]


@dataclass(kw_only=True)
class Hit:
    name: str
    query_to_hit: dict[int, int]  # 0-based query residue -> 0-based template residue
    sum_probs: float = 0.0
    hit_residues: dict[int, str] | None = None  # template residue letters the search saw (hhsearch)


def read_mmcif_chains(path: Path) -> list[Chain]:
    """Standard amino acids with coordinates from the first model (MSE read as MET, SE as SD)."""
    from Bio.PDB import MMCIFParser

    parser = MMCIFParser(QUIET=True)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt") as handle:
                structure = parser.get_structure(path.stem, handle)
        else:
            structure = parser.get_structure(path.stem, str(path))
    except Exception as exc:  # Biopython raises several types for broken files
        raise UserError(f"{path}: cannot read template mmCIF ({exc})") from None
    code = path.name.split(".")[0].lower()
    chains = []
    for chain in next(iter(structure), []):
        letters, pos, mask = [], [], []
        for residue in chain:
            resname = "MET" if residue.get_resname() == "MSE" else residue.get_resname()
            if residue.id[0] not in (" ", "H_MSE") or resname not in rc.restype_3to1 or "CA" not in residue:
                continue
            xyz = np.zeros((rc.atom_type_num, 3), np.float32)
            m = np.zeros((rc.atom_type_num,), np.float32)
            for atom in residue:
                name = "SD" if atom.get_id() == "SE" and resname == "MET" else atom.get_id()
                if name in rc.atom_order:
                    xyz[rc.atom_order[name]] = atom.coord
                    m[rc.atom_order[name]] = 1.0
            letters.append(rc.restype_3to1[resname])
            pos.append(xyz)
            mask.append(m)
        if letters:
            chains.append(
                Chain(name=f"{code}_{chain.id}", sequence="".join(letters), positions=np.stack(pos), mask=np.stack(mask))
            )
    return chains


def load_template_folder(folder: Path) -> dict[str, Chain]:
    if not folder.is_dir():
        raise UserError(f"{folder}: template mmCIF folder not found")
    files = sorted([*folder.glob("*.cif"), *folder.glob("*.cif.gz")])
    if not files:
        raise UserError(f"{folder}: no .cif or .cif.gz files in the template folder")
    return {c.name: c for f in files for c in read_mmcif_chains(f)}


def msa_to_stockholm(msa: Msa) -> str:
    """Stockholm with an RF line marking every query column as a match state (for hmmbuild --hand)."""
    width = len(msa.sequences[0])
    lines = ["# STOCKHOLM 1.0", ""]
    for i, seq in enumerate(msa.sequences):
        lines.append(f"seq{i} {seq}")
    lines += ["#=GC RF " + "x" * width, "//"]
    return "\n".join(lines) + "\n"


def parse_hmmsearch_sto(text: str, query_length: int) -> list[Hit]:
    """Map query residues to hit residues through the RF (match state) columns."""
    rows: dict[str, list[str]] = {}
    rf: list[str] = []
    for line in text.splitlines():
        if line.startswith("#=GC RF"):
            rf.append(line.split()[2])
        elif line.strip() and not line.startswith("#") and line.strip() != "//":
            name, chunk = line.split()
            rows.setdefault(name, []).append(chunk)
    ref = "".join(rf)
    hits = []
    for name, chunks in rows.items():
        match = _HIT_NAME.match(name)
        row = "".join(chunks)
        if match is None or len(row) != len(ref) or ref.count("x") != query_length:
            continue
        q, h = 0, int(match.group("start")) - 1
        mapping = {}
        for state, char in zip(ref, row):
            if state == "x":
                if char not in "-.":
                    mapping[q] = h
                    h += 1
                q += 1
            elif char not in "-.":
                h += 1
        hits.append(Hit(name=match.group("chain"), query_to_hit=mapping))
    return hits


def parse_hhr(text: str) -> list[Hit]:
    """Hits of an hhsearch .hhr file: name, Sum_probs and the query -> template residue mapping."""
    hits = []
    for block in re.split(r"^No \d+\s*$", text, flags=re.M)[1:]:
        lines = block.strip().splitlines()
        name = lines[0][1:].split()[0]
        probs = re.search(r"Sum_probs=([\d.]+)", block)
        q_seq, t_seq, q_start, t_start = [], [], None, None
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[0] not in ("Q", "T") or parts[1] in ("Consensus", "ss_pred", "ss_dssp", "ss_conf"):
                continue
            start, seq = int(parts[2]), parts[3]
            if parts[0] == "Q":
                q_start = start if q_start is None else q_start
                q_seq.append(seq)
            else:
                t_start = start if t_start is None else t_start
                t_seq.append(seq)
        if q_start is None or t_start is None:
            continue
        mapping, letters = {}, {}
        q, t = q_start - 1, t_start - 1
        for qc, tc in zip("".join(q_seq), "".join(t_seq)):
            if qc != "-" and tc != "-":
                mapping[q] = t
                letters[t] = tc.upper()
            q += qc != "-"
            t += tc != "-"
        hits.append(Hit(name=name, query_to_hit=mapping, sum_probs=float(probs.group(1)) if probs else 0.0,
                        hit_residues=letters))  # fmt: skip
    return hits


def realign_to_chain(hit: Hit, chain: Chain, kalign: Kalign | None) -> Hit | None:
    """Map a hit's template numbering onto the chain's observed residues (AF2 realigns with kalign
    when SEQRES and the atoms disagree); None when that is impossible."""
    letters = hit.hit_residues or {}
    if all(t < len(chain.sequence) and chain.sequence[t] == aa for t, aa in letters.items()):
        return hit
    if kalign is None or not letters:
        return None
    first = min(letters)
    segment = "".join(letters.get(i, "X") for i in range(first, max(letters) + 1))
    aligned_seg, aligned_chain = kalign.align([segment, chain.sequence])
    seg_to_chain, i, j = {}, 0, 0
    for a, b in zip(aligned_seg, aligned_chain):
        if a != "-" and b != "-":
            seg_to_chain[i] = j
        i += a != "-"
        j += b != "-"
    mapping = {q: seg_to_chain[t - first] for q, t in hit.query_to_hit.items() if t - first in seg_to_chain}
    return Hit(name=hit.name, query_to_hit=mapping, sum_probs=hit.sum_probs)


def hit_features(query: str, hit: Hit, chain: Chain) -> FeatureDict | None:
    """AF2's per-template arrays, or None when the hit fails the coverage/duplicate filters."""
    num_res = len(query)
    aligned = len(hit.query_to_hit)
    if aligned < 10 or aligned / num_res < 0.1:
        return None
    if any(h >= len(chain.sequence) for h in hit.query_to_hit.values()):
        return None
    template_seq = ["-"] * num_res
    positions = np.zeros((num_res, rc.atom_type_num, 3), np.float32)
    mask = np.zeros((num_res, rc.atom_type_num), np.float32)
    for q, h in hit.query_to_hit.items():
        template_seq[q] = chain.sequence[h]
        positions[q] = chain.positions[h]
        mask[q] = chain.mask[h]
    seq = "".join(template_seq)
    if aligned / num_res > 0.95 and seq == query:
        return None
    return {
        "template_aatype": rc.sequence_to_onehot(seq, rc.HHBLITS_AA_TO_ID).astype(np.float32),
        "template_all_atom_masks": mask,
        "template_all_atom_positions": positions,
        "template_domain_names": chain.name.encode(),
        "template_sequence": seq.encode(),
        "template_sum_probs": np.array([hit.sum_probs], np.float32),
    }


def search_templates(
    query: str, msa: Msa, *, folder: Path, searcher: Hmmsearch | HHSearch, max_hits: int = 4,
    hits_out: Path | None = None, kalign: Kalign | None = None, index=None, hit_filter=None,
) -> FeatureDict:
    """Template features for `query` from the mmCIF chains in `folder` (empty if no hit passes).

    With an HHSearch searcher the hits come from its PDB70-style database and are matched to the
    folder's chains by name (`<pdb id>_<chain>`), realigned with `kalign` where they disagree.
    Sequences come from the folder's index (`template_index.load_index`, built once); only the
    files of hits are parsed, and `hit_filter` drops hits after the release-date cut-off.
    """
    from ferryman.apps.fastfold.data.template_index import HitFilter, load_index

    index = index or load_index(folder)
    hit_filter = hit_filter or HitFilter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        if isinstance(searcher, HHSearch):
            a3m = tmp_dir / "query.a3m"
            a3m.write_text(to_a3m(msa))
            out = searcher.search(a3m, hits_out or tmp_dir / "pdb_hits.hhr")
            hits = parse_hhr(out.read_text())
        else:
            seqres = index.seqres_fasta(tmp_dir / "seqres.fasta")
            sto = tmp_dir / "query.sto"
            sto.write_text(msa_to_stockholm(msa))
            hmm = searcher.build(sto, tmp_dir / "query.hmm")
            out = searcher.search(hmm, seqres, hits_out or tmp_dir / "pdb_hits.sto")
            hits = parse_hmmsearch_sto(out.read_text(), len(query))
    chosen = []
    chains = _HitChains(index)
    for hit in hits:
        name = hit_filter.resolve(hit.name, index)
        chain = chains.get(name) if name is not None else None
        hit = realign_to_chain(hit, chain, kalign) if chain is not None else None
        feats = hit_features(query, hit, chain) if hit is not None else None
        if feats is not None:
            chosen.append(feats)
        if len(chosen) == max_hits:
            break
    if not chosen:
        return empty_template_features(len(query))
    out_feats: FeatureDict = {}
    for key in chosen[0]:
        values = [c[key] for c in chosen]
        out_feats[key] = np.array(values, dtype=object) if isinstance(values[0], bytes) else np.stack(values)
    return out_feats


class _HitChains:
    """Chains of the hit files only, each file parsed at most once."""

    def __init__(self, index) -> None:
        self.index, self.files, self.loaded = index, index.file_of(), {}

    def get(self, name: str) -> Chain | None:
        file_name = self.files.get(name.split("_")[0].lower())
        if file_name is None:
            return None
        if file_name not in self.loaded:
            self.loaded[file_name] = {c.name: c for c in read_mmcif_chains(self.index.folder / file_name)}
        return self.loaded[file_name].get(name)
