"""The plain engine's save_pretrained: every parameter and persistent buffer, values as trained,
the module's config beside them, shards and a cast when asked, and nothing from a rank other than 0."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ferryman.core.optim import OptimConfig
from ferryman.core.training import PlainEngine


class _Config:
    """What save_pretrained looks for on a module (transformers' PretrainedConfig, duck-typed)."""

    dtype = None

    def save_pretrained(self, folder):
        (Path(folder) / "config.json").write_text(json.dumps({"dtype": str(self.dtype)}))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # running statistics: persistent buffers
        self.register_buffer("freqs", torch.arange(4.0), persistent=False)  # not saved
        self.config = _Config()

    def forward(self, x):
        return self.norm(self.lin(x))


def _trained() -> PlainEngine:
    torch.manual_seed(0)
    engine = PlainEngine(Net(), OptimConfig(lr=0.1), torch.float32, torch.device("cpu"))
    engine.backward(engine(torch.randn(8, 4)).square().mean())  # also moves the running statistics
    engine.step()
    return engine


def _read(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


def test_weights_and_persistent_buffers_are_written_as_trained_with_the_config(tmp_path):
    engine = _trained()
    engine.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = _read(tmp_path)
    expected = engine.module.state_dict()
    assert set(saved) == set(expected) == {"lin.weight", "lin.bias", "norm.weight", "norm.bias", "norm.running_mean",
                                           "norm.running_var", "norm.num_batches_tracked"}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "None"}


def test_shards_and_a_cast_are_what_was_asked(tmp_path):
    engine = _trained()
    engine.save_pretrained(tmp_path, max_shard_bytes=32, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 32 bytes: several shards
    saved = _read(tmp_path)
    for name, value in engine.module.state_dict().items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert saved[name].dtype == want.dtype and torch.equal(saved[name], want), name
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "torch.bfloat16"}


def test_a_rank_other_than_0_writes_nothing(tmp_path):
    engine = _trained()
    engine.rank = 1  # as data parallelism sets it: every rank holds the same weights, rank 0 writes them
    engine.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
