"""MSA search: ColabFold's MMseqs2 protocol against AlphaFold2's jackhmmer, same query, same database.

    python benchmarks/msa_search.py                      # 100,000 sequences, HBB_HUMAN as the query
    python benchmarks/msa_search.py --num-seqs 300000 --query data/fastfold/villin.fasta

The database is synthetic but made from real proteins: every sequence is one of the shipped
sequences (the 45 globins of data/fastfold/seqdb, villin, HBB) copied with seeded mutation, at a
rate drawn uniformly from 5% to 100% of positions per sequence (a substituted residue is drawn
from the shipped sequences' amino-acid composition; 1 in 20 mutations is an insertion or a
deletion instead). Close homologues, remote ones and effectively random sequences of natural
composition are all present, as in a real database; the seed makes it the same in every run.

Both tools run in this one process's run, on the same FASTA, with the same thread count:

- jackhmmer with AF2's flags (-N 1, E-value 1e-4 and its F1/F2/F3 filters), as the AF2 pipeline
  runs it on UniRef90 (``ferryman.apps.fastfold.data.tools.Jackhmmer``);
- MMseqs2 with ColabFold's search protocol (``ferryman.apps.fastfold.data.mmseqs.MMseqs2``: a
  3-iteration profile search at sensitivity 8, expandaln, align, filterresult, result2msa) on the
  same sequences, clustered at 90% identity and indexed (``build_database``: createdb, linclust,
  createindex). The one-off database build is timed separately.

Reported: search wall time, database build time, hits (sequences in the alignment other than the
query), hits both found, and jackhmmer's time over MMseqs2's. JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

from ferryman.apps.fastfold.data import mmseqs, tools
from ferryman.apps.fastfold.data.fasta import read_fasta
from ferryman.apps.fastfold.data.msa import read_msa

DATA = Path(__file__).resolve().parents[1] / "data" / "fastfold"
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def shipped_sequences() -> list[str]:
    seqs = [t.sequence for f in ("seqdb/globins45.fa", "villin.fasta", "hbb_human.fasta") for t in read_fasta(DATA / f)]
    return [s for s in seqs if set(s) <= set(AMINO)]


def mutate(parent: np.ndarray, rate: float, rng: np.random.Generator, composition: np.ndarray) -> str:
    """Each position mutates with probability ``rate``: mostly a substitution, 1 in 20 an indel."""
    n = len(parent)
    mutated = rng.random(n) < rate
    kind = rng.random(n)
    substitutes = np.searchsorted(composition, rng.random(n))  # composition: cumulative frequencies
    out = np.where(mutated & (kind >= 0.05), substitutes, parent)  # substitutions
    keep = ~(mutated & (kind < 0.025))  # deletions
    inserted = mutated & (kind >= 0.025) & (kind < 0.05)  # an insertion after the residue
    extra = np.searchsorted(composition, rng.random(n))
    pieces = np.stack([out, np.where(inserted, extra, -1)], axis=1).ravel()  # [2 * n]
    pieces = pieces[np.repeat(keep, 2) | (np.arange(2 * n) % 2 == 1)]
    letters = np.frombuffer(AMINO.encode(), np.uint8)
    seq = letters[pieces[pieces >= 0]].tobytes().decode()
    return seq or AMINO[int(parent[0])]


def synthetic_database(path: Path, num_seqs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    parents = [np.array([AMINO.index(a) for a in s]) for s in shipped_sequences()]
    counts = np.bincount(np.concatenate(parents), minlength=20).astype(np.float64)
    composition = np.minimum(np.cumsum(counts / counts.sum()), 1.0)
    composition[-1] = 1.0
    rates = rng.uniform(0.05, 1.0, num_seqs)
    residues = 0
    with open(path, "w") as handle:
        for i in range(num_seqs):
            parent = parents[int(rng.integers(len(parents)))]
            seq = mutate(parent, float(rates[i]), rng, composition)
            residues += len(seq)
            handle.write(f">seq{i:07d} rate={rates[i]:.2f}\n{seq}\n")
    return {"num_seqs": num_seqs, "residues": residues, "parents": len(parents), "seed": seed}


def hit_names(msa_path: Path) -> set[str]:
    """Distinct database sequences in an alignment, query excluded ('seq0000123/5-140' -> 'seq0000123')."""
    msa = read_msa(msa_path)
    return {d.split()[0].split("/")[0] for d in msa.descriptions[1:] if d.startswith("seq")}


def run(args) -> dict:
    target = read_fasta(args.query)[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fasta = work / "db.fasta"
    t0 = time.perf_counter()
    db_info = synthetic_database(fasta, args.num_seqs, args.seed)
    db_info["make_fasta_s"] = time.perf_counter() - t0
    rows = []

    jack = tools.Jackhmmer(binary=tools.find_binary("jackhmmer"), database=fasta, cpus=args.threads)
    t0 = time.perf_counter()
    jack.search(target.sequence, work / "uniref90_hits.sto")
    jack_s = time.perf_counter() - t0
    jack_hits = hit_names(work / "uniref90_hits.sto")
    rows.append({"tool": "jackhmmer (AF2 flags)", "search_s": jack_s, "db_build_s": 0.0, "hits": len(jack_hits)})

    binary = mmseqs.find_mmseqs()
    t0 = time.perf_counter()
    mmseqs.build_database(fasta, work / "db" / "synthetic_db", binary=binary, threads=args.threads)
    build_s = time.perf_counter() - t0
    runner = mmseqs.MMseqs2(binary=binary, db_dir=work / "db", uniref_db="synthetic_db", env_db=None, threads=args.threads)
    (work / "mmseqs_out").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    (a3m,) = runner.search(target.name, target.sequence, work / "mmseqs_out")
    mm_s = time.perf_counter() - t0
    mm_hits = hit_names(a3m)
    rows.append({"tool": "MMseqs2 (ColabFold protocol)", "search_s": mm_s, "db_build_s": build_s, "hits": len(mm_hits)})
    for row in rows:
        row["hits_found_by_both"] = len(jack_hits & mm_hits)
        row["jackhmmer_time_ratio"] = jack_s / row["search_s"]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"query {target.record_id} ({len(target.sequence)} aa); database {db_info['num_seqs']:,} sequences, "
          f"{db_info['residues']:,} residues; {args.threads} threads; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    common.print_table(rows, ["tool", "search_s", "db_build_s", "hits", "hits_found_by_both", "jackhmmer_time_ratio"])
    env = {"device": f"cpu: {platform.processor() or 'cpu'}", "cpu_count": os.cpu_count(), "threads": args.threads,
           "loadavg_at_end": os.getloadavg(), "python": sys.version.split()[0],
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip
    return {"benchmark": "msa_search", "environment": env, "query": target.record_id, "query_length": len(target.sequence),
            "database": db_info, "rows": rows}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=100_000, help="sequences in the synthetic database")
    parser.add_argument("--query", type=Path, default=DATA / "hbb_human.fasta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the database goes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the database and alignments")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/msa_search-cpu.json"))
    args = parser.parse_args(argv)
    result = run(args)
    print(f"\nwrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
