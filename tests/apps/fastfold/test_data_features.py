"""Raw AF2 features and model inputs: keys, shapes, dtypes, MSA sampling and clustering."""

from pathlib import Path

import numpy as np
import pytest

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.features import make_features
from ferryman.apps.fastfold.data.msa import read_msa
from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs

DATA = Path(__file__).parents[3] / "data" / "fastfold"


@pytest.fixture(scope="module")
def hbb_raw():
    msa = read_msa(DATA / "msas" / "HBB_HUMAN" / "uniref90_hits.sto")
    return make_features(msa.sequences[0], "HBB_HUMAN", [msa])


def test_raw_features_match_af2_layout(hbb_raw):
    n, m = 146, hbb_raw["msa"].shape[0]
    expected = {
        "aatype": ((n, 21), np.int32),
        "between_segment_residues": ((n,), np.int32),
        "domain_name": ((1,), object),
        "residue_index": ((n,), np.int32),
        "seq_length": ((n,), np.int32),
        "sequence": ((1,), object),
        "msa": ((m, n), np.int32),
        "deletion_matrix_int": ((m, n), np.int32),
        "num_alignments": ((n,), np.int32),
        "msa_species_identifiers": ((m,), object),
        "template_aatype": ((0, n, 22), np.float32),
        "template_all_atom_masks": ((0, n, 37), np.float32),
        "template_all_atom_positions": ((0, n, 37, 3), np.float32),
        "template_domain_names": ((0,), object),
        "template_sequence": ((0,), object),
        "template_sum_probs": ((0, 1), np.float32),
    }
    assert set(hbb_raw) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert hbb_raw[key].shape == shape, key
        assert hbb_raw[key].dtype == dtype, key
    assert hbb_raw["aatype"].sum(-1).tolist() == [1] * n
    assert hbb_raw["sequence"][0] == hbb_raw["sequence"][0].decode().encode() and hbb_raw["seq_length"][0] == n
    assert hbb_raw["msa_species_identifiers"][1] != b""  # UniProt mnemonics carry the species


def test_model_inputs_shapes_and_channels(hbb_raw):
    cfg = InputConfig(max_msa_clusters=16, max_extra_msa=20)
    x = make_model_inputs(hbb_raw, cfg, seed=0)
    n = 146
    assert x["target_feat"].shape == (n, 22)
    assert x["msa_feat"].shape == (16, n, 49) and x["msa_feat"].dtype == np.float32
    assert x["extra_msa"].shape == (20, n) and x["extra_msa_feat"].shape == (20, n, 25)
    assert x["msa_mask"].shape == (16, n) and x["extra_msa_mask"].shape == (20, n)
    assert x["atom14_atom_exists"].shape == (n, 14) and x["atom37_atom_exists"].shape == (n, 37)
    # target_feat: no chain break, one-hot of our aatype.
    assert np.array_equal(x["target_feat"][:, 1:].argmax(-1), x["aatype"])
    assert x["aatype"][0] == rc.restype_order["V"]
    # The query is always the first cluster centre; the true MSA keeps its letters.
    query = np.array([rc.restype_order[c] for c in hbb_raw["sequence"][0].decode()])
    assert np.array_equal(x["true_msa"][0], query)
    # msa_feat channels: one-hot (23) + has_deletion + deletion_value + profile (23) + mean deletion.
    assert np.allclose(x["msa_feat"][..., :23].sum(-1), 1.0)
    assert np.allclose(x["msa_feat"][..., 25:48].sum(-1), 1.0, atol=1e-4)
    assert np.array_equal(x["msa_feat"][..., :23].argmax(-1), x["msa"])


def test_same_seed_same_sample_other_seed_differs(hbb_raw):
    cfg = InputConfig(max_msa_clusters=8, max_extra_msa=8)
    a, b = make_model_inputs(hbb_raw, cfg, seed=3), make_model_inputs(hbb_raw, cfg, seed=3)
    c = make_model_inputs(hbb_raw, cfg, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["msa_feat"], c["msa_feat"])


