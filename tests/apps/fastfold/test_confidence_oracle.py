"""pLDDT, PAE and pTM equal AlphaFold2's own confidence functions on the same logits (the
model's heads as `fastfold predict` calls them, and the numpy helpers), and the per-model JSON
files hold exactly what AF2 v2.3 writes for known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferryman.apps.fastfold.output import confidence

af2 = pytest.importorskip("alphafold.common.confidence")

BREAKS = np.linspace(0.0, 31.0, 63)  # AF2 config: predicted_aligned_error max_error_bin 31, 64 bins


def _logits(shape, seed):
    return np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)


def test_numpy_helpers_equal_af2():
    plddt_logits, pae_logits = _logits((23, 50), 0), _logits((23, 23, 64), 1)
    np.testing.assert_allclose(confidence.compute_plddt(plddt_logits), af2.compute_plddt(plddt_logits), rtol=1e-5)
    pae, max_pae = confidence.compute_pae(pae_logits)
    ref = af2.compute_predicted_aligned_error(pae_logits, BREAKS)
    np.testing.assert_allclose(pae, ref["predicted_aligned_error"], rtol=1e-5)
    assert max_pae == pytest.approx(float(ref["max_predicted_aligned_error"]))
    assert confidence.compute_ptm(pae_logits) == pytest.approx(float(af2.predicted_tm_score(pae_logits, BREAKS)), rel=1e-5)


def test_model_outputs_equal_af2_on_its_own_logits():
    """The predict path (pair_logits=False: PAE/pTM without materialising [N, N, 64] logits)
    against AF2's functions applied to the logits of the full path."""
    from ferryman.apps.fastfold.model import random_weights_model

    from ._model_inputs import random_features

    model = random_weights_model("tiny", seed=3)
    batch = random_features(n_res=13, seed=4)
    with torch.no_grad():
        full = model(batch, num_recycle=0, pair_logits=True)
        lean = model(batch, num_recycle=0, pair_logits=False)
    plddt_logits = full["plddt_logits"].double().numpy()
    pae_logits = full["pae_logits"].double().numpy()
    np.testing.assert_allclose(lean["plddt"].numpy(), af2.compute_plddt(plddt_logits), atol=1e-3)
    ref = af2.compute_predicted_aligned_error(pae_logits, BREAKS)
    np.testing.assert_allclose(lean["predicted_aligned_error"].numpy(), ref["predicted_aligned_error"], atol=1e-3)
    assert float(lean["max_predicted_aligned_error"]) == pytest.approx(31.75)
    assert float(lean["ptm"]) == pytest.approx(float(af2.predicted_tm_score(pae_logits, BREAKS)), abs=1e-5)


def test_json_files_hold_what_af2_writes():
    plddt = np.array([12.3456, 49.994, 50.0, 69.999, 89.999, 90.0, 100.0])
    assert confidence.confidence_json(plddt) == {
        "residueNumber": [1, 2, 3, 4, 5, 6, 7],
        "confidenceScore": [12.35, 49.99, 50.0, 70.0, 90.0, 90.0, 100.0],
        # AF2 categorises the unrounded score: 69.999 is L and 89.999 is M although they print as 70.0 and 90.0.
        "confidenceCategory": ["D", "D", "L", "L", "M", "H", "H"],
    }
    pae = np.array([[0.254, 3.0], [31.75, 1.005]])
    assert confidence.pae_json(pae, 31.75) == [
        {"predicted_aligned_error": [[0.25, 3.0], [31.75, 1.0]], "max_predicted_aligned_error": 31.75}
    ]


