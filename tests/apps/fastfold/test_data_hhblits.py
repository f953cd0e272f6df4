"""Real hhblits on the small HH-suite database shipped in data/ (the 45 globins)."""

import shutil
from pathlib import Path

import pytest

from ferryman.apps.fastfold.data import tools
from ferryman.apps.fastfold.data.fasta import read_fasta
from ferryman.apps.fastfold.data.pipeline import DataConfig, gather_alignments

DATA = Path(__file__).parents[3] / "data" / "fastfold"
HHDB = DATA / "hhdb" / "globins"  # built from seqdb/globins45.fa, see data/fastfold/README.md

pytestmark = pytest.mark.skipif(shutil.which("hhblits") is None, reason="needs HH-suite's hhblits")


def test_shipped_hh_database_lists_every_globin():
    names = [line.split()[0] for line in Path(f"{HHDB}_a3m.ffindex").read_text().splitlines()]
    cs219 = [line.split()[0] for line in Path(f"{HHDB}_cs219.ffindex").read_text().splitlines()]
    assert len(names) == 45 and names == cs219


def test_real_hhblits_gives_an_a3m_msa(tmp_path):
    query = read_fasta(DATA / "hbb_human.fasta")[0]
    cfg = DataConfig(bfd_db=HHDB, hhblits_n_iter=1)  # AF2 runs 3 iterations; 1 keeps CI quick
    cfg.check()
    msas, files, mode = gather_alignments(query, cfg, tmp_path / "msas")
    assert mode == "jackhmmer" and [f.name for f in files] == ["bfd_uniref_hits.a3m"]
    (msa,) = msas
    assert msa.sequences[0] == query.sequence and len(msa) > 10
    assert all(len(s) == len(query.sequence) for s in msa.sequences)
    assert "MYG_" in " ".join(msa.descriptions)  # distant homologues (myoglobins) found by HMM-HMM search


def test_hhblits_failure_is_one_line(tmp_path):
    runner = tools.HHBlits(binary=tools.find_binary("hhblits"), databases=[tmp_path / "nothing"])
    with pytest.raises(tools.UserError, match=r"hhblits: database .* not found"):
        runner.search("ACDEFGHIK", tmp_path / "out.a3m")
