"""Run options apart from the network: what fastfold predict asks for, and checkpoints written when
the run options still lived in the model config."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import save_file

from ferryman.apps.fastfold.inference import load_models, run_options
from ferryman.apps.fastfold.model import RunOptions, random_weights_model
from ferryman.apps.fastfold.params import ModelSource
from ferryman.apps.fastfold.predict import PredictOptions
from ferryman.apps.fastfold.presets import tiny


def test_predict_options_map_to_run_options():
    assert run_options(PredictOptions(chunk_size="auto", kernels="torch")) == RunOptions(auto_chunk=True, kernels="torch")
    assert run_options(PredictOptions(chunk_size="16", precision="bf16")) == RunOptions(chunk_size=16, precision="bf16")
    assert run_options(PredictOptions()) == RunOptions()


def test_checkpoint_with_run_fields_in_its_config_loads(tmp_path):
    """A safetensors checkpoint whose config metadata still carries chunk_size, kernels, inplace,
    precision and auto_chunk loads, and runs as this call's options say, not as the file says."""
    cfg = tiny()
    model = random_weights_model(cfg, seed=2)
    old_config = {**dataclasses.asdict(cfg), "chunk_size": 7, "auto_chunk": False, "kernels": "triton",
                  "inplace": False, "precision": "bf16"}  # fmt: skip
    path = tmp_path / "old.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "ferryman.fastfold", "config": json.dumps(old_config)})
    opts = PredictOptions(kernels="torch", chunk_size=4)
    [loaded] = load_models([ModelSource(name="old", path=path, kind="safetensors")], opts)
    assert loaded.model.cfg == cfg
    assert loaded.model.run_options == RunOptions(kernels="torch", chunk_size=4)
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
