"""Parameters that get no gradient in some steps: on some ranks only (data-dependent branches), on
every rank, and torch AdamW's per-parameter step counts for them, through checkpoints too."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.parallel import init_parallel
from tests.core.gemini.models import Block, batches, lm_loss, reference_optimizer, twin
from tests.threaded import launchers, one_rank_at_a_time
from tests.tolerance import approx

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
NUM_STEPS = 6
# which steps take the branches; step 0 is the warm-up that fixes the chunk layout
SIDE = {0: [True, False, True, True, False, True], 1: [False, True, False, False, True, False]}  # per rank
RARE = [False, False, True, False, True, False]  # every rank alike: unused by all in most steps
CONFIGS = {
    "static": GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5, optim_host_fraction=0.5),
    "auto": GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=28_000),
    "reuse": GeminiConfig(placement="static", precision="fp32"),
}


class BranchNet(nn.Module):
    """Blocks around two optional ones: ``side`` taken where the data say so, ``rare`` seldom.

    With ``reuse`` the last block runs twice, each time in its own reentrant checkpoint: its
    parameters deliver two gradients, the second after their chunk may have been reduced.
    """

    def __init__(self, vocab: int = 32, dim: int = 16, reuse: bool = False) -> None:
        super().__init__()
        self.reuse = reuse
        self.embed = nn.Embedding(vocab, dim)
        self.first, self.side, self.last = Block(dim), Block(dim), Block(dim)
        self.rare = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, side: bool, rare: bool) -> torch.Tensor:
        x = self.first(self.embed(ids))
        if side:
            x = self.side(x)
        if rare:
            x = x + self.rare(x)
        if self.reuse:
            x = checkpoint(self.last, checkpoint(self.last, x, use_reentrant=True), use_reentrant=True)
        else:
            x = self.last(x)
        return self.head(self.norm(x))


def _split(data, rank: int, world: int):
    per_rank = 4 // world
    return [(ids[rank * per_rank : (rank + 1) * per_rank], tgt[rank * per_rank : (rank + 1) * per_rank]) for ids, tgt in data]


def _reference(model: nn.Module, data, world: int, sides: dict[int, list[bool]]) -> list[float]:
    """DDP by hand: the mean of the ranks' losses, so each gradient is sum / world and a parameter
    no rank used keeps grad None; then torch's fused AdamW."""
    opt = reference_optimizer(model, OPTIM.lr, OPTIM.weight_decay)
    losses = []
    for step, batch in enumerate(data):
        parts = [
            lm_loss(model(ids, sides[r][step], RARE[step]), tgt)
            for r, (ids, tgt) in enumerate(_split([batch], r, world)[0] for r in range(world))
        ]
        loss = sum(parts) / world
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _train(engine, data, sides: list[bool]) -> list[float]:
    losses = []
    for step, (ids, tgt) in enumerate(data):
        loss = lm_loss(engine(ids, sides[step], RARE[step]), tgt)
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses


def _run_ranks(rank: int, world: int):
    dims = init_parallel()
    results = {}
    for name, cfg in CONFIGS.items():
        with one_rank_at_a_time():  # threaded ranks share the global RNG
            torch.manual_seed(0)
            model = BranchNet(reuse=name == "reuse")
        engine = gemini(model, cfg, OPTIM, dims)
        losses = _train(engine, _split(batches(NUM_STEPS), rank, world), SIDE[rank])
        results[name] = (losses, engine.state_dict(), engine.stats())
    return results


@pytest.fixture(scope="module", params=launchers())
def two_ranks(request):
    # a deadlock (collectives out of step) fails here after the timeout instead of hanging
    return request.param(_run_ranks, 2, timeout_s=120)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rank_dependent_branches_match_ddp_reference(two_ranks, name):
    torch.manual_seed(0)
    reference = BranchNet(reuse=name == "reuse")
    expected = _reference(reference, batches(NUM_STEPS), 2, SIDE)
    (loss0, state0, stats0), (loss1, state1, stats1) = two_ranks[0][name], two_ranks[1][name]
    assert [(a + b) / 2 for a, b in zip(loss0, loss1)] == approx(expected, ulps=16)
    for key, value in reference.named_parameters():
        assert (state0[key] - value.detach()).abs().max().item() < 1e-6, key
        assert torch.equal(state0[key], state1[key])
    assert stats0["gathers"] == stats1["gathers"]  # the skipping rank gathered what the other did
    assert stats0["overlapped_reductions"] > 0  # reductions still run behind backward
    assert (stats0["late_reductions"] > 0) == (name == "reuse")
    if name == "auto":
        assert stats0["evictions"] > 0 and stats0["peak_bytes"] <= CONFIGS[name].device_budget_bytes


