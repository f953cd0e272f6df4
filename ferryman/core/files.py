"""Users' binary files in, one clear line out: the one place that opens weights and checkpoints.

Every app reads safetensors, npz and model folders through these functions. A file that is
missing, truncated, overwritten or bit-flipped becomes a ``UserError`` naming the file and the
problem instead of a ``SafetensorError``/``BadZipFile`` traceback, and pickle-based weight files
(``.bin``, ``.pt``, ``.ckpt``...) are refused by name before anything unpickles them: loading
one can run arbitrary code.

``check_writable`` answers, before any work starts, whether an output can be written where the
user asked, so a long job never finds out at its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferryman.core.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What goes wrong when a damaged file is read: safetensors raises its own SafetensorError (an
# Exception subclass we cannot import lazily by name), numpy zip errors, zlib, EOF and OS errors.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile, zlib.error, struct.error,
    json.JSONDecodeError, UnicodeDecodeError,
)


def _safetensor_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


def damaged(path: str | os.PathLike, what: str, err: BaseException | str) -> UserError:
    """The one-line error for a file that exists but cannot be read."""
    reason = err if isinstance(err, str) else (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UserError(f"{path}: cannot read this {what}; it looks damaged or truncated ({reason}). "
                     "Replace it, or remove it to start over")


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn any failure while reading ``path`` inside the block into a ``UserError`` naming it."""
    if not Path(path).exists():
        raise UserError(f"{path}: no such {what}")
    try:
        yield
    except UserError:
        raise
    except (*_READ_ERRORS, _safetensor_error()) as err:
        raise damaged(path, what, err) from None


def refuse_pickled(path: str | os.PathLike, what: str) -> None:
    """Refuse a pickle-based weight file by its name or, whatever it is called, by its first bytes."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(path):
        raise UserError(
            f"{path}: {what} in a pickle-based format (a Python pickle); loading it could run code hidden in "
            "the file, so it is refused. Ferryman reads weights from .safetensors (AlphaFold parameters from .npz); "
            "convert the file where you trust it, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), ...)")


def _head(path: Path) -> bytes:
    if not path.is_file():
        return b""
    with open(path, "rb") as handle:
        return handle.read(4)


def _is_pickle_stream(path: Path) -> bool:
    head = _head(path)
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # the PROTO opcode


def _looks_pickled(path: Path) -> bool:
    """A raw pickle stream or torch.save's zip archive, whatever the file is called."""
    return _is_pickle_stream(path) or _head(path) == b"PK\x03\x04"


def check_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, Any]:
    """Validate a safetensors file's header against its size without reading the tensors.

    Catches truncation and overwritten headers cheaply (a bit flip inside tensor data carries no
    checksum and cannot be told). Returns the header.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickled(path, what)
    with reading(path, what):
        try:
            return _safetensors_header(path)
        except ValueError:
            refuse_pickled(path, what)  # a pickle saved under a .safetensors name says so
            raise


def _safetensors_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError(f"header claims {length} bytes but the file has {size}")
        header = json.loads(handle.read(length).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    entries = [v for k, v in header.items() if k != "__metadata__"]
    if not all(isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
               for v in entries):
        raise ValueError("header entries are not tensors (dtype, shape, data_offsets)")
    end = max((int(v["data_offsets"][1]) for v in entries), default=0)
    if 8 + length + end > size:
        raise ValueError(f"tensors end at byte {8 + length + end} but the file has {size}")
    return header


def load_safetensors(path: str | os.PathLike, what: str = "weights file", device: str = "cpu") -> dict:
    """All tensors of a safetensors file, or a ``UserError`` naming it."""
    from safetensors.torch import load_file

    check_safetensors(path, what)
    with reading(path, what):
        return load_file(str(path), device=device)


def load_npz(path: str | os.PathLike, what: str = "parameter file") -> dict:
    """Every array of an npz archive, read eagerly (so each member's CRC is checked here), with no
    object arrays (``allow_pickle=False``)."""
    import numpy as np

    if Path(path).suffix.lower() in PICKLE_SUFFIXES or _is_pickle_stream(Path(path)):
        refuse_pickled(path, what)  # np.load would only say "pickled data"; name what the file is
    with reading(path, what), np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def check_model_folder(folder: str | os.PathLike, what: str = "model folder") -> None:
    """Before transformers/diffusers load a folder: every weight file in it is safetensors with a
    sound header, and no pickle-based weight file stands where they would fall back to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such {what} (expected a folder)")
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES and _is_weight_file(path):
            refuse_pickled(path, f"weight file in {what} {folder}")
        elif path.suffix == ".safetensors":
            check_safetensors(path, f"weight file in {what} {folder}")
        elif path.suffix == ".json":
            with reading(path, f"config file in {what} {folder}"):
                json.loads(path.read_text(encoding="utf-8"))


def _is_weight_file(path: Path) -> bool:
    """Names from_pretrained loads weights from (pytorch_model*.bin, diffusion_pytorch_model.bin,
    adapter_model.bin, model.ckpt ...), not a trainer's own pickles beside them (training_args.bin,
    optimizer.pt, rng_state.pth), which loading the model never opens."""
    return "model" in path.stem.lower() or path.suffix.lower() == ".ckpt"


def check_writable(path: str | os.PathLike, what: str = "output folder", *, is_dir: bool = True) -> None:
    """Fail now, in one line, if ``path`` cannot be written later; creates nothing that stays.

    The nearest existing ancestor must be a folder in which a file can really be created (a probe,
    because permission bits lie to root and say nothing of read-only mounts or immutable folders).
    """
    path = Path(path)
    if path.exists():
        if is_dir and not path.is_dir():
            raise UserError(f"{path}: the {what} is an existing file, not a folder")
        if not is_dir and path.is_dir():
            raise UserError(f"{path}: the {what} is an existing folder, not a file")
    probe_dir = path if (is_dir and path.is_dir()) else path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"{path}: cannot create the {what}: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ferryman-write-test-", dir=probe_dir)
    except OSError as err:
        raise UserError(f"{path}: cannot write the {what} in {probe_dir} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
