"""DAP parity on 2 gloo ranks against one process: the Evoformer, extra-MSA and template stacks
forward and backward (gradients tagged by ``parallelize`` with ``mark_partial_grads`` and summed by
``reduce_partial_grads``, as the engines do),
and the whole model forward; and what ``parallelize`` leaves unchanged."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import ferryman.apps.fastfold.model as model_package
from ferryman.apps.fastfold.model import random_weights_model
from ferryman.apps.fastfold.model.evoformer import (
    EvoformerBlock,
    EvoformerStack,
    PairStackBlock,
    TemplatePairStack,
)
from ferryman.apps.fastfold.parallelize import (
    DAPEvoformerBlock,
    DAPEvoformerStack,
    DAPPairStackBlock,
    parallelize,
)
from ferryman.apps.fastfold.presets import tiny
from ferryman.core.parallel import partial_grad_group, reduce_partial_grads, run_distributed

from ._model_inputs import random_features, ref_run

N_RES, N_SEQ = 11, 5  # both odd: each rank's shard is padded
STACKS = ("evoformer", "extra", "template")


def _inputs():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(N_SEQ, N_RES, 16, generator=g)
    z = torch.randn(N_RES, N_RES, 8, generator=g)
    msa_mask = torch.ones(N_SEQ, N_RES)
    msa_mask[-1, -3:] = 0.0  # a partly masked sequence
    pair_mask = torch.ones(N_RES, N_RES)
    return m, z, msa_mask, pair_mask


def _stack_result(model, stack_name: str) -> dict:
    m, z, msa_mask, pair_mask = _inputs()
    m.requires_grad_(True)
    z.requires_grad_(True)
    if stack_name in ("evoformer", "extra"):
        stack = model.evoformer if stack_name == "evoformer" else model.extra_msa_stack
        if stack_name == "extra":
            m = m[..., : model.cfg.c_e].detach().requires_grad_(True)
        m_out, z_out = stack(m, z, msa_mask, pair_mask, chunk_size=4)
    else:
        stack = model.template_embedder.template_pair_stack
        m_out, z_out = m * 1.0, stack(z, pair_mask, chunk_size=4)
    weights = torch.linspace(-1, 1, m_out.numel()).view_as(m_out)
    loss = (m_out * weights).sum() + (z_out**2).sum()
    loss.backward()
    return {"m": m_out.detach(), "z": z_out.detach(), "dm": m.grad, "dz": z.grad}


def _run(rank: int, world: int) -> dict:
    model = random_weights_model(tiny(), seed=3, run=ref_run())
    names = {k: v.shape for k, v in model.state_dict().items()}
    group = torch.distributed.group.WORLD if world > 1 else None
    parallelize(model, group)
    assert {k: v.shape for k, v in model.state_dict().items()} == names  # one checkpoint loads in both
    if world > 1:
        assert type(model.evoformer) is DAPEvoformerStack and type(model.evoformer.blocks[0]) is DAPEvoformerBlock
        assert type(model.template_embedder.template_pair_stack.blocks[0]) is DAPPairStackBlock
        sharded = {n for n, p in model.named_parameters() if partial_grad_group(p) is group}
        assert {"evoformer.blocks.0.pair_stack.pair_transition.transition1.weight",
                "template_embedder.template_pair_stack.blocks.0.pair_transition.transition1.weight"} <= sharded
        assert not sharded & {"evoformer.single_activations.weight",
                              "template_embedder.template_pair_stack.output_layer_norm.weight"}  # fmt: skip
    results = {name: _stack_result(model, name) for name in STACKS}
    reduce_partial_grads(model.parameters())  # what an engine does before it steps
    results["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        results["model"] = model(random_features(n_res=N_RES, n_seq=N_SEQ, n_extra=3, n_templ=1), num_recycle=1)
    return results


@pytest.mark.distributed
def test_dap_two_ranks_match_one():
    single = _run(0, 1)
    assert len(single["grads"]) > 50
    for result in run_distributed(_run, 2):
        for stack in STACKS:
            for key in ("m", "z", "dm", "dz"):
                torch.testing.assert_close(result[stack][key], single[stack][key], rtol=1e-4, atol=1e-4)
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-3, atol=1e-4, msg=name)
        for key in ("final_atom_positions", "plddt", "distogram_logits", "ptm"):
            torch.testing.assert_close(result["model"][key], single["model"][key], rtol=1e-4, atol=1e-4, msg=key)


def test_parallelize_single_rank_is_identity():
    model = random_weights_model(tiny(), run=ref_run())
    assert parallelize(model, None) is model
    plain = (EvoformerStack, EvoformerBlock, PairStackBlock, TemplatePairStack)
    assert all(type(m) in plain for m in model.modules() if isinstance(m, plain))
    assert not any(partial_grad_group(p) for p in model.parameters())


def test_model_code_holds_no_parallelism():
    """No module of model/ has a ``dap`` attribute, reads one, or branches on parallelism: the
    layering test keeps collectives out of its imports, this keeps the dispatch out of its code."""
    model = random_weights_model(tiny(), run=ref_run())
    assert not any(hasattr(m, "dap") for m in model.modules())
    for path in Path(model_package.__file__).parent.glob("*.py"):
        names = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not {n for n in names if "dap" in n.lower() or n in ("dist", "distributed")}, path.name
