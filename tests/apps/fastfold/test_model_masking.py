"""Fully masked attention rows: Ferryman's kernels against AlphaFold2's additive mask bias.

AF2 masks attention by adding ``1e9 * (mask - 1)`` to the logits, so a row whose keys are all
masked gets a (near) uniform softmax and averages every value; Ferryman's kernels give such a row
zero weights and a zero output. The model keeps the kernels' convention: a whole row is masked
only for padding (padded residues, padded MSA rows), padding never feeds a real position (every
op masks it as a key or multiplies it by the mask), so the real residues' outputs, which are all
AF2 reports, are the same under both conventions. These tests pin both halves of that claim.
"""

from __future__ import annotations

import torch

import ferryman.apps.fastfold.model.primitives as primitives
import ferryman.apps.fastfold.model.structure_module as structure_module
from ferryman.apps.fastfold.model import random_weights_model
from ferryman.apps.fastfold.presets import tiny
from ferryman.kernels import attention, attention_ref, softmax_ref

from ._model_inputs import random_features, ref_run
from .test_model_alphafold import _pad_residues


def _af2_bias(mask, like: torch.Tensor) -> torch.Tensor:
    return 1e9 * (mask.to(torch.float32) - 1).to(like.dtype)


def af2_attention(q, k, v, biases=(), mask=None, *, scale=None, backend="auto"):
    extra = () if mask is None else (_af2_bias(mask, q),)
    return attention_ref(q, k, v, (*tuple(biases), *extra), None, scale=scale)


def af2_softmax(x, mask=None, bias=None, *, backend="auto"):
    if mask is not None:
        bias = _af2_bias(mask, x) if bias is None else bias + _af2_bias(mask, x)
    return softmax_ref(x, None, bias)


def test_fully_masked_row_zero_here_uniform_in_af2():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])[None, :, None, :]  # head 1: every key masked
    ours, af2 = attention(q, k, v, (), mask, backend="torch"), af2_attention(q, k, v, (), mask)
    torch.testing.assert_close(ours[:, 0], af2[:, 0])  # partly masked rows agree
    assert (ours[:, 1] == 0).all()
    torch.testing.assert_close(af2[:, 1], v[:, 1].mean(-2, keepdim=True).expand(1, 3, 4), rtol=1e-4, atol=1e-4)


def _pad_msa_rows(batch: dict, rows: int) -> dict:
    padded = dict(batch)
    for key in ("msa_feat", "msa_mask", "extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
        value = batch[key]
        padded[key] = torch.cat([value, value.new_zeros(rows, *value.shape[1:])], dim=0)
    return padded


def test_real_residues_do_not_depend_on_the_masked_row_convention(monkeypatch):
    """Padded residues and MSA rows (whole rows masked in every attention): the real residues'
    outputs agree between the two conventions, while the padded positions do not."""
    model = random_weights_model(tiny(num_recycle=1), seed=11, run=ref_run(chunk_size=4))
    batch = random_features(n_res=10, seed=12)
    n = batch["aatype"].shape[0]
    padded = _pad_msa_rows(_pad_residues(batch, 3), 2)
    with torch.no_grad():
        ours = model(padded)
        monkeypatch.setattr(primitives, "fused_attention", af2_attention)
        monkeypatch.setattr(primitives, "fused_softmax", af2_softmax)
        monkeypatch.setattr(structure_module, "fused_softmax", af2_softmax)
        af2 = model(padded)
    for key in ("final_atom_positions", "plddt", "single", "msa_first_row", "experimentally_resolved_logits"):
        torch.testing.assert_close(ours[key][:n], af2[key][:n], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(ours["pair"][:n, :n], af2["pair"][:n, :n], rtol=1e-4, atol=1e-4)
    assert (ours["pair"][n:] - af2["pair"][n:]).abs().max() > 1e-2  # the conventions did differ
