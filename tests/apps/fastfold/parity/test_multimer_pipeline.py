"""The multimer feature pipeline against AlphaFold2's own (``pipeline_multimer``, ``msa_pairing``,
``feature_processing``) on the same per-chain features: chain conversion, assembly ids, species
pairing, deduplication, cropping, homomer merging, block-diagonal MSAs, template padding, masks
and the 512-row padding; and the MSA sampling steps AF2-Multimer runs inside its model.

AF2 orders tied rows with unstable sorts (pandas and numpy quicksort: on AVX-512 machines even a
dozen elements come back out of order), so the pairing MSAs here are built without ties: each
row of a chain has its own identity to the query, and paired rows have distinct index products;
``test_inputs_have_no_ties`` checks that.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("alphafold.data.msa_pairing", reason="needs the parity extra (AlphaFold2's own code)")

import jax.numpy as jnp
import numpy as np
from alphafold.data import feature_processing, pipeline_multimer
from alphafold.model import modules_multimer

from ferryman.apps.fastfold.data import multimer_transforms as mt
from ferryman.apps.fastfold.data.features import make_features
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.data.multimer_pipeline import (
    add_assembly_features,
    all_seq_features,
    convert_chain_features,
)
from ferryman.apps.fastfold.data.pairing import pad_msa, pair_and_merge, pair_sequences
from tests.apps.fastfold._structures import VILLIN_SEQUENCE

from ._inputs import synthetic_msa, villin_template

pytestmark = pytest.mark.parity

SEQUENCES = {"A": VILLIN_SEQUENCE[:18], "B": VILLIN_SEQUENCE[18:]}
# Species of rows 1.. of each chain's UniProt hits: some in both chains, some in one, several
# rows of one species in a chain (the most similar pairs), more rows of a species in one chain.
PAIRING_SPECIES = {
    "A": ["HUMAN", "MOUSE", "YEAST", "HUMAN", "ECOLI", "BOVIN", "CHICK", "MOUSE", "PIG"],
    "B": ["DANRE", "HUMAN", "CHICK", "YEAST", "HUMAN", "PIG", "YEAST", "MOUSE"],
}
COMPLEXES = {"heterodimer": "AB", "heterotrimer_with_copies": "ABA", "homodimer": "AA", "monomer": "B"}


def _pairing_msa(chain: str) -> Msa:
    """Row r has its first r residues mutated: every row a different identity to the query."""
    query = SEQUENCES[chain]
    rows, names = [query], ["query"]
    for r, species in enumerate(PAIRING_SPECIES[chain], start=1):
        rows.append("".join("W" if i < r and c != "W" else ("Y" if i < r else c) for i, c in enumerate(query)))
        names.append(f"tr|{chain}{r:05d}|{chain}{r:05d}_{species}")
    return Msa(sequences=rows, deletions=[[r % 3] * len(query) for r in range(len(rows))], descriptions=names)


def _monomer_features(chain: str) -> dict:
    """Monomer features of a chain: an unpaired MSA (holding one of the pairing rows, which the
    deduplication must drop), templates of chain A from villin's structure, the UniProt hits."""
    unpaired = synthetic_msa(SEQUENCES[chain], 9, seed=ord(chain))
    pairing = _pairing_msa(chain)
    unpaired.sequences.append(pairing.sequences[1])
    unpaired.deletions.append(pairing.deletions[1])
    unpaired.descriptions.append(pairing.descriptions[1])
    cut = slice(0, 18) if chain == "A" else slice(18, None)
    templates = None
    if chain == "A":
        parts = [villin_template(), villin_template(slice(3, 6))]
        templates = {k: np.concatenate([p[k][:, cut] if p[k].ndim >= 3 else p[k] for p in parts]) for k in parts[0]}
    feats = make_features(SEQUENCES[chain], f"chain_{chain}", [unpaired], templates)
    feats.update(all_seq_features(pairing))
    return feats


