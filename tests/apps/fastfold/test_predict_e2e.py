"""End to end: a small random model saved as official AF2 .npz -> predict on data/ FASTAs -> files.

Every PDB and mmCIF is read back with Biopython and its B-factors compared with the pLDDT in the
confidence JSON; a run that searches the shipped globin database with real jackhmmer uses the MSA.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferryman.apps.fastfold.predict import predict

DATA = Path(__file__).parents[3] / "data" / "fastfold"



@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.weights import save_official_params

    folder = tmp_path_factory.mktemp("params")
    for seed, name in enumerate(("model_1_ptm", "model_2_ptm")):
        save_official_params(random_weights_model("tiny", seed=seed), folder / f"params_{name}.npz")
    return folder


def _bfactors_per_residue(structure) -> list[float]:
    out = []
    for residue in structure[0]["A"]:
        values = {round(a.bfactor, 2) for a in residue}
        assert len(values) == 1  # one pLDDT per residue, on every atom
        out.append(values.pop())
    return out


def _check_structure_files(folder: Path, stem: str, plddt: list[float], length: int) -> None:
    from Bio.PDB import MMCIFParser, PDBParser

    pdb = PDBParser(QUIET=True).get_structure(stem, folder / f"{stem}.pdb")
    cif = MMCIFParser(QUIET=True).get_structure(stem, str(folder / f"{stem}.cif"))
    for structure in (pdb, cif):
        assert len(list(structure[0]["A"])) == length
        assert np.allclose(_bfactors_per_residue(structure), plddt, atol=0.006)


@pytest.fixture(scope="module")
def villin_run(tiny_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = predict(
        [DATA / "villin.fasta"], out, params=tiny_params, model_preset="monomer_ptm", preset="tiny",
        msa_mode="single-sequence", relax=True, relax_platform="CPU",
        models_to_relax="best", relax_max_outer_iterations=1, relax_max_iterations=100, max_msa_clusters=8,
        max_extra_msa=8, num_recycles=1, seed=0, kernels="torch", progress=False,
    )  # fmt: skip
    return out / "villin_n68h", summary


def test_every_output_file_is_written(villin_run):
    folder, summary = villin_run
    models = ["model_1_ptm", "model_2_ptm"]
    expected = {"features.npz", "ranking_debug.json", "timings.json", "plddt.png", "msa_coverage.png"}
    best = json.loads((folder / "ranking_debug.json").read_text())["order"][0]
    expected |= {f"relaxed_{best}.pdb", f"relaxed_{best}.cif", "relax_metrics.json"}
    for name in models:
        expected |= {f"unrelaxed_{name}.{ext}" for ext in ("pdb", "cif")}
        expected |= {f"confidence_{name}.json", f"pae_{name}.json", f"pae_{name}.png"}
    expected |= {f"ranked_{i}.{ext}" for i in range(2) for ext in ("pdb", "cif")}
    present = {p.name for p in folder.iterdir()}
    assert expected <= present, expected - present
    assert (folder / "msas").is_dir()
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]  # no temp files left
    assert summary["villin_n68h"]["msa_mode"] == "single-sequence"
    assert (folder.parent / "run_config.json").is_file()


def test_structures_parse_and_bfactors_equal_plddt(villin_run):
    folder, _ = villin_run
    ranking = json.loads((folder / "ranking_debug.json").read_text())
    # AF2 ranks monomer models, _ptm ones included, by mean pLDDT.
    assert set(ranking["order"]) == set(ranking["plddts"]) == set(ranking["ptms"])
    assert [ranking["plddts"][n] for n in ranking["order"]] == sorted(ranking["plddts"].values(), reverse=True)
    for name in ranking["order"]:
        record = json.loads((folder / f"confidence_{name}.json").read_text())
        plddt = record["confidenceScore"]
        assert len(plddt) == 35 and ranking["plddts"][name] == pytest.approx(np.mean(plddt), abs=0.01)
        (pae_record,) = json.loads((folder / f"pae_{name}.json").read_text())
        pae = np.array(pae_record["predicted_aligned_error"])
        assert pae.shape == (35, 35) and pae.min() >= 0 and pae.max() <= pae_record["max_predicted_aligned_error"]
        _check_structure_files(folder, f"unrelaxed_{name}", plddt, 35)
    best, second = ranking["order"]
    best_plddt = json.loads((folder / f"confidence_{best}.json").read_text())["confidenceScore"]
    _check_structure_files(folder, f"relaxed_{best}", best_plddt, 35)
    _check_structure_files(folder, "ranked_0", best_plddt, 35)
    # ranked_0 is the relaxed best model; ranked_1 the unrelaxed second (only the best was relaxed).
    assert (folder / "ranked_0.pdb").read_text() == (folder / f"relaxed_{best}.pdb").read_text()
    assert (folder / "ranked_1.pdb").read_text() == (folder / f"unrelaxed_{second}.pdb").read_text()


def test_af2_format_outputs_read_back_independently(villin_run):
    """gemmi and Biopython read the mmCIF's ModelCIF pLDDT; json keys and shapes as AF2 v2.3."""
    import gemmi
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    folder, _ = villin_run
    ranking = json.loads((folder / "ranking_debug.json").read_text())
    assert {"plddts", "order"} <= set(ranking) and len(ranking["order"]) == 2
    for name in ranking["order"]:
        record = json.loads((folder / f"confidence_{name}.json").read_text())
        assert set(record) == {"residueNumber", "confidenceScore", "confidenceCategory"}
        assert record["residueNumber"] == list(range(1, 36)) and set(record["confidenceCategory"]) <= set("DLMH")
        (pae,) = json.loads((folder / f"pae_{name}.json").read_text())
        assert set(pae) == {"predicted_aligned_error", "max_predicted_aligned_error"}
        assert np.array(pae["predicted_aligned_error"]).shape == (35, 35)
        block = gemmi.cif.read(str(folder / f"unrelaxed_{name}.cif")).sole_block()
        local = block.find("_ma_qa_metric_local.", ["label_seq_id", "metric_id", "metric_value"])
        assert [int(row[0]) for row in local] == list(range(1, 36)) and {row[1] for row in local} == {"2"}
        assert [float(row[2]) for row in local] == pytest.approx(record["confidenceScore"], abs=0.006)
        metrics = block.find("_ma_qa_metric.", ["id", "mode", "name"])
        assert [(r[0], r[1], r[2]) for r in metrics] == [("1", "global", "pLDDT"), ("2", "local", "pLDDT")]
        mean = float(block.find_value("_ma_qa_metric_global.metric_value"))
        assert mean == pytest.approx(ranking["plddts"][name], abs=0.006)
        assert MMCIF2Dict(str(folder / f"unrelaxed_{name}.cif"))["_ma_qa_metric_global.metric_value"] == [f"{mean:.2f}"]
    best = max(ranking["plddts"], key=ranking["plddts"].get)
    assert ranking["order"][0] == best


