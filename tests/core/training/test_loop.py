"""The training loop: plain and Gemini engines, exact resume, EMA, checkpoints, metrics, plot."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from ferryman.core.config import load_config
from ferryman.core.errors import ConfigError, UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig
from ferryman.core.training import CheckpointStore, TrainConfig, train
from ferryman.core.training.schedule import lr_at
from tests.tolerance import approx, assert_close


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 16)
        self.drop = torch.nn.Dropout(0.2)  # draws random numbers: resume must restore the RNG
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.inp(x))))


def _loader():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(-1)  # learnable labels
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)  # 10 batches: epochs roll over


def _loss(engine, batch):
    x, y = batch
    logits = engine(x)
    return torch.nn.functional.cross_entropy(logits.float(), y), {"acc": (logits.argmax(-1) == y).float().mean()}


def _cfg(tmp_path, engine, **kw):
    base = dict(
        out_dir=str(tmp_path), max_steps=8, grad_accum=2, precision="fp32", engine=engine, progress=False,
        optim=OptimConfig(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0), warmup_steps=2, ema_decay=0.9,
        gemini=GeminiConfig(placement="auto", device_budget_bytes=2_000),
    )
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("engine", ["plain", "gemini"])
def test_resume_continues_exactly(tmp_path, engine):
    torch.manual_seed(0)
    straight = train(_cfg(tmp_path / "a", engine), Net, _loader, _loss)
    torch.manual_seed(0)
    first = train(_cfg(tmp_path / "b", engine, stop_after=3, plot=False), Net, _loader, _loss)  # "killed"
    resumed = train(_cfg(tmp_path / "b", engine, resume="latest"), Net, _loader, _loss)
    assert first.losses + resumed.losses == straight.losses  # bit for bit, dropout and data order included
    assert all(torch.equal(resumed.ema_state_dict[k], straight.ema_state_dict[k]) for k in straight.ema_state_dict)
    assert straight.losses[-1] < straight.losses[0]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "acc"} <= set(lines[0])


def test_outputs_written(tmp_path):
    result = train(_cfg(tmp_path, "gemini", max_steps=4, ckpt_every=1, keep_last=2), Net, _loader, _loss)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert folders == ["step-00000003", "step-00000004"]  # pruned to keep_last
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ckpt = result.last_checkpoint
    assert {"gemini.json", "trainer.json", "ema.safetensors", "rng-rank00000.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert set(load_file(str(ckpt / "ema.safetensors"))) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    again = load_config(TrainConfig, tmp_path / "config.yaml")  # the saved config reads back
    assert again.max_steps == 4 and again.gemini.device_budget_bytes == 2_000


def test_lr_schedule():
    kw = dict(base_lr=1.0, max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, schedule="constant", **kw) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_at(s, schedule="cosine", **kw) for s in range(10)]
    assert cosine[2] == 1.0 and cosine[-1] > 0.1 and all(a >= b for a, b in itertools.pairwise(cosine[2:]))
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="engine"):
        TrainConfig(engine="deepspeed")
    with pytest.raises(UserError, match="no checkpoint"):
        train(_cfg(tmp_path, "plain", resume="latest"), Net, _loader, _loss)
    with pytest.raises(UserError, match="no batches"):
        train(_cfg(tmp_path, "plain"), Net, lambda: [], _loss)


class LateNet(Net):
    """Registers its output layer first, so Gemini repacks its chunks after the first forward."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.out = torch.nn.Linear(16, 3)
        self.drop = torch.nn.Dropout(0.2)
        self.inp = torch.nn.Linear(6, 16)


def test_plain_and_gemini_engines_agree_in_fp32(tmp_path):
    kw = dict(max_steps=5, plot=False, ema_decay=0.5)
    plain = train(_cfg(tmp_path / "p", "plain", **kw), LateNet, _loader, _loss)
    offloaded = train(_cfg(tmp_path / "g", "gemini", **kw), LateNet, _loader, _loss)
    assert offloaded.losses == approx(plain.losses)
    assert offloaded.engine.stats()["evictions"] > 0
    assert offloaded.engine.layout_order[0].startswith("inp.")  # the chunks were repacked...
    for key, value in plain.ema_state_dict.items():  # ...and the EMA followed them
        assert_close(offloaded.ema_state_dict[key], value, msg=key)


