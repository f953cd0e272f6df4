"""How the plain engine is set up, checked by what it then does: its updates equal torch's own
AdamW (non-fused, built here) with the configured betas, eps and weight decay (biases exempt or
not), a single-process ``ParallelDims`` (what ``init_parallel`` returns without torchrun) trains
without DDP, a rank other than 0 writes no checkpoint, and with data parallelism the gradients are
averaged over the data-parallel group only (threaded ranks: a [dp=2, dap=2] grid whose ranks all
see different batches), also for a parameter that a step leaves out."""

import pytest
import torch
from torch import nn

from ferryman.core.optim import OptimConfig
from ferryman.core.parallel import ParallelDims, init_parallel
from ferryman.core.training import PlainEngine
from tests.threaded import one_rank_at_a_time, run_threaded

CPU = torch.device("cpu")
XS = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(11))  # a batch per step (or per rank)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(module, x: torch.Tensor) -> torch.Tensor:
    return (module(x) - 0.5).square().sum()


@pytest.mark.parametrize("no_decay_1d", [True, False])
def test_updates_are_torch_adamw_with_the_configured_betas_eps_and_decay(no_decay_1d):
    ocfg = OptimConfig(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, no_decay_1d=no_decay_1d)
    engine = PlainEngine(_model(), ocfg, torch.float32, CPU)
    reference = _model()
    decayed = [p for p in reference.parameters() if p.dim() > 1 or not no_decay_1d]
    exempt = [p for p in reference.parameters() if p.dim() == 1 and no_decay_1d]
    groups = [{"params": decayed, "weight_decay": 0.1}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    adamw = torch.optim.AdamW(groups, lr=0.05, betas=(0.8, 0.95), eps=1e-3, foreach=False)
    for x in XS:  # several steps: the betas show only after the first
        engine.backward(_loss(engine, x))
        engine.step()
        engine.zero_grad()
        _loss(reference, x).backward()
        adamw.step()
        adamw.zero_grad()
    for (name, mine), theirs in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_a_single_process_parallel_dims_trains_like_none():
    """``init_parallel()`` without torchrun's variables: one process, no groups, no DDP."""
    alone = PlainEngine(_model(), OptimConfig(lr=0.1), torch.float32, CPU, ParallelDims())
    plain = PlainEngine(_model(), OptimConfig(lr=0.1), torch.float32, CPU)
    for engine in (alone, plain):
        engine.backward(_loss(engine, XS[0]))
        engine.step()
    assert alone.rank == 0
    assert all(torch.equal(a, b) for a, b in zip(alone.module.parameters(), plain.module.parameters(), strict=True))


def test_only_rank_0_writes_the_checkpoint(tmp_path):
    """Every rank holds the same state; rank 1 of a DAP pair (one data-parallel rank) writes nothing."""
    dims = ParallelDims(world_size=2, rank=1, dap=2)
    engine = PlainEngine(_model(), OptimConfig(), torch.float32, CPU, dims)
    assert engine.rank == 1
    engine.save(tmp_path / "rank1")
    assert not (tmp_path / "rank1").exists()
    PlainEngine(_model(), OptimConfig(), torch.float32, CPU).save(tmp_path / "rank0")
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == {"model.safetensors", "optimizer.safetensors",
                                                                "optimizer.json"}


class WithSide(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)
        self.side = nn.Linear(5, 2)  # used in the first step only

    def forward(self, x, side=False):
        return self.lin(x) + self.side(x) if side else self.lin(x)


INITIAL = {"lin": _model().state_dict()}  # drawn before any rank starts (the ranks share the RNG)
torch.manual_seed(1)
INITIAL["side"] = WithSide().state_dict()


def _grads_by_rank(rank, world, kind):
    dims = init_parallel(dap=2, backend="threaded")  # ranks [[0, 1], [2, 3]]: dp groups {0, 2} and {1, 3}
    with one_rank_at_a_time():
        model = _model() if kind == "lin" else WithSide()
    model.load_state_dict(INITIAL[kind])
    engine = PlainEngine(model, OptimConfig(lr=0.1), torch.float32, CPU, dims)
    grads = []
    for step in range(3 if kind == "side" else 1):  # the side layer: used, left out, used again
        out = engine(XS[rank], side=step != 1) if kind == "side" else engine(XS[rank])
        engine.backward((out - 0.5).square().sum())
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in engine.module.named_parameters()})
        engine.step()
        engine.zero_grad()
    return grads


def _own_grads(model: nn.Module, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (model(x, **kw) - 0.5).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_data_parallel_gradients_are_averaged_over_the_data_parallel_group_only():
    by_rank = run_threaded(_grads_by_rank, 4, "lin")
    model = _model()
    model.load_state_dict(INITIAL["lin"])
    own = [_own_grads(model, XS[r]) for r in range(4)]
    for rank, [grads] in enumerate(by_rank):
        mates = [r for r in range(4) if r % 2 == rank % 2]  # this rank's data-parallel group
        for name, grad in grads.items():
            expected = sum(own[r][name] for r in mates) / 2
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_a_parameter_left_out_of_a_data_parallel_step_neither_stops_training_nor_moves():
    by_rank = run_threaded(_grads_by_rank, 4, "side")
    model = WithSide()
    model.load_state_dict(INITIAL["side"])
    own = [_own_grads(model, XS[r], side=True) for r in range(4)]
    for rank, (first, second, third) in enumerate(by_rank):
        mates = [r for r in range(4) if r % 2 == rank % 2]
        torch.testing.assert_close(first["side.weight"], sum(own[r]["side.weight"] for r in mates) / 2,
                                   rtol=1e-5, atol=1e-6)
        assert second["side.weight"] is None and second["lin.weight"] is not None  # left out of the second step
        assert third["side.weight"] is not None  # DDP was told to expect unused parameters: no error
