"""PDB/mmCIF writers read back by Biopython; confidence maths; JSON and PNG outputs."""

import json

import numpy as np
import pytest

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.output import confidence, plots
from ferryman.apps.fastfold.output.protein import from_prediction, to_pdb, write_mmcif, write_pdb

from ._structures import VILLIN_SEQUENCE, villin_protein


@pytest.fixture(scope="module")
def villin_with_plddt():
    prot = villin_protein()
    plddt = np.linspace(20.0, 95.0, len(VILLIN_SEQUENCE)).astype(np.float32)
    return from_prediction(
        aatype=prot.aatype, residue_index=prot.residue_index - 1, atom_positions=prot.atom_positions,
        atom_mask=prot.atom_mask, plddt=plddt, remarks=["test remark"],
    ), plddt  # fmt: skip


def _check_structure(structure, prot, plddt):
    from Bio.SeqUtils import seq1

    residues = [r for r in structure[0]["A"]]
    assert len(residues) == len(VILLIN_SEQUENCE)
    assert "".join(seq1(r.get_resname()) for r in residues) == VILLIN_SEQUENCE
    for i, residue in enumerate(residues):
        assert residue.id[1] == i + 1
        for atom in residue:
            assert atom.bfactor == pytest.approx(float(plddt[i]), abs=0.005)
            k = rc.atom_order[atom.get_id()]
            assert np.allclose(atom.coord, prot.atom_positions[i, k], atol=1e-3)
    assert sum(1 for _ in structure.get_atoms()) == int(prot.atom_mask.sum())


def test_pdb_round_trip_with_biopython(tmp_path, villin_with_plddt):
    from Bio.PDB import PDBParser

    prot, plddt = villin_with_plddt
    path = write_pdb(prot, tmp_path / "x.pdb")
    _check_structure(PDBParser(QUIET=True).get_structure("x", path), prot, plddt)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("REMARK 250 test remark")
    assert all(len(line) <= 80 for line in lines)
    assert lines[-2].startswith("TER") and lines[-1] == "END"


def test_mmcif_round_trip_with_biopython(tmp_path, villin_with_plddt):
    from Bio.PDB import MMCIFParser
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    prot, plddt = villin_with_plddt
    path = write_mmcif(prot, tmp_path / "x.cif", name="villin test")
    _check_structure(MMCIFParser(QUIET=True).get_structure("x", str(path)), prot, plddt)
    block = MMCIF2Dict(str(path))
    assert block["_entity_poly_seq.mon_id"][:3] == ["LEU", "SER", "ASP"]


def test_writes_are_atomic(tmp_path, villin_with_plddt, monkeypatch):
    prot, _ = villin_with_plddt
    target = tmp_path / "x.pdb"
    import ferryman.apps.fastfold.output.protein as protein_module

    def boom(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(protein_module, "to_pdb", boom)
    with pytest.raises(RuntimeError):
        write_pdb(prot, target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert "ATOM" in to_pdb(prot)


def test_plddt_from_logits_matches_bin_expectation():
    logits = np.full((3, 50), -1e9, np.float32)
    logits[0, 0] = logits[1, 49] = 0.0
    logits[2] = 0.0  # uniform -> 50
    assert confidence.compute_plddt(logits) == pytest.approx([1.0, 99.0, 50.0], abs=1e-4)


def test_pae_and_ptm_limits():
    n = 30
    sure_zero = np.full((n, n, 64), -1e9, np.float32)
    sure_zero[..., 0] = 0.0
    pae, max_pae = confidence.compute_pae(sure_zero)
    assert max_pae == pytest.approx(31.75)
    assert np.allclose(pae, 0.25)
    assert confidence.compute_ptm(sure_zero) == pytest.approx(1 / (1 + (0.25 / (1.24 * 15 ** (1 / 3) - 1.8)) ** 2))
    far = np.full((n, n, 64), -1e9, np.float32)
    far[..., -1] = 0.0
    assert confidence.compute_ptm(far) < 0.1


def test_ranking_is_by_mean_plddt_even_for_ptm_models():
    plddts = {"model_1_ptm": 70.0, "model_2_ptm": 80.0, "model_3": 75.0}
    assert confidence.rank_models(plddts) == ["model_2_ptm", "model_3", "model_1_ptm"]
    record = confidence.ranking_debug(plddts, {"model_1_ptm": 0.9, "model_2_ptm": 0.1})
    assert record["order"] == ["model_2_ptm", "model_3", "model_1_ptm"] and record["plddts"] == plddts


def test_confidence_json_and_plots(tmp_path):
    # AF2's bands: [0, 50) D, [50, 70) L, [70, 90) M, [90, 100] H; the edges go up.
    plddt = np.array([10.0, 49.99, 50.0, 69.99, 70.0, 89.99, 90.0, 100.0])
    record = confidence.confidence_json(plddt, random_weights=True)
    path = confidence.write_json(tmp_path / "c.json", record, compact=True)
    loaded = json.loads(path.read_text())
    assert loaded["confidenceCategory"] == ["D", "D", "L", "L", "M", "M", "H", "H"]
    assert loaded["residueNumber"] == list(range(1, 9)) and loaded["confidenceScore"][1] == 49.99
    assert "random weights" in loaded["warning"] and " " not in path.read_text().split('"warning"')[0]
    pae = np.random.default_rng(0).uniform(0, 30, (4, 4))
    from PIL import Image

    for made in (
        plots.plot_plddt({"m": plddt}, tmp_path / "plddt.png"),
        plots.plot_pae(pae, tmp_path / "pae.png"),
        plots.plot_msa_coverage(np.array([[0, 1, 2, 3], [0, 21, 2, 5]]), tmp_path / "cov.png", gap_index=21),
    ):
        with Image.open(made) as image:
            assert image.format == "PNG" and image.size[0] > 100
