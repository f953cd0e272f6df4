"""The memory-lean inference path (chunked, in place, no autograd): same numbers as the plain
path, and memory properties counted tensor by tensor (never timed, never read from RSS)."""

from __future__ import annotations

import pytest
import torch

from ferryman.apps.fastfold.model import apply_run_options, random_weights_model, randomize_
from ferryman.apps.fastfold.model.config import AlphaFoldConfig, TemplateConfig
from ferryman.apps.fastfold.model.evoformer import EvoformerBlock, _block_kwargs
from ferryman.apps.fastfold.model.heads import compute_predicted_aligned_error, compute_tm
from ferryman.apps.fastfold.model.options import set_kernels
from ferryman.apps.fastfold.model.pair import TriangleMultiplication
from ferryman.apps.fastfold.model.template import TemplateEmbedder
from ferryman.apps.fastfold.presets import tiny

from ._live_bytes import LiveBytes
from ._model_inputs import random_features, ref_run


def _block_inputs(cfg: AlphaFoldConfig, n: int, s: int, seed: int = 0, c_m: int | None = None):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(s, n, c_m or cfg.c_m, generator=g)
    z = torch.randn(n, n, cfg.c_z, generator=g)
    msa_mask = (torch.rand(s, n, generator=g) > 0.2).float()
    seq_mask = torch.ones(n)
    seq_mask[-2:] = 0  # padded residues: fully masked rows and columns of the pair
    return m, z, msa_mask, seq_mask[:, None] * seq_mask[None, :]


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_lean_block_equals_plain_block(extra, chunk_size):
    cfg = tiny(c_z=12, c_hidden_mul=10, c_hidden_opm=3)
    block = randomize_(EvoformerBlock(**_block_kwargs(cfg, extra), backend="torch"), seed=3).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg, n=13, s=5, c_m=cfg.c_e if extra else cfg.c_m)
    with torch.no_grad():
        m_ref, z_ref = block(m, z, msa_mask, pair_mask, None, False)
        m_lean, z_lean = block(m.clone(), z.clone(), msa_mask, pair_mask, chunk_size, True)
    torch.testing.assert_close(z_lean, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_lean, m_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_channel_blocks(outgoing):
    """Channel blocks that do not divide the hidden width, rows that do not divide N."""
    mod = randomize_(TriangleMultiplication(6, 11, outgoing=outgoing), seed=1).eval()
    z = torch.randn(9, 9, 6)
    mask = (torch.rand(9, 9) > 0.3).float()
    with torch.no_grad():
        expected = z + mod(z, mask)
        got = mod.update_(z.clone(), mask, chunk_size=2)  # 11 * 2 / 9 -> blocks of 3 channels
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _peak_and_sizes(block, m, z, msa_mask, pair_mask, chunk_size, inplace):
    with torch.no_grad(), LiveBytes(m, z, msa_mask, pair_mask, *block.parameters()) as live:
        block(m, z, msa_mask, pair_mask, chunk_size, inplace)
    return live.peak, live.sizes


def test_lean_evoformer_block_holds_one_extra_pair_tensor():
    """Full-width block (c_z=128, c_m=256) at N=96, single-sequence MSA: the chunked in-place path
    holds at most ~1.5 pair tensors beyond z (the triangle product, its projection blocks and
    row-block transients); the eager path holds many (N^3 attention logits, whole updates)."""
    cfg = AlphaFoldConfig()
    block = randomize_(EvoformerBlock(**_block_kwargs(cfg, False), backend="torch"), seed=0).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg, n=96, s=1)
    pair_bytes = z.numel() * z.element_size()
    lean_peak, lean_sizes = _peak_and_sizes(block, m.clone(), z.clone(), msa_mask, pair_mask, 12, True)
    eager_peak, eager_sizes = _peak_and_sizes(block, m, z, msa_mask, pair_mask, None, False)
    assert lean_peak < 1.6 * pair_bytes
    assert eager_peak > 4 * pair_bytes
    # The only allocations of half a pair tensor or more on the lean path are the product
    # buffers of the two triangle multiplications (never alive together: see the peak).
    assert [b for b in lean_sizes if b >= pair_bytes // 2] == [pair_bytes, pair_bytes]
    assert sum(b >= pair_bytes // 2 for b in eager_sizes) > 10


def _template_setup(n_templ: int):
    cfg = tiny(c_z=16, template=TemplateConfig(enabled=True, c_t=16, num_blocks=1, num_heads=2, c_hidden_att=4,
                                                c_hidden_mul=16, pointwise_heads=2, c_hidden_pointwise=8))  # fmt: skip
    emb = set_kernels(randomize_(TemplateEmbedder(cfg), seed=2), "torch").eval()
    batch = random_features(n_res=24, n_templ=n_templ, seed=4)
    z = torch.randn(24, 24, cfg.c_z)
    return emb, batch, z, torch.ones(24, 24)


def test_lean_template_embedding_matches_and_does_not_grow_with_templates():
    peaks = {}
    for n_templ in (1, 3):
        emb, batch, z, pair_mask = _template_setup(n_templ)
        batch["template_mask"][-1] = float(n_templ == 1)  # a masked template must not count
        with torch.no_grad():
            expected = z + emb.pair_embedding(z, batch, pair_mask, None, False)
            with LiveBytes(z, pair_mask, *batch.values(), *emb.parameters()) as live:
                got = emb.add_pair_embedding_(z.clone(), batch, pair_mask, chunk_size=4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        peaks[n_templ] = live.peak - z.numel() * z.element_size()  # the clone of z is counted
    assert peaks[3] == peaks[1]


def test_recycling_does_not_keep_the_previous_pair():
    """On entering the Evoformer, the lean path holds one pair tensor (z) whatever the iteration:
    no zeros stand in for the first iteration's previous pair, and the previous pair is released
    as soon as the recycling embedder has read it."""
    model = random_weights_model(tiny(c_z=32, num_evoformer_blocks=1), seed=5, run=ref_run(chunk_size=4))
    batch = random_features(n_res=24, n_seq=2, n_extra=2, n_templ=1, seed=6)
    pair_bytes = 24 * 24 * model.cfg.c_z * 4
    for num_recycle in (0, 2):
        live = LiveBytes(*model.parameters(), *batch.values())
        at_entry = []
        hook = model.evoformer.register_forward_pre_hook(lambda *_, live=live, at=at_entry: at.append(live.live))
        try:
            with torch.no_grad(), live:
                model(batch, num_recycle=num_recycle, pair_logits=False)
        finally:
            hook.remove()
        assert len(at_entry) == num_recycle + 1
        assert max(at_entry) < 1.5 * pair_bytes, (num_recycle, [b / pair_bytes for b in at_entry])


def test_confidence_without_pair_logits_matches():
    model = random_weights_model(tiny(num_recycle=0), seed=7, run=ref_run(chunk_size=5))
    batch = random_features(n_res=12, seed=8)
    with torch.no_grad():
        full = model(batch)
        lean = model(batch, pair_logits=False)
    assert "pae_logits" not in lean and "distogram_logits" not in lean
    breaks = model.predicted_aligned_error_head.breaks()
    pae = compute_predicted_aligned_error(full["pae_logits"], breaks)["predicted_aligned_error"]
    torch.testing.assert_close(lean["predicted_aligned_error"], pae)
    torch.testing.assert_close(lean["ptm"], compute_tm(full["pae_logits"], breaks))
    torch.testing.assert_close(lean["final_atom_positions"], full["final_atom_positions"])


def test_lean_path_triton_kernels_match_torch():
    """The lean path through the fused kernels (interpreter on CPU): no query blocks, strided
    column views and permuted biases go to the kernels as they are."""
    pytest.importorskip("triton")
    model = random_weights_model(tiny(num_recycle=0, num_evoformer_blocks=1), seed=2, run=ref_run(chunk_size=3))
    batch = random_features(n_res=8, n_seq=3, n_extra=3, n_templ=2)
    with torch.no_grad():
        ref = model(batch)
        apply_run_options(model, ref_run(chunk_size=3, kernels="triton"))
        fused = model(batch)
    for key in ("final_atom_positions", "pair", "pae_logits", "msa_first_row"):
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-3, atol=1e-3, msg=key)
