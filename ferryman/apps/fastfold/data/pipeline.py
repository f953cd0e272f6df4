"""The per-target data pipeline: alignments (precomputed, searched or none), templates, features.

Alignment sources (`--msa-mode`): jackhmmer on UniRef90/MGnify and hhblits on BFD/UniRef30 (AF2's
tools), MMseqs2 on ColabFold's UniRef30 and environmental databases (ColabFold's protocol), or
the query alone (`single-sequence`, which must be asked for: a run without any MSA source stops).
Alignments already on disk come first: `--use-precomputed-msas` reads `<out>/<target>/msas/` that
an earlier run (or `fastfold msa`) wrote, `--msa-dir` reads `<msa_dir>/<name>/*.sto|*.a3m` or
`<msa_dir>/<name>.sto|.a3m`. Every alignment used is copied to `<target out>/msas/` under AF2's
or ColabFold's names (uniref90_hits.sto, mgnify_hits.sto, bfd_uniref_hits.a3m, uniref.a3m, ...).
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

MSA_MODES = ("jackhmmer", "mmseqs2", "single-sequence")
NO_MSA_SOURCE = (
    "no MSA source: give --msa-mode mmseqs2 with --mmseqs-db-dir (ColabFold's databases), jackhmmer/hhblits "
    "databases (--uniref90-db, --mgnify-db, --bfd-db), alignments (--msa-dir, --use-precomputed-msas), or "
    "--msa-mode single-sequence to predict from the sequence alone (far less accurate on most proteins)"
)


@dataclass(kw_only=True)
class DataConfig:
    """Where alignments and templates come from; AF2's hit limits (uniref90 10000, mgnify 501)."""

    msa_mode: str | None = None  # jackhmmer | mmseqs2 | single-sequence; None: from the sources given
    use_precomputed_msas: bool = False  # read <out>/<target>/msas/ of an earlier run (AF2's flag)
    msa_dir: Path | None = None
    uniref90_db: Path | None = None
    mgnify_db: Path | None = None
    bfd_db: Path | None = None
    uniref30_db: Path | None = None
    mmseqs_db_dir: Path | None = None  # folder of ColabFold's MMseqs2 databases
    mmseqs_uniref_db: str = "uniref30_2302_db"
    mmseqs_env_db: str | None = "colabfold_envdb_202108_db"  # None or "": UniRef30 only
    template_mmcif_dir: Path | None = None
    max_template_date: str | None = None  # YYYY-MM-DD: templates released later are not used
    obsolete_pdbs_path: Path | None = None  # wwPDB obsolete.dat: obsolete template ids -> replacements
    pdb70_db: Path | None = None  # hhsearch database prefix; without it templates use hmmsearch
    jackhmmer_binary: Path | None = None
    hhblits_binary: Path | None = None
    hmmsearch_binary: Path | None = None
    hmmbuild_binary: Path | None = None
    hhsearch_binary: Path | None = None
    kalign_binary: Path | None = None
    mmseqs_binary: Path | None = None
    uniprot_db: Path | None = None  # multimer: UniProt FASTA searched per chain for MSA pairing (AF2's)
    uniref90_max_hits: int = 10000
    uniprot_max_hits: int = 50000  # AF2 multimer's max_uniprot_hits
    mgnify_max_hits: int = 501
    max_templates: int = 4
    hhblits_n_iter: int = 3  # AF2's hhblits -n 3
    jackhmmer_n_iter: int = 1  # AF2's jackhmmer -N 1
    cpus: int = 2

    def jackhmmer_dbs(self) -> bool:
        return any(getattr(self, k) is not None for k in ("uniref90_db", "mgnify_db", "bfd_db", "uniref30_db"))

    def search_mode(self) -> str | None:
        """The search to run when no alignment is on disk: jackhmmer, mmseqs2, single-sequence or None."""
        if self.msa_mode is not None:
            return self.msa_mode
        if self.mmseqs_db_dir is not None:
            return "mmseqs2"
        return "jackhmmer" if self.jackhmmer_dbs() else None

    def check(self) -> None:
        """Fail before any work if a named database, folder or needed binary is missing."""
        if self.msa_mode is not None and self.msa_mode not in MSA_MODES:
            raise UserError(f"--msa-mode {self.msa_mode!r}: choose one of {', '.join(MSA_MODES)}")
        mode = self.search_mode()
        if mode is None and self.msa_dir is None and not self.use_precomputed_msas:
            raise UserError(NO_MSA_SOURCE)
        if mode == "jackhmmer" and not self.jackhmmer_dbs():
            raise UserError("--msa-mode jackhmmer needs a database: --uniref90-db, --mgnify-db, --bfd-db or --uniref30-db")
        if mode == "mmseqs2":
            self._check_mmseqs()
        self._check_paths()
        self._check_templates()

    def _check_mmseqs(self) -> None:
        from ferryman.apps.fastfold.data import mmseqs

        if self.mmseqs_db_dir is None:
            raise UserError("--msa-mode mmseqs2 needs --mmseqs-db-dir, the folder of ColabFold's databases "
                            f"({self.mmseqs_uniref_db}, {self.mmseqs_env_db})")  # fmt: skip
        if not Path(self.mmseqs_db_dir).is_dir():
            raise UserError(f"--mmseqs-db-dir: {self.mmseqs_db_dir} is not a folder")
        mmseqs.check_database(Path(self.mmseqs_db_dir), self.mmseqs_uniref_db, "--mmseqs-db-dir")
        if self.mmseqs_env_db:
            mmseqs.check_database(Path(self.mmseqs_db_dir), self.mmseqs_env_db, "--mmseqs-db-dir")
        mmseqs.find_mmseqs(self.mmseqs_binary)

    def _check_paths(self) -> None:
        for name in ("msa_dir", "template_mmcif_dir"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise UserError(f"--{name.replace('_', '-')}: {value} is not a folder")
        for name in ("uniref90_db", "mgnify_db", "uniprot_db"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UserError(f"--{name.replace('_', '-')}: {value} not found")
        if self.uniprot_db is not None:
            tools.find_binary("jackhmmer", self.jackhmmer_binary)
        for name in ("bfd_db", "uniref30_db"):  # HH-suite databases are path prefixes (<prefix>_a3m.ffdata ...)
            value = getattr(self, name)
            if value is not None and not any(Path(value).parent.glob(Path(value).name + "*")):
                raise UserError(f"--{name.replace('_', '-')}: no HH-suite database files start with {value}")
        if self.search_mode() == "jackhmmer" and (self.uniref90_db or self.mgnify_db):
            tools.find_binary("jackhmmer", self.jackhmmer_binary)
        if self.search_mode() == "jackhmmer" and (self.bfd_db or self.uniref30_db):
            tools.find_binary("hhblits", self.hhblits_binary)

    def _check_templates(self) -> None:
        from ferryman.apps.fastfold.data.template_index import parse_date

        if self.max_template_date is not None:
            parse_date(self.max_template_date)
        if self.obsolete_pdbs_path is not None and not Path(self.obsolete_pdbs_path).is_file():
            raise UserError(f"--obsolete-pdbs-path: {self.obsolete_pdbs_path} not found")
        if self.pdb70_db is not None and self.template_mmcif_dir is None:
            raise UserError("--pdb70-db needs --template-mmcif-dir (the structures its hits point to)")
        if self.pdb70_db is not None:
            if not any(Path(self.pdb70_db).parent.glob(Path(self.pdb70_db).name + "*")):
                raise UserError(f"--pdb70-db: no HH-suite database files start with {self.pdb70_db}")
            tools.find_binary("hhsearch", self.hhsearch_binary)
        elif self.template_mmcif_dir:
            tools.find_binary("hmmsearch", self.hmmsearch_binary)
            tools.find_binary("hmmbuild", self.hmmbuild_binary)

    def hit_filter(self):
        from ferryman.apps.fastfold.data.template_index import HitFilter, parse_date, read_obsolete

        return HitFilter(
            max_date=parse_date(self.max_template_date) if self.max_template_date else None,
            obsolete=read_obsolete(Path(self.obsolete_pdbs_path)) if self.obsolete_pdbs_path else {},
        )


# Merge order (first copy of a sequence wins): AF2's monomer pipeline (UniRef90, BFD, MGnify) and
# ColabFold's (UniRef30, then the environmental database); other names after, alphabetically.
ALIGNMENT_ORDER = ("uniref90_hits", "bfd_uniref_hits", "mgnify_hits", "uniref", "bfd.mgnify30.metaeuk30.smag30")


def in_merge_order(files: list[Path]) -> list[Path]:
    def key(path: Path) -> tuple[int, str]:
        stem = path.name.rsplit(".", 1)[0]
        return (ALIGNMENT_ORDER.index(stem) if stem in ALIGNMENT_ORDER else len(ALIGNMENT_ORDER), path.name)

    return sorted(files, key=key)


def precomputed_alignments(msa_dir: Path, name: str) -> list[Path]:
    """<msa_dir>/<name>/msas/ (an earlier run's output folder), <msa_dir>/<name>/, or
    <msa_dir>/<name>.sto|.a3m; template hits (pdb_hits.*) are not alignments, and a multimer
    chain's UniProt hits (uniprot_hits.*) are for pairing only, as in AF2."""
    folder = msa_dir / name
    if (folder / "msas").is_dir():
        folder = folder / "msas"
    if folder.is_dir():
        skip = ("pdb_hits", "uniprot_hits")
        files = [p for p in folder.iterdir() if p.suffix in (".sto", ".a3m") and not p.name.startswith(skip)]
    else:
        files = [p for p in (msa_dir / f"{name}.sto", msa_dir / f"{name}.a3m") if p.is_file()]
    return in_merge_order(files)


def _search(cfg: DataConfig, target: FastaTarget, msas_out: Path) -> list[Path]:
    """Run the configured searches; results land in `msas_out` only once complete."""
    produced = []
    with tempfile.TemporaryDirectory(dir=msas_out) as tmp:
        tmp_dir = Path(tmp)
        if cfg.search_mode() == "mmseqs2":
            from ferryman.apps.fastfold.data.mmseqs import MMseqs2, find_mmseqs

            runner = MMseqs2(binary=find_mmseqs(cfg.mmseqs_binary), db_dir=Path(cfg.mmseqs_db_dir),
                             uniref_db=cfg.mmseqs_uniref_db, env_db=cfg.mmseqs_env_db or None, threads=cfg.cpus)  # fmt: skip
            produced += runner.search(target.name, target.sequence, tmp_dir)
        jobs = [("uniref90_hits.sto", cfg.uniref90_db), ("mgnify_hits.sto", cfg.mgnify_db)]
        for filename, db in jobs if cfg.search_mode() == "jackhmmer" else []:
            if db is None:
                continue
            binary = tools.find_binary("jackhmmer", cfg.jackhmmer_binary)
            runner = tools.Jackhmmer(binary=binary, database=Path(db), n_iter=cfg.jackhmmer_n_iter, cpus=cfg.cpus)
            produced.append(runner.search(target.sequence, tmp_dir / filename))
        hh_dbs = [Path(p) for p in (cfg.bfd_db, cfg.uniref30_db) if p is not None]
        if hh_dbs and cfg.search_mode() == "jackhmmer":
            binary = tools.find_binary("hhblits", cfg.hhblits_binary)
            runner = tools.HHBlits(binary=binary, databases=hh_dbs, n_iter=cfg.hhblits_n_iter, cpus=cfg.cpus)
            produced.append(runner.search(target.sequence, tmp_dir / "bfd_uniref_hits.a3m"))
        final = []
        for path in in_merge_order(produced):
            final_path = msas_out / path.name
            shutil.move(str(path), final_path)
            final.append(final_path)
    return final


def _limit(path: Path, cfg: DataConfig) -> int | None:
    """AF2 keeps the first 10000 UniRef90 and 501 MGnify hits."""
    if path.name.startswith("uniref90"):
        return cfg.uniref90_max_hits
    if path.name.startswith("mgnify"):
        return cfg.mgnify_max_hits
    return None


def precomputed_for(target: FastaTarget, cfg: DataConfig, previous_msas: Path | None) -> tuple[list[Path], str]:
    """Alignment files already on disk for the target, and which flag found them."""
    if cfg.use_precomputed_msas and previous_msas is not None and previous_msas.is_dir():
        found = precomputed_alignments(previous_msas.parent, previous_msas.name)
        if found:
            return found, "--use-precomputed-msas"
    if cfg.msa_dir is not None:
        found = precomputed_alignments(Path(cfg.msa_dir), target.name)
        if found:
            return found, "--msa-dir"
    return [], ""


def check_target_sources(target: FastaTarget, cfg: DataConfig, previous_msas: Path | None) -> None:
    """Without a search to fall back on, a target whose alignments are not on disk cannot run."""
    if cfg.search_mode() is not None or precomputed_for(target, cfg, previous_msas)[0]:
        return
    places = [f"{previous_msas}/*.sto|*.a3m"] if cfg.use_precomputed_msas and previous_msas else []
    if cfg.msa_dir is not None:
        places += [f"{cfg.msa_dir}/{target.name}[/msas]/*.sto|*.a3m", f"{cfg.msa_dir}/{target.name}.a3m"]
    flag = "--msa-dir " + str(cfg.msa_dir) if cfg.msa_dir is not None else "--use-precomputed-msas"
    raise UserError(f"{flag}: no alignment for {target.record_id!r}; expected {' or '.join(places)} "
                    "(or give --msa-mode with its databases)")  # fmt: skip


def gather_alignments(target: FastaTarget, cfg: DataConfig, msas_out: Path,
                      previous_msas: Path | None = None) -> tuple[list[Msa], list[Path], str]:  # fmt: skip
    """(alignments, their files in msas_out, mode) for one target; mode names the source.

    ``previous_msas`` is the target's msas/ folder of an earlier run (`--use-precomputed-msas`).
    Parse errors name the user's file, not its copy in msas_out.
    """
    msas_out.mkdir(parents=True, exist_ok=True)
    found, _ = precomputed_for(target, cfg, previous_msas)
    sources: list[tuple[Path, Path]] = []  # (file read, copy in msas_out)
    if not found and cfg.search_mode() is None:
        check_target_sources(target, cfg, previous_msas)
    mode = "precomputed" if found else cfg.search_mode()
    for path in found:
        copy = msas_out / path.name
        if path.resolve() != copy.resolve():
            with atomic_path(copy) as tmp:
                shutil.copyfile(path, tmp)
        sources.append((path, copy))
    if not found and mode in ("jackhmmer", "mmseqs2"):
        sources = [(p, p) for p in _search(cfg, target, msas_out)]
    msas = []
    for original, _copy in sources:
        msa = read_msa(original, max_seqs=_limit(original, cfg))
        check_query(msa, target.sequence, source=str(original))
        msas.append(msa)
    if not msas:
        msas = [single_sequence_msa(target.sequence, target.record_id)]
    return msas, [copy for _, copy in sources], mode


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


def run_pipeline(target: FastaTarget, cfg: DataConfig, target_out: Path, *, previous_msas: Path | None = None,
                 template_index=None) -> tuple[FeatureDict, dict]:  # fmt: skip
    """Raw AF2 features for one target and a small report (alignment sources, depths, templates).

    ``template_index``: the template folder's index, loaded once per run by the caller.
    """
    msas, files, mode = gather_alignments(target, cfg, target_out / "msas", previous_msas)
    templates = None
    if cfg.template_mmcif_dir is not None:
        from ferryman.apps.fastfold.data.templates import search_templates

        templates = search_templates(
            target.sequence, merge_and_deduplicate(msas), folder=Path(cfg.template_mmcif_dir),
            searcher=_template_searcher(cfg), max_hits=cfg.max_templates, kalign=_kalign(cfg),
            hits_out=target_out / "msas" / ("pdb_hits.hhr" if cfg.pdb70_db else "pdb_hits.sto"),
            index=template_index, hit_filter=cfg.hit_filter(),
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
