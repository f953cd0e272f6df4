"""One target's output files as `fastfold predict` writes them (output/writer.py), called directly
on known model results: ranked_<i>.pdb/.cif, ranking_debug.json, confidence_<model>.json,
pae_<model>.json, relaxed_<model> files, relax_metrics.json and features.npz, each read back and
compared with the values AF2 v2.3 writes for the same inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferryman.apps.fastfold.output import confidence, plots, writer
from ferryman.apps.fastfold.output.protein import Protein, from_prediction, to_mmcif, to_pdb
from ferryman.apps.fastfold.output.writer import ModelResult

N = 5


def _protein(shift: float, plddt: np.ndarray) -> Protein:
    positions = np.zeros((N, 37, 3), np.float32)
    positions[:, 1, 0] = 3.8 * np.arange(N) + shift  # CA trace along x
    mask = np.zeros((N, 37), np.float32)
    mask[:, :3] = 1.0  # N, CA, C
    return from_prediction(aatype=np.arange(N), residue_index=np.arange(N), atom_positions=positions, atom_mask=mask,
                           plddt=plddt)  # fmt: skip


def _result(name: str, plddt, *, shift: float = 0.0, **kw) -> ModelResult:
    plddt = np.asarray(plddt, np.float32)
    return ModelResult(name=name, unrelaxed=_protein(shift, plddt), plddt=plddt, **kw)


@pytest.fixture
def calls(monkeypatch):
    """The plots the writer asks for (the images themselves are checked in test_output_writers.py)."""
    made = []

    def record(kind):
        def plot(*args, **kwargs):
            made.append((kind, args, kwargs))

        return plot

    monkeypatch.setattr(plots, "plot_pae", record("pae"))
    monkeypatch.setattr(plots, "plot_plddt", record("plddt"))
    return made


def test_model_files_hold_structure_confidence_and_pae(tmp_path, calls):
    pae = np.array([[0.254, 3.0, 4.0, 5.0, 6.0]] * N)
    result = _result("model_1_ptm", [12.345, 50.0, 69.996, 90.0, 99.0], pae=pae, max_pae=31.75)
    writer.write_model_files(result, tmp_path, target="T1", random_weights=False)
    assert (tmp_path / "unrelaxed_model_1_ptm.pdb").read_text() == to_pdb(result.unrelaxed)
    assert (tmp_path / "unrelaxed_model_1_ptm.cif").read_text() == to_mmcif(result.unrelaxed, "T1_model_1_ptm")
    assert (tmp_path / "confidence_model_1_ptm.json").read_text() == (
        '{"residueNumber":[1,2,3,4,5],"confidenceScore":[12.35,50.0,70.0,90.0,99.0],'
        '"confidenceCategory":["D","L","L","H","H"]}\n'
    )
    row = "[0.25,3.0,4.0,5.0,6.0]"
    assert (tmp_path / "pae_model_1_ptm.json").read_text() == (
        '[{"predicted_aligned_error":[' + ",".join([row] * N) + '],"max_predicted_aligned_error":31.75}]\n'
    )
    [(kind, args, kwargs)] = calls
    assert kind == "pae" and args[1] == tmp_path / "pae_model_1_ptm.png"
    assert np.array_equal(args[0], pae) and kwargs == {"max_pae": 31.75, "title": "T1 model_1_ptm"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confidence_model_1_ptm.json", "pae_model_1_ptm.json", "unrelaxed_model_1_ptm.cif", "unrelaxed_model_1_ptm.pdb"]


def test_model_files_with_random_weights_and_without_pae(tmp_path, calls):
    result = _result("model_3", [80.0] * N)
    writer.write_model_files(result, tmp_path, target="T1", random_weights=True)
    record = json.loads((tmp_path / "confidence_model_3.json").read_text())
    assert record["warning"] == confidence.RANDOM_WEIGHTS_NOTE
    assert not (tmp_path / "pae_model_3.json").exists() and calls == []
    # A _ptm model with random weights: the PAE plot says so; its max_pae (another bin range) goes through.
    ptm = _result("model_2_ptm", [80.0] * N, pae=np.ones((N, N)), max_pae=20.5)
    writer.write_model_files(ptm, tmp_path, target="T1", random_weights=True)
    assert calls[0][2] == {"max_pae": 20.5, "title": "T1 model_2_ptm (random weights)"}
    assert json.loads((tmp_path / "pae_model_2_ptm.json").read_text())[0]["max_predicted_aligned_error"] == 20.5
    calls.clear()
    writer.write_model_files(ptm, tmp_path / "..", target="T1", random_weights=False, plot=False)
    assert calls == [] and (tmp_path / ".." / "pae_model_2_ptm.json").is_file()


def test_relaxed_files_only_when_relaxed(tmp_path):
    plain = _result("model_1", [70.0] * N)
    writer.write_relaxed_files(plain, tmp_path, target="T1")
    assert list(tmp_path.iterdir()) == []
    relaxed = _protein(1.5, np.full(N, 70.0, np.float32))
    done = _result("model_1", [70.0] * N, relaxed=relaxed)
    writer.write_relaxed_files(done, tmp_path, target="T1")
    assert (tmp_path / "relaxed_model_1.pdb").read_text() == to_pdb(relaxed)
    assert (tmp_path / "relaxed_model_1.cif").read_text() == to_mmcif(relaxed, "T1_model_1_relaxed")
    assert len(list(tmp_path.iterdir())) == 2


def test_monomer_ranking_files(tmp_path, calls):
    """AF2 ranks monomer models, _ptm included, by mean pLDDT; ranked_<i> holds the relaxed
    structure where there is one; ranking_debug.json is {"plddts", "order"} (+ "ptms")."""
    relaxed = _protein(100.0, np.full(N, 88.0, np.float32))
    results = [
        _result("model_1_ptm", [60.0, 70.0, 80.0, 90.0, 50.0], shift=1.0, ptm=0.123456789),  # mean 70
        _result("model_2_ptm", [90.0, 85.0, 80.0, 75.0, 70.0], shift=2.0, ptm=0.5, relaxed=relaxed,
                relax_metrics={"final_energy": -12.5}),  # mean 80
        _result("model_3_ptm", [75.0] * N, shift=3.0, ptm=0.9),  # mean 75
    ]  # fmt: skip
    order = writer.write_ranking(results, tmp_path, target="T1", random_weights=False)
    assert order == ["model_2_ptm", "model_3_ptm", "model_1_ptm"]
    assert (tmp_path / "ranking_debug.json").read_text() == (
        '{\n "plddts": {\n  "model_1_ptm": 70.0,\n  "model_2_ptm": 80.0,\n  "model_3_ptm": 75.0\n },\n'
        ' "order": [\n  "model_2_ptm",\n  "model_3_ptm",\n  "model_1_ptm"\n ],\n'
        ' "ptms": {\n  "model_1_ptm": 0.123457,\n  "model_2_ptm": 0.5,\n  "model_3_ptm": 0.9\n }\n}\n'
    )
    assert (tmp_path / "ranked_0.pdb").read_text() == to_pdb(relaxed)
    assert (tmp_path / "ranked_0.cif").read_text() == to_mmcif(relaxed, "T1_ranked_0")
    assert (tmp_path / "ranked_1.pdb").read_text() == to_pdb(results[2].unrelaxed)
    assert (tmp_path / "ranked_2.pdb").read_text() == to_pdb(results[0].unrelaxed)
    assert (tmp_path / "ranked_2.cif").read_text() == to_mmcif(results[0].unrelaxed, "T1_ranked_2")
    assert json.loads((tmp_path / "relax_metrics.json").read_text()) == {"model_2_ptm": {"final_energy": -12.5}}
    [(kind, args, kwargs)] = calls
    assert kind == "plddt" and args[1] == tmp_path / "plddt.png" and kwargs == {"title": "T1", "note": ""}
    assert list(args[0]) == order and all(args[0][n] is results[i].plddt for n, i in zip(order, (1, 2, 0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ranked_{i}.{ext}" for i in range(3) for ext in ("pdb", "cif")] + ["ranking_debug.json", "relax_metrics.json"])


def test_monomer_ranking_without_ptm_relax_or_plot(tmp_path, calls):
    results = [_result("model_1", [40.0] * N), _result("model_2", [60.0] * N)]
    order = writer.write_ranking(results, tmp_path, target="T1", random_weights=True, plot=False)
    assert order == ["model_2", "model_1"] and calls == []
    assert json.loads((tmp_path / "ranking_debug.json").read_text()) == {
        "plddts": {"model_1": 40.0, "model_2": 60.0}, "order": ["model_2", "model_1"],
        "warning": confidence.RANDOM_WEIGHTS_NOTE}  # fmt: skip
    assert not (tmp_path / "relax_metrics.json").exists()
    writer.write_ranking(results, tmp_path, target="T1", random_weights=True)
    assert calls[0][2] == {"title": "T1", "note": "(random weights)"}


def test_multimer_ranking_by_iptm_plus_ptm(tmp_path, calls):
    """AF2 ranks multimer models by 0.8 ipTM + 0.2 pTM, not by pLDDT: here the two orders differ."""
    results = [
        _result("model_1_multimer_v3", [95.0] * N, shift=1.0, ptm=0.70, iptm=0.60, ranking_confidence=0.62),
        _result("model_2_multimer_v3", [60.0] * N, shift=2.0, ptm=0.90, iptm=0.8000004, ranking_confidence=0.82000032),
    ]  # fmt: skip
    assert writer.rank(results) == ["model_2_multimer_v3", "model_1_multimer_v3"]
    order = writer.write_ranking(results, tmp_path, target="H1", random_weights=False)
    assert order == ["model_2_multimer_v3", "model_1_multimer_v3"]
    assert json.loads((tmp_path / "ranking_debug.json").read_text()) == {
        "iptm+ptm": {"model_1_multimer_v3": 0.62, "model_2_multimer_v3": 0.82},
        "order": ["model_2_multimer_v3", "model_1_multimer_v3"],
        "iptm": {"model_1_multimer_v3": 0.6, "model_2_multimer_v3": 0.8},
        "ptm": {"model_1_multimer_v3": 0.7, "model_2_multimer_v3": 0.9},
        "plddts": {"model_1_multimer_v3": 95.0, "model_2_multimer_v3": 60.0},
    }
    assert (tmp_path / "ranked_0.pdb").read_text() == to_pdb(results[1].unrelaxed)
    assert (tmp_path / "ranked_1.cif").read_text() == to_mmcif(results[0].unrelaxed, "H1_ranked_1")


def test_rank_falls_back_to_plddt_unless_every_model_is_multimer():
    mixed = [_result("a", [50.0] * N, ranking_confidence=0.9), _result("b", [60.0] * N)]
    assert writer.rank(mixed) == ["b", "a"]
    assert writer.rank([_result("a", [50.0] * N), _result("b", [60.0] * N)]) == ["b", "a"]
    assert writer.rank([]) == []
    multimer = [_result("a", [50.0] * N, ranking_confidence=0.9), _result("b", [60.0] * N, ranking_confidence=0.1)]
    assert writer.rank(multimer) == ["a", "b"]


def test_features_npz_without_pickles(tmp_path):
    raw = {
        "aatype": np.arange(6, dtype=np.int32).reshape(2, 3),
        "sequence": np.array([b"ACDE"], dtype=object),
        "domain_name": np.array([[b"a", b"bc"], [b"d", b"e"]], dtype=object),
    }
    path = writer.write_features(raw, tmp_path / "features.npz")
    assert path == tmp_path / "features.npz" and [p.name for p in tmp_path.iterdir()] == ["features.npz"]
    with np.load(path, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["aatype", "domain_name", "sequence"]
        assert loaded["aatype"].dtype == np.int32 and np.array_equal(loaded["aatype"], raw["aatype"])
        assert loaded["sequence"].tolist() == ["ACDE"]
        assert loaded["domain_name"].shape == (2, 2) and loaded["domain_name"].tolist() == [["a", "bc"], ["d", "e"]]


def test_pae_without_max_pae_gets_af2s_largest_error(tmp_path, calls):
    """A result with a PAE but no max_pae: the JSON and the plot take AF2's 31.75 Å (64 bins to 31 Å)."""
    result = _result("model_1_ptm", [80.0] * N, pae=np.full((N, N), 2.0))
    writer.write_model_files(result, tmp_path, target="T1", random_weights=False)
    assert json.loads((tmp_path / "pae_model_1_ptm.json").read_text())[0]["max_predicted_aligned_error"] == 31.75
    assert calls[0][2]["max_pae"] == 31.75


def test_multimer_ranking_with_random_weights_says_so(tmp_path, calls):
    results = [_result("model_1_multimer_v3", [50.0] * N, ptm=0.5, iptm=0.5, ranking_confidence=0.5)]
    writer.write_ranking(results, tmp_path, target="H1", random_weights=True)
    record = json.loads((tmp_path / "ranking_debug.json").read_text())
    assert record["warning"] == confidence.RANDOM_WEIGHTS_NOTE and record["order"] == ["model_1_multimer_v3"]
    assert calls[0][2] == {"title": "H1", "note": "(random weights)"}
