"""ColabFold's MSA search with the MMseqs2 binary against local ColabFold databases.

The protocol is ColabFold's own (colabfold_search, Mirdita et al. 2022): a 3-iteration profile
search of UniRef30 at sensitivity 8, expanding each hit cluster to its members (expandaln),
realigning the members to the query profile (align), filtering (filterresult) and writing A3M
(result2msa); then the same with the last iteration's profile against the environmental
database (BFD/MGnify/MetaEuk/SMAG). The two A3M files carry ColabFold's names, ``uniref.a3m``
and ``bfd.mgnify30.metaeuk30.smag30.a3m``.

A ColabFold database ``<name>`` is the search target ``<name>`` (its ``<name>.idx`` index when
``createindex`` made one), the member sequences ``<name>_seq`` and the alignments of each
cluster to its members ``<name>_aln``; ``build_database`` makes that layout from a FASTA file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import UserError

UNIREF_A3M = "uniref.a3m"
ENV_A3M = "bfd.mgnify30.metaeuk30.smag30.a3m"
DB_PARTS = ("", "_seq", "_aln")  # the target, its member sequences, cluster -> member alignments
INSTALL_HINT = "install it with `apt-get install mmseqs2` (or conda: -c bioconda mmseqs2), or pass --mmseqs-binary"

# colabfold_search's settings with filtering on (its defaults).
SEARCH = ["--num-iterations", "3", "-a", "-s", "8", "-e", "0.1", "--max-seqs", "10000"]
EXPAND = ["--expansion-mode", "0", "-e", "inf", "--expand-filter-clusters", "1", "--max-seq-id", "0.95"]
ALIGN = ["-e", "10", "--max-accept", "100000", "--alt-ali", "10", "-a"]
FILTER = ["--qid", "0", "--qsc", "0.8", "--diff", "0", "--max-seq-id", "1.0", "--filter-min-enable", "100"]
MSA = ["--msa-format-mode", "6", "--filter-msa", "1", "--filter-min-enable", "1000", "--diff", "3000",
       "--qid", "0.0,0.2,0.4,0.6,0.8,1.0", "--qsc", "0", "--max-seq-id", "0.95"]  # fmt: skip


def find_mmseqs(given: str | os.PathLike | None = None) -> Path:
    if given is not None:
        path = Path(given)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UserError(f"--mmseqs-binary {path}: not an executable file; {INSTALL_HINT}")
        return path
    found = shutil.which("mmseqs")
    if found is None:
        raise UserError(f"mmseqs (MMseqs2) not found on PATH; {INSTALL_HINT}")
    return Path(found)


def check_database(folder: Path, name: str, flag: str) -> Path:
    """The database's prefix, after checking that the three MMseqs2 databases it needs exist."""
    prefix = Path(folder) / name
    missing = [prefix.name + part for part in DB_PARTS if not Path(f"{prefix}{part}.dbtype").is_file()]
    if missing:
        raise UserError(f"{flag}: {folder} lacks the MMseqs2 database(s) {', '.join(missing)} "
                        "(made by ColabFold's setup_databases.sh, or `fastfold` tests' build_database)")  # fmt: skip
    return prefix


def _run(binary: Path, *args: str | os.PathLike, threads: int | None = None, timeout: float | None = None) -> None:
    cmd = [str(binary), *map(str, args)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, MMSEQS_CALL_DEPTH="1")  # keeps the workflows' nested calls quiet
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise UserError(f"mmseqs {args[0]} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise UserError(f"mmseqs could not be started ({binary}): {exc.strerror}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        hint = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "no output")
        raise UserError(f"mmseqs {args[0]} failed with exit status {proc.returncode}: {hint.strip()}")


