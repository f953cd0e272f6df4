"""MSA pairing and chain merging for AlphaFold-Multimer (AF2 ``msa_pairing`` and
``feature_processing.pair_and_merge``, in numpy without pandas).

Per-chain feature dicts (``multimer_pipeline.chain_features``) go in; one merged dict comes out:

1. Pairing (heteromers only): each chain's UniProt hits (``*_all_seq``) are grouped by species;
   for every species found in two or more chains, its rows are paired across chains in order of
   identity to each chain's query (the chain without that species gets a gap row). Pairings over
   more chains come first, then by the product of the row numbers (the search's e-value order).
2. Unpaired rows identical to a paired row of the same chain are removed.
3. Each chain's MSA is cropped so that paired plus unpaired rows stay within 2048.
4. Templates are padded to 4 slots per chain; copies of one sequence (same entity) are merged
   into one dense block; the unpaired MSAs of different entities go block-diagonal (gaps off the
   diagonal), under the paired rows.
5. The MSA moves to Ferryman's/AF2's residue order; masks, ``cluster_bias_mask`` (each block's
   query) and ``bert_mask`` (positions inside a chain's own block) are made.

Where AF2 sorts with an unstable sort (pandas ``sort_values``, numpy ``argsort`` quicksort),
ties are broken here by row order; AF2's order among tied rows is whatever its sort returns.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.features import FeatureDict

MSA_GAP_IDX = rc.restypes_with_x_and_gap.index("-")
MSA_PAD_VALUES = {"msa": MSA_GAP_IDX, "msa_mask": 1, "deletion_matrix": 0, "deletion_matrix_int": 0}
MSA_FEATURES = ("msa", "msa_mask", "deletion_matrix", "deletion_matrix_int")
SEQ_FEATURES = ("residue_index", "aatype", "all_atom_positions", "all_atom_mask", "seq_mask",
                "between_segment_residues", "has_alt_locations", "has_hetatoms", "asym_id", "entity_id", "sym_id",
                "entity_mask", "deletion_mean", "prediction_atom_mask", "literature_positions",
                "atom_indices_to_group_indices", "rigid_group_default_frame")  # fmt: skip
TEMPLATE_FEATURES = ("template_aatype", "template_all_atom_positions", "template_all_atom_mask")
CHAIN_FEATURES = ("num_alignments", "seq_length")
REQUIRED_FEATURES = frozenset({
    "aatype", "all_atom_mask", "all_atom_positions", "assembly_num_chains", "asym_id", "bert_mask",
    "cluster_bias_mask", "deletion_matrix", "deletion_mean", "entity_id", "entity_mask", "msa", "msa_mask",
    "num_alignments", "num_templates", "residue_index", "seq_length", "seq_mask", "sym_id", "template_aatype",
    "template_all_atom_mask", "template_all_atom_positions",
})  # fmt: skip
MAX_TEMPLATES = 4
MSA_CROP_SIZE = 2048
MAX_ROWS_PER_SPECIES = 600  # AF2 skips species with more hits in any chain (paralogues, not orthologues)


def _base(name: str) -> str:
    return name.split("_all_seq")[0]


# --- pairing ---------------------------------------------------------------------------------
def _species_rows(chain: FeatureDict) -> dict[bytes, list[int]]:
    """Species -> its rows of the chain's UniProt MSA, best identity to the query first."""
    msa = chain["msa_all_seq"]
    similarity = (msa[0][None] == msa).sum(-1) / float(msa.shape[1])
    rows: dict[bytes, list[int]] = collections.defaultdict(list)
    for row, species in enumerate(chain["msa_species_identifiers_all_seq"]):
        rows[species].append(row)
    return {s: sorted(r, key=lambda i: -similarity[i]) for s, r in rows.items()}


def pair_sequences(chains: Sequence[FeatureDict]) -> dict[int, np.ndarray]:
    """Number of chains paired -> ``[P, num_chains]`` row indices (-1: the chain's gap row)."""
    species_rows = [_species_rows(chain) for chain in chains]
    common = sorted(set().union(*species_rows) - {b""})
    paired: dict[int, list] = {k: [] for k in range(len(chains))}
    paired[len(chains)] = [np.zeros(len(chains), int)]  # the queries
    for species in common:
        present = [rows.get(species) for rows in species_rows]
        counts = [len(r) for r in present if r is not None]
        if len(counts) <= 1 or max(counts) > MAX_ROWS_PER_SPECIES:
            continue
        take = min(counts)
        columns = [r[:take] if r is not None else [-1] * take for r in present]
        paired[len(counts)].extend(np.array(columns).T)
    return {k: np.array(v) for k, v in paired.items()}