SINGLE = {
    "static-0": GeminiConfig(placement="static", precision="fp32"),
    "static-half": GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5, optim_host_fraction=0.5),
    "static-host": GeminiConfig(placement="static", precision="fp32", param_host_fraction=1.0, optim_host_fraction=1.0),
    "auto-evict": GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=24_000),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_per_parameter_step_counts_match_adamw(name):
    """``rare`` and ``side`` skip steps: their bias corrections use their own counts, as in torch."""
    model = BranchNet()
    reference = twin(model)
    data = batches(NUM_STEPS)
    sides = {0: [True, False, True, False, False, True]}
    expected = _reference(reference, data, 1, sides)
    engine = gemini(model, SINGLE[name], OPTIM)
    got = _train(engine, data, sides[0])
    assert got == approx(expected)
    state = engine.state_dict()
    for key, value in reference.named_parameters():
        assert (state[key] - value.detach()).abs().max().item() < 1e-6, key
    if name == "auto-evict":
        assert engine.stats()["evictions"] > 0
        assert engine.stats()["peak_bytes"] <= SINGLE[name].device_budget_bytes
    counts = _counts(engine)
    assert counts["rare.weight"] == sum(RARE) and counts["side.up.weight"] == sum(sides[0])
    assert counts["embed.weight"] == NUM_STEPS


def _counts(engine) -> dict[str, float]:
    return {s.name: float(c.steps[i]) for c in engine.chunks if c.steps is not None for i, s in enumerate(c.slots)}


def test_checkpoint_keeps_per_parameter_steps_and_resumes_exactly(tmp_path):
    cfg = GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=24_000)
    model = BranchNet()
    fresh = twin(model)
    data = batches(NUM_STEPS)
    sides = [True, False, True, False, False, True]
    straight = gemini(model, cfg, OPTIM)
    _train(straight, data[:3], sides[:3])
    straight.save(tmp_path)
    before = _counts(straight)
    rest = [_step(straight, data[i], sides[i], RARE[i]) for i in range(3, NUM_STEPS)]

    shard = load_file(str(tmp_path / "shard-00000-of-00001.safetensors"))
    layout = json.loads((tmp_path / "gemini.json").read_text())
    assert layout["format"] == "ferryman-gemini-2"
    for index, chunk in enumerate(layout["chunks"]):
        if chunk["trainable"]:
            assert shard[f"c{index}.steps"].shape == (len(chunk["params"]),)

    resumed = gemini(fresh, GeminiConfig(placement="static", precision="fp32", chunk_numel=1024), OPTIM)
    resumed.load(tmp_path)  # another layout: counts follow their parameters
    assert _counts(resumed) == before and before["rare.weight"] != before["embed.weight"]
    assert [_step(resumed, data[i], sides[i], RARE[i]) for i in range(3, NUM_STEPS)] == rest  # bit for bit


def _step(engine, batch, side: bool, rare: bool) -> float:
    loss = lm_loss(engine(batch[0], side, rare), batch[1])
    engine.backward(loss)
    engine.step()
    engine.zero_grad()
    return loss.item()


def test_format_1_checkpoint_loads_with_chunk_step_counts(tmp_path):
    """A checkpoint from before per-parameter counts: each parameter takes its chunk's count."""
    engine = gemini(BranchNet(), GeminiConfig(placement="static", precision="fp32"), OPTIM)
    _train(engine, batches(2), [True, True])
    engine.save(tmp_path)
    path = tmp_path / "shard-00000-of-00001.safetensors"
    tensors = load_file(str(path))
    layout = json.loads((tmp_path / "gemini.json").read_text())
    chunk_counts = {}
    for key in [k for k in tensors if k.endswith(".steps")]:
        tensors[key.removesuffix("s")] = tensors.pop(key).max().reshape(1)
        chunk = layout["chunks"][int(key[1:].split(".")[0])]
        chunk_counts |= {name: tensors[key.removesuffix("s")].item() for name, *_ in chunk["params"]}
    save_file(tensors, str(path))
    (tmp_path / "gemini.json").write_text(json.dumps(layout | {"format": "ferryman-gemini-1"}))
    other = gemini(BranchNet(), GeminiConfig(placement="static", precision="fp32"), OPTIM)
    other.load(tmp_path)
    assert _counts(other) == chunk_counts and set(chunk_counts.values()) == {0.0, 2.0}  # rare: none
    expected = engine.state_dict()
    assert all(torch.equal(other.state_dict()[k], expected[k]) for k in expected)

    (tmp_path / "gemini.json").write_text(json.dumps(layout | {"format": "ferryman-gemini-9"}))
    with pytest.raises(UserError, match="unknown format 'ferryman-gemini-9'"):
        other.load(tmp_path)
