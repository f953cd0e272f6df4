"""The template path against AlphaFold2's own modules (AF2 Suppl. Alg. 2 lines 7-13, 16-17):
torsion-angle features, one template's pair features through the template pair stack, the
pointwise attention over templates (whole and Ferryman's running-softmax lean path)."""

from __future__ import annotations

import copy
import dataclasses

import pytest

pytest.importorskip("alphafold.model.modules", reason="needs the parity extra (AlphaFold2's JAX code)")

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import torch
from alphafold.model import all_atom, modules

from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles

from ._af2 import assert_matches, module_runner, run_module
from ._inputs import to_af2, to_torch, villin_features, villin_template

pytestmark = pytest.mark.parity

ATOL = 1e-4
SCOPE = "alphafold/alphafold_iteration/evoformer/template_embedding"


def _templates(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k.startswith("template_")}


def test_torsion_angle_features():
    """AF2's ``atom37_to_torsion_angles`` as its model runs it (jitted) on a template with a gap.

    The pre-omega of a residue without a predecessor (the first, the first after the gap) has no
    frame: Ferryman gives (0, 0), the exact-arithmetic value and AF2's own un-jitted value; AF2
    jitted on a CPU or GPU with fused multiply-adds gives a random unit vector there (the rounding
    residual of a collinear frame, normalised), so those entries are checked apart.
    """
    feats = villin_features(templates=(villin_template(slice(14, 17), hide_undefined=False),))
    b = to_af2(feats, templates=True)
    ref = jax.jit(all_atom.atom37_to_torsion_angles)(
        jnp.asarray(b["template_aatype"]), b["template_all_atom_positions"], b["template_all_atom_masks"]
    )
    t = to_torch(feats)
    ours = atom37_to_torsion_angles(t["template_aatype"], t["template_all_atom_positions"], t["template_all_atom_mask"])
    undefined = np.zeros((*ref["torsion_angles_mask"].shape[:2], 7), bool)
    undefined[:, [0, 17], 0] = True  # pre-omega of residues 0 and 17
    for key in ("torsion_angles_sin_cos", "alt_torsion_angles_sin_cos"):
        r, o = np.asarray(ref[key]), ours[key].numpy()
        np.testing.assert_allclose(o[~undefined], r[~undefined], atol=ATOL, rtol=0, err_msg=key)
        assert (o[undefined] == 0).all(), key
    np.testing.assert_array_equal(ours["torsion_angles_mask"].numpy(), np.asarray(ref["torsion_angles_mask"]))


@pytest.mark.parametrize("unit_vector", [False, True], ids=["monomer", "unit_vector"])
def test_single_template_embedding(model, af2_cfg, hparams, feats, unit_vector):
    """Pair features of one template (distogram, masks, aatypes, unit vectors in the frame of
    each residue) through embedding2d, the template pair stack and its output LayerNorm."""
    c = copy.deepcopy(af2_cfg)
    c.embeddings_and_evoformer.template.use_template_unit_vector = unit_vector
    b = to_af2(feats, templates=True)
    one = {k: v[1] for k, v in _templates(b).items()}  # the template with a gap
    n = b["aatype"].shape[0]
    mask_2d = np.ones((n, n), np.float32)
    z = np.zeros((n, n, 16), np.float32)  # read for its dtype only

    def fn(z, batch, mask_2d):
        with hk.experimental.name_scope(SCOPE):
            embed = modules.SingleTemplateEmbedding(c.embeddings_and_evoformer.template, c.global_config)
            return embed(z, batch, mask_2d, is_training=False)

    ref = run_module(fn, hparams, z, one, mask_2d)
    embedder = model.template_embedder
    saved = embedder.cfg
    embedder.cfg = dataclasses.replace(saved, use_unit_vector=unit_vector)
    try:
        with torch.no_grad():
            ours = embedder.embed_template(to_torch(feats), 1, torch.ones(n, n), None, False, torch.float32)
    finally:
        embedder.cfg = saved
    assert_matches(ours, ref, atol=ATOL, what=f"single template embedding (unit vectors: {unit_vector})")


def test_template_pair_stack(model, af2_cfg, hparams):
    """The pair blocks alone (attention first, then the products, as AF2 orders them)."""
    tcfg = af2_cfg.embeddings_and_evoformer.template
    rng = np.random.default_rng(5)
    n, real = 16, 13
    t = rng.standard_normal((n, n, model.cfg.template.c_t)).astype(np.float32)
    seq = (np.arange(n) < real).astype(np.float32)
    mask = seq[:, None] * seq[None, :]

    def fn(t, mask):
        with hk.experimental.name_scope(SCOPE + "/single_template_embedding"):
            return modules.TemplatePairStack(tcfg.template_pair_stack, af2_cfg.global_config)(t, mask, False)

    ref = run_module(fn, hparams, t, mask)
    out = torch.from_numpy(t)
    with torch.no_grad():
        for block in model.template_embedder.template_pair_stack.blocks:
            out = block(out, torch.from_numpy(mask), None, False, template_order=True)
    assert_matches(out[:real, :real], ref[:real, :real], atol=ATOL, what="template pair stack")


MASKS = {"both": (1.0, 1.0), "one": (1.0, 0.0), "none": (0.0, 0.0)}


@pytest.fixture(scope="module")
def template_embedding_refs(af2_cfg, hparams, feats):
    """AF2's TemplateEmbedding for each template mask (one compilation: masks are data), and z."""
    b = to_af2(feats, templates=True)
    n = b["aatype"].shape[0]
    z = np.random.default_rng(6).standard_normal((n, n, af2_cfg.embeddings_and_evoformer.pair_channel))
    z = z.astype(np.float32)
    mask_2d = np.ones((n, n), np.float32)
    tcfg, gc = af2_cfg.embeddings_and_evoformer.template, af2_cfg.global_config

    def fn(z, batch, mask_2d):
        with hk.experimental.name_scope("alphafold/alphafold_iteration/evoformer"):
            return modules.TemplateEmbedding(tcfg, gc)(z, batch, mask_2d, is_training=False)

    run = module_runner(fn, hparams, z, _templates(b), mask_2d)
    refs = {name: run(z, {**_templates(b), "template_mask": np.array(m, np.float32)}, mask_2d)
            for name, m in MASKS.items()}  # fmt: skip
    return z, refs


@pytest.mark.parametrize("case", list(MASKS))
def test_template_embedding(model, feats, template_embedding_refs, case):
    """Every template embedded and attended to from the pair representation (Alg. 17), with
    masked templates; Ferryman's lean path (one template at a time, running softmax) too."""
    z, refs = template_embedding_refs
    n = z.shape[0]
    batch = {**to_torch(feats), "template_mask": torch.tensor(MASKS[case])}
    embedder, zt, pair_mask = model.template_embedder, torch.from_numpy(z), torch.ones(n, n)
    with torch.no_grad():
        whole = embedder.pair_embedding(zt, batch, pair_mask, None, False)
        lean = embedder.add_pair_embedding_(zt.clone(), batch, pair_mask, chunk_size=5) - zt
    scale = 0.0 if case == "none" else 0.1  # no template: AF2 and Ferryman add zeros
    assert_matches(whole, refs[case], atol=ATOL, what=f"template embedding, {case}", min_scale=scale)
    assert_matches(lean, refs[case], atol=ATOL, what=f"template embedding, {case}, lean path", min_scale=scale)
