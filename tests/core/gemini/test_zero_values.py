"""ZeRO sharding on two threaded ranks (tests/threaded.py), by value: each rank holds its half of
every chunk, gathers give the full values, a two-rank checkpoint holds one file per rank (buffers
and layout from rank 0) and loads on one rank, and a one-rank checkpoint loads on two."""

import json

import torch
from safetensors.torch import load_file

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.state import gather_full
from ferryman.core.parallel import init_parallel
from tests.core.gemini.models import TinyNet, batches, lm_loss
from tests.core.gemini.test_engine_values import Buffered
from tests.threaded import one_rank_at_a_time, run_threaded
from tests.tolerance import assert_close

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)
CFG = GeminiConfig(placement="static", precision="fp32", min_num_chunks=3, param_host_fraction=0.5)


def _initial(cls) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():  # other tests' draws stay as they were
        torch.manual_seed(0)
        return cls().state_dict()


INITIAL = _initial(Buffered)  # drawn before any rank starts: threaded ranks share the global RNG


def _model() -> Buffered:
    with one_rank_at_a_time():
        model = Buffered()
    model.load_state_dict(INITIAL)
    return model


def _train(engine, rank: int, world: int, steps: int) -> None:
    per = 4 // world
    for ids, tgt in batches(steps):
        engine.backward(lm_loss(engine(ids[rank * per : (rank + 1) * per]), tgt[rank * per : (rank + 1) * per]))
        engine.step()
        engine.zero_grad()


def _ranks(rank: int, world: int, folder: str):
    dims = init_parallel()
    engine = gemini(_model(), CFG, OPTIM, dims)
    _train(engine, rank, world, 2)
    shards = [(c.shard_numel, c.shard_range, c.shard.clone(), gather_full(engine.ranks, c, c.shard)) for c in engine.chunks]
    engine.save(folder + "/two")
    resumed = gemini(_model(), CFG, OPTIM, dims)
    resumed.load(folder + "/one")  # written by one rank
    return shards, engine.state_dict(), engine.named_from(engine.master_tensors()), resumed.state_dict()


def test_two_ranks_hold_halves_gather_wholes_and_exchange_checkpoints(tmp_path):
    single = gemini(_model(), CFG, OPTIM)
    single.save(tmp_path / "one")
    one_state = single.state_dict()
    (shards0, state0, named0, resumed0), (shards1, state1, _, resumed1) = run_threaded(_ranks, 2, str(tmp_path), timeout_s=60)
    for (n0, range0, shard0, full0), (n1, range1, shard1, full1) in zip(shards0, shards1):
        assert range0 == (0, n0) and range1 == (n1, 2 * n1) and n0 == n1
        assert torch.equal(full0, torch.cat([shard0, shard1])) and torch.equal(full1, full0)
    params = [k for k in state0 if not k.startswith("bn.")]  # buffers are each rank's own (its data)
    assert all(torch.equal(state0[k], state1[k]) for k in params)
    assert all(torch.equal(named0[k], state0[k]) for k in named0)
    for resumed in (resumed0, resumed1):  # a one-rank checkpoint, on two ranks
        assert all(torch.equal(resumed[k], one_state[k]) for k in one_state)

    folder = tmp_path / "two"
    layout = json.loads((folder / "gemini.json").read_text())
    assert layout["world_size"] == 2
    files = [load_file(str(folder / f"shard-0000{r}-of-00002.safetensors")) for r in range(2)]
    assert {k for k in files[0] if k.startswith("buffer.")} == {"buffer.bn.running_mean", "buffer.bn.num_batches_tracked"}
    assert not any(k.startswith("buffer.") for k in files[1])  # buffers are rank 0's to write
    assert files[0]["buffer.bn.num_batches_tracked"].item() == 2
    assert {k for k in files[1]} == {k for k in files[0] if not k.startswith("buffer.")}

    other = gemini(Buffered(), CFG, OPTIM)
    other.load(folder)  # written by two ranks, read by one
    loaded = other.state_dict()
    assert set(loaded) == set(state0) and all(torch.equal(loaded[k], state0[k]) for k in state0)


TINY = _initial(TinyNet)  # no buffers: the ranks' halves of the batch give the whole batch's gradient


def _tiny() -> TinyNet:
    with one_rank_at_a_time():
        model = TinyNet()
    model.load_state_dict(TINY)
    return model


CLIPPED = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.1)  # the norm is summed over the dp group only