def reorder_paired_rows(paired: dict[int, np.ndarray]) -> np.ndarray:
    """Pairings over more chains first; within them by |product of row indices|."""
    out = []
    for num in sorted(paired, reverse=True):
        rows = paired[num]
        order = np.argsort(np.abs(np.array([np.prod(r) for r in rows])), kind="stable")
        out.extend(rows[order])
    return np.array(out)


def _pad_row(feature: np.ndarray, name: str) -> np.ndarray:
    """The gap row at the end of a chain's UniProt features that -1 selects."""
    if name == "msa_species_identifiers_all_seq":
        return np.concatenate([feature, np.array([b""], dtype=object)])
    if _base(name) in MSA_PAD_VALUES:
        row = MSA_PAD_VALUES[_base(name)] * np.ones((1, feature.shape[1]), feature.dtype)
        return np.concatenate([feature, row], axis=0)
    return feature


def create_paired_features(chains: list[FeatureDict]) -> list[FeatureDict]:
    if len(chains) < 2:
        return chains
    rows = reorder_paired_rows(pair_sequences(chains))
    out = []
    for index, chain in enumerate(chains):
        new = {k: v for k, v in chain.items() if "_all_seq" not in k}
        for name in chain:
            if name.endswith("_all_seq"):
                new[name] = _pad_row(chain[name], name)[rows[:, index]]
        new["num_alignments_all_seq"] = np.asarray(len(rows[:, index]))
        out.append(new)
    return out


def deduplicate_unpaired_sequences(chains: list[FeatureDict]) -> list[FeatureDict]:
    for chain in chains:
        paired = {tuple(row) for row in chain["msa_all_seq"]}
        keep = [i for i, row in enumerate(chain["msa"]) if tuple(row) not in paired]
        for name in MSA_FEATURES:
            if name in chain:
                chain[name] = chain[name][keep]
        chain["num_alignments"] = np.array(chain["msa"].shape[0], dtype=np.int32)
    return chains


