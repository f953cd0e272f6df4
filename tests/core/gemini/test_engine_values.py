"""The Gemini engine's state by value on a model with frozen weights, tied weights and buffers:
the checkpoint folder's contents, what a load restores, ``load_state_dict``, the trainable-state
export with the fp16 loss scaler, ``save_pretrained``, the EMA views, and the device-byte account
while gradient buffers are held."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.checkpoint import consolidate
from tests.core.gemini.models import TinyNet, batches, lm_loss, train_engine

OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)


class Stats(nn.Module):
    """Running statistics in buffers, as a batch norm keeps them (two persistent, one not)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_mean.mul_(0.9).add_(x.detach().float().reshape(-1, x.shape[-1]).mean(0), alpha=0.1)
            self.num_batches_tracked += 1
        return x - self.running_mean.to(x.dtype)


class Buffered(nn.Module):
    """An embedding tied to the head, a frozen layer, and running statistics in buffers."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.bn = Stats(dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.frozen(self.embed(ids))
        x = self.bn(x)
        return self.head(torch.tanh(self.mid(x)))


def _trained(precision="bf16", steps=2, **cfg):
    torch.manual_seed(0)
    model = Buffered()
    engine = gemini(model, GeminiConfig(placement="static", precision=precision, min_num_chunks=3, **cfg), OPTIM)
    train_engine(engine, batches(steps))
    return model, engine


def test_the_checkpoint_folder_holds_layout_shards_frozen_values_and_buffers(tmp_path):
    model, engine = _trained()
    engine.save(tmp_path)
    layout = json.loads((tmp_path / "gemini.json").read_text())
    assert {k: layout[k] for k in ("format", "world_size", "dtype", "loss_scale", "calm_steps", "aliases")} == {
        "format": "ferryman-gemini-2", "world_size": 1, "dtype": "bfloat16", "loss_scale": 1.0, "calm_steps": 0,
        "aliases": {"head.weight": "embed.weight"}}
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    listed = {}
    for chunk in layout["chunks"]:
        offset = 0
        for name, start, numel, shape in chunk["params"]:
            assert start == offset and numel == torch.Size(shape).numel()
            offset += numel
            listed[name] = (shape, chunk["trainable"])
        assert offset <= chunk["numel"] and chunk["numel"] % 8 == 0
    assert listed == {n: (s, not n.startswith("frozen.")) for n, s in shapes.items()}

    shard = load_file(str(tmp_path / "shard-00000-of-00001.safetensors"))
    state = engine.state_dict()
    for index, chunk in enumerate(layout["chunks"]):
        key = f"c{index}"
        if not chunk["trainable"]:  # frozen chunks: their compute copy, in the compute dtype
            assert {k for k in shard if k.startswith(key + ".")} == {key + ".shard"}
            assert shard[key + ".shard"].dtype == torch.bfloat16
            for name, start, numel, shape in chunk["params"]:
                assert torch.equal(shard[key + ".shard"][start : start + numel].view(shape), state[name])
        else:
            assert {k for k in shard if k.startswith(key + ".")} == {f"{key}.{n}" for n in ("master", "exp_avg", "exp_avg_sq", "steps")}
            assert shard[key + ".steps"].tolist() == [2.0] * len(chunk["params"])
    buffers = {k.removeprefix("buffer."): v for k, v in shard.items() if k.startswith("buffer.")}
    assert set(buffers) == {"bn.running_mean", "bn.num_batches_tracked"}  # persistent ones only
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers() if n != "bn.scratch")
    assert buffers["bn.num_batches_tracked"].item() == 2 and buffers["bn.running_mean"].abs().sum() > 0

    plain = consolidate(tmp_path)
    assert set(plain) == set(state) and all(torch.equal(plain[k], state[k]) for k in state)
    assert torch.equal(plain["head.weight"], plain["embed.weight"])
    # non-persistent buffers are the model's own business, as in nn.Module.state_dict (they were
    # written, and a plain module refused the consolidated dict with an unexpected key)
    Buffered().load_state_dict(plain)
    Buffered().load_state_dict(state)
    (tmp_path / "gemini.json").write_text(json.dumps({k: v for k, v in layout.items() if k != "aliases"}))
    assert set(consolidate(tmp_path)) == set(state) - {"head.weight"}  # a layout without aliases: names as stored


def test_a_load_restores_weights_buffers_and_the_frozen_compute_copies(tmp_path):
    model, engine = _trained()
    engine.save(tmp_path)
    expected = engine.state_dict()
    torch.manual_seed(1)
    other = gemini(Buffered(), GeminiConfig(placement="auto", precision="bf16", chunk_numel=256), OPTIM)
    other.load(tmp_path)
    got = other.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(other.module.bn.running_mean, model.bn.running_mean)
    assert other.module.bn.num_batches_tracked.item() == 2
    data = batches(4)[2:]
    assert train_engine(other, data) == train_engine(engine, data)  # moments and counts came along


def test_the_fp16_loss_scaler_goes_through_checkpoints_and_trainable_state(tmp_path):
    _, engine = _trained(precision="fp16", steps=3, initial_loss_scale=2.0**8, loss_scale_growth_interval=5)
    assert (engine.scaler.scale, engine.scaler.calm_steps) == (256.0, 3)
    engine.save(tmp_path)
    assert json.loads((tmp_path / "gemini.json").read_text())["dtype"] == "float16"
    fresh = gemini(Buffered(), GeminiConfig(placement="static", precision="fp16"), OPTIM)
    assert fresh.scaler.scale == 2.0**16
    fresh.load(tmp_path)
    assert (fresh.scaler.scale, fresh.scaler.calm_steps) == (256.0, 3)

    state = engine.export_trainable()
    assert (state.scale, state.calm_steps) == (256.0, 3)
    assert set(state.values) == {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert set(state.moments) == set(state.values)
    other = gemini(Buffered(), GeminiConfig(placement="static", precision="fp16"), OPTIM)
    other.import_trainable(state)
    assert (other.scaler.scale, other.scaler.calm_steps) == (256.0, 3)
    assert type(other.scaler.scale) is float and type(other.scaler.calm_steps) is int
    bf16 = gemini(Buffered(), GeminiConfig(placement="static", precision="bf16"), OPTIM)
    bf16.import_trainable(state)  # no scaler: its scale stays 1
    assert (bf16.scaler.scale, bf16.scaler.calm_steps) == (1.0, 0)


def test_load_state_dict_names_what_is_missing_and_keeps_moments_and_buffers():
    model, engine = _trained(precision="fp32")
    state = engine.state_dict()
    with pytest.raises(KeyError) as err:
        engine.load_state_dict({k: v for k, v in state.items() if not k.startswith(("mid.", "frozen."))})
    assert err.value.args[0] == "state dict lacks 4 parameters, e.g. ['frozen.bias', 'frozen.weight', 'mid.bias']"

    twin_model, twin_engine = _trained(precision="fp32")
    new_mean = torch.full((16,), 0.25)
    engine.load_state_dict(state | {"bn.running_mean": new_mean})  # the same weights, one buffer changed
    twin_model.bn.running_mean.copy_(new_mean)
    assert torch.equal(model.bn.running_mean, new_mean)
    assert model.bn.num_batches_tracked.item() == 2
    model.bn.num_batches_tracked.fill_(7)
    twin_model.bn.num_batches_tracked.fill_(7)
    without = {k: v for k, v in state.items() if k != "bn.num_batches_tracked"}
    engine.load_state_dict(without)  # a buffer the dict lacks is kept
    assert model.bn.num_batches_tracked.item() == 7
    data = batches(4)[2:]
    assert train_engine(engine, data) == train_engine(twin_engine, data)  # Adam moments survived the reload


def test_save_pretrained_writes_masters_frozen_copies_and_persistent_buffers(tmp_path):
    _, engine = _trained()
    engine.save_pretrained(tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    state = engine.state_dict()
    assert set(written) == set(state) - {"head.weight"}  # tied: written once
    assert all(torch.equal(written[k], state[k]) for k in written)
    assert written["mid.weight"].dtype == torch.float32 and written["frozen.weight"].dtype == torch.bfloat16
    engine.save_pretrained(tmp_path / "small", max_shard_bytes=2_000, dtype=torch.float16)
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(v.numel() * (8 if k.endswith("tracked") else 2) for k, v in written.items())
    assert load_file(str(tmp_path / "small" / index["weight_map"]["mid.weight"]))["mid.weight"].dtype == torch.float16


def test_save_pretrained_writes_the_modules_config(tmp_path):
    class Config:
        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text(json.dumps({"dtype": str(getattr(self, "dtype", None))}))

    _, engine = _trained()
    engine.module.config = Config()
    engine.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "torch.bfloat16"}


def test_train_and_eval_switch_the_module():
    engine = gemini(Buffered(), GeminiConfig(precision="fp32"), OPTIM)
    assert engine.eval() is engine and not engine.module.training and not engine.module.bn.training
    assert engine.train() is engine and engine.module.training
    assert engine.train(False) is engine and not engine.module.training


def test_ema_views_cover_frozen_chunks_and_stay_fp32():
    model, engine = _trained(precision="bf16")
    masters = engine.master_tensors()
    assert len(masters) == sum(c.master is not None for c in engine.chunks) < len(engine.chunks)
    named = engine.named_from([m * 2 for m in masters])
    state = engine.state_dict()
    assert set(named) == set(state) - {n for n, _ in model.named_buffers()}
    assert torch.equal(named["mid.weight"], state["mid.weight"] * 2)
    assert torch.equal(named["frozen.weight"], state["frozen.weight"])  # frozen: the compute copy, as it is
    assert torch.equal(named["head.weight"], named["embed.weight"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        flat = engine.flat_from(named)
    finally:
        torch.set_default_dtype(default)
    assert [t.dtype for t in flat] == [torch.float32] * len(masters)
    assert all(torch.equal(a, b * 2) for a, b in zip(flat, masters))


def test_the_device_account_includes_the_gradient_buffers_during_backward():
    model = TinyNet()
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32"), OPTIM)
    train_engine(engine, batches(1))  # the warm-up step
    seen = []

    def check(grad):
        buffers = sum(c() for c in engine.manager.buffer_bytes)
        seen.append((engine.manager.device_bytes, engine.manager.recount(), buffers))
        return grad

    ids, tgt = batches(2)[1]
    for block in model.blocks:
        block.up.register_full_backward_pre_hook(lambda m, g: check(None))
    engine.backward(lm_loss(engine(ids), tgt))
    assert seen and all(held == counted for held, counted, _ in seen)
    assert any(buffers > 0 for *_, buffers in seen)  # some chunk was half-delivered at some point


class Wider(Buffered):
    """Buffered with four parameters more."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Linear(16, 16, bias=False)
        for name in "dcba":
            setattr(self, f"extra_{name}", nn.Parameter(torch.zeros(3)))


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    _, engine = _trained(precision="fp32")
    engine.save(tmp_path)
    other = gemini(Wider(), GeminiConfig(precision="fp32"), OPTIM)
    with pytest.raises(UserError) as err:
        other.load(tmp_path)
    assert str(err.value) == f"{tmp_path}: checkpoint lacks 4 parameters of this model, e.g. ['extra_a', 'extra_b', 'extra_c']"

    class Fewer(Buffered):
        def __init__(self) -> None:
            super().__init__()
            del self.mid
            self.mid = nn.Linear(16, 16)
            self.frozen = nn.Linear(16, 16, bias=False)
            self.frozen.requires_grad_(False)

    fewer = gemini(Fewer(), GeminiConfig(precision="fp32"), OPTIM)
    fewer.load(tmp_path)  # a parameter the model does not have (frozen.bias) is left out
    state, expected = fewer.state_dict(), engine.state_dict()
    assert "frozen.bias" not in state and all(torch.equal(state[k], expected[k]) for k in state)

    class Reshaped(Buffered):
        def __init__(self) -> None:
            super().__init__()
            self.mid = nn.Linear(16, 16)
            self.mid.weight = nn.Parameter(torch.zeros(16, 8))

    with pytest.raises(UserError) as err:
        gemini(Reshaped(), GeminiConfig(precision="fp32"), OPTIM).load(tmp_path)
    assert str(err.value) == f"{tmp_path}: mid.weight has shape (16, 16), the model wants (16, 8)"


