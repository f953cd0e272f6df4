"""FASTA parsing and validation: every rejection names the file and the record."""

from pathlib import Path

import pytest

from ferryman.apps.fastfold.data.fasta import read_fasta, read_fastas, safe_name
from ferryman.core.errors import UserError

DATA = Path(__file__).parents[3] / "data" / "fastfold"


def _write(tmp_path: Path, text: str, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_sample_fasta_parses():
    targets = read_fasta(DATA / "sample.fasta")
    assert [t.name for t in targets] == ["villin_n68h", "HBB_HUMAN"]
    assert targets[0].sequence == "LSDEDFKAVFGMTRSAFANLPLWKQQHLKKEKGLF"
    assert len(targets[1].sequence) == 146 and targets[1].sequence.startswith("VHLTPEEK")


def test_multiline_records_and_trailing_stop(tmp_path):
    path = _write(tmp_path, ">a first\nACDE\nFGHI*\n>b\nKLMN\n")
    targets = read_fasta(path)
    assert [(t.record_id, t.sequence) for t in targets] == [("a", "ACDEFGHI"), ("b", "KLMN")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (">a\n\n>b\nACD\n", "record 1 ('a'): the sequence is empty"),
        (">a\nACD\n>b\n*\n", "record 2 ('b'): the sequence is empty"),
        (">a\nACDefg\n", "lower-case letter 'e' at position 4"),
        (">a\nACDXK\n", "'X' at position 4 is an unknown residue"),
        (">a\nACDBK\n", "'B' at position 4 is Asx"),
        (">a\nAC1K\n", "'1' at position 3 is not an amino-acid letter"),
        (">a\nAC-K\n", "gap '-' at position 3"),
        ("ACDEF\n", "the first line must start with '>'"),
        ("", "no FASTA records found"),
    ],
)
def test_bad_records_are_named(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as info:
        read_fasta(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message and "\n" not in message


def test_duplicate_ids_within_and_across_files(tmp_path):
    one = _write(tmp_path, ">x\nACD\n>x\nKLM\n", "one.fasta")
    with pytest.raises(UserError, match="duplicate record id 'x'"):
        read_fastas([one])
    a = _write(tmp_path, ">x\nACD\n", "a.fasta")
    b = _write(tmp_path, ">x\nKLM\n", "b.fasta")
    with pytest.raises(UserError, match=r"b\.fasta: duplicate record id 'x' \(first seen in .*a\.fasta"):
        read_fastas([a, b])


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(UserError, match="FASTA file not found"):
        read_fasta(tmp_path / "nope.fasta")
    path = tmp_path / "bin.fasta"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UserError, match="not a text FASTA file"):
        read_fasta(path)


def test_safe_names_for_uniprot_ids():
    assert safe_name("sp|P68871|HBB_HUMAN") == "sp_P68871_HBB_HUMAN"
    assert safe_name("../../etc") == "etc"