# --- cropping --------------------------------------------------------------------------------
def crop_chain(chain: FeatureDict, pair: bool, msa_crop_size: int = MSA_CROP_SIZE,
               max_templates: int = MAX_TEMPLATES) -> FeatureDict:  # fmt: skip
    """Crop one chain's MSA so that its paired and unpaired rows fit ``msa_crop_size``."""
    crop = min(int(chain["num_alignments"]), msa_crop_size)
    if pair:
        crop_paired = min(int(chain["num_alignments_all_seq"]), msa_crop_size // 2)
        non_gapped = int(np.any(chain["msa_all_seq"][:crop_paired] != MSA_GAP_IDX, axis=1).sum())
        crop = min(int(chain["num_alignments"]), max(msa_crop_size - min(non_gapped, crop_paired), 0))
    num_templates = min(chain["template_aatype"].shape[0], max_templates)
    for name in chain:
        if _base(name) in TEMPLATE_FEATURES:
            chain[name] = chain[name][:num_templates]
        elif _base(name) in MSA_FEATURES:
            chain[name] = chain[name][: crop_paired if pair and "_all_seq" in name else crop]
    chain["num_alignments"] = np.asarray(crop, dtype=np.int32)
    chain["num_templates"] = np.asarray(num_templates, dtype=np.int32)
    if pair:
        chain["num_alignments_all_seq"] = np.asarray(crop_paired, dtype=np.int32)
    return chain


# --- merging ---------------------------------------------------------------------------------
def block_diag(*arrays: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
    """Block-diagonal of 2-D arrays with ``pad_value`` off the diagonal blocks."""
    rows, cols = sum(a.shape[0] for a in arrays), sum(a.shape[1] for a in arrays)
    out = np.full((rows, cols), pad_value, dtype=np.result_type(*arrays))
    r = c = 0
    for a in arrays:
        out[r : r + a.shape[0], c : c + a.shape[1]] = a
        r, c = r + a.shape[0], c + a.shape[1]
    return out


def _merge(chains: Sequence[FeatureDict], dense_msa: bool) -> FeatureDict:
    """Features of several chains as one: residues concatenated; MSAs side by side (``dense_msa``
    or paired rows) or block-diagonal; counts summed; anything else from the first chain."""
    merged = {}
    for name in chains[0]:
        feats = [c[name] for c in chains]
        base = _base(name)
        if base in MSA_FEATURES and (dense_msa or "_all_seq" in name):
            merged[name] = np.concatenate(feats, axis=1)
        elif base in MSA_FEATURES:
            merged[name] = block_diag(*feats, pad_value=MSA_PAD_VALUES[base])
        elif base in SEQ_FEATURES:
            merged[name] = np.concatenate(feats, axis=0)
        elif base in TEMPLATE_FEATURES:
            merged[name] = np.concatenate(feats, axis=1)
        elif base in CHAIN_FEATURES:
            merged[name] = np.sum(feats).astype(np.int32)
        else:
            merged[name] = feats[0]
    return merged


def _pad_templates(chains: list[FeatureDict], max_templates: int) -> list[FeatureDict]:
    for chain in chains:
        for name in TEMPLATE_FEATURES:
            value = chain[name]
            chain[name] = np.pad(value, [(0, max_templates - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
    return chains


def _post_merge(example: FeatureDict, chains: list[FeatureDict], pair: bool) -> FeatureDict:
    """Counts, the rows sampling must keep (``cluster_bias_mask``) and where BERT may mask."""
    example["seq_length"] = np.asarray(example["aatype"].shape[0], dtype=np.int32)
    example["num_alignments"] = np.asarray(example["msa"].shape[0], dtype=np.int32)
    unpaired = block_diag(*[np.ones(c["msa"].shape, np.float32) for c in chains])
    if pair:
        example["cluster_bias_mask"] = np.zeros(example["msa"].shape[0])
        example["cluster_bias_mask"][0] = 1
        paired = np.concatenate([np.ones(c["msa_all_seq"].shape, np.float32) for c in chains], axis=1)
        example["bert_mask"] = np.concatenate([paired, unpaired], axis=0)
    else:
        firsts = [np.eye(1, c["msa"].shape[0])[0] for c in chains]  # each block's query row
        example["cluster_bias_mask"] = np.concatenate(firsts)
        example["bert_mask"] = unpaired
    return example


def merge_chain_features(chains: list[FeatureDict], pair: bool, max_templates: int = MAX_TEMPLATES) -> FeatureDict:
    chains = _pad_templates(chains, max_templates)
    by_entity = collections.defaultdict(list)
    for chain in chains:
        by_entity[chain["entity_id"][0]].append(chain)
    chains = [_merge(by_entity[e], dense_msa=True) for e in sorted(by_entity)]
    example = _merge(chains, dense_msa=False)
    if pair:
        for name in MSA_FEATURES:
            if name in example:
                example[name] = np.concatenate([example[name + "_all_seq"], example[name]], axis=0)
        example["num_alignments"] = np.array(example["msa"].shape[0], dtype=np.int32)
    return _post_merge(example, chains, pair)


# --- the whole step --------------------------------------------------------------------------
def process_unmerged(chains: list[FeatureDict]) -> None:
    """Per-chain float deletions, their mean, dummy atoms and the chain count (in place)."""
    for chain in chains:
        chain["deletion_matrix"] = np.asarray(chain.pop("deletion_matrix_int"), dtype=np.float32)
        if "deletion_matrix_int_all_seq" in chain:
            chain["deletion_matrix_all_seq"] = np.asarray(chain.pop("deletion_matrix_int_all_seq"), dtype=np.float32)
        chain["deletion_mean"] = np.mean(chain["deletion_matrix"], axis=0)
        chain["all_atom_mask"] = rc.STANDARD_ATOM_MASK[chain["aatype"]]
        chain["all_atom_positions"] = np.zeros((*chain["all_atom_mask"].shape, 3))
        chain["assembly_num_chains"] = np.asarray(len(chains))
        chain["entity_mask"] = (chain["entity_id"] != 0).astype(np.int32)


def process_final(example: FeatureDict) -> FeatureDict:
    """MSA to Ferryman's residue order, masks from entity ids, only the features the model reads."""
    example["msa"] = np.take(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, example["msa"], axis=0).astype(np.int32)
    example["seq_mask"] = (example["entity_id"] > 0).astype(np.float32)
    example["msa_mask"] = np.ones_like(example["msa"], dtype=np.float32) * example["seq_mask"][None]
    return {k: v for k, v in example.items() if k in REQUIRED_FEATURES}


def is_homomer_or_monomer(chains: Sequence[FeatureDict]) -> bool:
    return len({float(e) for c in chains for e in np.unique(c["entity_id"][c["entity_id"] > 0])}) == 1


def pair_and_merge(chains: list[FeatureDict]) -> FeatureDict:
    """Per-chain features (``add_assembly_features`` done) -> one complex's merged features."""
    process_unmerged(chains)
    pair = not is_homomer_or_monomer(chains)
    if pair:
        chains = deduplicate_unpaired_sequences(create_paired_features(chains))
    chains = [crop_chain(chain, pair) for chain in chains]
    return process_final(merge_chain_features(chains, pair))


def pad_msa(example: FeatureDict, min_num_seq: int = 512) -> FeatureDict:
    """Zero rows (masked) up to ``min_num_seq``, so sampling leaves extra rows (AF2 pads to 512)."""
    example = dict(example)
    missing = min_num_seq - example["msa"].shape[0]
    if missing > 0:
        for name in ("msa", "deletion_matrix", "bert_mask", "msa_mask"):
            example[name] = np.pad(example[name], ((0, missing), (0, 0)))
        example["cluster_bias_mask"] = np.pad(example["cluster_bias_mask"], ((0, missing),))
    return example
