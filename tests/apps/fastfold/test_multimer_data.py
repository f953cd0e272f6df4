"""The multimer data side: complexes from FASTA (AF2 files, ColabFold's A:B), the per-chain
pipeline with a real jackhmmer search of the shipped globins for pairing, chain order (AF2's
entity grouping inside, FASTA order in the files) and the in-model MSA sampling.
(Pairing and merging against AF2's own code: parity/test_multimer_pipeline.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data import multimer_transforms as mt
from ferryman.apps.fastfold.data.fasta import CHAIN_IDS, read_complexes, read_fastas
from ferryman.apps.fastfold.data.multimer_pipeline import run_multimer_pipeline
from ferryman.apps.fastfold.data.pipeline import DataConfig
from ferryman.apps.fastfold.output.complex import fasta_order
from ferryman.core.errors import UserError

DATA = Path(__file__).parents[3] / "data" / "fastfold"
GLOBINS = DATA / "seqdb" / "globins45.fa"
X, Y = "LSDEDFKAVFGMTRSAFANL", "PLWKQQHLKKEKGLF"


def _fasta(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_file_is_one_complex_and_a_colon_record_is_another(tmp_path):
    af2 = _fasta(tmp_path, "pair.fasta", f">first protein\n{X}\n>second\n{Y}\n")
    colabfold = _fasta(tmp_path, "jobs.fasta", f">job1\n{X}:{Y}:{X}\n>job2\n{Y}\n")
    targets = read_complexes([af2, colabfold])
    assert [t.name for t in targets] == ["pair", "job1", "job2"]
    assert [(c.chain_id, c.sequence, c.description) for c in targets[0].chains] == [
        ("A", X, "first protein"), ("B", Y, "second")]  # fmt: skip
    assert [c.chain_id for c in targets[1].chains] == ["A", "B", "C"] and targets[1].sequence == f"{X}:{Y}:{X}"
    assert len(targets[2].chains) == 1
    assert len(read_complexes([_fasta(tmp_path, "62.fasta", "".join(f">c{i}\nACDE\n" for i in range(62)))])[0].chains) == 62


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f">a\n{X}\n>b\n\n", "record 2 ('b'): the sequence is empty"),
        (f">job\n{X}::{Y}\n", "record 1 ('job') chain 2 of 3: the sequence is empty"),
        ("".join(f">c{i}\nACDE\n" for i in range(63)), "has 63 chains; at most 62"),
        (f">protein\n{X}\n>dna\n{'ACGT' * 6}\n", "record 2 ('dna'): this looks like a DNA/RNA sequence"),
    ],
    ids=["empty_chain", "empty_colon_chain", "63_chains", "dna_chain"],
)
def test_bad_complexes_fail_naming_the_chain(tmp_path, text, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        read_complexes([_fasta(tmp_path, "bad.fasta", text)])


def test_colon_without_the_multimer_preset_says_how(tmp_path):
    with pytest.raises(UserError, match=r"separates the chains of a complex.*--model-preset multimer"):
        read_fastas([_fasta(tmp_path, "ab.fasta", f">ab\n{X}:{Y}\n")])
    assert CHAIN_IDS[:3] == "ABC" and len(CHAIN_IDS) == 62


@pytest.fixture(scope="module")
def dimer(tmp_path_factory):
    if shutil.which("jackhmmer") is None:
        pytest.skip("needs jackhmmer (apt-get install hmmer)")
    out = tmp_path_factory.mktemp("dimer")
    target = read_complexes([DATA / "dimer.fasta"])[0]
    cfg = DataConfig(uniref90_db=GLOBINS, uniprot_db=GLOBINS)
    cfg.check()
    raw, report = run_multimer_pipeline(target, cfg, out)
    return target, raw, report, out


def test_per_chain_searches_pairing_and_af2_layout(dimer):
    _, raw, report, out = dimer
    for chain in ("A", "B"):
        assert sorted(p.name for p in (out / "msas" / chain).iterdir()) == ["uniprot_hits.sto", "uniref90_hits.sto"]
        assert report["chains"][chain]["pairing_depth"] > 40
    chain_map = json.loads((out / "msas" / "chain_id_map.json").read_text())
    assert chain_map["B"]["description"].startswith("HBE_PONPY")
    residues = raw["msa_mask"] * (raw["msa"] != 21)
    spans = np.stack([residues[:, raw["asym_id"] == a].any(-1) for a in (1, 2)]).all(0)
    assert spans[0] and spans.sum() > 20  # the queries, then rows of species found for both chains
    assert raw["msa"].shape[0] == 512 and raw["cluster_bias_mask"][0] == 1  # padded as AF2 pads
    assert raw["template_aatype"].shape == (4, len(raw["aatype"]))  # four empty template slots
    assert (raw["msa"][0] == raw["aatype"]).all()


def test_copies_are_grouped_inside_and_in_fasta_order_outside(tmp_path):
    """X, Y, X: AF2 numbers the two X chains 1 and 2 (entity 1) and Y 3; the files keep A, B, C."""
    target = read_complexes([_fasta(tmp_path, "xyx.fasta", f">x1\n{X}\n>y\n{Y}\n>x2\n{X}\n")])[0]
    raw, report = run_multimer_pipeline(target, DataConfig(msa_mode="single-sequence"), tmp_path / "out")
    assert [c.decode() for c in raw["asym_chain_ids"]] == ["A", "C", "B"]
    assert raw["entity_id"].tolist() == [1] * 20 + [1] * 20 + [2] * 15
    assert raw["sym_id"].tolist() == [1] * 20 + [2] * 20 + [1] * 15
    assert report["chains"]["C"] == {"same_as": "A"}
    order, chain_index = fasta_order(raw, target)
    assert chain_index.tolist() == [0] * 20 + [1] * 15 + [2] * 20
    sequence = "".join(rc.restypes_with_x[a] for a in raw["aatype"][order])
    assert sequence == X + Y + X


def test_sampling_keeps_queries_masks_within_chains_and_drops_padding(dimer):
    _, raw, _, _ = dimer
    cfg = mt.MultimerInputConfig(max_msa_clusters=16, max_extra_msa=64)
    feats = mt.make_multimer_inputs(raw, cfg, seed=0)
    again = mt.make_multimer_inputs(raw, cfg, seed=0)
    other = mt.make_multimer_inputs(raw, cfg, seed=1)
    assert all(np.array_equal(feats[k], again[k]) for k in ("msa_feat", "extra_msa", "bert_mask"))
    assert not np.array_equal(feats["msa_feat"], other["msa_feat"])
    assert (feats["true_msa"][0] == raw["aatype"]).all()  # the query row is always a cluster centre
    assert feats["msa_feat"].shape == (16, len(raw["aatype"]), 49) and feats["target_feat"].shape[-1] == 21
    assert (feats["msa_mask"].sum(-1) > 0).all() and (feats["extra_msa_mask"].sum(-1) > 0).all()  # no padding
    masked = feats["bert_mask"] > 0
    assert 0.05 < masked.mean() < 0.25  # AF2's 15 % replacement
    assert (feats["msa"][~masked] == feats["true_msa"][~masked]).all()
    profile = feats["cluster_profile"].sum(-1)
    assert np.allclose(profile[feats["msa_mask"] > 0], 1.0, atol=1e-4)


def test_mmseqs2_mode_pairs_the_uniref_hits_by_species(tmp_path):
    """ColabFold's search per chain; its uniref.a3m rows (named by the database's entry names,
    here globins with species) pair across chains when no --uniprot-db is given."""
    if shutil.which("mmseqs") is None:
        pytest.skip("needs MMseqs2 (Debian package mmseqs2)")
    from ferryman.apps.fastfold.data.mmseqs import build_database

    build_database(GLOBINS, tmp_path / "dbs" / "uniref30_2302_db", index=False)
    target = read_complexes([DATA / "dimer.fasta"])[0]
    cfg = DataConfig(msa_mode="mmseqs2", mmseqs_db_dir=tmp_path / "dbs", mmseqs_env_db=None)
    cfg.check()
    raw, report = run_multimer_pipeline(target, cfg, tmp_path / "out")
    assert {report["chains"][c]["pairing_alignment"] for c in "AB"} == {"uniref.a3m"}
    residues = raw["msa_mask"] * (raw["msa"] != 21)
    spans = np.stack([residues[:, raw["asym_id"] == a].any(-1) for a in (1, 2)]).all(0)
    assert spans.sum() > 10