def test_gpt2_trains_in_the_loop_with_gemini(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ferryman.core.gemini.checkpoint import consolidate

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(
        out_dir=str(tmp_path), max_steps=6, grad_accum=2, precision="bf16", engine="gemini", progress=False,
        plot=False, optim=OptimConfig(lr=1e-2), gemini=GeminiConfig(placement="static", param_host_fraction=0.5),
    )
    result = train(
        cfg,
        lambda: transformers.GPT2LMHeadModel(config),
        lambda: DataLoader(TensorDataset(ids), batch_size=4),
        lambda engine, batch: engine(input_ids=batch[0], labels=batch[0]).loss,
    )
    assert result.losses[-1] < 0.9 * result.losses[0]
    fresh = transformers.GPT2LMHeadModel(config)
    fresh.load_state_dict(consolidate(result.last_checkpoint))  # the checkpoint is a plain GPT-2 again
    with torch.no_grad():
        loss = fresh(input_ids=ids, labels=ids).loss.item()
    assert loss < result.losses[0]


def test_on_step_sees_every_update_and_ema_warms_up_like_diffusers(tmp_path):
    from ferryman.core.training.schedule import ema_decay_at

    seen, weights = [], []

    def on_step(info):
        seen.append((info.step, info.loss, info.lr, info.record["step"], info.is_last))
        weights.append([t.clone() for t in info.engine.master_tensors()])
        assert set(info.ema_named()) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}

    cfg = _cfg(tmp_path, "plain", max_steps=4, grad_accum=1, ema_warmup=True, plot=False, ckpt_at_end=False)
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in Net().parameters()]  # the loop seeds the same way before build_model
    result = train(cfg, Net, _loader, _loss, on_step=on_step)
    assert [s[0] for s in seen] == [1, 2, 3, 4] and [s[3] for s in seen] == [1, 2, 3, 4]
    assert [s[1] for s in seen] == result.losses and [s[4] for s in seen] == [False, False, False, True]
    assert [s[2] for s in seen] == [lr_at(i, base_lr=1e-2, max_steps=4, warmup_steps=2, schedule="cosine",
                                          min_lr_ratio=0.1) for i in range(4)]
    ema = initial
    for n, now in enumerate(weights):  # the EMA by hand with diffusers' decay min(d, (1 + n) / (10 + n))
        decay = ema_decay_at(0.9, n)
        ema = [torch.lerp(e, w, 1.0 - decay) for e, w in zip(ema, now)]
    for (name, _), expected in zip(Net().named_parameters(), ema):
        assert_close(result.ema_state_dict[name], expected, ulps=4)
    assert not (tmp_path / "checkpoints").exists()  # ckpt_at_end=False and no ckpt_every


class FrozenInput(Net):
    """A frozen first layer (like a base model under adapters) and a trained head."""

    def __init__(self):
        super().__init__()
        self.inp.requires_grad_(False)


class Store(CheckpointStore):
    """An app's own layout: run-N folders, engine files in state/, an extra file and field."""

    trainer_file, pointer, fresh_if_none = "state.json", None, True

    def name(self, step):
        return f"run-{step}"

    def engine_folder(self, folder):
        return folder / "state"

    def complete(self):
        return sorted((p for p in self.root.glob("run-*") if (p / self.trainer_file).is_file()),
                      key=lambda p: int(p.name.split("-")[1]))

    def export(self, folder, engine, ema_named, *, rank):
        (folder / "export.txt").write_text(",".join(sorted(ema_named)))

    def extra_state(self):
        return {"app": "demo"}


@pytest.mark.parametrize("engine", ["plain", "gemini"])
def test_app_store_trainable_only_resumes_exactly_across_engines(tmp_path, engine):
    other = "gemini" if engine == "plain" else "plain"
    kw = dict(max_steps=6, ckpt_every=2, ckpt_at_end=False, plot=False, config_file="", optim=OptimConfig(lr=1e-2))

    def store(path, keep=0):
        return Store(path, keep_last=keep, trainable_only=True)

    straight = train(_cfg(tmp_path / "a", engine, **kw), FrozenInput, _loader, _loss, checkpoints=store(tmp_path / "a", 2))
    assert [p.name for p in store(tmp_path / "a").complete()] == ["run-4", "run-6"]  # keep_last=2
    assert not (tmp_path / "a" / "config.yaml").exists()  # config_file="": the app saves its own
    first = train(_cfg(tmp_path / "b", engine, **kw, resume="latest", stop_after=2), FrozenInput, _loader, _loss,
                  checkpoints=store(tmp_path / "b"))  # nothing to resume yet: fresh_if_none starts anew
    folder = tmp_path / "b" / "run-2"
    trainer = json.loads((folder / "state.json").read_text())
    assert trainer["step"] == 2 and trainer["app"] == "demo" and trainer["engine"] == engine
    assert (folder / "export.txt").read_text() == "out.bias,out.weight"
    assert set(load_file(str(folder / "state" / "trainable.safetensors"))) == {
        f"{kind}.out.{p}" for kind in ("param", "exp_avg", "exp_avg_sq") for p in ("weight", "bias")}
    assert set(load_file(str(folder / "ema.safetensors"))) == {"out.weight", "out.bias"}  # the frozen layer is left out
    resumed = train(_cfg(tmp_path / "b", other, **kw, resume="latest"), FrozenInput, _loader, _loss,
                    checkpoints=store(tmp_path / "b"))
    assert first.losses + resumed.losses == straight.losses  # fp32 without clipping: the engines agree exactly
    for key, value in straight.ema_state_dict.items():
        assert torch.equal(resumed.ema_state_dict[key], value), key


class Stream:
    """An endless stream whose batch k is a function of k; its state is its position."""

    def __init__(self):
        self.position, self.drawn = 0, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.position)
            x = torch.randn(4, 6, generator=gen)
            self.position, self.drawn = self.position + 1, self.drawn + 1
            yield x, (x[:, :3]).argmax(-1)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_stateful_loader_resumes_without_replaying(tmp_path):
    streams = []

    def build():
        streams.append(Stream())
        return streams[-1]

    kw = dict(max_steps=6, grad_accum=1, plot=False)
    straight = train(_cfg(tmp_path / "a", "plain", **kw), Net, build, _loss)
    first = train(_cfg(tmp_path / "b", "plain", **kw, stop_after=2), Net, build, _loss)
    resumed = train(_cfg(tmp_path / "b", "plain", **kw, resume="latest"), Net, build, _loss)
    assert first.losses + resumed.losses == straight.losses
    assert json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "trainer.json").read_text())["loader"] == {"position": 2}
    assert streams[-1].drawn == 4  # started at batch 2 instead of drawing batches 0 and 1 again