SUFFIX = "; raise the budget, move optimizer state to the host (optim_host_fraction) or use smaller chunks"


def test_a_full_budget_names_the_move_the_bytes_and_what_holds_them():
    # Linear(4, 4), fp32, two chunks: the weight (16 elements, 64 B) and the bias (8 with padding, 32 B).
    # Budget 90, auto: 63 B before the warm-up; the weight's chunk goes to the host, the bias's stays.
    # The forward holds both: moving the weight up would need 32 + 64 B > 90 B, with nothing to evict.
    no_decay = OptimConfig(lr=1e-2)  # one kind of chunk for weights and biases
    engine = gemini(nn.Linear(4, 4), GeminiConfig(placement="auto", precision="fp32", min_num_chunks=2,
                                                 device_budget_bytes=90), no_decay)
    assert [(c.numel, c.shard_on_device) for c in engine.chunks] == [(16, False), (8, True)]
    with pytest.raises(UserError) as err:
        engine(torch.ones(2, 4))
    assert str(err.value) == ("gemini: moving chunk 0 to the device needs 64 B but the device budget "
                              "(gemini.device_budget_bytes=90) is full: 32 B of model data, 96 B of it in use by "
                              "running modules" + SUFFIX)
    # static, everything on the host: two chunks of 24 elements (96 B each), gathered for use
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    engine = gemini(model, GeminiConfig(placement="static", precision="fp32", min_num_chunks=2, device_budget_bytes=90,
                                        param_host_fraction=1.0, optim_host_fraction=1.0), no_decay)
    with pytest.raises(UserError) as err:
        engine(torch.ones(2, 4))
    assert str(err.value) == ("gemini: gathering chunk 0 needs 96 B but the device budget "
                              "(gemini.device_budget_bytes=90) is full: 0 B of model data, 96 B of it in use by "
                              "running modules" + SUFFIX)


