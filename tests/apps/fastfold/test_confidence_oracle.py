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
