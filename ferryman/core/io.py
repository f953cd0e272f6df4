"""Atomic file output: write under a temporary name in the same folder, then rename.

The temporary file comes from ``mkstemp`` (mode 0600, so no other user can read a half-written
file); before the rename it gets the mode a plain ``open()`` would have given it under the
current umask, so finished outputs are as readable as any other file the user writes. The data
reaches the disk before the rename, and the rename before the call returns (the folder is synced
too), so a power loss leaves the old file or the whole new one, never an empty file by the name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing so that readers see either the old file or the whole new one.

    A crash inside the block leaves no file at ``path`` (or the previous one untouched).
    """
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not supported")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; the rename is still atomic there
        pass
    finally:
        os.close(fd)


def _publish(tmp: str | os.PathLike, target: Path) -> None:
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)
    _fsync(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` if the block succeeds.

    For writers that insist on a file name (safetensors, PIL, PyAV, matplotlib).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)  # the writer closed it; its data must be on disk before the name points at it
        _publish(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
