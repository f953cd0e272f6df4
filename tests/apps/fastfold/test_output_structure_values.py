"""The structure writers by value: PDB ATOM/TER records equal AlphaFold2's own `protein.to_pdb`
(alphafold-colabfold, CPU), `from_pdb_string` equals AF2's reader, and the mmCIF fields (atoms,
entities, ModelCIF pLDDT) are read back by gemmi and compared with what they must hold."""

from __future__ import annotations

import numpy as np
import pytest

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.output import protein
from ferryman.apps.fastfold.output.protein import Protein, from_pdb_string, from_prediction, to_mmcif, to_pdb

from ._structures import openmm_villin_pdb, villin_protein

af2 = pytest.importorskip("alphafold.common.protein")
gemmi = pytest.importorskip("gemmi")


@pytest.fixture(scope="module")
def villin():
    return villin_protein()


def _two_chains(villin) -> Protein:
    """Villin as chains A (residues 1-20) and B (renumbered from 101), per-atom B-factors that all
    differ, a coordinate with four integer digits and a negative one, an unknown residue, and the
    atom mask at the writer's threshold (0.5 kept, 0.49 dropped)."""
    n = villin.aatype.shape[0]
    positions = villin.atom_positions.copy()
    positions[0, 0] = [-123.456, 1000.125, -0.5]
    mask = villin.atom_mask.copy()
    present = np.argwhere(mask > 0)
    mask[tuple(present[3])] = 0.5
    mask[tuple(present[7])] = 0.49
    aatype = villin.aatype.copy()
    aatype[5] = 20  # UNK
    residue_index = np.concatenate([np.arange(1, 21), np.arange(101, 101 + n - 20)])
    b = (np.arange(n * 37, dtype=np.float32).reshape(n, 37) % 97) + 0.25
    chain = np.array([0] * 20 + [1] * (n - 20), np.int32)
    return Protein(atom_positions=positions, aatype=aatype, atom_mask=mask, residue_index=residue_index,
                   b_factors=b, chain_index=chain)  # fmt: skip


def _af2(prot: Protein):
    return af2.Protein(atom_positions=prot.atom_positions, aatype=prot.aatype, atom_mask=prot.atom_mask,
                       residue_index=prot.residue_index, b_factors=prot.b_factors, chain_index=prot.chain_index)  # fmt: skip


def _records(text: str) -> list[str]:
    """ATOM and TER records, trailing blanks dropped (AF2 pads every line to 80 columns)."""
    return [line.rstrip() for line in text.splitlines() if line.startswith(("ATOM", "TER"))]


def test_pdb_records_equal_af2s_to_pdb(villin):
    prot = _two_chains(villin)
    ours = to_pdb(prot)
    assert _records(ours) == _records(af2.to_pdb(_af2(prot)))
    lines = ours.splitlines()
    # A TER closes each chain and takes a serial of its own: chain B's first atom follows it.
    ters = [i for i, line in enumerate(lines) if line.startswith("TER")]
    assert len(ters) == 2 and lines[-1] == "END" and ters[1] == len(lines) - 2
    assert lines[ters[0]] == f"TER   {int(lines[ters[0] - 1][6:11]) + 1:>5}      LEU A  20"
    assert int(lines[ters[0] + 1][6:11]) == int(lines[ters[0] - 1][6:11]) + 2
    assert lines[ters[0] + 1][21] == "B" and lines[ters[0] + 1][22:26] == " 101"


def test_pdb_columns_by_position(villin):
    prot = _two_chains(villin)
    first = to_pdb(prot).splitlines()[0]
    assert first[:6] == "ATOM  " and first[6:11] == "    1" and first[12:16] == " N  " and first[17:20] == "LEU"
    assert first[21] == "A" and first[22:26] == "   1"
    assert first[30:38] == "-123.456" and first[38:46] == "1000.125" and first[46:54] == "  -0.500"
    assert first[54:60] == "  1.00" and first[60:66] == "  0.25" and first[76:78] == " N"
    unk = [line for line in to_pdb(prot).splitlines() if line[22:26] == "   6"]
    assert unk and all(line[17:20] == "UNK" for line in unk)
    # The B-factor column is each atom's own value, not the residue's.
    lines = [line for line in to_pdb(prot).splitlines() if line.startswith("ATOM")]
    kept = np.argwhere(prot.atom_mask >= 0.5)
    assert len(lines) == len(kept)
    assert [float(line[60:66]) for line in lines] == [pytest.approx(float(prot.b_factors[i, j])) for i, j in kept]


