"""Chunk-size search, packing, configs and chunk states."""

import pytest
import torch
from torch import nn

from ferryman.core.errors import ConfigError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.layout import pack, search_chunk_numel, waste
from tests.core.gemini.models import TinyNet, batches, lm_loss


def test_pack_never_splits_a_parameter():
    numels = [5, 3, 7, 2, 6]
    groups = pack(numels, 8)
    assert [sorted(g) for g in groups] == [[0, 1], [2], [3, 4]]
    assert all(sum(numels[i] for i in g) <= 8 for g in groups)


def test_search_minimises_padding_among_candidates():
    numels = [100, 60, 40, 100, 50, 50, 100]
    size = search_chunk_numel(numels, min_num_chunks=3, max_chunk_numel=10_000, align=2)
    candidates = range(100, 168 + 1, 2)
    assert waste(numels, size, 2) == min(waste(numels, c, 2) for c in candidates)
    assert waste(numels, size, 2) == 0  # 100 | 60+40 | 100 | 50+50 | 100


def test_small_model_is_still_chunked():
    """ColossalAI's 32M-element minimum folds small models into one chunk; ours does not."""
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(6)))
    engine = gemini(model, GeminiConfig(precision="fp32", min_num_chunks=4), OptimConfig())
    assert len(engine.chunks) >= 4
    placed = sorted(s.name for c in engine.chunks for s in c.slots)
    assert placed == sorted(n for n, _ in model.named_parameters())


def test_chunks_follow_execution_order_after_first_forward():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.c(x)))

    engine = gemini(Reversed(), GeminiConfig(precision="fp32", min_num_chunks=3), OptimConfig())
    weights_before = [s.name for c in engine.chunks for s in c.slots if s.name.endswith("weight")]
    assert weights_before == ["a.weight", "b.weight", "c.weight"]  # registration order
    engine(torch.randn(2, 4)).sum()
    weights_after = [s.name for c in engine.chunks for s in c.slots if s.name.endswith("weight")]
    assert weights_after == ["c.weight", "b.weight", "a.weight"]  # the order of use


def test_chunk_states_through_a_step():
    model = TinyNet()
    shapes = [p.shape for p in model.parameters()]
    engine = gemini(model, GeminiConfig(placement="static", precision="bf16", param_host_fraction=1.0), OptimConfig())
    assert {c.state for c in engine.chunks} == {"released"}
    # released parameters keep their shape but own one NaN element: shape reads work, value reads poison
    assert [p.shape for p in model.parameters()] == shapes
    assert all(p.untyped_storage().nbytes() == p.element_size() for p in model.parameters())
    assert all(torch.isnan(p).all() for p in model.parameters())
    ids, tgt = batches(1)[0]
    seen = []
    handle = model.blocks[0].up.register_forward_pre_hook(
        lambda *_: seen.append({c.state for c in engine.chunks if any(s.name == "blocks.0.up.weight" for s in c.slots)})
    )
    loss = lm_loss(engine(ids), tgt)
    handle.remove()
    assert seen == [{"compute"}]
    assert {c.state for c in engine.chunks} == {"released"}  # static host chunks are freed after use
    engine.backward(loss)
    assert all(c.in_use == 0 for c in engine.chunks)
    assert engine.manager.device_bytes == sum(c.optim_bytes for c in engine.chunks if c.optim_on_device)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"placement": "gpu"}, "placement"), ({"precision": "fp8"}, "precision"), ({"param_host_fraction": 1.5}, "param_host_fraction")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GeminiConfig(**kwargs)


def test_warmup_records_order_and_next_use():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    engine = gemini(model, GeminiConfig(precision="fp32", min_num_chunks=3), OptimConfig())
    engine.backward(engine(torch.randn(2, 4)).square().sum())
    engine.step()
    tracer = engine.manager.tracer
    linear = [i for i, m in enumerate(engine.hook_modules) if isinstance(m, nn.Linear)]
    assert tracer.modules == linear + linear[::-1]  # forward, then backward in reverse
    first, last = (engine.manager.module_chunks[linear[k]][0] for k in (0, 2))
    assert tracer.next_use(last, 1) == 2  # needed next in forward...
    assert tracer.next_use(first, 1) == 5  # ...the first layer only at the end of backward: evict it first
    assert tracer.next_use(first, 6) == float("inf")
