"""The loop's run folder: an earlier run is never overwritten by a fresh one, a metrics line cut
short does not stop a resume, and resume is exact even when the data pipeline draws from the
global RNG (random augmentation)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ferryman.core.errors import UserError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import TrainConfig, train


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x)


def _loader():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def _loss(engine, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(engine(x).float(), y)


def _cfg(out, **kw):
    base = dict(out_dir=str(out), max_steps=4, precision="fp32", engine="plain", progress=False, plot=False,
                optim=OptimConfig(lr=1e-2), ckpt_every=2, keep_last=0, device="cpu")
    return TrainConfig(**(base | kw))


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_and_changes_nothing(tmp_path):
    train(_cfg(tmp_path), Net, _loader, _loss)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"holds checkpoints of an earlier run \(newest step-00000004\).*--resume latest"):
        train(_cfg(tmp_path, seed=1, optim=OptimConfig(lr=0.5)), Net, _loader, _loss)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    step2 = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert set(step2) == {"lin.weight", "lin.bias"}


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
    train(_cfg(tmp_path, stop_after=2), Net, _loader, _loss)
    with (tmp_path / "metrics.jsonl").open("a") as handle:  # killed, or the disk filled, mid-append
        handle.write('{"step": 3, "lo')
    train(_cfg(tmp_path, resume="latest"), Net, _loader, _loss)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class _Augmented(Dataset):
    """Random augmentation drawn from the global RNG, as torchvision transforms do."""

    def __init__(self):
        gen = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]


def _augmented():
    return DataLoader(_Augmented(), batch_size=4, shuffle=True)


def test_resume_is_exact_when_the_data_draws_from_the_global_rng(tmp_path):
    straight = train(_cfg(tmp_path / "a", max_steps=6, ckpt_every=0), Net, _augmented, _loss)
    first = train(_cfg(tmp_path / "b", max_steps=6, ckpt_every=0, stop_after=3), Net, _augmented, _loss)
    resumed = train(_cfg(tmp_path / "b", max_steps=6, ckpt_every=0, resume="latest"), Net, _augmented, _loss)
    assert first.losses + resumed.losses == straight.losses