def test_without_masking_or_extras_profile_is_own_one_hot(hbb_raw):
    cfg = InputConfig(max_msa_clusters=512, max_extra_msa=0, masked_msa_replace_fraction=0.0)
    x = make_model_inputs(hbb_raw, cfg, seed=0)
    assert x["msa"].shape[0] == hbb_raw["msa"].shape[0] and x["extra_msa"].shape[0] == 0
    assert np.allclose(x["msa_feat"][..., 25:48], x["msa_feat"][..., :23], atol=1e-5)
    assert x["bert_mask"].sum() == 0


def test_extra_sequences_are_summarised_into_clusters(hbb_raw):
    cfg = InputConfig(max_msa_clusters=4, max_extra_msa=1000, masked_msa_replace_fraction=0.0)
    x = make_model_inputs(hbb_raw, cfg, seed=1)
    profile = x["msa_feat"][..., 25:48]
    own = x["msa_feat"][..., :23]
    assert not np.allclose(profile, own)  # neighbours changed the profiles
    total = x["msa"].shape[0] + x["extra_msa"].shape[0]
    assert total == hbb_raw["msa"].shape[0]


def test_deletion_features_follow_af2_formula():
    from ferryman.apps.fastfold.data.msa import parse_a3m

    msa = parse_a3m(">q\nACDEFGHIKL\n>h\nACDEaaaFGHIKV\n>h2\nACDEFGHIKW\n")
    raw = make_features("ACDEFGHIKL", "t", [msa])
    x = make_model_inputs(raw, InputConfig(max_extra_msa=0, masked_msa_replace_fraction=0.0), seed=0)
    (hit,) = np.nonzero(x["deletion_matrix"][:, 4] == 3)[0]  # rows after the query are shuffled
    row = x["msa_feat"][hit, 4]  # residue F of hit h: 3 deletions before it
    assert row[23] == 1.0
    assert row[24] == pytest.approx(np.arctan(3 / 3) * 2 / np.pi)


def test_blocked_clustering_matches_af2_formula():
    """Blocked matrix products == AF2's one-hot einsum + segment sums, written out plainly here."""
    from ferryman.apps.fastfold.data.transforms import cluster_extra_msa, one_hot

    rng = np.random.default_rng(0)
    s, e, n = 4, 11, 7
    feats = {
        "msa": rng.integers(0, 23, (s, n)), "extra_msa": rng.integers(0, 23, (e, n)),
        "msa_mask": np.ones((s, n), np.float32), "extra_msa_mask": (rng.random((e, n)) > 0.2).astype(np.float32),
        "deletion_matrix": rng.integers(0, 4, (s, n)).astype(np.float32),
        "extra_deletion_matrix": rng.integers(0, 4, (e, n)).astype(np.float32),
    }  # fmt: skip
    weights = np.array([1.0] * 21 + [0.0, 0.0])
    agreement = np.einsum(
        "mrc,nrc->mn", feats["extra_msa_mask"][..., None] * one_hot(feats["extra_msa"], 23),
        feats["msa_mask"][..., None] * one_hot(feats["msa"], 23) * weights,
    )  # fmt: skip
    assign = agreement.argmax(1)
    counts = 1e-6 + feats["msa_mask"].copy()
    profile = one_hot(feats["msa"], 23).copy()
    deletions = feats["deletion_matrix"].copy()
    for i, c in enumerate(assign):
        counts[c] += feats["extra_msa_mask"][i]
        profile[c] += feats["extra_msa_mask"][i][:, None] * one_hot(feats["extra_msa"][i], 23)
        deletions[c] += feats["extra_msa_mask"][i] * feats["extra_deletion_matrix"][i]
    out = cluster_extra_msa(feats, block=3)
    assert np.allclose(out["cluster_profile"], profile / counts[..., None], atol=1e-6)
    assert np.allclose(out["cluster_deletion_mean"], deletions / counts, atol=1e-6)
