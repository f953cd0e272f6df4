"""Alignment inputs in every form A3M and Stockholm allow, with values worked out by hand: insert
columns of the query, '.' gaps in match columns, '#=GS' lines that are not descriptions,
multi-block files read with a row limit, empty alignments; and every one-line error by its text."""

from __future__ import annotations

import pytest

from ferryman.apps.fastfold.data.msa import (
    Msa,
    check_query,
    merge_and_deduplicate,
    parse_a3m,
    parse_stockholm,
    read_msa,
    single_sequence_msa,
    to_a3m,
)
from ferryman.core.errors import UserError

# Three blocks, blank lines and '#=GC'/'#=GR' lines between them; the query has an insert column
# ('.') in block 1 and a '-' in block 3. Worked out by hand: query columns are 1-3, 5-7, 8 and 10.
MULTIBLOCK = """# STOCKHOLM 1.0
#=GS q DE the query
#=GS h1 DE first hit
#=GS h1 AC P12345
#=GS h2 DE
#=GS h3/1-9 DE third hit

q      ACD.E
h1     AXDkE
h2     A.-xe
h3/1-9 -CDX-
#=GC RF xxx.x

q      FGH
h1     FG.
h2     fGH
h3/1-9 FGH
#=GR h1 PP 999

q      I-K
h1     IXK
h2     I-K
h3/1-9 IxK
//
"""


def test_a_multiblock_stockholm_by_hand():
    msa = parse_stockholm(MULTIBLOCK)
    assert msa.sequences == ["ACDEFGHIK", "AXDEFG-IK", "A--EFGHIK", "-CD-FGHIK"]
    # h1: 'k' in the query's insert column (block 1) and 'X' in its '-' column (block 3) are deletions.
    assert msa.deletions == [[0] * 9,
                             [0, 0, 0, 1, 0, 0, 0, 0, 1],
                             [0, 0, 0, 1, 0, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0, 0, 1]]  # fmt: skip
    # '#=GS ... AC' is not a description, and a '#=GS ... DE' without text gives none.
    assert msa.descriptions == ["q the query", "h1 first hit", "h2", "h3/1-9 third hit"]


def test_a_row_limit_keeps_every_block_of_the_rows_it_keeps():
    msa = parse_stockholm(MULTIBLOCK, max_seqs=2)
    assert msa.sequences == ["ACDEFGHIK", "AXDEFG-IK"]
    assert msa.deletions == [[0] * 9, [0, 0, 0, 1, 0, 0, 0, 0, 1]]
    lines = iter(MULTIBLOCK.splitlines(keepends=True))  # an open file streams lines, ends included
    assert parse_stockholm(lines, max_seqs=3).sequences == ["ACDEFGHIK", "AXDEFG-IK", "A--EFGHIK"]


def test_an_x_in_the_query_is_a_residue_and_in_an_insert_column_a_deletion():
    msa = parse_stockholm("q AXC-D\nh AXCXD\n")
    assert msa.sequences == ["AXCD", "AXCD"] and msa.deletions == [[0, 0, 0, 0], [0, 0, 0, 1]]


def test_empty_alignments():
    empty = parse_stockholm("# STOCKHOLM 1.0\n#=GF ID x\n//\n")
    assert len(empty) == 0 and empty.sequences == [] and empty.deletions == [] and empty.descriptions == []


def test_read_msa_knows_every_suffix(tmp_path):
    a3m = ">q\nACD\n>h\nAkCD\n"
    for suffix in (".a3m", ".fasta", ".fa", ".afa"):
        path = tmp_path / f"x{suffix}"
        path.write_text(a3m)
        msa = read_msa(path)
        assert msa.sequences == ["ACD", "ACD"] and msa.deletions == [[0, 0, 0], [0, 1, 0]], suffix
    for suffix in (".sto", ".stockholm"):
        path = tmp_path / f"x{suffix}"
        path.write_text(MULTIBLOCK)
        assert read_msa(path).sequences[3] == "-CD-FGHIK", suffix
        assert len(read_msa(path, max_seqs=2)) == 2


def test_read_msa_limits_a3m_rows_and_replaces_undecodable_bytes(tmp_path):
    path = tmp_path / "x.a3m"
    path.write_bytes(b">q\nACD\n>h1 caf\xe9\nAC-\n>h2\n-CD\n")
    full = read_msa(path)
    assert full.descriptions == ["q", "h1 caf\ufffd", "h2"]
    first = read_msa(path, max_seqs=2)
    assert first.sequences == ["ACD", "AC-"] and first.deletions == [[0, 0, 0]] * 2
    assert first.descriptions == ["q", "h1 caf\ufffd"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("x.a3m", "ACD\n>q\nACD\n", "malformed alignment: sequence data before the first '>' header"),
        ("x.sto", "q ACDEF\nh ACDE\n", "malformed alignment: Stockholm row 'h' has 4 columns, the query 5"),
        ("x.sto", "# STOCKHOLM 1.0\n//\n", "the alignment has no sequences"),
        ("x.a3m", "# only a comment\n", "the alignment has no sequences"),
        ("x.a3m", ">q\nACDEF\n>h\nACD\n>i\nA\n", "aligned rows differ in length ([1, 3, 5]); is it a valid alignment?"),
        ("x.msa", ">q\nACD\n", "unknown alignment format; use .a3m or .sto"),
    ],
)
def test_read_msa_errors_are_one_line_and_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_msa(path)
    assert str(info.value) == f"{path}: {message}"


