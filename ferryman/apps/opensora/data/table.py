"""The clip table: CSV or parquet with columns path,text[,num_frames,height,width,fps] (Open-Sora's layout)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import UserError

REQUIRED = ("path", "text")
OPTIONAL_INT = ("num_frames", "height", "width")


@dataclass(kw_only=True)
class ClipRecord:
    """One row; sizes are None when the table does not give them (they are then probed from the file)."""

    row: int
    path: Path
    text: str
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None

    @property
    def has_sizes(self) -> bool:
        return None not in (self.num_frames, self.height, self.width, self.fps)


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"  # a parquet file by another name reads as one


def _csv_rows(path: Path) -> list[dict[str, object]]:
    """The CSV's rows as mappings; a file that is not a readable CSV is one line."""
    try:
        # utf-8-sig: spreadsheet programs start their UTF-8 CSVs with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise UserError(f"{path}: the file is empty; expected a header line path,text[,num_frames,height,width,fps]")
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            return list(reader)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text CSV (undecodable byte at offset {err.start}); "
                        "expected a clip table with columns path,text[,num_frames,height,width,fps]") from None
    except csv.Error as err:
        raise UserError(f"{path}: not a readable CSV ({err}); expected columns path,text[,...]") from None


def _parquet_rows(path: Path) -> list[dict[str, object]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or use a CSV") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: not a readable parquet file ({reason})") from None


def _number(value: object, kind: type, path: Path, row: int, column: str) -> int | float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{path}, row {row}: column {column} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{path}, row {row}: column {column} must be positive, got {value!r}")
    return int(number) if kind is int else number


def read_table(path: str | Path, root: Path | None = None) -> list[ClipRecord]:
    """Parse and check the table; clip paths are relative to ``root`` (default: the table's folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"clip table {path} is a folder; expected a CSV or parquet file")
    if not path.is_file():
        raise UserError(f"clip table {path} does not exist")
    parquet = _is_parquet(path)  # by its suffix or its content: rows are numbered as the format counts them
    rows = _parquet_rows(path) if parquet else _csv_rows(path)
    if not rows:
        raise UserError(f"{path}: no clips listed (only a header)")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, rows[0]))}")
    root = Path(root) if root is not None else path.parent
    records = []
    for i, row in enumerate(rows, start=1 if parquet else 2):  # a CSV's first row is its line 2
        clip, text = str(row.get("path") or "").strip(), row.get("text")
        if not clip:
            raise UserError(f"{path}, row {i}: empty path")
        if text is None or not str(text).strip():
            raise UserError(f"{path}, row {i}: empty text for {clip}")
        sizes = {c: _number(row.get(c), int, path, i, c) for c in OPTIONAL_INT}
        fps = _number(row.get("fps"), float, path, i, "fps")
        full = Path(clip) if Path(clip).is_absolute() else root / clip
        records.append(ClipRecord(row=i, path=full, text=str(text).strip(), fps=fps, **sizes))  # type: ignore[arg-type]
    return records
