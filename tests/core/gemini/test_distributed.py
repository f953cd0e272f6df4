"""Two ranks (ZeRO-sharded chunks, reduce-scattered gradients) against one process: as gloo
processes and as threads (tests/threaded.py)."""

import pytest
import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.checkpoint import consolidate
from ferryman.core.parallel import init_parallel
from tests.core.gemini.models import TinyNet, batches, lm_loss, train_engine
from tests.threaded import launchers
from tests.tolerance import approx, assert_close

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
CONFIGS = {
    "static": GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5, optim_host_fraction=0.5),
    "auto": GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=20_000),
}


def _run_all(rank: int, world: int, folder: str | None):
    """Every configuration in one spawn: starting processes costs more than the training."""
    results = {name: _run(rank, world, name, folder and f"{folder}/{name}") for name in CONFIGS}
    results["loop"] = _loop(rank, folder)
    return results


def _loop(rank: int, folder: str) -> dict:
    """The training loop on two ranks: checkpoints, EMA and an exact resume through collectives."""
    from ferryman.core.training import TrainConfig, train

    dims = init_parallel()
    data = batches(4)

    def loader():
        return [(ids[rank * 2 : rank * 2 + 2], tgt[rank * 2 : rank * 2 + 2]) for ids, tgt in data]

    def loss_fn(engine, batch):
        return lm_loss(engine(batch[0]), batch[1])

    def cfg(out, steps, **kw):
        return TrainConfig(
            out_dir=out, max_steps=steps, precision="fp32", engine="gemini", progress=False, plot=False,
            ema_decay=0.5, optim=OPTIM, gemini=CONFIGS["auto"], **kw,
        )

    straight = train(cfg(f"{folder}/loop_a", 6), _tiny_net, loader, loss_fn, dims=dims)
    train(cfg(f"{folder}/loop_b", 6, stop_after=3), _tiny_net, loader, loss_fn, dims=dims)
    resumed = train(cfg(f"{folder}/loop_b", 6, resume="latest"), _tiny_net, loader, loss_fn, dims=dims)
    return {"straight": straight.losses, "resumed": resumed.losses, "ema": resumed.ema_state_dict, "ema_ref": straight.ema_state_dict}


def _seeded_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().state_dict()


# Drawn at import, before any rank starts: threaded ranks share the global RNG, and the loop seeds
# it (for dropout) while another rank may be building its model.
INITIAL = _seeded_state()


def _tiny_net() -> TinyNet:
    model = TinyNet()
    model.load_state_dict(INITIAL)
    return model


def _run(rank: int, world: int, name: str, folder: str | None):
    model = _tiny_net()
    dims = init_parallel() if world > 1 else None
    engine = gemini(model, CONFIGS[name], OPTIM, dims)
    per_rank = 4 // world  # the same global batch of 4, split across ranks
    data = [(ids[rank * per_rank : (rank + 1) * per_rank], tgt[rank * per_rank : (rank + 1) * per_rank]) for ids, tgt in batches(4)]
    losses = train_engine(engine, data)
    if folder is not None:
        engine.save(folder)
    shard_numel = [c.shard_numel for c in engine.chunks]
    return losses, engine.state_dict(), shard_numel, engine.stats()


@pytest.fixture(scope="module", params=launchers())
def two_ranks(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("gemini_dp")
    return request.param(_run_all, 2, str(folder)), folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one(name, two_ranks):
    results, folder = two_ranks
    tmp_path = folder / name
    (single_losses, single_state, _, _) = _run(0, 1, name, None)
    (loss0, state0, shards0, stats0), (loss1, state1, _, _) = results[0][name], results[1][name]
    mean = [(a + b) / 2 for a, b in zip(loss0, loss1)]
    assert mean == approx(single_losses, ulps=16)  # two ranks sum in another order
    for key, value in single_state.items():
        assert_close(state0[key], value, ulps=16, msg=key)
        assert torch.equal(state0[key], state1[key])  # both ranks agree
    if name == "auto":  # the budget binds on each rank, and holds
        assert stats0["evictions"] > 0
        assert stats0["peak_bytes"] <= CONFIGS[name].device_budget_bytes
    # a checkpoint written by two ranks consolidates into the same plain weights
    plain = consolidate(tmp_path)
    assert all(torch.equal(plain[k], state0[k]) for k in single_state)
    assert (tmp_path / "shard-00001-of-00002.safetensors").is_file()
    assert sum(shards0) < sum(p.numel() for p in TinyNet().parameters())  # each rank holds half


def test_training_loop_resumes_exactly_on_two_ranks(two_ranks):
    results, folder = two_ranks
    loop0, loop1 = results[0]["loop"], results[1]["loop"]
    assert loop0["resumed"] == loop0["straight"][3:]  # the mean loss over ranks, bit for bit
    assert loop0["straight"] == loop1["straight"]
    assert all(torch.equal(loop0["ema"][k], loop0["ema_ref"][k]) for k in loop0["ema_ref"])
    ckpt = folder / "loop_b" / "checkpoints" / "step-00000006"
    assert {p.name for p in ckpt.glob("shard-*")} == {"shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"}
    assert (ckpt / "rng-rank00001.safetensors").is_file()
