"""core/pretrained.py through the engines' ``save_pretrained``: transformers' sharded safetensors
layout (index, names, config), read back by ``from_pretrained``; a new save replaces every weight
file of the old one; the dtype is written into config.json; tied weights are written once."""

import json
import os

import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.training import PlainEngine


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


def test_gemini_writes_shards_with_an_index_that_transformers_reads(models, tmp_path):
    reference = _model(models["llama"])
    engine = gemini(_model(models["llama"]), GeminiConfig(placement="auto", precision="fp32"), OptimConfig())
    out = tmp_path / "out"
    engine.save_pretrained(out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(reference.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in reference.state_dict().values())
    assert not (out / "model.safetensors").exists() and not list(out.glob(".tmp*"))
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in out.iterdir())
    loaded = _model(out).state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded[name], value), name

    engine.save_pretrained(out, dtype=torch.bfloat16)  # one shard now: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _model(out).dtype == torch.bfloat16


def test_tied_weights_are_written_once(models, tmp_path):
    from safetensors import safe_open

    engine = PlainEngine(_model(models["opt"]), OptimConfig(), torch.float32, torch.device("cpu"))
    engine.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.decoder.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = _model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, engine.module.lm_head.weight)
