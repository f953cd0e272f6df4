"""Each Evoformer op, one Evoformer block and one extra-MSA block against AlphaFold2's own modules
(AF2 Suppl. Alg. 6-15, 18-19), with order-1 random weights and activations, partial MSA masks
and padded residues. Padded residues are compared out: a row whose keys are all masked is zero
here and a uniform average in AF2 (tests/apps/fastfold/test_model_masking.py), and neither ever
reaches a real residue."""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.modules", reason="needs the parity extra (AlphaFold2's JAX code)")

import haiku as hk
import numpy as np
import torch
from alphafold.model import modules

from ._af2 import assert_matches, run_module

pytestmark = pytest.mark.parity

S, N, REAL = 6, 16, 13  # MSA rows, residues, real residues (the last 3 are padding)
ATOL = 1e-4
SCOPES = {False: "alphafold/alphafold_iteration/evoformer/evoformer_iteration",
          True: "alphafold/alphafold_iteration/evoformer/extra_msa_stack"}  # fmt: skip


@pytest.fixture(scope="module")
def acts(cfg):
    rng = np.random.default_rng(3)
    msa_mask = (rng.random((S, N)) < 0.8).astype(np.float32)
    msa_mask[0], msa_mask[:, 0] = 1.0, 1.0  # no row or column entirely masked
    seq_mask = (np.arange(N) < REAL).astype(np.float32)
    msa_mask *= seq_mask
    return {
        "m": rng.standard_normal((S, N, cfg.c_m)).astype(np.float32),
        "e": rng.standard_normal((S, N, cfg.c_e)).astype(np.float32),
        "z": rng.standard_normal((N, N, cfg.c_z)).astype(np.float32),
        "msa_mask": msa_mask,
        "pair_mask": seq_mask[:, None] * seq_mask[None, :],
    }


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


# name: (AF2 module class, its config entry, output track, Ferryman call on a block)
_MSA = {
    "msa_row_attention_with_pair_bias": (modules.MSARowAttentionWithPairBias, "msa_row_attention_with_pair_bias",
                                         lambda b, m, z, mm, pm: b.msa_row_attention_with_pair_bias(m, z, mm)),
    "msa_column_attention": (modules.MSAColumnAttention, "msa_column_attention",
                             lambda b, m, z, mm, pm: b.msa_column_attention(m, mm)),
    "msa_column_global_attention": (modules.MSAColumnGlobalAttention, "msa_column_attention",
                                    lambda b, m, z, mm, pm: b.msa_column_global_attention(m, mm)),
    "msa_transition": (modules.Transition, "msa_transition", lambda b, m, z, mm, pm: b.msa_transition(m, mm)),
}  # fmt: skip
_PAIR = {
    "outer_product_mean": (modules.OuterProductMean, "outer_product_mean",
                           lambda b, m, z, mm, pm: b.outer_product_mean(m, mm)),
    "triangle_multiplication_outgoing": (modules.TriangleMultiplication, "triangle_multiplication_outgoing",
                                         lambda b, m, z, mm, pm: b.pair_stack.triangle_multiplication_outgoing(z, pm)),
    "triangle_multiplication_incoming": (modules.TriangleMultiplication, "triangle_multiplication_incoming",
                                         lambda b, m, z, mm, pm: b.pair_stack.triangle_multiplication_incoming(z, pm)),
    "triangle_attention_starting_node": (modules.TriangleAttention, "triangle_attention_starting_node",
                                         lambda b, m, z, mm, pm: b.pair_stack.triangle_attention_starting_node(z, pm)),
    "triangle_attention_ending_node": (modules.TriangleAttention, "triangle_attention_ending_node",
                                       lambda b, m, z, mm, pm: b.pair_stack.triangle_attention_ending_node(z, pm)),
    "pair_transition": (modules.Transition, "pair_transition",
                        lambda b, m, z, mm, pm: b.pair_stack.pair_transition(z, pm)),
}  # fmt: skip


def _af2_op(af2_cfg, hparams, name: str, extra: bool, a: dict) -> np.ndarray:
    cls, entry, _ = {**_MSA, **_PAIR}[name]
    ev, gc = af2_cfg.embeddings_and_evoformer.evoformer, af2_cfg.global_config
    m = a["e"] if extra else a["m"]

    def fn(m, z, msa_mask, pair_mask):
        with hk.experimental.name_scope(SCOPES[extra]):
            if name == "outer_product_mean":
                return cls(ev[entry], gc, z.shape[-1], name=name)(m, msa_mask, is_training=False)
            mod = cls(ev[entry], gc, name=name)
            if name == "msa_row_attention_with_pair_bias":
                return mod(m, msa_mask, z, is_training=False)
            if name in _MSA:
                return mod(m, msa_mask, is_training=False)
            return mod(z, pair_mask, is_training=False)

    return run_module(fn, hparams, m, a["z"], a["msa_mask"], a["pair_mask"])


@pytest.mark.parametrize(
    "name,extra",
    [(n, False) for n in _MSA if n != "msa_column_global_attention"]
    + [(n, False) for n in _PAIR]
    + [("msa_row_attention_with_pair_bias", True), ("msa_column_global_attention", True), ("msa_transition", True),
       ("outer_product_mean", True)],
)  # fmt: skip
def test_evoformer_op(model, af2_cfg, hparams, acts, name, extra):
    ref = _af2_op(af2_cfg, hparams, name, extra, acts)
    block = (model.extra_msa_stack if extra else model.evoformer).blocks[0]
    m = acts["e"] if extra else acts["m"]
    with torch.no_grad():
        ours = {**_MSA, **_PAIR}[name][2](block, _t(m), _t(acts["z"]), _t(acts["msa_mask"]), _t(acts["pair_mask"]))
    if name in _MSA:
        assert_matches(ours[:, :REAL], ref[:, :REAL], atol=ATOL, what=name)
    else:
        assert_matches(ours[:REAL, :REAL], ref[:REAL, :REAL], atol=ATOL, what=name)


@pytest.mark.parametrize("extra", [False, True], ids=["evoformer", "extra_msa"])
def test_block(model, af2_cfg, hparams, acts, extra):
    """A whole block, the last of its stack (a stacked official array's last slice)."""
    ev, gc = af2_cfg.embeddings_and_evoformer.evoformer, af2_cfg.global_config
    name = "extra_msa_stack" if extra else "evoformer_iteration"
    m = acts["e"] if extra else acts["m"]
    stack = model.extra_msa_stack if extra else model.evoformer
    layer = len(stack.blocks) - 1

    def fn(m, z, msa_mask, pair_mask):
        with hk.experimental.name_scope("alphafold/alphafold_iteration/evoformer"):
            block = modules.EvoformerIteration(ev, gc, is_extra_msa=extra, name=name)
            return block({"msa": m, "pair": z}, {"msa": msa_mask, "pair": pair_mask}, is_training=False)

    ref = run_module(fn, hparams, m, acts["z"], acts["msa_mask"], acts["pair_mask"], layer=layer)
    with torch.no_grad():
        m_out, z_out = stack.blocks[layer](_t(m), _t(acts["z"]), _t(acts["msa_mask"]), _t(acts["pair_mask"]))
    assert_matches(m_out[:, :REAL], ref["msa"][:, :REAL], atol=ATOL, what=f"{name} msa")
    assert_matches(z_out[:REAL, :REAL], ref["pair"][:REAL, :REAL], atol=ATOL, what=f"{name} pair")
