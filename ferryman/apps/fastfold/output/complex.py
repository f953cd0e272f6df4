"""A multimer prediction as AlphaFold2 writes it: chains in PDB/mmCIF, ranked by 0.8 ipTM + 0.2 pTM.

The model sees chains in AF2's order (entity by entity, ``asym_id``); the files list them as the
FASTA does (chain A = the first record or the first ``:``-separated sequence, B the second, ...),
residues numbered from 1 in each chain, and PAE rows and columns in that same order. AF2 itself
names chains by ``asym_id``, so for a FASTA like X, Y, X it writes the second X as chain B; here
it stays chain C, as ``msas/chain_id_map.json`` says.
"""

from __future__ import annotations

import numpy as np

from ferryman.apps.fastfold.data.fasta import ComplexTarget
from ferryman.apps.fastfold.output import protein
from ferryman.apps.fastfold.output.writer import ModelResult

RANKING_KEY = "iptm+ptm"  # AF2 v2.3's ranking_debug.json key for multimer models


def fasta_order(feats: dict, target: ComplexTarget) -> tuple[np.ndarray, np.ndarray]:
    """(residue permutation from the model's order to the FASTA's, chain index per output residue)."""
    asym_of = {cid.decode() if isinstance(cid, bytes) else str(cid): a + 1 for a, cid in enumerate(feats["asym_chain_ids"])}
    asym_id = np.asarray(feats["asym_id"]).astype(np.int64)
    blocks = [np.flatnonzero(asym_id == asym_of[chain.chain_id]) for chain in target.chains]
    chain_index = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(blocks)])
    return np.concatenate(blocks), chain_index


def complex_result(name: str, feats: dict, out: dict, target: ComplexTarget, remarks: list[str]) -> ModelResult:
    """One multimer model's outputs, reordered to the FASTA's chains, ready to write."""
    order, chain_index = fasta_order(feats, target)
    plddt = np.asarray(out["plddt"], np.float32)[order]
    ids = ", ".join(f"{c.chain_id}={c.description or c.chain_id}"[:40] for c in target.chains)
    prot = protein.from_prediction(
        aatype=np.asarray(feats["aatype"])[order], residue_index=np.asarray(feats["residue_index"])[order],
        atom_positions=out["final_atom_positions"][order], atom_mask=out["final_atom_mask"][order], plddt=plddt,
        chain_index=chain_index, remarks=[*remarks, f"model {name}", f"chains {ids}"],
    )  # fmt: skip
    pae = out.get("predicted_aligned_error")
    return ModelResult(
        name=name, unrelaxed=prot, plddt=plddt, pae=None if pae is None else pae[np.ix_(order, order)],
        max_pae=out.get("max_predicted_aligned_error"), ptm=out.get("ptm"), iptm=out.get("iptm"),
        ranking_confidence=out.get("ranking_confidence"),
    )  # fmt: skip