def _chains(letters: str) -> tuple[dict, dict]:
    """(AF2's per-chain dicts, Ferryman's), converted and with assembly ids, keyed as AF2 keys them."""
    monomer = {c: _monomer_features(c) for c in set(letters)}
    ids = "ABCDEFGH"
    theirs = {ids[i]: pipeline_multimer.convert_monomer_features(copy.deepcopy(monomer[c]), ids[i])
              for i, c in enumerate(letters)}  # fmt: skip
    ours = {ids[i]: convert_chain_features(copy.deepcopy(monomer[c]), ids[i]) for i, c in enumerate(letters)}
    return pipeline_multimer.add_assembly_features(theirs), add_assembly_features(ours)


def _assert_same(ours: dict, theirs: dict, what: str) -> None:
    assert sorted(ours) == sorted(theirs), what
    for key in theirs:
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        assert a.shape == b.shape, f"{what}: {key} shape {a.shape} != AF2's {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: {key}")


def test_inputs_have_no_ties():
    for letters in ("AB", "AAB"):
        chains = [{"msa_all_seq": all_seq_features(_pairing_msa(c))["msa_all_seq"],
                   "msa_species_identifiers_all_seq": all_seq_features(_pairing_msa(c))["msa_species_identifiers_all_seq"]}
                  for c in letters]  # fmt: skip
        for rows in pair_sequences(chains).values():
            products = [abs(int(np.prod(r))) for r in rows]
            assert len(set(products)) == len(products), (letters, rows)


@pytest.mark.parametrize("name", COMPLEXES)
def test_chain_conversion_and_assembly_ids(name):
    theirs, ours = _chains(COMPLEXES[name])
    assert list(ours) == list(theirs)  # AF2's keys and order: entity by entity, copies together
    for key in theirs:
        _assert_same(ours[key], theirs[key], f"{name} chain {key}")


@pytest.mark.parametrize("name", COMPLEXES)
def test_pairing_and_merged_features(name):
    theirs, ours = _chains(COMPLEXES[name])
    ref = pipeline_multimer.pad_msa(feature_processing.pair_and_merge(theirs), 512)
    merged = pad_msa(pair_and_merge(list(ours.values())), 512)
    _assert_same(merged, ref, name)
    if name == "heterodimer":  # the queries, then six pairs of the five species found in both chains
        spans = [(merged["msa"][:, merged["asym_id"] == a] != 21).any(-1) for a in (1, 2)]
        assert (spans[0] & spans[1]).tolist()[:8] == [True] * 7 + [False]
        assert merged["cluster_bias_mask"][:2].tolist() == [1, 0]


@pytest.fixture(scope="module")
def sampled():
    _, ours = _chains("AB")
    merged = pad_msa(pair_and_merge(list(ours.values())), 40)
    return merged, mt.make_multimer_inputs(merged, mt.MultimerInputConfig(max_msa_clusters=9, max_extra_msa=64), 0)


def test_msa_profile_clusters_and_msa_feat(sampled):
    """The deterministic steps of AF2-Multimer's in-model sampling on the same sampled rows."""
    merged, feats = sampled
    batch = {k: jnp.asarray(merged[k]) for k in ("msa", "msa_mask")}
    np.testing.assert_allclose(mt.msa_profile({k: merged[k] for k in batch}),
                               modules_multimer.make_msa_profile(batch), atol=1e-6)  # fmt: skip
    keys = ("msa", "msa_mask", "deletion_matrix", "extra_msa", "extra_msa_mask", "extra_deletion_matrix")
    batch = {k: jnp.asarray(feats[k]) for k in keys}
    profile, deletion_mean = modules_multimer.nearest_neighbor_clusters(batch)
    np.testing.assert_allclose(feats["cluster_profile"], profile, atol=1e-5)
    np.testing.assert_allclose(feats["cluster_deletion_mean"], deletion_mean, atol=1e-5)
    batch.update(cluster_profile=profile, cluster_deletion_mean=deletion_mean)
    np.testing.assert_allclose(feats["msa_feat"], modules_multimer.create_msa_feat(batch), atol=1e-5)
    extra_feat, extra_mask = modules_multimer.create_extra_msa_feature(batch, 64)
    ours = np.concatenate([np.eye(23)[feats["extra_msa"]], feats["extra_has_deletion"][..., None],
                           feats["extra_deletion_value"][..., None]], axis=-1)  # fmt: skip
    np.testing.assert_allclose(ours, extra_feat, atol=1e-6)
    np.testing.assert_array_equal(feats["extra_msa_mask"], extra_mask)
