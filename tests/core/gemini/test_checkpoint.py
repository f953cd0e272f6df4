"""Sharded checkpoints: round trip, consolidation to a plain state_dict, and exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.checkpoint import consolidate
from tests.core.gemini.models import TinyNet, batches, lm_loss, train_engine, twin

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)


def test_save_load_round_trip_and_consolidate(tmp_path):
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="static", precision="bf16", param_host_fraction=0.5), OPTIM)
    train_engine(engine, batches(2))
    engine.save(tmp_path)
    layout = json.loads((tmp_path / "gemini.json").read_text())
    assert layout["world_size"] == 1 and len(layout["chunks"]) == len(engine.chunks)
    shard = load_file(str(tmp_path / "shard-00000-of-00001.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in shard)

    plain = consolidate(tmp_path)
    expected = engine.state_dict()
    assert set(plain) == set(expected)
    assert all(torch.equal(plain[k], expected[k]) for k in expected)
    reference = TinyNet()
    reference.load_state_dict(plain)  # a plain nn.Module takes the consolidated dict as it is

    other = gemini(TinyNet(), GeminiConfig(placement="auto", precision="bf16", chunk_numel=512), OPTIM)
    other.load(tmp_path)  # a different chunk layout reads the same files
    again = other.state_dict()
    assert all(torch.equal(again[k], expected[k]) for k in expected)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_reproduces_next_losses_exactly(tmp_path, precision):
    data = batches(6)
    cfg = GeminiConfig(placement="auto", precision=precision, device_budget_bytes=40_000)
    model = TinyNet()
    fresh = twin(model)
    straight = gemini(model, cfg, OPTIM)
    first = train_engine(straight, data[:3])
    straight.save(tmp_path)
    rest = train_engine(straight, data[3:])

    resumed = gemini(fresh, cfg, OPTIM)
    resumed.load(tmp_path)
    assert train_engine(resumed, data[3:]) == rest  # bit for bit
    assert first[-1] != rest[0]


def test_missing_or_corrupt_checkpoint_is_a_user_error(tmp_path):
    engine = gemini(TinyNet(), GeminiConfig(precision="fp32"), OPTIM)
    with pytest.raises(UserError, match=r"gemini\.json"):
        engine.load(tmp_path)
    (tmp_path / "gemini.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        engine.load(tmp_path)


def test_load_state_dict_keeps_training():
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32"), OPTIM)
    target = TinyNet().state_dict()
    engine.load_state_dict(target)
    state = engine.state_dict()
    assert all(torch.equal(state[k], target[k]) for k in target)
    ids, tgt = batches(1)[0]
    engine.backward(lm_loss(engine(ids), tgt))
    assert engine.step()["skipped"] == 0.0