def test_random_weights_are_declared_in_outputs(villin_run):
    folder, _ = villin_run
    # A real --params run: no warning anywhere.
    assert "warning" not in json.loads((folder / "ranking_debug.json").read_text())
    timings = json.loads((folder / "timings.json").read_text())
    assert {"features", "predict_and_compile_model_1_ptm", "predict_and_compile_model_2_ptm"} <= set(timings)
    assert len([k for k in timings if k.startswith("relax_")]) == 1


def test_random_weights_run_says_so_everywhere(tmp_path):
    predict(
        [DATA / "villin.fasta"], tmp_path, random_weights=True, models=["model_3"], relax=False, msa_mode="single-sequence",
        max_msa_clusters=4, max_extra_msa=4, num_recycles=0, kernels="torch", progress=False,
    )  # fmt: skip
    folder = tmp_path / "villin_n68h"
    assert "REMARK 250 random weights" in (folder / "ranked_0.pdb").read_text()
    assert "random weights" in (folder / "ranked_0.cif").read_text()
    assert "random weights" in json.loads((folder / "ranking_debug.json").read_text())["warning"]
    assert "random weights" in json.loads((folder / "confidence_model_3.json").read_text())["warning"]
    assert "random weights" in json.loads((tmp_path / "run_info.json").read_text())["warning"]
    assert not (folder / "relaxed_model_3.pdb").exists()
    assert not (folder / "pae_model_3.json").exists()  # model_3 has no PAE head


