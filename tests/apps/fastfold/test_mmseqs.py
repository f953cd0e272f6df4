"""ColabFold's MMseqs2 search end to end on a database the test builds from the shipped globins
(createdb, clustering, createindex), the A3M it writes used by the prediction; and alignments
computed alone (`fastfold msa`) reused by a later `predict --use-precomputed-msas`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main
from ferryman.apps.fastfold.data.msa import merge_and_deduplicate, read_msa

pytestmark = pytest.mark.skipif(shutil.which("mmseqs") is None, reason="needs MMseqs2 (Debian package mmseqs2)")

DATA = Path(__file__).parents[3] / "data" / "fastfold"
HBB = "".join(DATA.joinpath("hbb_human.fasta").read_text().splitlines()[1:])
MODEL = ["--random-weights", "--models", "model_3", "--no-relax", "--no-plots", "--kernels", "torch", "--num-recycles",
         "0", "--no-progress", "--set", "inputs.max_msa_clusters=8", "--set", "inputs.max_extra_msa=16"]  # fmt: skip


@pytest.fixture(scope="module")
def colabfold_dbs(tmp_path_factory):
    """uniref30_2302_db in ColabFold's layout from the 45 globins; the environmental step searches
    the same database under its own name (one build keeps the test quick)."""
    from ferryman.apps.fastfold.data.mmseqs import build_database

    folder = tmp_path_factory.mktemp("colabfold_dbs")
    build_database(DATA / "seqdb" / "globins45.fa", folder / "uniref30_2302_db")
    assert (folder / "uniref30_2302_db.idx").is_file()  # createindex ran
    return folder, ["--mmseqs-db-dir", str(folder), "--mmseqs-env-db", "uniref30_2302_db"]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_mmseqs2_msa_feeds_the_prediction(colabfold_dbs, tmp_path):
    _, db_args = colabfold_dbs
    _invoke("predict", str(DATA / "hbb_human.fasta"), "--out", str(tmp_path), "--msa-mode", "mmseqs2", *db_args, *MODEL)
    folder = tmp_path / "HBB_HUMAN"
    uniref = read_msa(folder / "msas" / "uniref.a3m")
    env = read_msa(folder / "msas" / "bfd.mgnify30.metaeuk30.smag30.a3m")
    assert uniref.sequences[0] == HBB and uniref.descriptions[0].startswith("HBB_HUMAN")
    assert len(uniref) > 20  # most of the 45 globins are found from the beta chain
    assert any(d.startswith("MYG_") for d in uniref.descriptions)  # distant homologues (myoglobins) too
    with np.load(folder / "features.npz", allow_pickle=False) as feats:
        assert feats["msa"].shape == (len(merge_and_deduplicate([uniref, env])), len(HBB))
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["model_names"] == ["model_3"]


def test_msa_only_then_predict_with_precomputed_msas(colabfold_dbs, tmp_path):
    _, db_args = colabfold_dbs
    out = tmp_path / "out"
    printed = _invoke("msa", str(DATA / "hbb_human.fasta"), "--out", str(out), "--msa-mode", "mmseqs2", *db_args, "--no-plots")
    assert "mmseqs2" in printed
    folder = out / "HBB_HUMAN"
    assert sorted(p.name for p in (folder / "msas").iterdir()) == ["bfd.mgnify30.metaeuk30.smag30.a3m", "uniref.a3m"]
    assert not list(folder.glob("*.pdb"))  # alignments and features only
    searched = {p.name: p.read_bytes() for p in (folder / "msas").iterdir()}
    with np.load(folder / "features.npz", allow_pickle=False) as feats:
        msa_only = feats["msa"].copy()

    # Later, elsewhere: no database, only the output folder.
    _invoke("predict", str(DATA / "hbb_human.fasta"), "--out", str(out), "--use-precomputed-msas", *MODEL)
    assert {p.name: p.read_bytes() for p in (folder / "msas").iterdir()} == searched
    assert (folder / "ranked_0.pdb").is_file()
    with np.load(folder / "features.npz", allow_pickle=False) as feats:
        assert np.array_equal(feats["msa"], msa_only)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no .tmp-/.old- target folders left

    # An earlier run's output folder also serves as --msa-dir for a new one.
    _invoke("predict", str(DATA / "hbb_human.fasta"), "--out", str(tmp_path / "again"), "--msa-dir", str(out), *MODEL)
    assert {p.name: p.read_bytes() for p in (tmp_path / "again" / "HBB_HUMAN" / "msas").iterdir()} == searched