def test_damaged_checkpoint_folders_are_refused_in_one_line(tmp_path):
    _, engine = _trained(precision="fp32")
    engine.save(tmp_path)
    layout = json.loads((tmp_path / "gemini.json").read_text())
    other = gemini(Buffered(), GeminiConfig(precision="fp32"), OPTIM)

    (tmp_path / "gemini.json").write_text(json.dumps(layout | {"format": "ferryman-gemini-0"}))
    with pytest.raises(UserError) as err:
        other.load(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'gemini.json'}: unknown format 'ferryman-gemini-0'; this version reads "
                              "ferryman-gemini-1, ferryman-gemini-2")

    (tmp_path / "gemini.json").write_text(json.dumps(layout | {"world_size": 2}))
    with pytest.raises(UserError) as err:
        other.load(tmp_path)
    assert str(err.value) == f"{tmp_path / 'shard-00000-of-00002.safetensors'}: missing; the checkpoint was written by 2 ranks"

    trainable = next(i for i, c in enumerate(layout["chunks"]) if c["trainable"])
    chunks = [dict(c) for c in layout["chunks"]]
    count = len(chunks[trainable]["params"])
    chunks[trainable]["params"] = chunks[trainable]["params"] * 2  # the file has a count for half of them
    (tmp_path / "gemini.json").write_text(json.dumps(layout | {"chunks": chunks}))
    with pytest.raises(UserError) as err:
        other.load(tmp_path)
    assert str(err.value) == f"{tmp_path}: c{trainable}.steps has {count} counts for {2 * count} parameters"


