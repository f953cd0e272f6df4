"""Alignment parsers, deletion matrices, deduplication, and real jackhmmer on the shipped database."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from ferryman.apps.fastfold.data import tools
from ferryman.apps.fastfold.data.fasta import read_fasta
from ferryman.apps.fastfold.data.features import make_msa_features
from ferryman.apps.fastfold.data.msa import (
    merge_and_deduplicate,
    parse_a3m,
    parse_stockholm,
    read_msa,
    single_sequence_msa,
)
from ferryman.core.errors import UserError

DATA = Path(__file__).parents[3] / "data" / "fastfold"
HMMER_TUTORIAL = Path("/usr/share/doc/hmmer/examples/tutorial")


def test_a3m_insertions_become_deletion_counts():
    msa = parse_a3m(">query\nACDEF\n>hit1 desc\nAabCD-F\n>hit2\n-CxyzDEF\n")
    assert msa.sequences == ["ACDEF", "ACD-F", "-CDEF"]
    assert msa.deletions == [[0, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 3, 0, 0]]
    assert msa.descriptions == ["query", "hit1 desc", "hit2"]


def test_stockholm_keeps_query_columns_and_counts_deletions():
    text = """# STOCKHOLM 1.0
#=GS hit/3-7 DE some protein
query  AC-DE
hit/3-7 AGKD-
query  F.
hit/3-7 FW
//
"""
    msa = parse_stockholm(text)
    # Column 3 (query gap) holds K for the hit: one deletion before query residue D.
    assert msa.sequences == ["ACDEF", "AGD-F"]
    assert msa.deletions == [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
    assert msa.descriptions[1] == "hit/3-7 some protein"


def test_deduplication_keeps_first_copy_across_alignments():
    a = parse_a3m(">q\nACDE\n>x\nAC-E\n")
    b = parse_a3m(">q\nACDE\n>y\nACkkk-E\n>z\nGCDE\n")
    merged = merge_and_deduplicate([a, b])
    assert merged.sequences == ["ACDE", "AC-E", "GCDE"]
    feats = make_msa_features([a, b])
    assert feats["msa"].shape == (3, 4) and feats["msa"].dtype == np.int32
    assert feats["deletion_matrix_int"].dtype == np.int32
    assert feats["num_alignments"].tolist() == [3] * 4
    # HHblits alphabet: A=0, C=1, D=2, E=3, G=5, gap=21.
    assert feats["msa"][1].tolist() == [0, 1, 21, 3]


def test_read_msa_rejects_ragged_and_unknown_files(tmp_path):
    bad = tmp_path / "x.a3m"
    bad.write_text(">q\nACDE\n>h\nACD\n")
    with pytest.raises(UserError, match="differ in length"):
        read_msa(bad)
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="unknown alignment format"):
        read_msa(other)


def test_shipped_stockholm_files_parse():
    msa = read_msa(DATA / "msas" / "HBB_HUMAN" / "uniref90_hits.sto")
    query = read_fasta(DATA / "hbb_human.fasta")[0].sequence
    assert msa.sequences[0] == query and len(msa) > 10
    pfam = read_msa(HMMER_TUTORIAL / "globins4.sto") if HMMER_TUTORIAL.exists() else None
    if pfam is not None:
        assert len(pfam) == 4 and len({len(s) for s in pfam.sequences}) == 1


def test_missing_binary_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError) as info:
        tools.find_binary("jackhmmer")
    assert "jackhmmer not found on PATH" in str(info.value)
    assert "apt-get install hmmer hhsuite kalign" in str(info.value)
    with pytest.raises(UserError, match="is not an executable file"):
        tools.find_binary("hhblits", "/nonexistent/hhblits")


@pytest.mark.skipif(shutil.which("jackhmmer") is None, reason="needs HMMER's jackhmmer")
def test_real_jackhmmer_on_shipped_globin_database(tmp_path):
    query = read_fasta(DATA / "hbb_human.fasta")[0].sequence
    runner = tools.Jackhmmer(binary=tools.find_binary("jackhmmer"), database=DATA / "seqdb" / "globins45.fa")
    out = runner.search(query, tmp_path / "uniref90_hits.sto")
    msa = read_msa(out)
    assert msa.sequences[0] == query  # query first
    assert len(msa) > 1
    # Real homologues: beta globins of other species align over most of the chain.
    names = " ".join(msa.descriptions)
    assert "HBB_" in names
    identity = [np.mean([a == b for a, b in zip(query, s)]) for s in msa.sequences[1:]]
    assert max(identity) > 0.7
    feats = make_msa_features([msa, single_sequence_msa(query)])
    assert feats["msa"].shape[0] == len(msa)  # the single-sequence copy deduplicates away


def test_stockholm_read_stops_collecting_after_max_seqs():
    full = read_msa(DATA / "msas" / "HBB_HUMAN" / "uniref90_hits.sto")
    first = read_msa(DATA / "msas" / "HBB_HUMAN" / "uniref90_hits.sto", max_seqs=5)
    assert len(first) == 5 and first.sequences == full.sequences[:5]
    assert first.deletions == full.deletions[:5]
