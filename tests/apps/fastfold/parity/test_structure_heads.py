"""The structure module (AF2 Suppl. Alg. 20-24), every output head (1.9.6-1.9.10) and the
confidence metrics (pLDDT, PAE, pTM) against AlphaFold2's own modules and ``confidence.py``."""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.modules", reason="needs the parity extra (AlphaFold2's JAX code)")

import haiku as hk
import numpy as np
import torch
from alphafold.common import confidence
from alphafold.model import folding, modules

from ferryman.apps.fastfold.model.heads import (
    compute_plddt,
    compute_predicted_aligned_error,
    compute_tm,
    confidence_from_pair,
)

from ._af2 import assert_matches, run_module
from ._inputs import to_torch

pytestmark = pytest.mark.parity

ATOL = 1e-4
SCOPE = "alphafold/alphafold_iteration"


@pytest.fixture(scope="module")
def reps(cfg, feats):
    """Order-1 single, pair and MSA representations, and the villin residue features."""
    rng = np.random.default_rng(7)
    n = feats["aatype"].shape[0]
    keys = ("aatype", "seq_mask", "atom14_atom_exists", "residx_atom14_to_atom37", "residx_atom37_to_atom14",
            "atom37_atom_exists")  # fmt: skip
    return {
        "single": rng.standard_normal((n, cfg.c_s)).astype(np.float32),
        "pair": rng.standard_normal((n, n, cfg.c_z)).astype(np.float32),
        "msa": rng.standard_normal((5, n, cfg.c_m)).astype(np.float32),
        "batch": {k: feats[k].astype(np.int32 if feats[k].dtype.kind in "iu" else np.float32) for k in keys},
    }


@pytest.fixture(scope="module")
def structure(model, af2_cfg, hparams, reps):
    """(AF2's structure module outputs, Ferryman's) on the same representations."""

    def fn(single, pair, batch):
        with hk.experimental.name_scope(SCOPE):
            sm = folding.StructureModule(af2_cfg.heads.structure_module, af2_cfg.global_config, compute_loss=True)
            return sm({"single": single, "pair": pair}, batch, is_training=False)

    ref = run_module(fn, hparams, reps["single"], reps["pair"], reps["batch"])
    b = to_torch(reps["batch"])
    with torch.no_grad():
        ours = model.structure_module(torch.from_numpy(reps["single"]), torch.from_numpy(reps["pair"]),
                                      b["aatype"], b["seq_mask"])  # fmt: skip
    return ref, ours


def test_structure_module_single_and_angles(structure):
    """The single representation it hands the pLDDT head and the torsion angles of every layer."""
    ref, ours = structure
    assert_matches(ours["single"], ref["representations"]["structure_module"], atol=ATOL, what="structure single")
    sc = ref["sidechains"]
    assert_matches(ours["angles_sin_cos"], sc["angles_sin_cos"], atol=ATOL, what="torsion angles")
    assert_matches(ours["unnormalized_angles_sin_cos"], sc["unnormalized_angles_sin_cos"], atol=ATOL,
                   what="unnormalised torsion angles")  # fmt: skip


def test_structure_module_frames_and_atoms(structure, cfg):
    """Backbone frames of every layer and the final atoms, in nanometres (the module's own unit,
    where its activations are of order one)."""
    ref, ours = structure
    nm = 1.0 / cfg.structure.position_scale
    assert_matches(ours["traj"][..., :4], ref["traj"][..., :4], atol=ATOL, what="backbone quaternions")
    assert_matches(ours["traj"][..., 4:] * nm, ref["traj"][..., 4:] * nm, atol=ATOL, what="backbone translations")
    assert_matches(ours["final_atom14_positions"] * nm, ref["final_atom14_positions"] * nm, atol=ATOL,
                   what="atom14 positions")  # fmt: skip
    assert_matches(ours["final_atom_positions"] * nm, ref["final_atom_positions"] * nm, atol=ATOL,
                   what="atom37 positions")  # fmt: skip


def test_heads(model, af2_cfg, hparams, reps):
    """pLDDT, distogram, masked-MSA, experimentally-resolved and PAE logits."""
    heads, gc = af2_cfg.heads, af2_cfg.global_config
    classes = {"predicted_lddt": modules.PredictedLDDTHead, "distogram": modules.DistogramHead,
               "masked_msa": modules.MaskedMsaHead, "experimentally_resolved": modules.ExperimentallyResolvedHead,
               "predicted_aligned_error": modules.PredictedAlignedErrorHead}  # fmt: skip

    def fn(single, pair, msa):
        representations = {"structure_module": single, "single": single, "pair": pair, "msa": msa}
        with hk.experimental.name_scope(SCOPE):
            return {name: cls(heads[name], gc)(representations, {}, False)["logits"] for name, cls in classes.items()}

    ref = run_module(fn, hparams, reps["single"], reps["pair"], reps["msa"])
    s, z, m = (torch.from_numpy(reps[k]) for k in ("single", "pair", "msa"))
    with torch.no_grad():
        ours = {
            "predicted_lddt": model.predicted_lddt_head(s),
            "distogram": model.distogram_head(z),
            "masked_msa": model.masked_msa_head(m),
            "experimentally_resolved": model.experimentally_resolved_head(s),
            "predicted_aligned_error": model.predicted_aligned_error_head(z),
        }
    for name in classes:
        assert_matches(ours[name], ref[name], atol=ATOL, what=f"{name} logits")


def test_confidence_metrics(model):
    """pLDDT, PAE and pTM from logits (AF2's numpy ``confidence.py``), and from the pair a row
    block at a time as ``fastfold predict`` computes them."""
    rng = np.random.default_rng(8)
    n = 35
    plddt_logits = rng.standard_normal((n, 50)).astype(np.float32) * 3
    pae_logits = rng.standard_normal((n, n, 64)).astype(np.float32) * 3
    breaks = np.linspace(0.0, 31.0, 63)
    ref_pae = confidence.compute_predicted_aligned_error(pae_logits, breaks)
    ref_ptm = confidence.predicted_tm_score(pae_logits, breaks)
    pae = compute_predicted_aligned_error(torch.from_numpy(pae_logits), torch.from_numpy(breaks).float())
    assert_matches(compute_plddt(torch.from_numpy(plddt_logits)), confidence.compute_plddt(plddt_logits), atol=1e-3,
                   what="pLDDT (0-100)")  # fmt: skip
    assert_matches(pae["predicted_aligned_error"], ref_pae["predicted_aligned_error"], atol=ATOL, what="PAE")
    assert_matches(pae["max_predicted_aligned_error"], ref_pae["max_predicted_aligned_error"], atol=ATOL,
                   what="max PAE")  # fmt: skip
    ptm = compute_tm(torch.from_numpy(pae_logits), torch.from_numpy(breaks).float())
    assert_matches(ptm, ref_ptm, atol=ATOL, what="pTM", min_scale=0.01)
    z = torch.from_numpy(rng.standard_normal((n, n, model.cfg.c_z)).astype(np.float32))
    head = model.predicted_aligned_error_head
    with torch.no_grad():
        logits = head(z).numpy()
        blocks = confidence_from_pair(head, z, chunk_size=8)
    ref_ptm = confidence.predicted_tm_score(logits, breaks)
    assert_matches(blocks["ptm"], ref_ptm, atol=ATOL, what="pTM from the pair", min_scale=0.01)
    assert_matches(blocks["predicted_aligned_error"],
                   confidence.compute_predicted_aligned_error(logits, breaks)["predicted_aligned_error"], atol=ATOL,
                   what="PAE from the pair")  # fmt: skip