def test_the_peak_outlives_the_warm_up_repack():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.c(x)))

    cfg = GeminiConfig(placement="static", precision="fp32", min_num_chunks=3, param_host_fraction=1.0)
    engine = gemini(Reversed(), cfg, OptimConfig(lr=1e-2))
    before = engine.layout_order
    seen = []
    engine.module.a.register_forward_hook(lambda *_: seen.append(engine.manager.peak_bytes))  # a runs last
    engine(torch.ones(2, 4))
    assert engine.layout_order != before  # repacked in the order of use: a new manager
    # the peak of the warm-up forward (a gathered chunk beside the optimizer state) is kept
    assert engine.manager.peak_bytes == seen[-1] > engine.manager.device_bytes


def test_a_gradient_buffer_over_the_budget_is_named():
    # static, everything on the host, two chunks of 96 B: the backward holds the second layer's
    # chunk (96 B) and needs its gradient buffer (96 B more) under a budget of 150 B
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    cfg = GeminiConfig(placement="static", precision="fp32", min_num_chunks=2, device_budget_bytes=150,
                       param_host_fraction=1.0, optim_host_fraction=1.0)
    engine = gemini(model, cfg, OptimConfig(lr=1e-2))
    loss = engine(torch.ones(2, 4)).sum()
    with pytest.raises(UserError) as err:
        engine.backward(loss)
    assert str(err.value) == ("gemini: gradient buffer of chunk 1 needs 96 B but the device budget "
                              "(gemini.device_budget_bytes=150) is full: 96 B of model data, 96 B of it in use by "
                              "running modules" + SUFFIX)


class FrozenFirst(nn.Module):
    """A frozen embedding used first (its chunk comes first), trainable layers after it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.embed.requires_grad_(False)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


class Failing(FrozenFirst):
    """The root module owns ``scale`` (so it is hooked too) and raises on request inside its
    forward, as a model can fail."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, ids: torch.Tensor, fail: bool = False) -> torch.Tensor:
        x = torch.tanh(self.mid(self.embed(ids))) * self.scale
        if fail:
            raise ValueError("a model error")
        return self.head(x)


def test_a_failing_forward_releases_its_chunks():
    torch.manual_seed(0)
    engine = gemini(Failing(), GeminiConfig(placement="static", precision="fp32", param_host_fraction=1.0), OPTIM)
    ids, tgt = batches(1)[0]
    with pytest.raises(ValueError, match="a model error"):
        engine(ids, fail=True)
    assert all(c.in_use == 0 for c in engine.chunks)  # the post-hook ran despite the error
    engine.backward(lm_loss(engine(ids), tgt))
    assert engine.step()["skipped"] == 0.0


def test_moments_after_a_frozen_chunk_come_back_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = FrozenFirst()
    fresh = FrozenFirst()
    fresh.load_state_dict(model.state_dict())
    cfg = GeminiConfig(placement="static", precision="fp32")
    straight = gemini(model, cfg, OPTIM)
    assert straight.chunks[0].master is None  # the frozen chunk first
    data = batches(4)
    train_engine(straight, data[:2])
    straight.save(tmp_path)
    resumed = gemini(fresh, cfg, OPTIM)
    resumed.load(tmp_path)
    assert train_engine(resumed, data[2:]) == train_engine(straight, data[2:])
