"""The whole AlphaFold-Multimer model against AF2's own (``modules_multimer.AlphaFold``): villin
cut into two chains, paired and block-diagonal MSA rows, three templates over four slots per
chain, one recycling iteration, fp32, on Ferryman's plain path and on the chunked in-place path.

Weights as in the monomer suite: 0.15 / sqrt(fan_in) in the trunk, 1 / sqrt(fan_in) in the
structure module and heads. The oracle measures template unit vectors by subtracting first
(``exact_self_vectors``: otherwise the vector from a residue to itself is rounding noise blown up
to unit length). The noise floor is the oracle against itself with 1e-6 relative weight noise.
"""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.modules_multimer", reason="needs the parity extra (AlphaFold2's JAX code)")

from dataclasses import replace

import numpy as np
import torch

from ._af2 import assert_matches, haiku_params, perturbed, run_whole_model
from ._af2_multimer import (
    af2_multimer_config,
    exact_self_vectors,
    ferryman_multimer,
    random_multimer_params,
    to_af2_multimer,
    whole_multimer,
)
from ._inputs import OUTPUT_SCALES, PARITY_RUN, WHOLE_MODEL_SCALE, to_torch
from ._multimer_inputs import complex_features, multimer_parity_config

pytestmark = pytest.mark.parity

ATOMS_ANGSTROM = 1e-3
LOGITS = 1e-3
NUM_RECYCLE = 1


@pytest.fixture(scope="module")
def mcfg():
    return multimer_parity_config()


@pytest.fixture(scope="module")
def feats():
    return complex_features()


@pytest.fixture(scope="module")
def whole(mcfg, feats):
    """(parameters, AF2's outputs, AF2's outputs with 1e-6 relative weight noise)."""
    params = random_multimer_params(mcfg, scale=WHOLE_MODEL_SCALE, scales=OUTPUT_SCALES, seed=1)
    apply = whole_multimer(af2_multimer_config(mcfg))
    batch = to_af2_multimer(feats)
    with exact_self_vectors():
        ref = run_whole_model(apply, haiku_params(params), batch, mcfg, NUM_RECYCLE)
        noisy = run_whole_model(apply, haiku_params(perturbed(params, 1e-6)), batch, mcfg, NUM_RECYCLE)
    return params, ref, noisy


def _atoms(out: np.ndarray, feats) -> np.ndarray:
    return out * feats["atom37_atom_exists"][..., None]


def test_inputs_have_paired_rows_and_both_chains(feats):
    assert set(np.unique(feats["asym_id"])) == {1, 2}
    residues = feats["msa_mask"] * (feats["msa"] != 21)  # [S, N]
    both = np.stack([residues[:, feats["asym_id"] == a].any(-1) for a in (1, 2)]).all(0)
    assert both.sum() >= 2  # the queries and at least one species pair span both chains


def test_reference_is_not_chaotic(whole, feats):
    _, ref, noisy = whole
    atoms = ref["structure_module"]["final_atom_positions"]
    floor = np.abs(_atoms(atoms, feats) - _atoms(noisy["structure_module"]["final_atom_positions"], feats)).max()
    assert 0 < floor < ATOMS_ANGSTROM / 2, f"noise floor {floor:.2e} A"
    assert np.ptp(atoms[:, 1], axis=0).max() > 5.0


@pytest.mark.parametrize("path", ["plain", "lean"])
def test_whole_multimer(mcfg, whole, feats, path):
    params, ref, _ = whole
    # lean: fastfold predict --chunk-size: row blocks, in-place updates, no pair logits
    model = ferryman_multimer(mcfg, params, replace(PARITY_RUN, chunk_size=8) if path == "lean" else PARITY_RUN)
    with torch.no_grad():
        out = model(to_torch(feats), num_recycle=NUM_RECYCLE, pair_logits=path == "plain")
    assert_matches(_atoms(out["final_atom_positions"].numpy(), feats),
                   _atoms(ref["structure_module"]["final_atom_positions"], feats), atol=ATOMS_ANGSTROM,
                   what=f"multimer {path}: atom positions (Angstrom)")  # fmt: skip
    assert_matches(out["plddt"], ref["plddt"], atol=LOGITS, what=f"multimer {path}: pLDDT")
    assert_matches(out["predicted_aligned_error"], ref["predicted_aligned_error"], atol=LOGITS,
                   what=f"multimer {path}: PAE")  # fmt: skip
    for key in ("ptm", "iptm", "ranking_confidence"):
        scale = 100.0 if key == "ranking_confidence" else 1.0  # AF2 reports 80 ipTM + 20 pTM
        assert_matches(out[key] * scale, ref[key], atol=LOGITS * scale, what=f"multimer {path}: {key}", min_scale=0.01)
    assert_matches(out["masked_msa_logits"], ref["masked_msa"]["logits"], atol=LOGITS,
                   what=f"multimer {path}: masked MSA")  # fmt: skip
    if path == "plain":
        assert_matches(out["distogram_logits"], ref["distogram"]["logits"], atol=LOGITS, what="multimer distogram")
