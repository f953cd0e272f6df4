"""AlphaFold-Multimer's modules against AlphaFold2's own (``modules_multimer``, ``folding_multimer``,
``confidence``), fp32, weights in the official multimer v3 layout at the module scale:

- the parameter table: every key and shape the oracle creates, and no other;
- the embeddings entering the two layer stacks (chain-relative encoding, recycling, the multimer
  template embedding with its within-chain masks, the extra MSA, the chi-angle template rows);
- an Evoformer and an extra-MSA block, outer product mean first, fused triangle weights;
- the multimer structure module (frames, angles, atoms) and ipTM.
"""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.modules_multimer", reason="needs the parity extra (AlphaFold2's JAX code)")

import haiku as hk
import jax
import numpy as np
import torch
from alphafold.common import confidence
from alphafold.model import folding_multimer, modules, modules_multimer

from ferryman.apps.fastfold import multimer_weights
from ferryman.apps.fastfold.model.multimer_heads import interface_tm
from tests.apps.fastfold._structures import villin_protein

from ._af2 import assert_matches, haiku_params, module_runner, run_module
from ._af2_multimer import (
    af2_multimer_config,
    exact_self_vectors,
    ferryman_multimer,
    random_multimer_params,
    to_af2_multimer,
)
from ._inputs import MODULE_SCALE, PARITY_RUN, to_torch
from ._multimer_inputs import complex_features, multimer_parity_config

pytestmark = pytest.mark.parity

ATOL = 1e-4
SCOPE = "alphafold/alphafold_iteration"


@pytest.fixture(scope="module")
def mcfg():
    return multimer_parity_config()


@pytest.fixture(scope="module")
def oracle(mcfg):
    """(AF2's config, random v3-layout arrays, the oracle's params, Ferryman's model)."""
    params = random_multimer_params(mcfg, scale=MODULE_SCALE, seed=0)
    return af2_multimer_config(mcfg), params, haiku_params(params), ferryman_multimer(mcfg, params, PARITY_RUN)


@pytest.fixture(scope="module")
def feats():
    return complex_features()


def test_parameter_layout_is_the_oracles(oracle, feats):
    """Ferryman's exported multimer arrays have exactly the keys and shapes AF2-Multimer creates."""
    c, _, _, model = oracle
    n = len(feats["aatype"])
    batch = {**to_af2_multimer(feats), "prev": {"prev_msa_first_row": np.zeros((n, model.cfg.c_m), np.float32),
             "prev_pair": np.zeros((n, n, model.cfg.c_z), np.float32), "prev_pos": np.zeros((n, 37, 3), np.float32)}}  # fmt: skip
    init = hk.transform(lambda b: modules_multimer.AlphaFold(c)(b, is_training=False)).init
    theirs = {f"{s}//{k}": tuple(v.shape) for s, d in jax.eval_shape(init, jax.random.PRNGKey(0), batch).items()
              for k, v in d.items()}  # fmt: skip
    ours = {k: v.shape for k, v in multimer_weights.official_params(model).items()}
    assert ours == theirs


def _stack_inputs(c, hparams, batch: dict) -> list[dict]:
    """The activations entering AF2-Multimer's extra-MSA stack and Evoformer stack, in that order."""

    def fn(batch):
        seen = []

        def skip_stacks(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or type(context.module).__name__ != "_LayerStackNoState":
                return next_fun(*args, **kwargs)
            if not context.module.module_name.rsplit("/", 1)[0].endswith("/evoformer"):
                return next_fun(*args, **kwargs)  # the template pair stack runs
            seen.append(args[0][0][0])
            return args[0], None

        with hk.intercept_methods(skip_stacks), hk.experimental.name_scope(SCOPE):
            modules_multimer.EmbeddingsAndEvoformer(c.embeddings_and_evoformer, c.global_config)(batch, False)
        return seen

    with exact_self_vectors():
        return run_module(fn, hparams, batch)


@pytest.fixture(scope="module")
def states(oracle, feats, mcfg):
    """(AF2's stack inputs, Ferryman's states there) for the two villin chains read as copies of
    one entity (sym_id 1 and 2), residue numbers jumping by 40 inside chain A (past the clip)."""
    c, _, hparams, model = oracle
    feats = dict(feats)
    feats["entity_id"] = np.ones_like(feats["entity_id"])
    feats["sym_id"] = feats["asym_id"].copy()
    feats["residue_index"] = feats["residue_index"] + 40 * ((feats["asym_id"] == 1) & (feats["residue_index"] >= 9))
    n, rng = len(feats["aatype"]), np.random.default_rng(4)
    prev = {"prev_pos": villin_protein().atom_positions.astype(np.float32),
            "prev_msa_first_row": rng.standard_normal((n, mcfg.c_m)).astype(np.float32),
            "prev_pair": rng.standard_normal((n, n, mcfg.c_z)).astype(np.float32)}  # fmt: skip
    extra_in, evo_in = _stack_inputs(c, hparams, {**to_af2_multimer(feats), **prev})
    b, p = to_torch(feats), {k: torch.from_numpy(v) for k, v in prev.items()}
    with torch.no_grad():
        m, z = model.input_embedder(b["target_feat"], b["msa_feat"], b)
        row, z = model.recycling_embedder(z, b["aatype"], p["prev_pos"], p["prev_msa_first_row"], p["prev_pair"])
        m[0] += row
        z = model.template_embedder.add_pair_embedding(z, b, torch.ones(n, n), None, False)
        e = model.extra_msa_embedder(b["extra_msa"], b["extra_has_deletion"], b["extra_deletion_value"])
        rows, rows_mask = model.template_embedder.single_embedding(b, torch.float32)
    return (extra_in, evo_in), {"msa": m, "pair": z, "extra": e, "rows": rows, "rows_mask": rows_mask}


def test_input_embedding_relative_chains_recycling_and_templates(states):
    """The pair entering the extra-MSA stack carries all four; the MSA entering the Evoformer."""
    (extra_in, evo_in), ours = states
    num_seq = ours["msa"].shape[0]
    assert_matches(ours["pair"], extra_in["pair"], atol=ATOL, what="multimer pair embedding (relpos, recycling, templates)")
    assert_matches(ours["msa"], evo_in["msa"][:num_seq], atol=ATOL, what="multimer MSA embedding")
    assert_matches(ours["extra"], extra_in["msa"], atol=ATOL, what="multimer extra MSA embedding")


def test_template_chi_angle_rows(states):
    (_, evo_in), ours = states
    num_seq = ours["msa"].shape[0]
    assert ours["rows_mask"].sum() > 10 and (ours["rows_mask"] == 0).sum() > 10  # chi1 masks some rows
    rows = evo_in["msa"][num_seq:]
    assert_matches(ours["rows"].flatten(0, 1), rows.reshape(-1, rows.shape[-1]), atol=ATOL,
                   what="multimer template chi-angle rows")  # fmt: skip


@pytest.mark.parametrize("extra", [False, True], ids=["evoformer", "extra_msa"])
def test_evoformer_block_outer_product_first(oracle, extra):
    c, _, hparams, model = oracle
    e, gc = c.embeddings_and_evoformer, c.global_config
    rng = np.random.default_rng(5)
    n, s = 21, 6
    c_m = model.cfg.c_e if extra else model.cfg.c_m
    m = rng.standard_normal((s, n, c_m)).astype(np.float32)
    z = rng.standard_normal((n, n, model.cfg.c_z)).astype(np.float32)
    msa_mask = np.ones((s, n), np.float32)
    msa_mask[-1, -4:] = 0.0
    pair_mask = np.ones((n, n), np.float32)
    name = "extra_msa_stack" if extra else "evoformer_iteration"

    def fn(m, z, msa_mask, pair_mask):
        with hk.experimental.name_scope(SCOPE + "/evoformer"):
            block = modules.EvoformerIteration(e.evoformer, gc, is_extra_msa=extra, name=name)
            out = block({"msa": m, "pair": z}, {"msa": msa_mask, "pair": pair_mask}, is_training=False)
        return out["msa"], out["pair"]

    ref_m, ref_z = module_runner(fn, hparams, m, z, msa_mask, pair_mask)(m, z, msa_mask, pair_mask)
    block = (model.extra_msa_stack if extra else model.evoformer).blocks[0]
    with torch.no_grad():
        ours_m, ours_z = block(*(torch.from_numpy(x) for x in (m, z, msa_mask, pair_mask)))
    assert_matches(ours_m, ref_m, atol=ATOL, what=f"multimer {name} block MSA")
    assert_matches(ours_z, ref_z, atol=ATOL, what=f"multimer {name} block pair")


@pytest.fixture(scope="module")
def structure(oracle, feats, mcfg):
    c, _, hparams, model = oracle
    rng = np.random.default_rng(7)
    n = len(feats["aatype"])
    single = rng.standard_normal((n, mcfg.c_s)).astype(np.float32)
    pair = rng.standard_normal((n, n, mcfg.c_z)).astype(np.float32)
    batch = {"aatype": feats["aatype"].astype(np.int32), "seq_mask": feats["seq_mask"].astype(np.float32)}

    def fn(single, pair, batch):
        with hk.experimental.name_scope(SCOPE):
            sm = folding_multimer.StructureModule(c.heads.structure_module, c.global_config)
            return sm({"single": single, "pair": pair}, batch, is_training=False, compute_loss=True)

    ref = run_module(fn, hparams, single, pair, batch)
    with torch.no_grad():
        ours = model.structure_module(torch.from_numpy(single), torch.from_numpy(pair),
                                      torch.from_numpy(feats["aatype"]), torch.from_numpy(feats["seq_mask"]))  # fmt: skip
    return ref, ours


def test_structure_module(structure, mcfg):
    """Frames of every layer, angles and atoms (translations and atoms in units of the module's
    position scale, where its activations are of order one)."""
    ref, ours = structure
    unit = 1.0 / mcfg.structure.position_scale
    assert_matches(ours["single"], ref["act"], atol=ATOL, what="multimer structure single")
    assert_matches(ours["frames"][..., :3, :3], ref["traj"][..., :3], atol=ATOL, what="multimer backbone rotations")
    assert_matches(ours["frames"][..., :3, 3] * unit, ref["traj"][..., 3] * unit, atol=ATOL,
                   what="multimer backbone translations")  # fmt: skip
    sc = ref["sidechains"]
    assert_matches(ours["angles_sin_cos"], sc["angles_sin_cos"], atol=ATOL, what="multimer torsion angles")
    assert_matches(ours["final_atom14_positions"] * unit, ref["final_atom14_positions"] * unit, atol=ATOL,
                   what="multimer atom14 positions")  # fmt: skip
    assert_matches(ours["final_atom_positions"] * unit, ref["final_atom_positions"] * unit, atol=ATOL,
                   what="multimer atom37 positions")  # fmt: skip


def test_iptm_against_af2_confidence():
    """ipTM (and pTM with the sequence mask as weights) from logits, one row block at a time."""
    rng = np.random.default_rng(8)
    n = 35
    logits = (rng.standard_normal((n, n, 64)) * 3).astype(np.float32)
    asym_id = np.array([1] * 18 + [2] * 10 + [3] * 7)
    breaks = np.linspace(0.0, 31.0, 63)
    ref = confidence.predicted_tm_score(logits, breaks, residue_weights=np.ones(n), asym_id=asym_id)
    t = torch.from_numpy(logits)
    ours = interface_tm(lambda rows: t[rows], torch.from_numpy(breaks).float(), torch.from_numpy(asym_id),
                        chunk_size=8)  # fmt: skip
    assert_matches(ours, ref, atol=ATOL, what="ipTM", min_scale=0.01)