def _dap_ranks(rank: int, world: int):
    """Four ranks: two data-parallel groups of two DAP peers, which see the same data."""
    dims = init_parallel(dap=2)
    assert (dims.dp, dims.dap) == (2, 2)
    engine = gemini(_tiny(), CFG, CLIPPED, dims)
    _train(engine, torch.distributed.get_rank(dims.dp_group), dims.dp, 3)
    return engine.state_dict()


def test_the_data_parallel_group_is_not_the_world():
    reference = gemini(_tiny(), CFG, CLIPPED)
    _train(reference, 0, 1, 3)
    expected = reference.state_dict()
    for state in run_threaded(_dap_ranks, 4, timeout_s=60):
        for name in expected:
            assert_close(state[name], expected[name], ulps=16, msg=name)


def _bf16_ranks(rank: int, world: int):
    dims = init_parallel()
    cfg = GeminiConfig(placement="static", precision="bf16", min_num_chunks=3, reorder_after_warmup=False)
    engine = gemini(_model(), cfg, OPTIM, dims)
    dtypes = set()

    def watch(module, args, out):  # after the engine's hooks: sees what forward and backward use
        dtypes.update(p.dtype for p in module.parameters())
        out.register_hook(lambda grad: dtypes.update(p.dtype for p in module.parameters()))

    handle = engine.module.mid.register_forward_hook(watch)
    _train(engine, rank, world, 3)
    handle.remove()
    states = {c.state for c in engine.chunks}
    stats = engine.stats()
    trainable = sum(c.master is not None for c in engine.chunks)
    return dtypes, stats["gathers"], len(engine.chunks), states, (stats["overlapped_reductions"], trainable)


def test_two_ranks_gather_each_chunk_once_per_weight_version_in_the_compute_dtype():
    for dtypes, gathers, num_chunks, states, (overlapped, trainable) in run_threaded(_bf16_ranks, 2, timeout_s=60):
        assert dtypes == {torch.bfloat16}  # backward too, from the host copy of the gathered values
        assert overlapped == 3 * trainable  # every parameter gets its gradient: each chunk goes during backward
        assert gathers == 3 * num_chunks - 2  # every chunk each step; the frozen ones (two) only once
        assert states == {"released"}  # static: nothing stays gathered between uses


