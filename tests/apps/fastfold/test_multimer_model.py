"""AlphaFold-Multimer in Ferryman's one model tree: run options (chunking, in-place, bf16) change no
math, recycling stops early as AF2-Multimer's does, ipTM is about interfaces only, and the
official v3 npz layout round-trips (AF2 parity itself: tests/apps/fastfold/parity)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferryman.apps.fastfold import multimer_weights
from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.model import apply_run_options, random_weights_model
from ferryman.apps.fastfold.model.evoformer import EvoformerBlock
from ferryman.apps.fastfold.model.multimer import AlphaFoldMultimer
from ferryman.apps.fastfold.model.multimer_heads import interface_tm
from ferryman.apps.fastfold.presets import alphafold, as_multimer, tiny
from ferryman.core.errors import UserError

from ._model_inputs import ref_run


def complex_batch(lengths=(7, 6), n_seq: int = 5, n_extra: int = 4, seed: int = 0) -> dict:
    """Random multimer inputs for chains of ``lengths`` (4 template slots, the last ones empty)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    asym = torch.cat([torch.full((k,), i + 1) for i, k in enumerate(lengths)])
    aatype = torch.randint(0, 20, (n,), generator=g)
    t_aatype = torch.randint(0, 20, (4, n), generator=g)
    t_mask = torch.from_numpy(rc.STANDARD_ATOM_MASK).float()[t_aatype]
    t_mask[2:] = 0.0
    msa_feat = torch.cat([F.one_hot(torch.randint(0, 23, (n_seq, n), generator=g), 23).float(),
                          torch.rand(n_seq, n, 26, generator=g)], dim=-1)  # fmt: skip
    return {
        "aatype": aatype, "residue_index": torch.cat([torch.arange(k) for k in lengths]), "asym_id": asym,
        "entity_id": asym, "sym_id": torch.ones(n, dtype=torch.long), "seq_mask": torch.ones(n),
        "target_feat": F.one_hot(aatype, 21).float(), "msa_feat": msa_feat, "msa_mask": torch.ones(n_seq, n),
        "extra_msa": torch.randint(0, 23, (n_extra, n), generator=g), "extra_msa_mask": torch.ones(n_extra, n),
        "extra_has_deletion": torch.zeros(n_extra, n), "extra_deletion_value": torch.zeros(n_extra, n),
        "template_aatype": t_aatype, "template_all_atom_mask": t_mask,
        "template_all_atom_positions": torch.randn(4, n, 37, 3, generator=g) * 4 * t_mask[..., None],
    }  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return random_weights_model(as_multimer(tiny(num_recycle=1)), seed=2, run=ref_run())


def test_the_multimer_shares_the_monomer_tree(model):
    assert isinstance(model, AlphaFoldMultimer)
    blocks = [*model.evoformer.blocks, *model.extra_msa_stack.blocks]
    assert all(type(b) is EvoformerBlock and b.outer_product_first for b in blocks)
    assert not random_weights_model(tiny(), run=ref_run()).evoformer.blocks[0].outer_product_first
    assert model.masked_msa_head.logits.out_features == 22


def test_chunked_in_place_path_equals_plain(model):
    batch = complex_batch()
    with torch.no_grad():
        plain = model(batch, num_recycle=1)
        apply_run_options(model, ref_run(chunk_size=3))
        try:
            lean = model(batch, num_recycle=1, pair_logits=False)
        finally:
            apply_run_options(model, ref_run())
    for key in ("final_atom_positions", "plddt", "predicted_aligned_error", "ptm", "iptm"):
        torch.testing.assert_close(lean[key], plain[key], rtol=1e-4, atol=1e-4, msg=key)


def test_bf16_trunk_runs_and_tracks_fp32():
    model = random_weights_model(as_multimer(tiny(num_recycle=0)), seed=4, run=ref_run())
    batch = complex_batch(seed=5)
    with torch.no_grad():
        ref = model(batch)
        low = apply_run_options(model, ref_run(precision="bf16"))(batch)
    assert model.template_embedder.template_pair_embedding_0.weight.dtype == torch.bfloat16
    assert model.structure_module.fold_iteration.quat_rigid.rigid.weight.dtype == torch.float32
    assert torch.isfinite(low["final_atom_positions"]).all() and torch.isfinite(low["iptm"])
    assert (low["pair"].float() - ref["pair"]).norm() / ref["pair"].norm() < 0.05


def test_recycling_stops_early_below_the_tolerance(model):
    batch = complex_batch(seed=3)
    cfg = model.cfg
    with torch.no_grad():
        model.cfg = dataclasses.replace(cfg, recycle_early_stop_tolerance=1e9)  # any change stops it after one
        try:
            early = model(batch, num_recycle=5)
        finally:
            model.cfg = cfg
        full = model(batch, num_recycle=2)
    assert int(early["num_recycles"]) == 1 and int(full["num_recycles"]) == 2
    assert alphafold("model_1_multimer_v3").recycle_early_stop_tolerance == 0.5  # AF2 v2.3's


def test_iptm_counts_only_pairs_across_chains():
    """Confident within chains, uncertain between them: pTM-like scores high, ipTM low; one
    chain alone has no interface."""
    n, bins = 20, 64
    asym = torch.tensor([1] * 10 + [2] * 10)
    same = asym[:, None] == asym[None, :]
    logits = torch.full((n, n, bins), -10.0)
    logits[..., 0] = torch.where(same, 10.0, -10.0)  # error ~0.25 A within a chain
    logits[..., -1] = torch.where(same, -10.0, 10.0)  # error > 31 A across
    breaks = torch.linspace(0, 31, bins - 1)
    iptm = interface_tm(lambda rows: logits[rows], breaks, asym)
    assert iptm < 0.05
    assert interface_tm(lambda rows: logits[rows], breaks, torch.ones(n, dtype=torch.long)) == 0


def test_official_layout_round_trips_and_mismatches_fail_in_one_line(model, tmp_path):
    path = tmp_path / "params_model_1_multimer_v3.npz"
    multimer_weights.save_official_params(model, path)
    with np.load(path) as arrays:
        keys = list(arrays)
    assert any(k.endswith("triangle_multiplication_incoming/projection//weights") for k in keys)  # v3: fused
    assert not any("left_projection" in k and "triangle_multiplication" in k for k in keys)
    loaded = multimer_weights.model_from_official_params(model.cfg, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(UserError, match="do not fit this multimer model preset"):
        multimer_weights.model_from_official_params(as_multimer(tiny(c_z=16)), path)