def read_a3m_db(path: Path) -> str:
    """The A3M of the (single) query from a result2msa database: entries end in a NUL byte."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return next((entry for entry in text.split("\x00") if entry.strip()), "")


@dataclass(kw_only=True)
class MMseqs2:
    """One query against UniRef30 and, if named, the environmental database (ColabFold's steps)."""

    binary: Path
    db_dir: Path
    uniref_db: str = "uniref30_2302_db"
    env_db: str | None = "colabfold_envdb_202108_db"
    threads: int = 2
    timeout: float | None = None

    def _expand_align_msa(self, work: Path, query_db: Path, profile: Path, result: Path, db: Path, out: Path) -> None:
        """Cluster hits -> members -> realigned to the profile -> filtered -> A3M database `out`."""
        mm, t = self.binary, self.threads
        _run(mm, "expandaln", query_db, f"{db}_seq", result, f"{db}_aln", work / "exp", *EXPAND, threads=t)
        _run(mm, "align", profile, f"{db}_seq", work / "exp", work / "exp_realign", *ALIGN, threads=t)
        _run(mm, "filterresult", query_db, f"{db}_seq", work / "exp_realign", work / "exp_filter", *FILTER, threads=t)
        _run(mm, "result2msa", query_db, f"{db}_seq", work / "exp_filter", out, *MSA, threads=t)
        for name in ("exp", "exp_realign", "exp_filter"):
            _run(mm, "rmdb", work / name)

    def search(self, name: str, sequence: str, out_dir: Path) -> list[Path]:
        """Write uniref.a3m (and the environmental A3M) for one query into ``out_dir``."""
        uniref = check_database(self.db_dir, self.uniref_db, "--mmseqs-db-dir")
        env = check_database(self.db_dir, self.env_db, "--mmseqs-db-dir") if self.env_db else None
        mm, t = self.binary, self.threads
        written = []
        with tempfile.TemporaryDirectory(prefix="mmseqs-") as tmp:
            work = Path(tmp)
            (work / "query.fasta").write_text(f">{name}\n{sequence}\n")
            _run(mm, "createdb", work / "query.fasta", work / "qdb")
            _run(mm, "search", work / "qdb", uniref, work / "res", work / "tmp", *SEARCH, threads=t, timeout=self.timeout)
            # The last iteration's query profile is what ColabFold realigns against.
            _run(mm, "mvdb", work / "tmp" / "latest" / "profile_1", work / "prof_res")
            _run(mm, "lndb", work / "qdb_h", work / "prof_res_h")
            self._expand_align_msa(work, work / "qdb", work / "prof_res", work / "res", uniref, work / "uniref_msa")
            written.append(self._publish(work / "uniref_msa", out_dir / UNIREF_A3M))
            if env is not None:
                _run(mm, "search", work / "prof_res", env, work / "res_env", work / "tmp_env", *SEARCH, threads=t,
                     timeout=self.timeout)  # fmt: skip
                profile = work / "tmp_env" / "latest" / "profile_1"
                self._expand_align_msa(work, work / "qdb", profile, work / "res_env", env, work / "env_msa")
                written.append(self._publish(work / "env_msa", out_dir / ENV_A3M))
        return written

    @staticmethod
    def _publish(db: Path, target: Path) -> Path:
        from ferryman.core.io import write_text

        text = read_a3m_db(db)
        if not text.startswith(">"):
            raise UserError(f"mmseqs result2msa wrote no alignment for the query ({db.name})")
        write_text(target, text if text.endswith("\n") else text + "\n")
        return target


def build_database(fasta: Path, prefix: Path, *, binary: Path | None = None, min_seq_id: float = 0.9,
                   index: bool = True, threads: int = 2) -> Path:  # fmt: skip
    """A ColabFold-layout database from a FASTA file: members (`_seq`), clusters of `min_seq_id`
    (linclust), their representatives as the search target and the cluster alignments (`_aln`);
    ``createindex`` when ``index``. The real UniRef30/envdb come from ColabFold's setup script."""
    mm = binary or find_mmseqs()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmseqs-db-") as tmp:
        work = Path(tmp)
        _run(mm, "createdb", fasta, f"{prefix}_seq")
        _run(mm, "linclust", f"{prefix}_seq", work / "clu", work / "tmp", "--min-seq-id", str(min_seq_id), threads=threads)
        _run(mm, "createsubdb", work / "clu", f"{prefix}_seq", prefix)
        _run(mm, "align", prefix, f"{prefix}_seq", work / "clu", f"{prefix}_aln", "-a", "-e", "inf", threads=threads)
        if index:
            _run(mm, "createindex", prefix, work / "tmp_index", threads=threads)
    return prefix