def test_check_query_ignores_gaps_and_names_both_sequences():
    msa = parse_a3m(">q\nAC-DE\n")
    check_query(msa, "ACDE", source="msa.a3m")  # gaps in the query row are not residues
    with pytest.raises(UserError) as info:
        check_query(msa, "ACDF", source="msa.a3m")
    assert str(info.value) == ("msa.a3m: the first sequence of the alignment is not the target sequence "
                               "(AC-DE... vs ACDF...); was it computed for another target?")
    long = "ACDEFGHIKLMNPQRSTVWYAC"
    with pytest.raises(UserError, match=r"\(ACDEFGHIKLMNPQRSTVWY\.\.\. vs ACDEFGHIKLMNPQRSTVWW\.\.\.\)"):
        check_query(single_sequence_msa(long), "ACDEFGHIKLMNPQRSTVWWAC", source="m")


def test_msa_rows_and_descriptions():
    msa = Msa(sequences=["AC", "A-"], deletions=[[0, 0], [0, 2]])
    assert msa.descriptions == ["", ""]
    with pytest.raises(ValueError, match=r"^Msa: sequences, deletions and descriptions differ in length$"):
        Msa(sequences=["AC"], deletions=[[0, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"^Msa: sequences, deletions and descriptions differ in length$"):
        Msa(sequences=["AC"], deletions=[[0, 0]], descriptions=["a", "b"])
    single = single_sequence_msa("ACD")
    assert (single.sequences, single.deletions, single.descriptions) == (["ACD"], [[0, 0, 0]], ["query"])
    assert single_sequence_msa("AC", "t1").descriptions == ["t1"]


def test_truncate_keeps_the_first_rows_of_each_field():
    msa = parse_a3m(">q\nACD\n>h1\nAkCD\n>h2\n-CD\n")
    first = msa.truncate(2)
    assert (first.sequences, first.deletions, first.descriptions) == (
        ["ACD", "ACD"], [[0, 0, 0], [0, 1, 0]], ["q", "h1"])
    assert len(msa.truncate(10)) == 3 and len(msa) == 3


def test_species_from_uniprot_names():
    msa = Msa(sequences=["A"] * 6, deletions=[[0]] * 6,
              descriptions=["query", "HBB_HUMAN", "tr|Q0ABC1|Q0ABC1_9MYCO some protein",
                            "sp|P68871|HBB_HUMAN/1-146", "UniRef100_A0A1", "HBB_MOUSE desc"])  # fmt: skip
    assert msa.species() == ["", "HUMAN", "9MYCO", "HUMAN", "", "MOUSE"]


def test_merge_keeps_the_first_copy_with_its_deletions_and_description():
    a = parse_a3m(">q\nACD\n>x\nAkC-\n")
    b = parse_a3m(">q2\nACD\n>y\nAC-\n>z\nGCD\n")
    merged = merge_and_deduplicate([a, b])
    assert merged.sequences == ["ACD", "AC-", "GCD"]
    assert merged.deletions == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert merged.descriptions == ["q", "x", "z"]
    with pytest.raises(ValueError, match=r"^at least one MSA is required$"):
        merge_and_deduplicate([])


def test_to_a3m_writes_the_rows_and_reads_back():
    msa = Msa(sequences=["ACD", "A-D"], deletions=[[0, 0, 0], [0, 0, 0]], descriptions=["q", ""])
    assert to_a3m(msa) == ">q\nACD\n>seq1\nA-D\n"
    back = parse_a3m(to_a3m(msa))
    assert back.sequences == msa.sequences and back.deletions == msa.deletions


def test_a3m_headers_and_comment_lines():
    msa = parse_a3m("#comment\n>  q  padded  \nAC\n\n# between\nD\n>\nAkCD\n")
    assert msa.descriptions == ["q  padded", ""] and msa.sequences == ["ACD", "ACD"]


def test_one_row_alignments_and_undecodable_stockholm_bytes(tmp_path):
    one = tmp_path / "one.a3m"
    one.write_text(">q\nACD\n")
    assert read_msa(one).sequences == ["ACD"]
    sto = tmp_path / "x.sto"
    sto.write_bytes(b"#=GS h DE caf\xe9\nq AC-D\nh AkCD\n//\n")
    msa = read_msa(sto)
    assert msa.sequences == ["ACD", "AKD"] and msa.deletions == [[0, 0, 0], [0, 0, 1]]
    assert msa.descriptions == ["q", "h caf\ufffd"]


def test_ragged_rows_show_the_first_four_widths(tmp_path):
    path = tmp_path / "x.a3m"
    path.write_text("".join(f">r{n}\n{'A' * n}\n" for n in (5, 1, 4, 2, 3)))
    with pytest.raises(UserError) as info:
        read_msa(path)
    assert str(info.value) == f"{path}: aligned rows differ in length ([1, 2, 3, 4]); is it a valid alignment?"
