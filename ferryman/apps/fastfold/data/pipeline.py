"""The per-target data pipeline: alignments (precomputed, searched or none), templates, features.

Alignment sources, in order: files for the target in `msa_dir` (`<msa_dir>/<name>/*.sto|*.a3m`
or `<msa_dir>/<name>.sto|.a3m`); else jackhmmer on UniRef90 and MGnify and hhblits on BFD/UniRef30
for the databases given; else the query alone (single-sequence mode). Every alignment used is
copied to `<target out>/msas/` under AF2's names (uniref90_hits.sto, mgnify_hits.sto,
bfd_uniref_hits.a3m).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferryman.apps.fastfold.data import tools
from ferryman.apps.fastfold.data.fasta import FastaTarget
from ferryman.apps.fastfold.data.features import FeatureDict, make_features
from ferryman.apps.fastfold.data.msa import (
    Msa,
    check_query,
    merge_and_deduplicate,
    read_msa,
    single_sequence_msa,
)
from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path


@dataclass(kw_only=True)
class DataConfig:
    """Where alignments and templates come from; AF2's hit limits (uniref90 10000, mgnify 501)."""

    msa_dir: Path | None = None
    uniref90_db: Path | None = None
    mgnify_db: Path | None = None
    bfd_db: Path | None = None
    uniref30_db: Path | None = None
    template_mmcif_dir: Path | None = None
    pdb70_db: Path | None = None  # hhsearch database prefix; without it templates use hmmsearch
    jackhmmer_binary: Path | None = None
    hhblits_binary: Path | None = None
    hmmsearch_binary: Path | None = None
    hmmbuild_binary: Path | None = None
    hhsearch_binary: Path | None = None
    kalign_binary: Path | None = None
    uniref90_max_hits: int = 10000
    mgnify_max_hits: int = 501
    max_templates: int = 4
    hhblits_n_iter: int = 3  # AF2's hhblits -n 3
    jackhmmer_n_iter: int = 1  # AF2's jackhmmer -N 1
    cpus: int = 2

    def check(self) -> None:
        """Fail before any work if a named database, folder or needed binary is missing."""
        for name in ("msa_dir", "template_mmcif_dir"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise UserError(f"--{name.replace('_', '-')}: {value} is not a folder")
        for name in ("uniref90_db", "mgnify_db"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UserError(f"--{name.replace('_', '-')}: {value} not found")
        for name in ("bfd_db", "uniref30_db"):  # HH-suite databases are path prefixes (<prefix>_a3m.ffdata ...)
            value = getattr(self, name)
            if value is not None and not any(Path(value).parent.glob(Path(value).name + "*")):
                raise UserError(f"--{name.replace('_', '-')}: no HH-suite database files start with {value}")
        if self.uniref90_db or self.mgnify_db:
            tools.find_binary("jackhmmer", self.jackhmmer_binary)
        if self.bfd_db or self.uniref30_db:
            tools.find_binary("hhblits", self.hhblits_binary)
        if self.pdb70_db is not None and self.template_mmcif_dir is None:
            raise UserError("--pdb70-db needs --template-mmcif-dir (the structures its hits point to)")
        if self.pdb70_db is not None:
            if not any(Path(self.pdb70_db).parent.glob(Path(self.pdb70_db).name + "*")):
                raise UserError(f"--pdb70-db: no HH-suite database files start with {self.pdb70_db}")
            tools.find_binary("hhsearch", self.hhsearch_binary)
        elif self.template_mmcif_dir:
            tools.find_binary("hmmsearch", self.hmmsearch_binary)
            tools.find_binary("hmmbuild", self.hmmbuild_binary)


def precomputed_alignments(msa_dir: Path, name: str) -> list[Path]:
    folder = msa_dir / name
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".sto", ".a3m") and not p.name.startswith("pdb_hits"))
    else:
        files = [p for p in (msa_dir / f"{name}.sto", msa_dir / f"{name}.a3m") if p.is_file()]
    return files


