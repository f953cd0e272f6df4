"""Parsers on every character the formats allow (lower-case insertions, '*' terminators, blank
lines, Windows line endings, '#=GS'/'#=GR'/'#=GC' lines, interleaved blocks, ColabFold's tab
headers), with AlphaFold2's own parsers as the reference where it has one."""

from __future__ import annotations

import numpy as np
import pytest

from ferryman.apps.fastfold.data.fasta import read_fasta
from ferryman.apps.fastfold.data.msa import parse_a3m, parse_stockholm, read_msa
from ferryman.core.errors import UserError

A3M = (
    ">101\tquery sequence\r\n"
    "MKTAYIAKQR\r\n"
    "QISFVKSHFS\r\n"
    "\r\n"
    ">UniRef100_A0A1\t57\t0.863\t1.2E-10\t0\t19\t20\t0\t19\t20  \r\n"  # ColabFold's tab-separated hit header
    "MKTAYIAKQRqQISfvFVKSHFS\r\n"
    ">hit2 lower-case insertions at both ends and a run of them\r\n"
    "aaMKT-YIAKQRQISFVKSHFSsss\r\n"
    ">hit3\r\n"
    "--------AKqwertyQRQISFVK--\r\n"
)
STOCKHOLM = """# STOCKHOLM 1.0\r
#=GF ID query-i1\r
#=GS hit/2-15 DE [subseq from] some protein\r
#=GS other/1-9 DE another one\r
\r
query       MKTAY--IAKQRQ\r
hit/2-15    MKSAYgaIAK-RQ\r
#=GR hit/2-15 PP ***..********\r
other/1-9   ---AYa-IAKQ--\r
#=GC RF     xxxxx..xxxxxx\r
\r
query       ISFVKSHFS\r
hit/2-15    ISFIKS---\r
other/1-9   ---------\r
//\r
"""


def test_a3m_equals_alphafold2s_parser():
    parsers = pytest.importorskip("alphafold.data.parsers")
    ours, ref = parse_a3m(A3M), parsers.parse_a3m(A3M)
    assert ours.sequences == ref.sequences
    assert ours.deletions == [list(row) for row in ref.deletion_matrix]
    assert ours.descriptions[1].startswith("UniRef100_A0A1\t57") and len(ours.sequences) == 4
    assert ours.deletions[2][0] == 2 and ours.deletions[3][10] == 6  # leading and mid-row insertion runs
    assert ours.sequences[2].endswith("HFS") and ours.deletions[1][10] == 1 and ours.deletions[1][13] == 2  # trailing insertions belong to no column


def test_stockholm_equals_alphafold2s_parser():
    parsers = pytest.importorskip("alphafold.data.parsers")
    ours, ref = parse_stockholm(STOCKHOLM), parsers.parse_stockholm(STOCKHOLM)
    assert ours.sequences == [s.upper() for s in ref.sequences]
    assert ours.deletions == [list(row) for row in ref.deletion_matrix]
    assert ours.sequences[0] == "MKTAYIAKQRQISFVKSHFS"
    assert ours.deletions[1][5] == 2 and ours.deletions[2][5] == 1
    assert ours.descriptions == ["query", "hit/2-15 [subseq from] some protein", "other/1-9 another one"]


def test_insert_state_dots_and_comment_lines_carry_no_residue():
    msa = parse_a3m("#20\t1\n>q\nACDEF\n>h\nA..cC.DEF\n")  # ColabFold's '#len\tcard' first line; '.' gaps
    assert msa.sequences == ["ACDEF", "ACDEF"] and msa.deletions[1] == [0, 1, 0, 0, 0]


def test_files_with_windows_line_endings_read_the_same(tmp_path):
    for name, text in (("x.a3m", A3M), ("x.sto", STOCKHOLM)):
        crlf, lf = tmp_path / f"crlf_{name}", tmp_path / f"lf_{name}"
        crlf.write_bytes(text.encode())
        lf.write_bytes(text.replace("\r\n", "\n").encode())
        a, b = read_msa(crlf), read_msa(lf)
        assert a.sequences == b.sequences and a.deletions == b.deletions
        assert not any("\r" in d for d in a.descriptions)


def test_ragged_alignment_names_the_file(tmp_path):
    path = tmp_path / "ragged.a3m"
    path.write_text(">q\nACDEF\n>h\nACD\n")
    with pytest.raises(UserError, match=str(path)):
        read_msa(path)


def test_fasta_with_every_allowed_character(tmp_path):
    path = tmp_path / "in.fasta"
    text = (">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens\r\n"
            "MVLSPADKTN\r\n\r\nVKAAWGKVGA*\r\n\r\n"
            ">second  with  spaces\r\nACDEFGHIKLMNPQRSTVWY\r\n")  # fmt: skip
    path.write_bytes(text.encode())
    first, second = read_fasta(path)
    assert (first.record_id, first.name, first.sequence) == ("sp|P69905|HBA_HUMAN", "sp_P69905_HBA_HUMAN", "MVLSPADKTNVKAAWGKVGA")
    assert first.description.endswith("OS=Homo sapiens")
    assert second.sequence == "ACDEFGHIKLMNPQRSTVWY" and np.all([c.isupper() for c in second.sequence])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("ACDEFghik", "lower-case letter 'g' at position 6"),
        ("ACD*EF", "'*' at position 4"),  # a stop codon inside the chain is not a terminator
        ("ACD-EF", "gap '-' at position 4"),
        ("ACDXEF", "'X' at position 4 is an unknown residue"),
    ],
)
def test_fasta_letters_outside_the_alphabet_are_named(tmp_path, body, message):
    path = tmp_path / "in.fasta"
    path.write_text(f">t\n{body}\n")
    with pytest.raises(UserError, match=message):
        read_fasta(path)
