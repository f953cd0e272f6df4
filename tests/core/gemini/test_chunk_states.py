"""Chunk placement is a state machine: the table in chunk.py, moves through the manager, illegal moves raise."""

import pytest
import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini import chunk as chunk_mod
from ferryman.core.gemini.chunk import LEGAL, FullCopy, IllegalMove, OptimAt, Payload, ShardAt
from tests.core.gemini.models import TinyNet, batches, lm_loss


def _engine(**cfg):
    return gemini(TinyNet(), GeminiConfig(precision="fp32", **cfg), OptimConfig(lr=1e-2))


def test_the_docstring_table_names_every_state():
    for enum in (ShardAt, OptimAt, FullCopy, Payload):
        for state in enum:
            assert state.name in chunk_mod.__doc__, f"{enum.__name__}.{state.name} missing from the table"
    for enum, moves in LEGAL.items():
        assert set(moves) == set(enum), f"every {enum.__name__} state needs a row of legal moves"


@pytest.mark.parametrize("cfg", [dict(placement="static", param_host_fraction=0.5, optim_host_fraction=0.5),
                                 dict(placement="auto", device_budget_bytes=30_000)])
def test_a_training_step_moves_only_along_the_table(cfg, monkeypatch):
    moves = []
    original = chunk_mod.check_move

    def spy(what, old, new, legal):
        moves.append((old, new))
        return original(what, old, new, legal)

    monkeypatch.setattr(chunk_mod, "check_move", spy)
    engine = _engine(**cfg)
    for ids, tgt in batches(2):
        engine.backward(lm_loss(engine(ids), tgt))
        engine.step()
        engine.zero_grad()
    assert moves and all(new == old or new in LEGAL[type(new)][old] for old, new in moves)
    assert all(c.optim_at in (OptimAt.HOST, OptimAt.DEVICE) for c in engine.chunks if c.trainable)
    assert all(c.state == Payload.RELEASED or c.payload_is_shard for c in engine.chunks)
    if cfg["placement"] == "auto":
        assert ShardAt.DEVICE_AND_HOST in {new for _, new in moves}  # fetched back after an eviction


def test_illegal_moves_raise_with_the_states_named():
    engine = _engine(placement="static", param_host_fraction=1.0)
    chunk = engine.chunks[0]
    assert chunk.shard_at == ShardAt.HOST
    with pytest.raises(IllegalMove, match="ShardAt host -> device"):
        chunk.move_shard(ShardAt.DEVICE)  # only a fetch (keeping the host copy) leaves HOST
    trainable = next(c for c in engine.chunks if c.trainable)
    elsewhere = OptimAt.HOST if trainable.optim_at == OptimAt.DEVICE else OptimAt.DEVICE
    with pytest.raises(IllegalMove, match="OptimAt"):
        trainable.place_optim(elsewhere)  # placed once per run
    with pytest.raises(IllegalMove, match="FullCopy pending -> kept"):
        chunk.set_full_copy(FullCopy.KEPT)
    chunk.acquire()
    chunk.attach(torch.zeros(chunk.numel))
    with pytest.raises(IllegalMove, match="while 1 running module"):
        chunk.drop()
    chunk.release()
    chunk.drop()
    with pytest.raises(IllegalMove, match="released more often"):
        chunk.release()
