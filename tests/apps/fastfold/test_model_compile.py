"""RunOptions(compile=True): the blocks through torch.compile (inductor, on CPU) give the eager
numbers, one compiled graph serves every block of a kind, and a compiler failure falls back to
eager code with one warning line."""

from __future__ import annotations

import logging

import pytest
import torch

from ferryman.apps.fastfold.model import apply_run_options, random_weights_model
from ferryman.apps.fastfold.model.compiled import CompiledCall
from ferryman.apps.fastfold.presets import tiny
from tests.tolerance import assert_close

from ._model_inputs import random_features, ref_run


@torch._inductor.config.patch(compile_threads=1)  # a worker pool costs more than it saves on 2 cores
def test_compiled_blocks_match_eager():
    """Two Evoformer blocks (one graph, compiled once; the extra-MSA and template stacks are left
    out to keep the compile short) and the structure module's layers (one more graph), whole
    model, fp32: within 16 ulps of each output's scale."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = random_weights_model(tiny(num_recycle=0, num_extra_msa_blocks=0), seed=3, run=ref_run())
    batch = {k: v for k, v in random_features(n_res=9, n_seq=3, seed=4).items() if not k.startswith("template_")}
    with torch.no_grad():
        eager = model(batch)
        apply_run_options(model, ref_run(compile=True))
        calls = []
        real = model.evoformer.compiled.compiled
        model.evoformer.compiled.compiled = lambda *args: calls.append(args[0]) or real(*args)
        compiled = model(batch)
    assert calls == list(model.evoformer.blocks)  # every block went through the compiled call
    assert not model.evoformer.compiled.failed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one block, one structure-module layer
    for key in ("final_atom_positions", "pair", "msa_first_row", "plddt", "distogram_logits"):
        assert_close(compiled[key], eager[key], ulps=16, msg=key)


def _refusing(model, *, structure_too: bool) -> None:
    """Compiled calls that fail the test if used (the structure module's: only if ``structure_too``)."""
    model.evoformer.compiled.compiled = lambda *args: pytest.fail("compiled block used")
    model.structure_module.compiled.compiled = (
        (lambda *args: pytest.fail("compiled structure module used")) if structure_too else model.structure_module.compiled.fn
    )


def test_compile_is_skipped_where_it_does_not_apply():
    """Masked positions (blocks only: the structure module masks without branching), chunking or
    a recorded gradient run eagerly."""
    model = random_weights_model(tiny(num_recycle=0, num_extra_msa_blocks=0), seed=3, run=ref_run(compile=True))
    batch = {k: v for k, v in random_features(n_res=7, n_seq=2, seed=5).items() if not k.startswith("template_")}
    batch["seq_mask"][-1] = 0.0
    _refusing(model, structure_too=False)
    with torch.no_grad():
        model(batch)
    batch["seq_mask"][-1] = 1.0
    apply_run_options(model, ref_run(compile=True, chunk_size=4))
    _refusing(model, structure_too=True)
    with torch.no_grad():
        model(batch)
    apply_run_options(model, ref_run(compile=True))
    _refusing(model, structure_too=True)
    model(batch)["final_atom_positions"].sum().backward()


def test_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    def double(x):
        return 2 * x

    def broken(x):
        raise RuntimeError("inductor: no working C++ compiler\nmore detail that stays out of the log")

    call = CompiledCall(double)
    call.compiled = broken
    with caplog.at_level(logging.WARNING):
        assert call(torch.ones(2)).tolist() == [2.0, 2.0]
        assert call(torch.ones(2)).tolist() == [2.0, 2.0]
    assert call.failed
    [record] = caplog.records
    assert record.getMessage() == "torch.compile failed (RuntimeError: inductor: no working C++ compiler); running eagerly"