@pytest.mark.skipif(shutil.which("jackhmmer") is None, reason="needs HMMER's jackhmmer")
def test_real_jackhmmer_msa_is_used_by_the_prediction(tmp_path):
    summary = predict(
        [DATA / "hbb_human.fasta"], tmp_path, random_weights=True, models=["model_3"], relax=False,
        uniref90_db=DATA / "seqdb" / "globins45.fa", max_msa_clusters=8, max_extra_msa=16, num_recycles=0,
        kernels="torch", progress=False,
    )  # fmt: skip
    report = summary["HBB_HUMAN"]
    assert report["msa_mode"] == "jackhmmer" and report["alignment_files"] == ["uniref90_hits.sto"]
    folder = tmp_path / "HBB_HUMAN"
    assert (folder / "msas" / "uniref90_hits.sto").read_text().startswith("# STOCKHOLM")
    with np.load(folder / "features.npz", allow_pickle=False) as feats:
        assert feats["msa"].shape[0] == report["msa_depth_deduplicated"] > 10
        assert feats["msa"].shape[1] == 146


def test_precomputed_msa_dir_is_reused_and_copied(tmp_path):
    summary = predict(
        [DATA / "hbb_human.fasta"], tmp_path, random_weights=True, models=["model_3"], relax=False,
        msa_dir=DATA / "msas", max_msa_clusters=8, max_extra_msa=8, num_recycles=0, plots=False, kernels="torch",
        progress=False,
    )  # fmt: skip
    assert summary["HBB_HUMAN"]["msa_mode"] == "precomputed"
    copied = tmp_path / "HBB_HUMAN" / "msas" / "uniref90_hits.sto"
    assert copied.read_bytes() == (DATA / "msas" / "HBB_HUMAN" / "uniref90_hits.sto").read_bytes()


@pytest.mark.skipif(shutil.which("hmmsearch") is None, reason="needs HMMER's hmmsearch")
def test_templates_from_mmcif_folder_reach_the_model(tmp_path):
    from ferryman.apps.fastfold.output.protein import write_mmcif

    from ._structures import villin_protein

    write_mmcif(villin_protein(), tmp_path / "mmcif" / "1vii.cif", name="1vii")
    fasta = tmp_path / "homologue.fasta"
    fasta.write_text(">villin_homologue\nLSDEDFRAIFGMTRSAFANLPLWKQQHLKKDKGLF\n")
    summary = predict(
        [fasta], tmp_path / "out", random_weights=True, models=["model_1"], relax=False, plots=False,
        msa_mode="single-sequence",
        template_mmcif_dir=tmp_path / "mmcif", max_msa_clusters=4, max_extra_msa=4, num_recycles=0,
        kernels="torch", progress=False,
    )  # fmt: skip
    report = summary["villin_homologue"]
    assert report["num_templates"] == 1 and report["template_names"] == ["1vii_A"]
    assert (tmp_path / "out" / "villin_homologue" / "msas" / "pdb_hits.sto").is_file()
    with np.load(tmp_path / "out" / "villin_homologue" / "features.npz", allow_pickle=False) as feats:
        assert feats["template_all_atom_positions"].shape == (1, 35, 37, 3)
        assert str(feats["template_domain_names"][0]) == "1vii_A"
