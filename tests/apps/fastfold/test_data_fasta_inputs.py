"""FASTA inputs in every form the format allows (blank lines anywhere, a byte-order mark, Windows
line ends, descriptions with spaces, '>' alone, a terminal '*', lower case), for monomers and for
complexes (one chain per record, or ColabFold's ':'), and every refusal by its whole one-line text."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferryman.apps.fastfold.data.fasta import (
    CHAIN_IDS,
    STANDARD_AA,
    read_complex_fasta,
    read_complexes,
    read_fasta,
    read_fastas,
    safe_name,
    validate_sequence,
)
from ferryman.core.errors import UserError


def _write(tmp_path: Path, text: str, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- one sequence -------------------------------------------------------------------------------


def test_valid_sequences_come_back_without_a_terminal_stop():
    assert validate_sequence(STANDARD_AA, where="w") == STANDARD_AA
    assert validate_sequence("ACD*", where="w") == "ACD"
    assert validate_sequence("ACGT" * 4 + "ACG", where="w") == "ACGTACGTACGTACGTACG"  # 19 letters: a protein


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ("*", "w: the sequence is empty"),
        ("", "w: the sequence is empty"),
        ("ACGT" * 5, "w: this looks like a DNA/RNA sequence (only A, C, G, T/U, N); give the protein sequence "
                     "(translate it first)"),
        ("acgun" * 4, "w: this looks like a DNA/RNA sequence (only A, C, G, T/U, N); give the protein sequence "
                      "(translate it first)"),
        ("ACGTUN" * 4, "w: this looks like a DNA/RNA sequence (only A, C, G, T/U, N); give the protein sequence "
                       "(translate it first)"),  # every one of the six letters
        ("ACGTX" * 4, "w: 'X' at position 5 is an unknown residue; replace it with the residue you expect, or "
                      "remove it"),  # 20 letters, but X is no nucleotide
        ("ACDeF", "w: lower-case letter 'e' at position 4; write the sequence in upper case (lower case means an "
                  "insertion in alignment formats, so it is not accepted here)"),
        ("AX", "w: 'X' at position 2 is an unknown residue; replace it with the residue you expect, or remove it"),
        ("AB", "w: 'B' at position 2 is Asx (D or N); replace it with D or N"),
        ("AZ", "w: 'Z' at position 2 is Glx (E or Q); replace it with E or Q"),
        ("AJ", "w: 'J' at position 2 is Xle (L or I); replace it with L or I"),
        ("AU", "w: 'U' at position 2 is selenocysteine; replace it with C"),
        ("AO", "w: 'O' at position 2 is pyrrolysine; replace it with K"),
        ("AC:DE", "w: ':' at position 3 separates the chains of a complex (ColabFold's notation); predict complexes "
                  "with --model-preset multimer"),
        ("A-C", "w: gap '-' at position 2; give the unaligned sequence"),
        ("A.C", "w: gap '.' at position 2; give the unaligned sequence"),
        ("A*C", f"w: '*' at position 2 is not an amino-acid letter ({STANDARD_AA})"),
        ("AC é", f"w: ' ' at position 3 is not an amino-acid letter ({STANDARD_AA})"),
    ],
)
def test_refused_sequences(sequence, message):
    assert _error(validate_sequence, sequence, where="w") == message


def test_safe_names():
    assert safe_name("sp|P68871|HBB_HUMAN") == "sp_P68871_HBB_HUMAN"
    assert safe_name("a||b") == "a_b"  # a run of unsafe characters is one underscore
    assert safe_name("my-prot.v2") == "my-prot.v2"
    assert safe_name("._x_.") == "x"
    assert safe_name("XRCC1_HUMAN") == "XRCC1_HUMAN"  # only '.' and '_' are stripped from the ends
    assert safe_name("|||") == "target" and safe_name("..") == "target"


# --- files of monomers --------------------------------------------------------------------------


def test_every_allowed_form_of_a_fasta_file(tmp_path):
    text = ("\ufeff\r\n\r\n>sp|P1|A_HUMAN  Alpha  protein OS=Homo sapiens\r\nACD EF\r\n\r\nGHI*\r\n"
            "\r\n>b\r\nKLM\r\n\r\n")  # fmt: skip
    first, second = read_fasta(_write(tmp_path, text))
    assert (first.name, first.record_id, first.sequence) == ("sp_P1_A_HUMAN", "sp|P1|A_HUMAN", "ACDEFGHI")
    assert first.description == "sp|P1|A_HUMAN  Alpha  protein OS=Homo sapiens"
    assert first.source == tmp_path / "in.fasta"
    assert (second.name, second.record_id, second.description, second.sequence) == ("b", "b", "b", "KLM")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (">\nACD\n", "record 1: the header line has no id after '>'"),
        (">a\nAC\n> \nACD\n", "record 2: the header line has no id after '>'"),
        ("ACDEF\n>a\nAC\n", "not a FASTA file: the first line must start with '>' (a record header)"),
        ("  \n\n", "no FASTA records found"),
        (">a\nAC\n>b\n\n", "record 2 ('b'): the sequence is empty"),
        (">a\nACDxF\n", "record 1 ('a'): lower-case letter 'x' at position 4; write the sequence in upper case "
                        "(lower case means an insertion in alignment formats, so it is not accepted here)"),
    ],
)
def test_refused_files_name_the_file_and_the_record(tmp_path, text, message):
    path = _write(tmp_path, text)
    assert _error(read_fasta, path) == f"{path}: {message}"


def test_missing_and_undecodable_files(tmp_path):
    assert _error(read_fasta, tmp_path / "no.fasta") == f"{tmp_path / 'no.fasta'}: FASTA file not found"
    path = tmp_path / "latin1.fasta"
    path.write_bytes(b">a caf\xe9\nACD\n")
    assert _error(read_fasta, path) == f"{path}: not a text FASTA file (invalid continuation byte at byte 6)"


def test_read_fastas_keeps_the_order_and_refuses_names_that_collide(tmp_path):
    a = _write(tmp_path, ">x\nACD\n>y\nKL\n", "a.fasta")
    b = _write(tmp_path, ">z\nMN\n", "b.fasta")
    assert [(t.record_id, t.source) for t in read_fastas([a, b])] == [("x", a), ("y", a), ("z", b)]
    assert _error(read_fastas, []) == "no FASTA file given"
    c = _write(tmp_path, ">p|q\nACD\n", "c.fasta")
    d = _write(tmp_path, ">p_q\nKLM\n", "d.fasta")  # a different id with the same folder name
    assert _error(read_fastas, [c, d]) == (
        f"{d}: duplicate record id 'p_q' (first seen in {c} as 'p|q'); every record needs a unique id "
        "because it names the output folder")


# --- complexes ------------------------------------------------------------------------------------


def test_a_file_of_records_is_one_complex_named_after_the_file(tmp_path):
    path = _write(tmp_path, ">h1 heavy chain\nACDE\n\n>l1 light chain\r\nKLM*\r\n", "my complex.fasta")
    (target,) = read_complex_fasta(path)
    assert (target.name, target.record_id, target.source) == ("my_complex", "my complex", path)
    assert [(c.chain_id, c.sequence, c.description) for c in target.chains] == [
        ("A", "ACDE", "h1 heavy chain"), ("B", "KLM", "l1 light chain")]
    assert target.sequence == "ACDE:KLM"


def test_colabfold_records_are_one_complex_each(tmp_path):
    path = _write(tmp_path, ">dimer pair\nACD:KLM\n>trimer\nAC:DE:FG\n>single\nWY\n")
    dimer, trimer, single = read_complex_fasta(path)
    assert (dimer.name, dimer.record_id) == ("dimer", "dimer")
    assert [(c.chain_id, c.sequence, c.description) for c in dimer.chains] == [
        ("A", "ACD", "dimer pair"), ("B", "KLM", "dimer pair")]
    assert [c.chain_id for c in trimer.chains] == ["A", "B", "C"] and trimer.sequence == "AC:DE:FG"
    assert [c.sequence for c in single.chains] == ["WY"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (">a\nACD:KxM\n", "record 1 ('a') chain 2 of 2: lower-case letter 'x' at position 2; write the sequence in "
                          "upper case (lower case means an insertion in alignment formats, so it is not accepted "
                          "here)"),
        (">a\nAC\n>b\nKL:MN:\n", "record 2 ('b') chain 3 of 3: the sequence is empty"),
        (">a\nAC\n>b\nKXM\n", "record 2 ('b'): 'X' at position 2 is an unknown residue; replace it with the residue "
                              "you expect, or remove it"),
    ],
)
def test_refused_chains_name_the_record_and_the_chain(tmp_path, text, message):
    path = _write(tmp_path, text)
    assert _error(read_complex_fasta, path) == f"{path}: {message}"


def test_chain_ids_follow_alphafold2s_alphabet_up_to_62(tmp_path):
    most = _write(tmp_path, ">c\n" + ":".join(["AC"] * 62) + "\n", "most.fasta")
    (target,) = read_complex_fasta(most)
    assert "".join(c.chain_id for c in target.chains) == CHAIN_IDS
    assert CHAIN_IDS[0] + CHAIN_IDS[25] + CHAIN_IDS[26] + CHAIN_IDS[61] == "AZa9"
    too_many = _write(tmp_path, "".join(f">r{i}\nAC\n" for i in range(63)), "big.fasta")
    assert _error(read_complex_fasta, too_many) == (
        f"{too_many}: 'big' has 63 chains; at most 62 can be named (PDB chain ids A-Z, a-z, 0-9), as in AlphaFold2")


def test_read_complexes_keeps_the_order_and_refuses_names_that_collide(tmp_path):
    one = _write(tmp_path, ">a\nAC\n>b\nDE\n", "one.fasta")
    two = _write(tmp_path, ">x\nAC:DE\n>y\nKL:MN\n", "two.fasta")
    assert [(t.name, t.source) for t in read_complexes([one, two])] == [("one", one), ("x", two), ("y", two)]
    assert _error(read_complexes, []) == "no FASTA file given"
    other = tmp_path / "sub"
    other.mkdir()
    again = _write(other, ">c\nWY\n", "one.fasta")
    assert _error(read_complexes, [one, again]) == (
        f"{again}: complex 'one' has the name of one in {one}; every complex needs a unique name (the file name, "
        "or the record id with ':' chains) because it names the output folder")
    dup = _write(tmp_path, ">p|q\nAC:DE\n>p_q\nKL:MN\n", "dup.fasta")
    assert "complex 'p_q' has the name of one in" in _error(read_complexes, [dup])


@pytest.mark.parametrize("reader", [read_fasta, read_complex_fasta])
def test_a_letter_outside_ascii_is_named_by_its_line(tmp_path, reader):
    """A non-breaking space pasted from a web page, or an accented letter, in a sequence (Biopython
    holds sequences as ASCII and would raise a UnicodeDecodeError); a header may hold any text."""
    path = tmp_path / "t.fasta"
    path.write_text("\n\n>a café\nMKV\n>b\nMK\u00a0V\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        reader(path)
    assert str(err.value) == (f"{path}: line 6: '\\xa0' (U+00A0) is not an amino-acid letter; "
                              "a sequence is written in plain ASCII letters")
    path.write_text(">a café\nMKV\n", encoding="utf-8")
    assert [t.sequence for t in read_fasta(path)] == ["MKV"]
