"""Subprocess runners for the sequence search tools AlphaFold2 uses.

Flags follow AlphaFold2's data pipeline (jackhmmer -N 1 with its F1/F2/F3 filters and E-value
cut-offs, hhblits -n 3, hmmsearch with permissive thresholds for templates). Binaries come from
an explicit path or PATH; a missing one is a UserError saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import UserError

INSTALL_HINT = "install it with `apt-get install hmmer hhsuite kalign` (or conda: -c bioconda hmmer hhsuite kalign2)"
_PACKAGE = {
    "jackhmmer": "hmmer",
    "hmmsearch": "hmmer",
    "hmmbuild": "hmmer",
    "hhblits": "hhsuite",
    "hhsearch": "hhsuite",
    "kalign": "kalign",
}


def find_binary(name: str, given: str | os.PathLike | None = None) -> Path:
    """Resolve a tool: the given path (must exist and be executable) or the first match on PATH."""
    if given is not None:
        path = Path(given)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UserError(f"{name}: {path} is not an executable file; {INSTALL_HINT}")
        return path
    found = shutil.which(name)
    if found is None:
        package = _PACKAGE.get(name, name)
        raise UserError(f"{name} not found on PATH (package {package}); {INSTALL_HINT}, or pass its path")
    return Path(found)


def _run(cmd: list[str], *, tool: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{tool} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise UserError(f"{tool} could not be started ({cmd[0]}): {exc.strerror}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"{tool} failed with exit status {proc.returncode}: {last[0]}")
    return proc


def _check_db(path: str | os.PathLike, tool: str) -> Path:
    path = Path(path)
    if not path.exists() and not any(path.parent.glob(path.name + "*")):
        raise UserError(f"{tool}: database {path} not found")
    return path


def _write_query(sequence: str, folder: Path, name: str = "query") -> Path:
    path = folder / f"{name}.fasta"
    path.write_text(f">{name}\n{sequence}\n")
    return path


@dataclass(kw_only=True)
class Jackhmmer:
    """Iterative profile search; writes a Stockholm alignment with the query first."""

    binary: Path
    database: Path
    n_iter: int = 1
    e_value: float = 1e-4
    cpus: int = 2
    timeout: float | None = None

    def search(self, sequence: str, out_sto: Path) -> Path:
        db = _check_db(self.database, "jackhmmer")
        with tempfile.TemporaryDirectory() as tmp:
            query = _write_query(sequence, Path(tmp))
            cmd = [
                str(self.binary), "-o", os.devnull, "-A", str(out_sto), "--noali",
                "--F1", "0.0005", "--F2", "0.00005", "--F3", "0.0000005",
                "--incE", str(self.e_value), "-E", str(self.e_value),
                "--cpu", str(self.cpus), "-N", str(self.n_iter), str(query), str(db),
            ]  # fmt: skip
            _run(cmd, tool="jackhmmer", timeout=self.timeout)
        if not out_sto.exists():  # jackhmmer writes no file when nothing passes the thresholds
            out_sto.write_text(f"# STOCKHOLM 1.0\n\nquery {sequence}\n//\n")
        return out_sto


@dataclass(kw_only=True)
class HHBlits:
    """HMM-HMM search of BFD/UniRef30-style HH-suite databases; writes A3M."""

    binary: Path
    databases: list[Path]
    n_iter: int = 3
    e_value: float = 1e-3
    cpus: int = 2
    timeout: float | None = None

    def search(self, sequence: str, out_a3m: Path) -> Path:
        with tempfile.TemporaryDirectory() as tmp:
            query = _write_query(sequence, Path(tmp))
            cmd = [str(self.binary), "-i", str(query), "-cpu", str(self.cpus), "-oa3m", str(out_a3m),
                   "-o", os.devnull, "-n", str(self.n_iter), "-e", str(self.e_value),
                   "-maxseq", "1000000", "-realign_max", "100000", "-maxfilt", "100000",
                   "-min_prefilter_hits", "1000"]  # fmt: skip
            for db in self.databases:
                cmd += ["-d", str(_check_db(db, "hhblits"))]
            _run(cmd, tool="hhblits", timeout=self.timeout)
        return out_a3m


@dataclass(kw_only=True)
class HHSearch:
    """Template search of an A3M against a PDB70-style HH-suite database; writes .hhr."""

    binary: Path
    databases: list[Path]
    timeout: float | None = None

    def search(self, a3m_path: Path, out_hhr: Path) -> Path:
        cmd = [str(self.binary), "-i", str(a3m_path), "-o", str(out_hhr), "-maxseq", "1000000"]
        for db in self.databases:
            cmd += ["-d", str(_check_db(db, "hhsearch"))]
        _run(cmd, tool="hhsearch", timeout=self.timeout)
        return out_hhr


@dataclass(kw_only=True)
class Hmmsearch:
    """Build a profile HMM from the query alignment (hmmbuild --hand) and search template sequences."""

    binary: Path
    hmmbuild_binary: Path
    cpus: int = 2
    timeout: float | None = None

    def build(self, stockholm: Path, out_hmm: Path) -> Path:
        cmd = [str(self.hmmbuild_binary), "--hand", "--amino", str(out_hmm), str(stockholm)]
        _run(cmd, tool="hmmbuild", timeout=self.timeout)
        return out_hmm

    def search(self, hmm: Path, seqres_fasta: Path, out_sto: Path) -> Path:
        cmd = [str(self.binary), "--noali", "--cpu", str(self.cpus),
               "--F1", "0.1", "--F2", "0.1", "--F3", "0.1", "--incE", "100", "-E", "100",
               "--domE", "100", "--incdomE", "100", "-A", str(out_sto), str(hmm), str(seqres_fasta)]  # fmt: skip
        _run(cmd, tool="hmmsearch", timeout=self.timeout)
        if not out_sto.exists():
            out_sto.write_text("# STOCKHOLM 1.0\n//\n")
        return out_sto


@dataclass(kw_only=True)
class Kalign:
    """Pairwise/multiple alignment, used to realign a template's SEQRES to its observed residues."""

    binary: Path
    timeout: float | None = None

    def align(self, sequences: list[str]) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.fasta", Path(tmp) / "out.afa"
            src.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(sequences)))
            _run([str(self.binary), "-i", str(src), "-o", str(dst), "-f", "fasta"], tool="kalign",
                 timeout=self.timeout)
            rows: list[list[str]] = []
            for line in dst.read_text().splitlines():
                if line.startswith(">"):
                    rows.append([])
                elif rows:
                    rows[-1].append(line.strip())
        return ["".join(r) for r in rows]