def _search(cfg: DataConfig, sequence: str, msas_out: Path) -> list[Path]:
    """Run the configured searches; results land in `msas_out` only once complete."""
    produced = []
    with tempfile.TemporaryDirectory(dir=msas_out) as tmp:
        tmp_dir = Path(tmp)
        jobs = [("uniref90_hits.sto", cfg.uniref90_db), ("mgnify_hits.sto", cfg.mgnify_db)]
        for filename, db in jobs:
            if db is None:
                continue
            binary = tools.find_binary("jackhmmer", cfg.jackhmmer_binary)
            runner = tools.Jackhmmer(binary=binary, database=Path(db), n_iter=cfg.jackhmmer_n_iter, cpus=cfg.cpus)
            produced.append(runner.search(sequence, tmp_dir / filename))
        hh_dbs = [Path(p) for p in (cfg.bfd_db, cfg.uniref30_db) if p is not None]
        if hh_dbs:
            binary = tools.find_binary("hhblits", cfg.hhblits_binary)
            runner = tools.HHBlits(binary=binary, databases=hh_dbs, n_iter=cfg.hhblits_n_iter, cpus=cfg.cpus)
            produced.append(runner.search(sequence, tmp_dir / "bfd_uniref_hits.a3m"))
        final = []
        for path in produced:
            target = msas_out / path.name
            shutil.move(str(path), target)
            final.append(target)
    return final


def _limit(path: Path, cfg: DataConfig) -> int | None:
    """AF2 keeps the first 10000 UniRef90 and 501 MGnify hits."""
    if path.name.startswith("uniref90"):
        return cfg.uniref90_max_hits
    if path.name.startswith("mgnify"):
        return cfg.mgnify_max_hits
    return None


def gather_alignments(target: FastaTarget, cfg: DataConfig, msas_out: Path) -> tuple[list[Msa], list[Path], str]:
    """(alignments, their files in msas_out, mode) for one target; mode names the source."""
    msas_out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    mode = "single_sequence"
    if cfg.msa_dir is not None:
        found = precomputed_alignments(Path(cfg.msa_dir), target.name)
        if not found and not (cfg.uniref90_db or cfg.mgnify_db or cfg.bfd_db or cfg.uniref30_db):
            raise UserError(
                f"--msa-dir {cfg.msa_dir}: no alignment for {target.record_id!r}; expected "
                f"{cfg.msa_dir}/{target.name}/*.sto|*.a3m or {cfg.msa_dir}/{target.name}.a3m"
            )
        for path in found:
            copy = msas_out / path.name
            if path.resolve() != copy.resolve():
                with atomic_path(copy) as tmp:
                    shutil.copyfile(path, tmp)
            files.append(copy)
        mode = "precomputed" if found else mode
    if not files and (cfg.uniref90_db or cfg.mgnify_db or cfg.bfd_db or cfg.uniref30_db):
        files = _search(cfg, target.sequence, msas_out)
        mode = "searched"
    msas = []
    for path in files:
        msa = read_msa(path, max_seqs=_limit(path, cfg))
        check_query(msa, target.sequence, source=str(path))
        msas.append(msa)
    if not msas:
        msas = [single_sequence_msa(target.sequence, target.record_id)]
    return msas, files, mode


def _template_searcher(cfg: DataConfig) -> tools.Hmmsearch | tools.HHSearch:
    if cfg.pdb70_db is not None:
        return tools.HHSearch(binary=tools.find_binary("hhsearch", cfg.hhsearch_binary), databases=[Path(cfg.pdb70_db)])
    return tools.Hmmsearch(
        binary=tools.find_binary("hmmsearch", cfg.hmmsearch_binary),
        hmmbuild_binary=tools.find_binary("hmmbuild", cfg.hmmbuild_binary),
        cpus=cfg.cpus,
    )


def _kalign(cfg: DataConfig) -> tools.Kalign | None:
    """kalign is optional: without it, hhsearch hits that disagree with the structure are skipped."""
    try:
        return tools.Kalign(binary=tools.find_binary("kalign", cfg.kalign_binary))
    except UserError:
        return None


def run_pipeline(target: FastaTarget, cfg: DataConfig, target_out: Path) -> tuple[FeatureDict, dict]:
    """Raw AF2 features for one target and a small report (alignment sources, depths, templates)."""
    msas, files, mode = gather_alignments(target, cfg, target_out / "msas")
    templates = None
    if cfg.template_mmcif_dir is not None:
        from ferryman.apps.fastfold.data.templates import search_templates

        templates = search_templates(
            target.sequence, merge_and_deduplicate(msas), folder=Path(cfg.template_mmcif_dir),
            searcher=_template_searcher(cfg), max_hits=cfg.max_templates, kalign=_kalign(cfg),
            hits_out=target_out / "msas" / ("pdb_hits.hhr" if cfg.pdb70_db else "pdb_hits.sto"),
        )  # fmt: skip
    features = make_features(target.sequence, target.record_id, msas, templates)
    report = {
        "msa_mode": mode,
        "alignment_files": [p.name for p in files],
        "alignment_depths": [len(m) for m in msas],
        "msa_depth_deduplicated": int(features["msa"].shape[0]),
        "num_templates": int(features["template_aatype"].shape[0]),
        "template_names": [n.decode() for n in features["template_domain_names"]],
    }
    return features, report