def test_pdb_remarks_and_empty_protein():
    empty = Protein(atom_positions=np.zeros((0, 37, 3)), aatype=np.zeros((0,), np.int64),
                    atom_mask=np.zeros((0, 37)), residue_index=np.zeros((0,), np.int64), b_factors=np.zeros((0, 37)),
                    remarks=["short", "x" * 100])  # fmt: skip
    assert to_pdb(empty) == "REMARK 250 short\nREMARK 250 " + "x" * 69 + "\nEND\n"


def test_residue_beyond_the_table_is_written_unk(villin):
    aatype = villin.aatype.copy()
    aatype[0] = 21  # the gap index of the model's 22 classes
    prot = Protein(**{**vars(villin), "aatype": aatype})
    assert to_pdb(prot).splitlines()[0][17:20] == "UNK"


def test_protein_checks_its_shapes_and_chains():
    def make(n=3, atoms=37, chain=None):
        return Protein(atom_positions=np.zeros((n, atoms, 3)), aatype=np.zeros((n,), np.int64),
                       atom_mask=np.zeros((n, atoms)), residue_index=np.arange(n), b_factors=np.zeros((n, atoms)),
                       chain_index=chain)  # fmt: skip

    assert make().chain_index.tolist() == [0, 0, 0] and make().chain_index.dtype == np.int32
    with pytest.raises(ValueError, match=r"^Protein: atom arrays must be \[3, 37\(, 3\)\], got \(3, 14, 3\)$"):
        make(atoms=14)
    bad_mask = dict(atom_positions=np.zeros((3, 37, 3)), aatype=np.zeros((3,), np.int64), atom_mask=np.zeros((3, 14)),
                    residue_index=np.arange(3), b_factors=np.zeros((3, 37)))  # fmt: skip
    with pytest.raises(ValueError, match=r"^Protein: atom arrays must be \[3, 37\(, 3\)\], got \(3, 37, 3\)$"):
        Protein(**bad_mask)
    assert make(chain=np.array([0, 1, 61])).chain_index.tolist() == [0, 1, 61]
    with pytest.raises(ValueError, match=r"^Protein: at most 62 chains can be written$"):
        make(chain=np.array([0, 1, 62]))


def test_from_prediction_values():
    rng = np.random.default_rng(0)
    positions = rng.normal(size=(4, 37, 3))
    mask = (rng.uniform(size=(4, 37)) > 0.5).astype(np.float64)
    plddt = np.array([10.5, 20.25, 30.0, 99.75])
    prot = from_prediction(aatype=[0, 5, 20, 3], residue_index=[0, 1, 2, 10], atom_positions=positions,
                           atom_mask=mask, plddt=plddt, remarks=("a", "b"), chain_index=[0, 0, 1, 1])  # fmt: skip
    assert prot.residue_index.tolist() == [1, 2, 3, 11] and prot.residue_index.dtype == np.int64
    assert prot.aatype.tolist() == [0, 5, 20, 3] and prot.aatype.dtype == np.int64
    assert prot.atom_positions.dtype == np.float32 and np.array_equal(prot.atom_positions, positions.astype(np.float32))
    assert prot.atom_mask.dtype == np.float32 and np.array_equal(prot.atom_mask, mask)
    assert prot.b_factors.shape == (4, 37) and prot.b_factors.dtype == np.float32
    assert np.array_equal(prot.b_factors, np.repeat(plddt[:, None], 37, axis=1))
    assert prot.chain_index.tolist() == [0, 0, 1, 1] and prot.chain_index.dtype == np.int32
    assert prot.remarks == ["a", "b"] and isinstance(prot.remarks, list)
    single = from_prediction(aatype=[0], residue_index=[4], atom_positions=positions[:1], atom_mask=mask[:1],
                             plddt=[50.0])  # fmt: skip
    assert single.chain_index.tolist() == [0] and single.remarks == [] and single.residue_index.tolist() == [5]


