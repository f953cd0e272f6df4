"""The first forward's layout agreement must come after the gathers of a rank that took a branch
the others skipped: here rank 1 alone uses the last layer, so before the fix rank 0's broadcast of
the layout met rank 1's all-gather of that layer and both waited forever.
"""

import pytest
import torch
from torch import nn

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.parallel import init_parallel
from tests.threaded import launchers, one_rank_at_a_time
from tests.tolerance import assert_close


class Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)  # last in forward order, used on one rank only

    def forward(self, x: torch.Tensor, tail: bool) -> torch.Tensor:
        x = self.a(x)
        return self.b(x) if tail else x


def _ranks(rank: int, world: int, reorder: bool):
    dims = init_parallel()
    with one_rank_at_a_time():  # threaded ranks share the global RNG
        torch.manual_seed(0)
        model = Tail()
    cfg = GeminiConfig(placement="static", precision="fp32", min_num_chunks=2, reorder_after_warmup=reorder)
    engine = gemini(model, cfg, OptimConfig(lr=1e-2), dims)
    assert len(engine.chunks) == 2
    for _ in range(2):
        out = engine(torch.ones(2, 8) * (rank + 1), tail=rank == 1)
        engine.backward(out.square().mean())
        engine.step()
        engine.zero_grad()
    return engine.state_dict()


@pytest.mark.parametrize("launch", launchers())
@pytest.mark.parametrize("reorder", [True, False])
def test_branch_at_the_end_in_the_first_forward_does_not_hang(reorder, launch):
    state0, state1 = launch(_ranks, 2, reorder, timeout_s=45)
    assert all(torch.equal(state0[k], state1[k]) for k in state0)


# -- gradient accumulation with rank- and micro-batch-dependent branches, then an eval forward --
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
# [step][micro-batch][rank] -> (side, rare) branches of BranchNet; step 0 (the warm-up) the same on both ranks
PLAN = [
    [[(True, False), (True, False)], [(False, True), (False, True)]],
    [[(True, False), (False, False)], [(False, False), (False, True)]],
    [[(False, False), (True, True)], [(True, False), (False, False)]],
]
CONFIGS = {
    "static": GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5, optim_host_fraction=0.5),
    # tight: before the eval forward stopped moving the trace clock, the next backward overran it
    "auto": GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=28_000),
}


def _accumulating_ranks(rank: int, world: int, name: str):
    from tests.core.gemini.models import batches, lm_loss
    from tests.core.gemini.test_unused import BranchNet

    dims = init_parallel()
    with one_rank_at_a_time():
        torch.manual_seed(0)
        model = BranchNet()
    engine = gemini(model, CONFIGS[name], OPTIM, dims)
    data = batches(2 * len(PLAN))
    for s, micro in enumerate(PLAN):
        for k, plan in enumerate(micro):
            ids, tgt = data[2 * s + k]
            rows = slice(2 * rank, 2 * rank + 2)
            engine.backward(lm_loss(engine(ids[rows], *plan[rank]), tgt[rows]) / 2)
        engine.step()
        engine.zero_grad()
        with torch.no_grad():  # evaluation between steps, branches differing by rank
            engine(data[0][0][:2], rank == 0, rank == 1)
    return engine.state_dict(), engine.manager.device_bytes, engine.manager.recount(), engine.manager.peak_bytes


def _ddp_reference() -> dict[str, torch.Tensor]:
    from tests.core.gemini.models import batches, lm_loss, reference_optimizer
    from tests.core.gemini.test_unused import BranchNet

    torch.manual_seed(0)
    model = BranchNet()
    opt = reference_optimizer(model, OPTIM.lr, OPTIM.weight_decay)
    data = batches(2 * len(PLAN))
    for s, micro in enumerate(PLAN):
        for k, plan in enumerate(micro):
            ids, tgt = data[2 * s + k]
            # DDP: the mean over 2 ranks of each rank's loss / 2 micro-batches
            loss = sum(lm_loss(model(ids[2 * r : 2 * r + 2], *plan[r]), tgt[2 * r : 2 * r + 2]) for r in range(2)) / 4
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.max_grad_norm)
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("launch", launchers())
@pytest.mark.parametrize("name", list(CONFIGS))
def test_accumulation_with_branches_and_eval_forwards_matches_ddp(name, launch):
    results = launch(_accumulating_ranks, 2, name, timeout_s=120)
    reference = _ddp_reference()
    for state, device_bytes, recount, peak in results:
        for key, value in reference.items():
            assert_close(state[key], value, ulps=16)
        assert device_bytes == recount  # the manager's accounting matches what it holds
        if CONFIGS[name].device_budget_bytes:
            assert peak <= CONFIGS[name].device_budget_bytes