class Spare(torch.nn.Module):
    """Three 16 x 16 layers, one chunk each (chunk_numel=256); ``spare`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.spare = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _skipped_ranks(rank: int, world: int):
    dims = init_parallel()
    out = {}
    for placement in ("static", "auto"):
        with one_rank_at_a_time():
            torch.manual_seed(0)
            model = Spare()
        cfg = GeminiConfig(placement=placement, precision="fp32", chunk_numel=256, reorder_after_warmup=False)
        engine = gemini(model, cfg, OPTIM, dims)
        during = []  # at a's use (after the engine's own hook): gathered on demand, not ahead
        model.a.register_forward_pre_hook(lambda *_, e=engine, d=during: d.append([str(c.full_copy) for c in e.chunks]))
        engine(torch.ones(2, 16)).sum()
        spare = engine.chunks[engine.layout.slot_of["spare.weight"][0]]
        out[placement] = (len(engine.chunks), spare.state, spare.full_copy, engine.stats()["gathers"], during)
    with one_rank_at_a_time():
        model = Spare()
    tight = gemini(model, GeminiConfig(placement="static", precision="fp32", chunk_numel=256, device_budget_bytes=1000), OPTIM, dims)
    try:
        tight(torch.ones(2, 16))
    except UserError as err:
        out["error"] = str(err)
    return out


def test_a_chunk_gathered_only_for_the_other_ranks_is_kept_on_the_host_under_static_placement():
    for out in run_threaded(_skipped_ranks, 2, timeout_s=60):
        on_demand = [["gathered", "pending", "pending"]]
        assert out["static"] == (3, "released", "kept", 3, on_demand)  # gathered at the end of the forward, then dropped
        assert out["auto"] == (3, "held", "gathered", 3, on_demand)  # auto keeps it as a cache until evicted
        # 256 fp32 elements per chunk (1 KiB), more than the whole budget; static placement put
        # each rank's three shards (512 B) and their optimizer state (2 KiB) there already
        assert out["error"] == ("gemini: gathering chunk 0 needs 1.0 KiB but the device budget "
                                "(gemini.device_budget_bytes=1000) is full: 7.5 KiB of model data, 1.0 KiB of it in use "
                                "by running modules; raise the budget, move optimizer state to the host "
                                "(optim_host_fraction) or use smaller chunks")


def _trace(rank: int, world: int, rows: list[int]):
    dims = init_parallel() if world > 1 else None
    engine = gemini(_tiny(), GeminiConfig(placement="auto", precision="fp32"), OPTIM, dims)
    ids, tgt = batches(1, batch=max(rows))[0]
    engine.backward(lm_loss(engine(ids[: rows[rank]]), tgt[: rows[rank]]))
    engine.step()
    return engine.manager.tracer.non_model


def test_the_ranks_plan_with_the_largest_activations_any_rank_saw():
    small, large = _trace(0, 1, [1]), _trace(0, 1, [3])
    assert len(small) == len(large) and any(a < b for a, b in zip(small, large))
    merged = [max(a, b) for a, b in zip(small, large)]
    assert run_threaded(_trace, 2, [1, 3], timeout_s=60) == [merged, merged]


def _tight_backward(rank: int, world: int):
    dims = init_parallel()
    with one_rank_at_a_time():
        model = Spare()
    cfg = GeminiConfig(placement="static", precision="fp32", chunk_numel=256, device_budget_bytes=3500,
                       param_host_fraction=1.0, optim_host_fraction=1.0, reorder_after_warmup=False)
    engine = gemini(model, cfg, OPTIM, dims)
    loss = engine(torch.ones(2, 16)).sum()
    try:
        engine.backward(loss)
    except UserError as err:
        return str(err)
    return None


def test_a_reduce_scatter_output_over_the_budget_is_named():
    # everything on the host: the backward holds b (1 KiB) and its gradient buffer (1 KiB); spare,
    # first in the reduction order and unused, is reduced at once: its buffer (1 KiB) fits under
    # 3500 B, its reduce-scatter output (512 B) does not, and nothing can be evicted
    for message in run_threaded(_tight_backward, 2, timeout_s=60):
        assert message == ("gemini: reduce-scatter output of chunk 2 needs 512 B but the device budget "
                           "(gemini.device_budget_bytes=3500) is full: 3.0 KiB of model data, 1.0 KiB of it in use "
                           "by running modules; raise the budget, move optimizer state to the host "
                           "(optim_host_fraction) or use smaller chunks")


def _pretrained_ranks(rank: int, world: int, folder: str):
    dims = init_parallel()
    engine = gemini(_model(), CFG, OPTIM, dims)
    _train(engine, rank, world, 1)
    engine.save_pretrained(f"{folder}/pretrained-{rank}")  # every rank gathers; rank 0 alone writes
    return engine.state_dict()


def test_save_pretrained_on_two_ranks_writes_the_whole_model_once(tmp_path):
    state, _ = run_threaded(_pretrained_ranks, 2, str(tmp_path), timeout_s=60)
    written = load_file(str(tmp_path / "pretrained-0" / "model.safetensors"))
    assert set(written) == set(state) - {"head.weight"} and all(torch.equal(written[k], state[k]) for k in written)
    assert not (tmp_path / "pretrained-1").exists()


def _partial_ranks(rank: int, world: int):
    from tests.core.gemini.test_optim_values import Partial

    dims = init_parallel() if world > 1 else None
    with one_rank_at_a_time():
        torch.manual_seed(0)
        model = Partial()
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32", min_num_chunks=1), OPTIM, dims)
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(2):  # the same data on every rank: the mean gradient is one rank's
        engine.backward(engine(x).sum())
        engine.step()
        engine.zero_grad()
    return engine.state_dict()


def test_a_chunk_missing_a_gradient_is_reduced_at_the_end_of_backward_on_two_ranks():
    (expected,) = [_partial_ranks(0, 1)]
    for state in run_threaded(_partial_ranks, 2, timeout_s=60):
        assert_close(state["w"], expected["w"], ulps=16)
        assert torch.equal(state["idle"], expected["idle"])


def _reused_ranks(rank: int, world: int, steps: int):
    from tests.core.gemini.test_unused import BranchNet

    dims = init_parallel()
    with one_rank_at_a_time():
        torch.manual_seed(0)
        model = BranchNet(reuse=True)
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32"), OPTIM, dims)
    for ids, tgt in batches(steps):
        rows = slice(2 * rank, 2 * rank + 2)
        engine.backward(lm_loss(engine(ids[rows], True, False), tgt[rows]))
        engine.step()
        engine.zero_grad()
    return engine.stats()["late_reductions"]


def test_a_reused_block_takes_one_late_reduction_per_step():
    """The last block runs twice in reentrant checkpoints: one of its chunks is reduced before the
    recomputation delivers its second gradients, once in every backward, on every rank alike."""
    assert run_threaded(_reused_ranks, 2, 3, timeout_s=60) == [3, 3]
