"""The pure parts of core/gemini by value: config checks and their messages, the state table's
messages, chunk packing and the size search, static placement fractions, sizes in messages, the
tracer's queries, one chunk's shards, and the host AdamW probe's verdicts. Expected values are
worked out by hand in the comments."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ferryman.core.errors import ConfigError, UserError
from ferryman.core.gemini import GeminiConfig, host_adam
from ferryman.core.gemini.chunk import LEGAL, Chunk, FullCopy, IllegalMove, OptimAt, ShardAt, check_move
from ferryman.core.gemini.layout import (
    ChunkSpec,
    Slot,
    _round_up,
    pack,
    plan_layout,
    search_chunk_numel,
    waste,
)
from ferryman.core.gemini.manager import ChunkManager, _size, _take_fraction
from ferryman.core.gemini.optim import ChunkGrads, Reduction
from ferryman.core.gemini.state import Ranks, export_full, import_optim_state, optim_state
from ferryman.core.gemini.tracer import MemTracer

# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"placement": "gpu"}, "gemini.placement='gpu' must be 'static' or 'auto'"),
    ({"precision": "fp8"}, "gemini.precision='fp8' is not one of ['bf16', 'fp16', 'fp32']"),
    ({"param_host_fraction": 1.5}, "gemini.param_host_fraction=1.5 must lie in [0, 1]"),
    ({"param_host_fraction": -0.25}, "gemini.param_host_fraction=-0.25 must lie in [0, 1]"),
    ({"optim_host_fraction": 1.01}, "gemini.optim_host_fraction=1.01 must lie in [0, 1]"),
    ({"warmup_non_model_fraction": -1.0}, "gemini.warmup_non_model_fraction=-1.0 must lie in [0, 1]"),
    ({"device_budget_bytes": -1}, "gemini.device_budget_bytes=-1 must be >= 0"),
    ({"min_num_chunks": 0}, "gemini.min_num_chunks must be >= 1; chunk_numel and prefetch >= 0"),
    ({"chunk_numel": -1}, "gemini.min_num_chunks must be >= 1; chunk_numel and prefetch >= 0"),
    ({"prefetch": -1}, "gemini.min_num_chunks must be >= 1; chunk_numel and prefetch >= 0"),
])
def test_bad_config_is_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GeminiConfig(**kwargs)
    assert str(err.value) == message


def test_config_bounds_are_inclusive():
    for name in ("param_host_fraction", "optim_host_fraction", "warmup_non_model_fraction"):
        for value in (0.0, 1.0):
            assert getattr(GeminiConfig(**{name: value}), name) == value
    cfg = GeminiConfig(placement="static", precision="fp16", device_budget_bytes=0, min_num_chunks=1, chunk_numel=0,
                       prefetch=0)
    assert cfg.dtype == torch.float16 and cfg.placement == "static"


# -- the state table's messages ------------------------------------------------------------------


def test_check_move_names_the_states_and_the_legal_ones():
    assert check_move("c", ShardAt.HOST, ShardAt.HOST, LEGAL[ShardAt]) == ShardAt.HOST  # staying put
    assert check_move("c", ShardAt.HOST, ShardAt.DEVICE_AND_HOST, LEGAL[ShardAt]) == ShardAt.DEVICE_AND_HOST
    with pytest.raises(IllegalMove) as err:
        check_move("chunk 3", ShardAt.UNPLACED, ShardAt.DEVICE_AND_HOST, LEGAL[ShardAt])
    assert str(err.value) == "chunk 3: ShardAt unplaced -> device+host is not a legal move (from unplaced: device, host)"
    with pytest.raises(IllegalMove) as err:
        check_move("chunk 0", OptimAt.HOST, OptimAt.DEVICE, LEGAL[OptimAt])
    assert str(err.value) == "chunk 0: OptimAt host -> device is not a legal move (from host: nothing)"
    with pytest.raises(IllegalMove) as err:
        check_move("x", FullCopy.KEPT, FullCopy.GATHERED, LEGAL[FullCopy])
    assert str(err.value) == "x: FullCopy kept -> gathered is not a legal move (from kept: pending)"


# -- packing and the size search -----------------------------------------------------------------


def test_round_up_and_pack():
    assert [_round_up(v, 8) for v in (0, 1, 8, 9, 16)] == [0, 8, 8, 16, 16]
    assert pack([4, 4, 8], 8) == [[0, 1], [2]]  # a parameter that fills the chunk exactly still fits
    assert pack([5, 7, 3], 8) == [[0], [1], [2]]
    assert pack([9, 2], 8) == [[0], [1]]  # a parameter longer than the chunk gets one of its own
    assert pack([], 8) == []


def test_waste_counts_the_padding_of_every_chunk_but_the_last_to_the_alignment():
    assert waste([4, 4, 8], 8, 4) == 0
    assert waste([5, 3, 7], 8, 4) == 1  # [5, 3] full; [7] rounded up to 8
    assert waste([5, 7, 3], 8, 4) == 5  # 3 + 1 padding in the first two chunks; [3] rounded up to 4
    assert waste([5, 7, 3], 8, 1) == 4


def test_search_takes_the_largest_of_the_least_wasteful_sizes():
    # candidates 8..16: 8 packs [3, 5] [8] and 16 packs [3, 5, 8], both without padding; 9..15 pad
    assert search_chunk_numel([3, 5, 8], min_num_chunks=1, max_chunk_numel=100, align=1) == 16
    assert search_chunk_numel([3, 5, 8], min_num_chunks=2, max_chunk_numel=100, align=1) == 8  # at most 16 / 2
    assert search_chunk_numel([3, 5, 8], min_num_chunks=1, max_chunk_numel=12, align=1) == 8
    assert search_chunk_numel([3, 5, 8], min_num_chunks=1, max_chunk_numel=100, align=4) == 16  # 8, 12, 16
    assert search_chunk_numel([3, 5, 9], min_num_chunks=1, max_chunk_numel=100, align=4) == 20  # [3, 5, 9] in 20
    assert search_chunk_numel([30], min_num_chunks=4, max_chunk_numel=100, align=8) == 32  # never below the largest
    assert search_chunk_numel([], min_num_chunks=4, max_chunk_numel=100, align=16) == 16
    # 64 candidates: from 1 to 130 in steps of (130 - 1) // 64 = 2, so 130 itself is not tried
    assert search_chunk_numel([1] * 130, min_num_chunks=1, max_chunk_numel=1000, align=1) == 129


def _params(**shapes):
    return {n: nn.Parameter(torch.zeros(s), requires_grad=not n.startswith("f")) for n, s in shapes.items()}


def test_plan_layout_groups_packs_and_orders_the_chunks():
    # w1, w2 decay (2-D), b1, b2 do not: two groups. Decay group: its share of 4 chunks is
    # round(4 * 32 / 40) = 3, capped at its 2 parameters: size 16, one chunk each. Bias group:
    # share round(0.8) -> 1, size rounded up to the alignment 8: both in one chunk.
    params = _params(w1=(4, 4), b1=(4,), w2=(4, 4), b2=(4,))
    order = ["w1", "b1", "w2", "b2"]
    cfg = GeminiConfig(precision="fp32", min_num_chunks=4)
    layout = plan_layout(order, params, [["w1", "b1"], ["w2", "b2"]], shapes={n: tuple(p.shape) for n, p in params.items()},
                         decays=lambda n: n.startswith("w"), cfg=cfg, world=1)
    assert [[(s.name, s.offset, s.numel, s.shape) for s in spec.slots] for spec in layout.specs] == [
        [("w1", 0, 16, (4, 4))], [("w2", 0, 16, (4, 4))], [("b1", 0, 4, (4,)), ("b2", 4, 4, (4,))]]
    assert [(spec.numel, spec.trainable, spec.decay) for spec in layout.specs] == [(16, True, True), (16, True, True),
                                                                                  (8, True, False)]
    assert all(spec.slots[0].param is params[spec.slots[0].name] for spec in layout.specs)
    assert layout.order == tuple(order)
    assert layout.slot_of == {"w1": (0, 0), "w2": (1, 0), "b1": (2, 0), "b2": (2, 1)}
    assert layout.gather_order == (0, 2, 1)  # first uses: w1 at 0, b1 at 1, w2 at 2
    assert layout.reduce_order == (1, 2, 0)
    assert layout.module_chunks == {0: [0, 2], 1: [1, 2]}
    assert layout.module_slots == (((0, 0), (2, 0)), ((1, 0), (2, 1)))

    # two ranks: alignment 16; a frozen parameter gets a chunk of its own kind, and no slot to reduce
    params = _params(w1=(4, 4), b1=(4,), w2=(4, 4), fb=(4,))
    order = ["w1", "b1", "w2", "fb"]
    layout = plan_layout(order, params, [["w1", "b1"], ["w2", "fb"]], shapes={n: tuple(p.shape) for n, p in params.items()},
                         decays=lambda n: n.startswith("w"), cfg=cfg, world=2)
    assert [([s.name for s in spec.slots], spec.numel, spec.trainable, spec.decay) for spec in layout.specs] == [
        (["w1"], 16, True, True), (["w2"], 16, True, True), (["b1"], 16, True, False), (["fb"], 16, False, False)]
    assert layout.gather_order == (0, 2, 1, 3)
    assert layout.reduce_order == (1, 2, 0)  # the frozen chunk is never reduced
    assert layout.module_slots == (((0, 0), (2, 0)), ((1, 0),))


def test_a_given_chunk_size_is_used_but_never_below_the_largest_parameter():
    params = _params(a=(3,), b=(5,), c=(8,), d=(2,))
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    layout = plan_layout(list(params), params, [list(params)], shapes=shapes, decays=lambda n: False,
                         cfg=GeminiConfig(precision="fp32", chunk_numel=6), world=1)
    # size max(6, round_up(8, 8)) = 8: [3, 5] [8] [2]
    assert [[s.name for s in spec.slots] for spec in layout.specs] == [["a", "b"], ["c"], ["d"]]
    assert [spec.numel for spec in layout.specs] == [8, 8, 8]


# -- static placement fractions, sizes in messages -----------------------------------------------


def test_take_fraction_rounds_to_whole_chunks():
    chunks = [SimpleNamespace(index=i) for i in (7, 3, 5, 1)]
    ten = lambda c: 10  # noqa: E731
    assert _take_fraction(chunks, 0.0, ten) == set()
    assert _take_fraction(chunks, 0.3, ten) == {7}
    assert _take_fraction(chunks, 0.36, ten) == {7}  # 14.4 of 40: the second chunk is mostly past it
    assert _take_fraction(chunks, 0.375, ten) == {7, 3}  # 15 of 40: half a chunk rounds up
    assert _take_fraction(chunks, 0.5, ten) == {7, 3}
    assert _take_fraction(chunks, 1.0, ten) == {7, 3, 5, 1}
    sizes = {7: 30, 3: 2, 5: 4, 1: 4}
    assert _take_fraction(chunks, 0.5, lambda c: sizes[c.index]) == {7}  # half of the first chunk is below 20
    assert _take_fraction(chunks, 0.8, lambda c: sizes[c.index]) == {7, 3}


def test_sizes_in_messages():
    assert [_size(n) for n in (0, 512, 1023)] == ["0 B", "512 B", "1023 B"]
    assert [_size(n) for n in (1024, 1536, 5 * 1024**2, 3 * 1024**3, 2048 * 1024**3)] == [
        "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "2048.0 GiB"]


def _manager(cfg: GeminiConfig, budget: float, tracer: MemTracer) -> ChunkManager:
    layout = SimpleNamespace(gather_order=(), module_chunks={})
    return ChunkManager([], layout, cfg, device=torch.device("cpu"), group=None, budget=budget, tracer=tracer)


def test_soft_limit_leaves_room_for_the_activations():
    tracer = MemTracer()
    auto = GeminiConfig(precision="fp32", warmup_non_model_fraction=0.25)
    assert _manager(auto, 1000.0, tracer).soft_limit() == 750.0  # before the warm-up: a guess
    assert _manager(auto, float("inf"), tracer).soft_limit() == float("inf")
    assert _manager(GeminiConfig(placement="static", precision="fp32"), 1000.0, tracer).soft_limit() == 1000.0
    for module, nbytes in enumerate([100, 400, 50, 10]):
        tracer.record(module, nbytes)
    tracer.finish({})
    manager = _manager(auto, 1000.0, tracer)
    assert [(manager.__setattr__("clock", c), manager.soft_limit())[1] for c in range(5)] == [600, 600, 600, 950, 990]
    assert manager.world == 1 and manager.non_model_bytes() == 0
    tracer.saved_bytes = 77
    assert manager.non_model_bytes() == 77


# -- the tracer ------------------------------------------------------------------------------------


def test_tracer_queries():
    tracer = MemTracer()
    assert tracer.recording and not tracer.ready and tracer.non_model_at(3) == 0
    tracer.touch(99)  # nothing recorded yet: nothing to raise
    assert tracer.non_model == []
    for module, nbytes in [(4, 5), (5, 1), (6, 7), (5, 2), (4, 3)]:
        tracer.record(module, nbytes)
    tracer.touch(0)
    tracer.touch(6)
    assert tracer.modules == [4, 5, 6, 5, 4] and tracer.non_model == [5, 1, 7, 2, 6]
    tracer.finish({4: [0], 5: [1, 2], 6: [2]})
    assert not tracer.recording and tracer.ready
    tracer.touch(100)  # after the warm-up the record is fixed
    assert tracer.non_model == [5, 1, 7, 2, 6]
    assert [tracer.next_use(0, c) for c in range(6)] == [0, 4, 4, 4, 4, float("inf")]
    assert [tracer.next_use(2, c) for c in range(5)] == [1, 1, 2, 3, float("inf")]  # modules 5, 6 at 1, 2, 3
    assert tracer.next_use(9, 0) == float("inf")
    assert tracer.upcoming(0, 2) == [5, 6] and tracer.upcoming(2, 5) == [5, 4] and tracer.upcoming(4, 1) == []
    assert [tracer.non_model_at(c) for c in range(7)] == [5, 7, 7, 7, 6, 6, 6]  # neighbours; past the end: the last
    empty = MemTracer()
    empty.finish({})
    assert not empty.ready  # nothing recorded: no plan


def test_the_cpu_probe_counts_saved_activations_but_not_model_data():
    tracer = MemTracer()
    x = torch.randn(4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    with tracer.saved_tensor_hooks(lambda t: t is w):
        y = (x.exp() * w).sum()  # exp saves its result, the product saves it and w (model data)
    assert tracer.saved_bytes == 2 * 4 * 4
    y.backward()
    assert tracer.saved_bytes == 0
    assert torch.equal(x.grad, x.exp().detach() * w.detach())


# -- one chunk -----------------------------------------------------------------------------------


def _spec(trainable=True):
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))
    slots = [Slot(name="a", param=a, offset=0, numel=6, shape=(2, 3)), Slot(name="b", param=b, offset=6, numel=4, shape=(4,))]
    return ChunkSpec(slots=slots, numel=12, trainable=trainable, decay=False), {"a": a, "b": b}


def test_a_chunk_holds_its_ranks_shard():
    spec, params = _spec()
    values = {"a": torch.arange(6.0).view(2, 3) + 0.5, "b": torch.tensor([10.0, 11.0, 12.0, 13.0])}
    full = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 10.0, 11.0, 12.0, 13.0, 0.0, 0.0])  # padded with zeros
    chunk = Chunk.build(2, spec, values, dtype=torch.bfloat16, world=2, rank=1, device=torch.device("cpu"))
    assert (chunk.index, chunk.numel, chunk.shard_numel, chunk.shard_range) == (2, 12, 6, (6, 12))
    assert chunk.shard.dtype == torch.bfloat16 and torch.equal(chunk.shard, full[6:].bfloat16())
    assert chunk.master.dtype == torch.float32 and torch.equal(chunk.master.data, full[6:])
    assert chunk.master.data_ptr() != chunk.shard.data_ptr()
    assert (chunk.payload_bytes, chunk.shard_bytes, chunk.optim_bytes) == (24, 12, 96)
    assert (chunk.shard_at, chunk.optim_at, chunk.full_copy, chunk.in_use) == (ShardAt.UNPLACED, OptimAt.UNPLACED,
                                                                               FullCopy.PENDING, 0)
    assert torch.equal(chunk.flatten(values, torch.float32), full)
    assert torch.equal(chunk.flatten({"b": values["b"]}, torch.float64)[:6], torch.zeros(6, dtype=torch.float64))
    assert {k: v.tolist() for k, v in chunk.unflatten(full).items()} == {k: v.tolist() for k, v in values.items()}
    assert repr(chunk) == "Chunk(2, 2 params, 12 elems, released, shard unplaced)"

    chunk.acquire()
    chunk.attach(full.bfloat16())
    assert torch.equal(params["a"].data, values["a"].bfloat16()) and torch.equal(params["b"].data, values["b"].bfloat16())
    assert chunk.state == "compute" and not chunk.payload_is_shard
    with pytest.raises(IllegalMove) as err:
        chunk.attach(full)
    assert str(err.value) == "chunk 2: payload attached twice (state compute)"
    with pytest.raises(IllegalMove) as err:
        chunk.drop()
    assert str(err.value) == "chunk 2: payload dropped while 1 running module(s) use it"
    chunk.release()
    assert chunk.state == "held"
    chunk.drop()
    assert params["a"].dtype == torch.bfloat16 and params["a"].shape == (2, 3) and torch.isnan(params["a"]).all()
    with pytest.raises(IllegalMove) as err:
        chunk.release()
    assert str(err.value) == "Chunk(2, 2 params, 12 elems, released, shard unplaced) released more often than used"

    frozen, _ = _spec(trainable=False)
    chunk = Chunk.build(0, frozen, values, dtype=torch.float16, world=1, rank=0, device=torch.device("cpu"))
    assert chunk.master is None and chunk.optim_at == OptimAt.NONE and chunk.optim_bytes == 0
    assert chunk.shard.dtype == torch.float16 and torch.equal(chunk.shard, full.half())
    assert optim_state(chunk) == {}


def test_every_move_names_the_chunk_in_its_message():
    spec, _ = _spec()
    chunk = Chunk.build(2, spec, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, dtype=torch.float32, world=1, rank=0,
                        device=torch.device("cpu"))
    with pytest.raises(IllegalMove) as err:
        chunk.set_full_copy(FullCopy.KEPT)
    assert str(err.value) == "chunk 2: FullCopy pending -> kept is not a legal move (from pending: gathered)"
    with pytest.raises(IllegalMove) as err:
        chunk.move_shard(ShardAt.DEVICE_AND_HOST)
    assert str(err.value) == "chunk 2: ShardAt unplaced -> device+host is not a legal move (from unplaced: device, host)"
    with pytest.raises(IllegalMove) as err:
        chunk.place_optim(OptimAt.NONE)
    assert str(err.value) == "chunk 2: OptimAt unplaced -> none is not a legal move (from unplaced: device, host)"
    grads = ChunkGrads(chunk, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(IllegalMove) as err:
        grads.move(Reduction.LATE)
    assert str(err.value) == ("gradients of chunk 2: Reduction collecting -> late is not a legal move "
                              "(from collecting: reduced)")


def test_optimizer_state_goes_in_and_out_by_parameter_name():
    spec, _ = _spec()
    values = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    chunk = Chunk.build(0, spec, values, dtype=torch.float32, world=1, rank=0, device=torch.device("cpu"))
    assert optim_state(chunk) == {}  # not placed: no Adam state yet
    chunk.exp_avg, chunk.exp_avg_sq = torch.full((12,), 9.0), torch.full((12,), 9.0)
    chunk.steps = torch.tensor([5.0, 5.0])
    moments = {"b": {"exp_avg": torch.full((4,), 2.0), "exp_avg_sq": torch.full((4,), 3.0), "step": 7}}
    import_optim_state([chunk], moments)
    assert chunk.exp_avg.tolist() == [0.0] * 6 + [2.0] * 4 + [0.0] * 2  # a's state is fresh
    assert chunk.exp_avg_sq.tolist() == [0.0] * 6 + [3.0] * 4 + [0.0] * 2
    assert chunk.steps.tolist() == [0.0, 7.0]
    import_optim_state([chunk], {})  # nothing given: nothing changes
    import_optim_state([chunk], {"other": moments["b"]})
    assert chunk.steps.tolist() == [0.0, 7.0]

    ranks = Ranks(1, 0, None, torch.device("cpu"))
    out_values, out_moments = export_full([chunk], ranks)
    assert {k: v.tolist() for k, v in out_values.items()} == {k: v.tolist() for k, v in values.items()}
    assert set(out_moments) == {"a", "b"}
    assert out_moments["b"]["exp_avg"].tolist() == [2.0] * 4 and out_moments["b"]["exp_avg_sq"].tolist() == [3.0] * 4
    assert out_moments["b"]["step"] == 7.0 and out_moments["a"]["step"] == 0.0
    assert out_moments["a"]["exp_avg"].shape == (2, 3)
    out_moments["b"]["exp_avg"] += 1  # copies, not views of the chunk's state
    out_values["a"] += 1
    assert chunk.exp_avg[6].item() == 2.0 and chunk.master.data[0].item() == 0.0
    assert export_full([chunk], ranks, with_moments=False)[1] == {}


# -- the host AdamW probe ----------------------------------------------------------------------------


def test_the_probe_accepts_multiples_of_the_kernels_lanes_only():
    width = host_adam.vector_width()
    assert width in (4, 8, 16, 32)
    verdicts = {w: host_adam._reproduces(w) for w in range(1, 34)}
    assert [w for w, ok in verdicts.items() if ok] == [w for w in range(1, 34) if w % width == 0]


def test_the_probe_draws_from_its_own_generator():
    """The first offloaded step runs the probe: it must not move the global RNG (dropout streams)."""
    state = torch.get_rng_state()
    host_adam._reproduces(8)
    assert torch.equal(torch.get_rng_state(), state)


def _placed(placement: str, budget: float = float("inf"), **fractions):
    """Three one-parameter chunks of 8 fp32 elements (shard 32 B, optimizer state 128 B), placed by
    a manager (one rank)."""
    specs = []
    for i in range(3):
        p = nn.Parameter(torch.full((8,), float(i)))
        specs.append(ChunkSpec(slots=[Slot(name=f"p{i}", param=p, offset=0, numel=8, shape=(8,))], numel=8,
                               trainable=True, decay=False))
    chunks = [Chunk.build(i, s, {f"p{i}": s.slots[0].param.data}, dtype=torch.float32, world=1, rank=0,
                          device=torch.device("cpu")) for i, s in enumerate(specs)]
    layout = SimpleNamespace(gather_order=(0, 1, 2), module_chunks={0: [0], 1: [1], 2: [2]})
    cfg = GeminiConfig(placement=placement, precision="fp32", **fractions)
    manager = ChunkManager(chunks, layout, cfg, device=torch.device("cpu"), group=None, budget=budget, tracer=MemTracer())
    manager.place()
    return manager


def test_eviction_follows_the_trace_not_the_chunk_order():
    manager = _placed("auto")
    for module in (2, 1, 2, 1):  # chunk 2 is needed first, then 1; chunk 0 never
        manager.tracer.record(module, 0)
    manager.tracer.finish(manager.module_chunks)
    manager.clock = 0
    order = []
    while manager._evict_one():
        order.append(next(c.index for c in manager.chunks if not c.shard_on_device and c.index not in order))
    assert order == [0, 1, 2]  # never again, then latest next use (1 at 1, 2 at 0)


def test_eviction_takes_the_chunk_needed_latest():
    manager = _placed("auto")
    assert manager.device_bytes == 3 * (32 + 128)  # shards and optimizer state, all on the device
    for module in (1, 0, 2, 0, 1):  # uses: chunk 1 at 0 and 4, chunk 0 at 1 and 3, chunk 2 at 2
        manager.tracer.record(module, 0)
    manager.tracer.finish(manager.module_chunks)
    manager.clock = 3  # next uses: chunk 0 at 3, chunk 1 at 4, chunk 2 never
    manager.chunks[1].acquire()
    evicted = []
    while manager._evict_one():
        evicted.append(next(c.index for c in manager.chunks if not c.shard_on_device and c.index not in evicted))
    assert evicted == [2, 0]  # never needed again first; chunk 1 is in use and stays
    assert manager.num_evictions == 2 and manager.device_bytes == 3 * 128 + 32
    assert [c.shard_at for c in manager.chunks] == [ShardAt.HOST, ShardAt.DEVICE, ShardAt.HOST]
    assert torch.equal(manager.chunks[2].shard, torch.full((8,), 2.0))  # the values went home
    manager.chunks[1].release()
    manager.clock = 0
    assert manager._evict_one() and manager.chunks[1].shard_at == ShardAt.HOST
    assert not manager._evict_one()  # nothing left on the device


def test_ties_in_eviction_go_to_the_higher_index_and_static_chunks_keep_their_shards():
    manager = _placed("auto")
    manager.tracer.record(0, 0)
    manager.tracer.finish({})  # no chunk is used again: all tie at infinity
    assert manager._evict_one() and [c.shard_on_device for c in manager.chunks] == [True, True, False]
    static = _placed("static")
    assert not static._evict_one()  # a static shard is never evicted, only gathered copies
    assert static.num_evictions == 0


def _where(manager):
    return [(c.shard_on_device, c.optim_on_device) for c in manager.chunks]


def test_auto_placement_fills_the_budget_with_parameters_first():
    # room before the warm-up: 70 % of the budget. 300 B -> 210: the three shards (96 B) fit, no
    # optimizer state (96 + 128 > 210). 400 B -> 280: the first chunk's state fits too (224).
    assert _where(_placed("auto", 300.0)) == [(True, False)] * 3
    manager = _placed("auto", 400.0)
    assert _where(manager) == [(True, True), (True, False), (True, False)]
    assert manager.device_bytes == manager.peak_bytes == 96 + 128
    assert _where(_placed("auto", 60.0)) == [(True, False), (False, False), (False, False)]  # room 42: one shard
    half = _placed("auto", 400.0, warmup_non_model_fraction=0.5)  # room 200: shards only
    assert _where(half) == [(True, False)] * 3
    assert all(c.payload_is_shard for c in manager.chunks if c.shard_on_device)  # one rank: used in place
    assert all(torch.isnan(c.slots[0].param).all() for c in _placed("auto", 60.0).chunks[1:])  # host: placeholders


def test_static_placement_puts_the_last_chunks_on_the_host():
    # param_host_fraction 0.5 of 96 B, from the last chunk back: 32 (half of it, 16, is within 48),
    # then 64 (48 is not past 48), then the first would pass it. Optimizer state 0.25 of 384 B: one.
    manager = _placed("static", param_host_fraction=0.5, optim_host_fraction=0.25)
    assert _where(manager) == [(True, True), (False, True), (False, False)]
    assert manager.device_bytes == 32 + 2 * 128
    assert [c.payload is not None for c in manager.chunks] == [True, False, False]


def test_reserve_evicts_only_past_the_soft_limit():
    manager = _placed("auto", 1000.0)  # room 700 before the warm-up; all 480 B placed on the device
    assert manager.device_bytes == 480
    manager.reserve(220, "x")  # exactly up to the limit: nothing to evict
    assert (manager.num_evictions, manager.device_bytes) == (0, 700)
    manager.reserve(1, "y")  # one byte more: the chunk needed latest (all tie: the last) goes home
    assert manager.num_evictions == 1 and manager.device_bytes == 700 + 1 - 32
    assert [c.shard_on_device for c in manager.chunks] == [True, True, False]


def test_the_size_search_steps_through_every_size_for_a_small_range():
    # low 8 (the largest), high 11: steps of 1 try 11, where [3, 8] fits without padding
    assert search_chunk_numel([3, 8], min_num_chunks=1, max_chunk_numel=100, align=1) == 11
    # low 100, high 199: (199 - 100) // 64 = 1, a step of 1 reaches 199 (no padding)
    assert search_chunk_numel([100] + [1] * 99, min_num_chunks=1, max_chunk_numel=1000, align=1) == 199


def test_the_budget_itself_may_be_filled():
    manager = _placed("static", 1000.0)  # static: no eviction, the budget is the limit
    manager.reserve(1000 - manager.device_bytes, "all of it")
    assert manager.device_bytes == 1000
    with pytest.raises(UserError, match=r"gemini: one more needs 1 B but the device budget"):
        manager.reserve(1, "one more")


def test_a_given_chunk_size_larger_than_the_search_would_pick_is_used():
    params = _params(a=(3,), b=(5,), c=(8,), d=(2,))
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    layout = plan_layout(list(params), params, [list(params)], shapes=shapes, decays=lambda n: False,
                         cfg=GeminiConfig(precision="fp32", chunk_numel=16), world=1)
    assert [[s.name for s in spec.slots] for spec in layout.specs] == [["a", "b", "c"], ["d"]]  # 3 + 5 + 8 = 16


def test_placement_boundaries_are_inclusive():
    # warm-up fraction 0.5: the room is half the budget. 192 B: the three shards (96 B) just fit.
    assert _where(_placed("auto", 192.0, warmup_non_model_fraction=0.5)) == [(True, False)] * 3
    # 448 B: room 224 = the shards and exactly one chunk's optimizer state (128 B)
    assert _where(_placed("auto", 448.0, warmup_non_model_fraction=0.5)) == [(True, True), (True, False), (True, False)]
    empty = _manager(GeminiConfig(precision="fp32"), 1000.0, MemTracer())
    assert empty.stats()["peak_bytes"] == 0 and empty.stats()["device_bytes"] == 0


def test_moments_reach_a_chunk_after_chunks_that_have_none():
    """A trainable-only state lists the parameters that stepped: earlier chunks may have none."""
    chunks = _placed("auto").chunks
    moments = {"p2": {"exp_avg": torch.full((8,), 0.5), "exp_avg_sq": torch.full((8,), 0.25), "step": 3.0}}
    import_optim_state(chunks, moments)
    assert chunks[2].exp_avg.tolist() == [0.5] * 8 and chunks[2].exp_avg_sq.tolist() == [0.25] * 8
    assert chunks[2].steps.tolist() == [3.0] and chunks[0].steps.tolist() == [0.0]