def test_from_pdb_string_equals_af2s_reader():
    text = openmm_villin_pdb()
    lines = text.splitlines()
    # a hydrogen, an unknown residue type and a second chain
    extra = [
        "ATOM    901  N   MSE B   7      11.000  12.000  13.000  1.00 42.50           N",
        "ATOM    902  CA  MSE B   7      12.000  12.000  13.000  1.00 43.50           C",
        "ATOM    903  H   MSE B   7      12.500  12.000  13.000  1.00 44.50           H",
        "ATOM    904  N   GLY B   8      13.000  12.000  13.000  1.00 45.00           N",
    ]  # fmt: skip
    lines = [line.replace(" 0.00     ", f"{7.25:>5.2f}     ", 1) if i % 3 == 0 else line for i, line in enumerate(lines)]
    text = "\n".join(lines[:-1] + extra + ["END"]) + "\n"
    ours = from_pdb_string(text)
    theirs = af2.from_pdb_string(text)
    # AF2 keeps hetero residues (a water becomes an X residue); Ferryman drops them.
    water = "HETATM  900  O   HOH W   1      10.000  10.000  10.000  1.00 11.00           O"
    with_water = from_pdb_string(text.replace("END\n", water + "\nEND\n"))
    np.testing.assert_array_equal(with_water.atom_positions, ours.atom_positions)
    np.testing.assert_array_equal(with_water.chain_index, ours.chain_index)
    for key in ("atom_positions", "aatype", "atom_mask", "residue_index", "b_factors", "chain_index"):
        np.testing.assert_array_equal(getattr(ours, key), getattr(theirs, key), err_msg=key)
    assert ours.aatype[-2] == rc.restype_order_with_x["X"] and ours.residue_index[-2:].tolist() == [7, 8]
    assert ours.atom_positions.dtype == np.float32 and ours.aatype.dtype == np.int64
    assert ours.b_factors[-2, rc.atom_order["CA"]] == 43.5 and ours.b_factors.max() == 45.0
    only_b = from_pdb_string(text, chain_id="B")
    theirs_b = af2.from_pdb_string(text, chain_id="B")
    for key in ("atom_positions", "aatype", "atom_mask", "residue_index", "b_factors"):
        np.testing.assert_array_equal(getattr(only_b, key), getattr(theirs_b, key), err_msg=key)
    assert only_b.chain_index.tolist() == [0, 0]


def _cif(prot: Protein, name: str):
    doc = gemmi.cif.read_string(to_mmcif(prot, name))
    return doc.sole_block()


def test_mmcif_atoms_and_entities_read_by_gemmi(villin, tmp_path):
    prot = _two_chains(villin)
    path = protein.write_mmcif(prot, tmp_path / "two.cif", name="two chains")
    assert path == tmp_path / "two.cif" and path.read_text() == to_mmcif(prot, "two chains")
    st = gemmi.read_structure(str(path))
    assert [c.name for c in st[0]] == ["A", "B"]
    kept = np.argwhere(prot.atom_mask >= 0.5)
    atoms = [(r, a) for c in st[0] for r in c for a in r]
    assert len(atoms) == len(kept)
    for (residue, atom), (i, j) in zip(atoms, kept, strict=True):
        assert residue.seqid.num == prot.residue_index[i] and residue.label_seq == prot.residue_index[i]
        assert residue.name == ("UNK" if i == 5 else rc.resnames[prot.aatype[i]])
        assert atom.name == rc.atom_types[j] and atom.element.name == rc.atom_types[j][0]
        assert atom.b_iso == pytest.approx(float(prot.b_factors[i, j]), abs=1e-6) and atom.occ == 1.0
        assert [atom.pos.x, atom.pos.y, atom.pos.z] == pytest.approx(prot.atom_positions[i, j].tolist(), abs=1e-3)
    block = gemmi.cif.read(str(path)).sole_block()
    assert list(block.find_values("_entity.id")) == ["1", "2"]
    assert list(block.find_values("_entity.type")) == ["polymer", "polymer"]
    assert list(block.find_values("_entity_poly.type")) == ["polypeptide(L)", "polypeptide(L)"]
    seq = block.find("_entity_poly_seq.", ["entity_id", "num", "mon_id"])
    names = ["UNK" if i == 5 else rc.resnames[a] for i, a in enumerate(prot.aatype)]
    assert [r[0] for r in seq] == ["1"] * 20 + ["2"] * 15 and [r[2] for r in seq] == names
    chain_of_atom = [prot.chain_index[i] for i, _ in kept]
    assert list(block.find_values("_atom_site.label_entity_id")) == [str(c + 1) for c in chain_of_atom]
    assert set(block.find_values("_atom_site.label_asym_id")) == {"A", "B"}