def test_ptm_and_pae_with_residue_weights_and_another_bin_range_equal_af2():
    """A mask over residues (AF2 weights pTM by it) and a max_bin other than the default 31."""
    logits = _logits((17, 17, 64), 2)
    weights = (np.arange(17) % 3 != 0).astype(np.float32)
    ref = float(af2.predicted_tm_score(logits, BREAKS, residue_weights=weights))
    assert confidence.compute_ptm(logits, residue_weights=weights) == pytest.approx(ref, rel=1e-5)
    assert abs(ref - float(af2.predicted_tm_score(logits, BREAKS))) > 1e-3  # the weights matter here
    breaks = np.linspace(0.0, 20.0, 63)
    ref = float(af2.predicted_tm_score(logits, breaks))
    assert confidence.compute_ptm(logits, max_bin=20.0) == pytest.approx(ref, rel=1e-5)
    pae, max_pae = confidence.compute_pae(logits, max_bin=20.0)
    expected = af2.compute_predicted_aligned_error(logits, breaks)
    np.testing.assert_allclose(pae, expected["predicted_aligned_error"], rtol=1e-5)
    assert max_pae == pytest.approx(float(expected["max_predicted_aligned_error"]))


def test_json_values_from_float32_arrays_are_the_printed_decimals():
    """The model's outputs are float32: the JSON must hold 3.14, not float32's 3.140000104904175."""
    pae = np.array([[3.14159, 0.1], [2.68, 7.77]], np.float32)
    assert confidence.pae_json(pae, np.float32(31.75)) == [
        {"predicted_aligned_error": [[3.14, 0.1], [2.68, 7.77]],
         "max_predicted_aligned_error": 31.75}]  # fmt: skip
    record = confidence.confidence_json(np.array([70.123, 33.3], np.float32))
    assert record["confidenceScore"] == [70.12, 33.3] and record["confidenceCategory"] == ["M", "D"]
    assert confidence.plddt_category(np.array([-5.0, 0.0, 100.0, 140.0])) == ["D", "D", "H", "H"]


def test_ranking_debug_records():
    plddts = {"model_1_ptm": 70.0, "model_2_ptm": 80.0, "model_3": 80.0}
    # Ties keep the models' order, as AF2's sorted(..., reverse=True) does.
    assert confidence.rank_models(plddts) == ["model_2_ptm", "model_3", "model_1_ptm"]
    assert confidence.ranking_debug(plddts) == {"plddts": plddts, "order": ["model_2_ptm", "model_3", "model_1_ptm"]}
    assert confidence.ranking_debug(plddts, {}) == {"plddts": plddts, "order": ["model_2_ptm", "model_3", "model_1_ptm"]}
    assert confidence.ranking_debug(plddts, {"model_1_ptm": 0.5}, random_weights=True) == {
        "plddts": plddts, "order": ["model_2_ptm", "model_3", "model_1_ptm"], "ptms": {"model_1_ptm": 0.5},
        "warning": confidence.RANDOM_WEIGHTS_NOTE}  # fmt: skip
    scores = {"m1": 0.71234567, "m2": 0.9, "m3": 0.1}
    iptms, ptms, mplddts = {"m1": 0.7, "m2": 0.95, "m3": 0.05}, {"m1": 0.8, "m2": 0.7, "m3": 0.3}, {"m1": 1.0, "m2": 2.0, "m3": 3.0}
    record = confidence.ranking_debug_multimer(scores, iptms, ptms, mplddts)
    assert record == {"iptm+ptm": {"m1": 0.712346, "m2": 0.9, "m3": 0.1}, "order": ["m2", "m1", "m3"],
                      "iptm": iptms, "ptm": ptms, "plddts": mplddts}  # fmt: skip
    assert list(record) == ["iptm+ptm", "order", "iptm", "ptm", "plddts"]
    warned = confidence.ranking_debug_multimer(scores, iptms, ptms, mplddts, random_weights=True)
    assert warned == {**record, "warning": confidence.RANDOM_WEIGHTS_NOTE}
    assert confidence.RANDOM_WEIGHTS_NOTE == (
        "random weights: this structure is NOT a prediction, only a test of the pipeline")


def test_write_json_text(tmp_path):
    obj = {"a": [1, 2.5], "b": {"c": "d"}}
    path = confidence.write_json(str(tmp_path / "x.json"), obj)
    assert path == tmp_path / "x.json"
    assert path.read_text() == '{\n "a": [\n  1,\n  2.5\n ],\n "b": {\n  "c": "d"\n }\n}\n'
    compact = confidence.write_json(tmp_path / "y.json", obj, compact=True)
    assert compact.read_text() == '{"a":[1,2.5],"b":{"c":"d"}}\n'
