"""The template library's index and AF2's release-date and obsolete-entry filters.

A PDB mirror holds about 200,000 mmCIF files: parsing all of them for every target is hours of
work. The index reads each file once (its release date and the observed sequence of each chain)
and is cached next to the mirror as ``fastfold_template_index.json``; later runs re-read only
files that are new or changed (by size and modification time) and drop removed ones. Searches
run against the index's sequences, and only the files of the hits are parsed for coordinates.

Release dates follow AF2's mmcif_parsing: the earliest ``_pdbx_audit_revision_history.revision_date``
(falling back to ``_pdbx_database_status.recvd_initial_deposition_date``). With
``--max-template-date``, hits released after it are dropped, as AF2's TemplateHitFeaturizer does;
``--obsolete-pdbs-path`` (wwPDB's obsolete.dat) maps an obsolete entry to its replacement.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ferryman.core.errors import UserError

log = logging.getLogger(__name__)

INDEX_NAME = "fastfold_template_index.json"
INDEX_VERSION = 1
_DATE_KEYS = ("_pdbx_audit_revision_history.revision_date", "_pdbx_database_status.recvd_initial_deposition_date")


def parse_date(text: str, flag: str = "--max-template-date") -> dt.date:
    """A YYYY-MM-DD date, or one UserError line naming the flag."""
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {text!r}: expected a date as YYYY-MM-DD, e.g. 2022-01-01") from None


def release_date(path: Path) -> str | None:
    """The entry's first release date as YYYY-MM-DD, None when the file does not say."""
    import gemmi

    try:
        block = gemmi.cif.read(str(path)).sole_block()
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot read template mmCIF ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    for key in _DATE_KEYS:
        dates = sorted(v for v in block.find_values(key) if len(v) == 10 and v[4] == "-")
        if dates:
            return dates[0]
    return None


def read_obsolete(path: Path) -> dict[str, str | None]:
    """wwPDB obsolete.dat: ``OBSLTE  31-JUL-94 116L     216L`` -> {'116l': '216l'} (None: withdrawn)."""
    from ferryman.core.files import reading

    mapping: dict[str, str | None] = {}
    with reading(path, "obsolete PDB list (--obsolete-pdbs-path)"):
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "OBSLTE":
                mapping[parts[2].lower()] = parts[3].lower() if len(parts) > 3 else None
    return mapping


def _entry(path: Path) -> dict:
    from ferryman.apps.fastfold.data.templates import read_mmcif_chains

    return {"release_date": release_date(path), "chains": {c.name: c.sequence for c in read_mmcif_chains(path)}}


@dataclass(kw_only=True)
class TemplateIndex:
    """Chains (name -> observed sequence) and release dates of every mmCIF file in ``folder``."""

    folder: Path
    files: dict[str, dict] = field(default_factory=dict)  # file name -> size, mtime_ns, release_date, chains
    _by_id: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def chains(self) -> dict[str, str]:
        return {name: seq for entry in self.files.values() for name, seq in entry["chains"].items()}

    def file_of(self) -> dict[str, str]:
        """PDB id (lower case) -> file name (built once: a mirror has ~200,000 files)."""
        if self._by_id is None:
            self._by_id = {name.split(".")[0].lower(): name for name in self.files}
        return self._by_id

    def date_of(self, pdb_id: str) -> str | None:
        name = self.file_of().get(pdb_id.lower())
        return self.files[name]["release_date"] if name else None

    def seqres_fasta(self, path: Path) -> Path:
        with open(path, "w") as handle:
            for name, seq in self.chains().items():
                handle.write(f">{name}\n{seq}\n")
        return path


def _mmcif_files(folder: Path) -> dict[str, os.stat_result]:
    with os.scandir(folder) as entries:
        return {e.name: e.stat() for e in entries if e.is_file() and e.name.endswith((".cif", ".cif.gz"))}


def _read_cached(path: Path) -> dict[str, dict]:
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError, EOFError):
        log.warning("%s is unreadable; rebuilding the template index", path)
        return {}
    return data.get("files", {}) if isinstance(data, dict) and data.get("version") == INDEX_VERSION else {}


def load_index(folder: Path, *, write: bool = True, progress: bool = False) -> TemplateIndex:
    """The folder's index, brought up to date (new/changed files parsed, removed ones dropped) and
    written back when anything changed and the folder is writable."""
    from ferryman.core.io import write_text

    if not folder.is_dir():
        raise UserError(f"--template-mmcif-dir {folder}: not a folder")
    on_disk = _mmcif_files(folder)
    if not on_disk:
        raise UserError(f"--template-mmcif-dir {folder}: no .cif or .cif.gz files in the template folder")
    cache = folder / INDEX_NAME
    cached = _read_cached(cache) if cache.is_file() else {}
    files, parsed = {}, 0
    stale = [n for n, st in on_disk.items() if n not in cached
             or (cached[n].get("size"), cached[n].get("mtime_ns")) != (st.st_size, st.st_mtime_ns)]  # fmt: skip
    from tqdm import tqdm

    fresh = {}
    for name in tqdm(sorted(stale), disable=not progress or len(stale) < 50, desc="indexing templates", unit="file"):
        fresh[name] = {"size": on_disk[name].st_size, "mtime_ns": on_disk[name].st_mtime_ns, **_entry(folder / name)}
        parsed += 1
    for name in sorted(on_disk):
        files[name] = fresh.get(name) or cached[name]
    if write and (parsed or set(cached) != set(files)):
        try:
            write_text(cache, json.dumps({"version": INDEX_VERSION, "files": files}) + "\n")
        except OSError as exc:  # a read-only mirror: the index lives for this run only
            log.warning("cannot cache the template index in %s (%s); it is rebuilt each run", folder, exc.strerror)
    return TemplateIndex(folder=folder, files=files)


@dataclass(kw_only=True)
class HitFilter:
    """AF2's release-date cut-off and obsolete-entry mapping, applied to a hit's PDB id."""

    max_date: dt.date | None = None
    obsolete: dict[str, str | None] = field(default_factory=dict)

    def resolve(self, chain_name: str, index: TemplateIndex) -> str | None:
        """The chain name to use (replacement of an obsolete entry), or None when the hit is dropped."""
        pdb_id, _, chain = chain_name.partition("_")
        pdb_id = pdb_id.lower()
        if pdb_id in self.obsolete:
            replacement = self.obsolete[pdb_id]
            if replacement is None:
                return None
            pdb_id = replacement
        if self.max_date is not None:
            date = index.date_of(pdb_id)
            if date is not None and dt.date.fromisoformat(date) > self.max_date:
                return None
        return f"{pdb_id}_{chain}"