def test_mmcif_plddt_as_modelcif_quality_metrics(villin):
    prot = _two_chains(villin)
    prot.b_factors[:, rc.atom_order["CA"]] = np.linspace(30.0, 90.0, 35)
    prot.remarks = ["first remark", "second"]
    block = _cif(prot, "two chains/v1.0")
    assert block.name == "two_chains_v1_0"
    assert block.find_value("_struct.entry_id") == "two_chains_v1_0"
    assert gemmi.cif.as_string(block.find_value("_struct.title")) == "first remark; second"
    software = block.find("_software.", ["pdbx_ordinal", "name", "classification", "type", "description"])
    assert [gemmi.cif.as_string(v) for v in software[0]] == [
        "1", "Ferryman fastfold", "other", "package", "Structure prediction (AlphaFold2 model)"]
    metric = block.find("_ma_qa_metric.", ["id", "mode", "name", "software_group_id", "type"])
    assert [list(r) for r in metric] == [["1", "global", "pLDDT", "1", "pLDDT"], ["2", "local", "pLDDT", "1", "pLDDT"]]
    glob = block.find("_ma_qa_metric_global.", ["metric_id", "metric_value", "model_id", "ordinal_id"])
    assert list(glob[0]) == ["1", "60.00", "1", "1"]
    local = block.find("_ma_qa_metric_local.", ["label_asym_id", "label_comp_id", "label_seq_id", "metric_id",
                                                "metric_value", "model_id", "ordinal_id"])  # fmt: skip
    rows = [list(r) for r in local]
    assert len(rows) == 35
    assert rows[0] == ["A", "LEU", "1", "2", "30.00", "1", "1"]
    assert rows[5][:3] == ["A", "UNK", "6"]
    assert rows[20] == ["B", rc.resnames[prot.aatype[20]], "101", "2", f"{30 + 60 * 20 / 34:.2f}", "1", "21"]
    assert rows[-1][-1] == "35" and rows[-1][4] == "90.00"


def test_mmcif_defaults_for_names_and_titles(villin):
    plain = Protein(**{**vars(villin), "remarks": []})
    block = _cif(plain, "")
    assert block.name == "prediction" and block.find_value("_struct.entry_id") == "prediction"
    assert gemmi.cif.as_string(block.find_value("_struct.title")) == "Ferryman fastfold prediction"
    assert gemmi.cif.read_string(to_mmcif(plain)).sole_block().name == "prediction"
    assert _cif(plain, "a-b_c9").name == "a-b_c9"


def test_from_pdb_string_skips_a_hetero_residue_inside_a_chain_quietly(villin):
    """A water between residues 10 and 11 of chain A: dropped, the residues after it kept; the
    reader warns about nothing (Biopython is told to be quiet: relax feeds it whole PDB files)."""
    import warnings

    lines = to_pdb(villin).splitlines()
    k = next(i for i, line in enumerate(lines) if line[22:26] == "  11")
    water = "HETATM  900  O   HOH A 100      10.000  10.000  10.000  1.00 11.00           O"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = from_pdb_string("\n".join([*lines[:k], water, *lines[k:]]) + "\n")
    assert read.residue_index.tolist() == list(range(1, 36))
    np.testing.assert_array_equal(read.atom_positions, villin.atom_positions)
    np.testing.assert_array_equal(read.aatype, villin.aatype)


