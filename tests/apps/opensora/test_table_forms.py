"""The clip table in every form it may come in, and every refusal as its exact one line: a CSV
with extra columns, a caption holding a quoted CR or CRLF, absolute and relative clip paths,
fractional fps and sizes written as floats; a parquet file by its suffix in either case or by its
magic bytes under another name (its rows numbered from 1, as parquet counts them); and each
malformed table, row and value."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from ferryman.apps.opensora.data import read_table
from ferryman.core.errors import UserError

HEADER = "path,text[,num_frames,height,width,fps]"


def _refused(path: Path, message: str, **kw) -> None:
    with pytest.raises(UserError) as err:
        read_table(path, **kw)
    assert str(err.value) == message


def _csv(tmp_path: Path, text: str, name: str = "clips.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_values_paths_and_extra_columns_of_a_csv(tmp_path):
    """Extra columns are ignored; fps keeps its fraction, sizes written as floats are whole numbers;
    1 is a valid size (a one-frame clip); a relative path is under ``root`` (default: the table's
    folder), an absolute one is kept."""
    elsewhere = tmp_path / "store" / "b.mp4"
    table = _csv(tmp_path, "note,path,text,num_frames,height,width,fps,score\n"
                           "x,sub/a.mp4,  a cat  ,1,48.0,64,29.97,0.5\n"
                           f"y,{elsewhere},a dog,16,32,32,1,\n"
                           "z,c.mp4,a bird,,,,,\n")
    records = read_table(table)
    assert [(r.row, r.path, r.text) for r in records] == [
        (2, tmp_path / "sub" / "a.mp4", "a cat"), (3, elsewhere, "a dog"), (4, tmp_path / "c.mp4", "a bird")]
    first, second, third = records
    assert (first.num_frames, first.height, first.width, first.fps) == (1, 48, 64, 29.97)
    assert type(first.height) is int and type(first.fps) is float and first.has_sizes
    assert (second.num_frames, second.height, second.width, second.fps) == (16, 32, 32, 1.0)
    assert (third.num_frames, third.height, third.width, third.fps) == (None, None, None, None)
    assert not third.has_sizes
    assert [r.path for r in read_table(table, root=tmp_path / "clips")] == [
        tmp_path / "clips" / "sub" / "a.mp4", elsewhere, tmp_path / "clips" / "c.mp4"]


@pytest.mark.parametrize("inner", ["\r\n", "\r", "\n"])
def test_a_quoted_line_break_in_a_caption_is_kept_as_written(tmp_path, inner):
    table = _csv(tmp_path, f'path,text\r\na.mp4,"first{inner}second"\r\nb.mp4,plain\r\n')
    assert [r.text for r in read_table(table)] == [f"first{inner}second", "plain"]


@pytest.mark.parametrize("name", ["clips.parquet", "CLIPS.PARQUET", "clips.table"])
def test_a_parquet_table_by_suffix_or_content_numbers_its_rows_from_one(tmp_path, name):
    path = _parquet(tmp_path / name, {"path": ["a.mp4", "b.mp4"], "text": ["a cat", "a dog"], "fps": [24.0, 12.5]})
    records = read_table(path)
    assert [(r.row, r.path.name, r.text, r.fps) for r in records] == [(1, "a.mp4", "a cat", 24.0), (2, "b.mp4", "a dog", 12.5)]
    bad = _parquet(tmp_path / name, {"path": ["a.mp4", "b.mp4"], "text": ["a cat", " "]})
    _refused(bad, f"{bad}, row 2: empty text for b.mp4")


@pytest.mark.parametrize("name", ["clips.parquet", "clips.Parquet"])
def test_a_file_named_parquet_is_read_as_parquet_whatever_it_holds(tmp_path, name):
    pq = pytest.importorskip("pyarrow.parquet")
    path = _csv(tmp_path, "path,text\na.mp4,a cat\n", name)  # a CSV by a parquet name
    with pytest.raises(Exception) as err:
        pq.read_table(path)
    reason = str(err.value).splitlines()[0]
    _refused(path, f"{path}: not a readable parquet file ({reason})")


@pytest.mark.parametrize(("error", "reason"), [
    (OSError("first line\nsecond line"), "first line"),
    (OSError(), "OSError"),  # no message: the error's type names the reason
])
def test_an_unreadable_parquet_file_is_named_with_the_first_line_of_the_reason(tmp_path, monkeypatch, error, reason):
    pq = pytest.importorskip("pyarrow.parquet")
    path = _parquet(tmp_path / "clips.parquet", {"path": ["a.mp4"], "text": ["a cat"]})

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pq, "read_table", fail)
    _refused(path, f"{path}: not a readable parquet file ({reason})")


def test_parquet_without_pyarrow_is_one_line_naming_the_remedy(tmp_path, monkeypatch):
    path = tmp_path / "clips.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _refused(path, f"{path}: reading parquet needs pyarrow (pip install pyarrow), or use a CSV")


def test_malformed_tables_are_refused_in_one_line(tmp_path):
    _refused(tmp_path, f"clip table {tmp_path} is a folder; expected a CSV or parquet file")
    _refused(tmp_path / "none.csv", f"clip table {tmp_path / 'none.csv'} does not exist")
    empty = _csv(tmp_path, "")
    _refused(empty, f"{empty}: the file is empty; expected a header line {HEADER}")
    header = _csv(tmp_path, "path,text\n")
    _refused(header, f"{header}: no clips listed (only a header)")
    both = _csv(tmp_path, "clip,caption,fps\na.mp4,a cat,8\n")
    _refused(both, f"{both}: missing column(s) path, text; found clip, caption, fps")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path,text\na.mp4,caf\xe9\n")
    _refused(binary, f"{binary}: not a UTF-8 text CSV (undecodable byte at offset 19); "
                     f"expected a clip table with columns {HEADER}")
    huge = _csv(tmp_path, "path,text\na.mp4," + "x" * 140_000 + "\n")
    _refused(huge, f"{huge}: not a readable CSV (field larger than field limit (131072)); expected columns path,text[,...]")


@pytest.mark.parametrize(("row", "message"), [
    (",a cat,8,32,32,8", "row 3: empty path"),
    ("  ,a cat,8,32,32,8", "row 3: empty path"),
    ("b.mp4,,8,32,32,8", "row 3: empty text for b.mp4"),
    ("b.mp4,   ,8,32,32,8", "row 3: empty text for b.mp4"),
    ("b.mp4,a dog,many,32,32,8", "row 3: column num_frames must be a number, got 'many'"),
    ("b.mp4,a dog,8,32,wide,8", "row 3: column width must be a number, got 'wide'"),
    ("b.mp4,a dog,0,32,32,8", "row 3: column num_frames must be positive, got '0'"),
    ("b.mp4,a dog,8,-32,32,8", "row 3: column height must be positive, got '-32'"),
    ("b.mp4,a dog,inf,32,32,8", "row 3: column num_frames must be positive, got 'inf'"),
    ("b.mp4,a dog,8,32,32,fast", "row 3: column fps must be a number, got 'fast'"),
    ("b.mp4,a dog,8,32,32,0", "row 3: column fps must be positive, got '0'"),
    ("b.mp4,a dog,8,32,32,0.0", "row 3: column fps must be positive, got '0.0'"),
    ("b.mp4,a dog,8,32,32,inf", "row 3: column fps must be positive, got 'inf'"),
    ("b.mp4,a dog,8,32,32,nan", "row 3: column fps must be positive, got 'nan'"),
    ("b.mp4,a dog,8,32,32,-24", "row 3: column fps must be positive, got '-24'"),
])
def test_a_bad_row_is_refused_naming_file_row_and_column(tmp_path, row, message):
    table = _csv(tmp_path, f"path,text,num_frames,height,width,fps\na.mp4,a cat,8,32,32,8\n{row}\n")
    _refused(table, f"{table}, {message}")


def test_a_parquet_number_of_the_wrong_kind_is_named_with_its_value(tmp_path):
    path = _parquet(tmp_path / "clips.parquet", {"path": ["a.mp4"], "text": ["a cat"], "fps": [math.inf]})
    _refused(path, f"{path}, row 1: column fps must be positive, got inf")
