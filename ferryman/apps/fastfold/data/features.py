"""Raw monomer features with AlphaFold2's keys, shapes and dtypes (its `data_pipeline` output).

N = residues, M = alignment rows, T = templates.

| key | shape | dtype |
|---|---|---|
| aatype | [N, 21] one-hot | int32 |
| between_segment_residues, residue_index, seq_length | [N] | int32 |
| domain_name, sequence | [1] | object (bytes) |
| msa, deletion_matrix_int | [M, N] (HHblits alphabet) | int32 |
| num_alignments | [N] | int32 |
| msa_species_identifiers | [M] | object (bytes) |
| template_aatype | [T, N, 22] one-hot (HHblits alphabet) | float32 |
| template_all_atom_masks | [T, N, 37] | float32 |
| template_all_atom_positions | [T, N, 37, 3] | float32 |
| template_domain_names, template_sequence | [T] | object |
| template_sum_probs | [T, 1] | float32 |

`transforms.make_model_inputs` turns this into what the network reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.msa import Msa, merge_and_deduplicate

FeatureDict = dict[str, np.ndarray]


def make_sequence_features(sequence: str, description: str) -> FeatureDict:
    num_res = len(sequence)
    return {
        "aatype": rc.sequence_to_onehot(sequence, rc.restype_order_with_x, map_unknown_to_x=True),
        "between_segment_residues": np.zeros((num_res,), dtype=np.int32),
        "domain_name": np.array([description.encode("utf-8")], dtype=object),
        "residue_index": np.arange(num_res, dtype=np.int32),
        "seq_length": np.full((num_res,), num_res, dtype=np.int32),
        "sequence": np.array([sequence.encode("utf-8")], dtype=object),
    }


def make_msa_features(msas: Sequence[Msa]) -> FeatureDict:
    """Concatenate and deduplicate alignments; residues in the HHblits alphabet like AF2."""
    merged = merge_and_deduplicate(msas)
    num_res = len(merged.sequences[0])
    lookup = rc.HHBLITS_AA_TO_ID
    unknown = lookup["X"]
    msa = np.array([[lookup.get(c, unknown) for c in seq] for seq in merged.sequences], dtype=np.int32)
    return {
        "msa": msa.reshape(len(merged), num_res),
        "deletion_matrix_int": np.array(merged.deletions, dtype=np.int32).reshape(len(merged), num_res),
        "num_alignments": np.full((num_res,), len(merged), dtype=np.int32),
        "msa_species_identifiers": np.array([s.encode("utf-8") for s in merged.species()], dtype=object),
    }


def empty_template_features(num_res: int) -> FeatureDict:
    """No templates: the template arrays with T = 0, as AF2 returns when nothing is found."""
    return {
        "template_aatype": np.zeros((0, num_res, 22), dtype=np.float32),
        "template_all_atom_masks": np.zeros((0, num_res, rc.atom_type_num), dtype=np.float32),
        "template_all_atom_positions": np.zeros((0, num_res, rc.atom_type_num, 3), dtype=np.float32),
        "template_domain_names": np.array([], dtype=object),
        "template_sequence": np.array([], dtype=object),
        "template_sum_probs": np.zeros((0, 1), dtype=np.float32),
    }


def make_features(sequence: str, description: str, msas: Sequence[Msa], templates: FeatureDict | None = None) -> FeatureDict:
    """The full raw feature dict for one chain; `msas` must each start with `sequence`."""
    if not msas:
        from ferryman.apps.fastfold.data.msa import single_sequence_msa

        msas = [single_sequence_msa(sequence)]
    features = make_sequence_features(sequence, description)
    features.update(make_msa_features(msas))
    features.update(templates if templates is not None else empty_template_features(len(sequence)))
    return features


def make_atom14_masks(aatype: np.ndarray) -> FeatureDict:
    """atom14/atom37 existence masks and index maps for an [N] aatype (AF2 `make_atom14_masks`)."""
    aatype = np.minimum(aatype, rc.unk_restype_index)
    return {
        "atom14_atom_exists": np.asarray(rc.restype_atom14_mask, np.float32)[aatype],
        "residx_atom14_to_atom37": np.asarray(rc.restype_atom14_to_atom37, np.int64)[aatype],
        "residx_atom37_to_atom14": np.asarray(rc.restype_atom37_to_atom14, np.int64)[aatype],
        "atom37_atom_exists": np.asarray(rc.restype_atom37_mask, np.float32)[aatype],
    }