def test_mmcif_fields_by_their_names_as_biopython_reads_them(villin, tmp_path):
    """MMCIF2Dict (AF2's own mmCIF reader, Biopython) looks tags up as written: the ModelCIF and
    struct tags must be the lower-case names of the dictionary."""
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    prot = _two_chains(villin)
    prot.b_factors[:, rc.atom_order["CA"]] = np.linspace(30.0, 90.0, 35)
    prot.remarks = ["a remark"]
    cif = MMCIF2Dict(str(protein.write_mmcif(prot, tmp_path / "x.cif", name="x")))
    assert cif["_struct.entry_id"] == ["x"] and cif["_struct.title"] == ["a remark"]
    assert cif["_software.pdbx_ordinal"] == ["1"] and cif["_software.name"] == ["Ferryman fastfold"]
    assert cif["_software.classification"] == ["other"] and cif["_software.type"] == ["package"]
    assert cif["_software.description"] == ["Structure prediction (AlphaFold2 model)"]
    assert cif["_ma_qa_metric.id"] == ["1", "2"] and cif["_ma_qa_metric.mode"] == ["global", "local"]
    assert cif["_ma_qa_metric.name"] == ["pLDDT", "pLDDT"] and cif["_ma_qa_metric.type"] == ["pLDDT", "pLDDT"]
    assert cif["_ma_qa_metric.software_group_id"] == ["1", "1"]
    assert cif["_ma_qa_metric_global.metric_id"] == ["1"] and cif["_ma_qa_metric_global.metric_value"] == ["60.00"]
    assert cif["_ma_qa_metric_global.model_id"] == ["1"] and cif["_ma_qa_metric_global.ordinal_id"] == ["1"]
    assert cif["_ma_qa_metric_local.label_asym_id"] == ["A"] * 20 + ["B"] * 15
    assert cif["_ma_qa_metric_local.label_comp_id"][5] == "UNK"
    assert cif["_ma_qa_metric_local.label_seq_id"][19:21] == ["20", "101"]
    assert cif["_ma_qa_metric_local.metric_id"] == ["2"] * 35 and cif["_ma_qa_metric_local.model_id"] == ["1"] * 35
    assert cif["_ma_qa_metric_local.metric_value"][-1] == "90.00"
    assert cif["_ma_qa_metric_local.ordinal_id"] == [str(i) for i in range(1, 36)]
    # One model, number 1 (what _ma_qa_metric_*.model_id refers to).
    assert set(cif["_atom_site.pdbx_PDB_model_num"]) == {"1"}
    assert gemmi.read_structure(str(tmp_path / "x.cif"))[0].num == 1


def test_mmcif_of_an_empty_prediction_and_the_default_name(tmp_path):
    empty = Protein(atom_positions=np.zeros((0, 37, 3)), aatype=np.zeros((0,), np.int64),
                    atom_mask=np.zeros((0, 37)), residue_index=np.zeros((0,), np.int64), b_factors=np.zeros((0, 37)))  # fmt: skip
    block = _cif(empty, "empty")
    assert list(block.find("_ma_qa_metric_global.", ["metric_value"])[0]) == ["0"]
    path = protein.write_mmcif(empty, tmp_path / "e.cif")
    assert gemmi.cif.read(str(path)).sole_block().name == "prediction"


def test_from_pdb_string_of_a_chain_not_in_the_file_is_empty_with_the_same_types():
    """Selecting an absent chain gives no residues, with the arrays typed as for a full read (an
    empty list would otherwise become float64 and change the type of what it is joined to)."""
    text = openmm_villin_pdb()
    empty, full = from_pdb_string(text, chain_id="Z"), from_pdb_string(text)
    for key in ("atom_positions", "aatype", "atom_mask", "residue_index", "b_factors", "chain_index"):
        got, want = getattr(empty, key), getattr(full, key)
        assert got.dtype == want.dtype and got.shape == (0, *want.shape[1:]), key
    assert full.chain_index.dtype == np.int32 and full.aatype.dtype == np.int64 and full.b_factors.dtype == np.float32
