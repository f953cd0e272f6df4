"""The embedders against AlphaFold2's own ``EmbeddingsAndEvoformer`` (AF2 Suppl. Alg. 2 lines
5-15, Alg. 3-5, 32): input embedding with relative positions, the recycled first MSA row, pair
and pseudo-beta distogram, the extra-MSA embedding, and the template torsion-angle rows.

AF2 embeds inline, not in modules of their own, so its states are read where they enter the two
layer stacks: an interceptor records each stack's input and skips the stack (the stacks
themselves are tested block by block in test_evoformer_ops.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("alphafold.model.modules", reason="needs the parity extra (AlphaFold2's JAX code)")

import haiku as hk
import numpy as np
import torch
from alphafold.model import modules

from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles
from tests.apps.fastfold._structures import villin_protein

from ._af2 import assert_matches, run_module
from ._inputs import to_af2, to_torch

pytestmark = pytest.mark.parity

ATOL = 1e-4


def _prev(cfg, n: int) -> dict[str, np.ndarray]:
    """Recycled inputs: real atom positions (so the distogram fills several bins), random rows."""
    rng = np.random.default_rng(4)
    return {
        "prev_pos": villin_protein().atom_positions.astype(np.float32),
        "prev_msa_first_row": rng.standard_normal((n, cfg.c_m)).astype(np.float32),
        "prev_pair": rng.standard_normal((n, n, cfg.c_z)).astype(np.float32),
    }


def _stack_inputs(af2_cfg, hparams, batch: dict) -> list[dict]:
    """The activations entering AF2's extra-MSA stack and Evoformer stack, in that order."""

    def fn(batch):
        seen = []

        def skip_stacks(next_fun, args, kwargs, context):
            # The Evoformer's own two stacks, not the template pair stack inside the template embedding.
            if context.method_name != "__call__" or type(context.module).__name__ != "_LayerStackNoState":
                return next_fun(*args, **kwargs)
            if not context.module.module_name.rsplit("/", 1)[0].endswith("/evoformer"):
                return next_fun(*args, **kwargs)
            seen.append(args[0][0][0])  # layer_stack calls the stack with ((activations, rng),), None
            return args[0], None

        with hk.intercept_methods(skip_stacks), hk.experimental.name_scope("alphafold/alphafold_iteration"):
            modules.EmbeddingsAndEvoformer(af2_cfg.embeddings_and_evoformer, af2_cfg.global_config)(batch, False)
        return seen

    return run_module(fn, hparams, batch)


@pytest.fixture(scope="module")
def states(cfg, model, af2_cfg, hparams, feats):
    """(AF2's stack inputs, Ferryman's states at the same points); residue numbers jump by 40
    after residue 20, past the relative-position clip of 32, as between two domains."""
    feats = {**feats, "residue_index": feats["residue_index"] + 40 * (np.arange(len(feats["aatype"])) >= 20)}
    n = feats["aatype"].shape[0]
    prev = _prev(cfg, n)
    extra_in, evo_in = _stack_inputs(af2_cfg, hparams, {**to_af2(feats, templates=True), **prev})
    b, p = to_torch(feats), {k: torch.from_numpy(v) for k, v in prev.items()}
    with torch.no_grad():
        m, z = model.input_embedder(b["target_feat"], b["msa_feat"], b["residue_index"])
        row, z = model.recycling_embedder(z, b["aatype"], p["prev_pos"], p["prev_msa_first_row"], p["prev_pair"])
        m[0] += row
        z = z + model.template_embedder.pair_embedding(z, b, torch.ones(n, n), None, False)
        e = model.extra_msa_embedder(b["extra_msa"], b["extra_has_deletion"], b["extra_deletion_value"])
        rows, _ = model.template_embedder.single_embedding(b, torch.float32)
    return (extra_in, evo_in), {"msa": m, "pair": z, "extra": e, "template_rows": rows}


def test_input_and_recycling_embedders(states):
    """MSA rows and pair entering the stacks (the pair with the template embedding added, which
    test_templates.py checks on its own)."""
    (extra_in, evo_in), ours = states
    num_seq = ours["msa"].shape[0]
    assert_matches(ours["msa"], evo_in["msa"][:num_seq], atol=ATOL, what="MSA embedding with the recycled row")
    assert_matches(ours["pair"], extra_in["pair"], atol=ATOL, what="pair embedding, recycled pair and distogram")


def test_extra_msa_embedder(states):
    (extra_in, _), ours = states
    assert_matches(ours["extra"], extra_in["msa"], atol=ATOL, what="extra MSA embedding")


def test_template_single_embedding(states, feats):
    """Template torsion-angle rows appended to the MSA, where their mask lets the Evoformer read
    them (their masks and the masked positions' features: test_templates.py)."""
    (_, evo_in), ours = states
    num_seq = ours["msa"].shape[0]
    t = to_torch(feats)
    angles = atom37_to_torsion_angles(t["template_aatype"], t["template_all_atom_positions"], t["template_all_atom_mask"])
    read = angles["torsion_angles_mask"][..., 2].bool()  # [T, N], the psi mask
    assert (~read).any() and read.any()
    rows = ours["template_rows"][read]
    assert_matches(rows, evo_in["msa"][num_seq:][read.numpy()], atol=ATOL, what="template torsion-angle rows")
