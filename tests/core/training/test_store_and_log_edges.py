"""Defaults, odd lines and settings that the loop's other tests never reach: a store built without
options keeps the two newest checkpoints, a metrics log opened without a start step keeps no
earlier history, lines of metrics.jsonl that are JSON but not a record (or not UTF-8) are dropped,
a refused fresh run names the newest of several checkpoints, an empty loader's message, a seed
wider than numpy's 32 bits, and batches with non-tensor leaves."""

import json
import random

import numpy as np
import pytest
import torch

from ferryman.core.errors import UserError
from ferryman.core.optim import OptimConfig
from ferryman.core.training import CheckpointStore, PlainEngine, TrainConfig, train
from ferryman.core.training.metrics import MetricsLog


def test_a_store_built_without_options_keeps_the_two_newest_checkpoints(tmp_path):
    engine = PlainEngine(torch.nn.Linear(2, 2), OptimConfig(), torch.float32, torch.device("cpu"))
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3):
        store.save(step, engine, None, {"step": step}, rank=0)
    assert [p.name for p in store.complete()] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text() == "step-00000003\n"


def test_a_log_opened_without_a_start_step_keeps_no_earlier_step(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"  # its folder is made too
    first = MetricsLog(path)
    for step in (1, 2):
        first.write({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in MetricsLog(path, start_step=1).read()] == [1]
    assert MetricsLog(path).read() == [] and path.read_text() == ""


def test_lines_that_are_json_but_not_a_record_or_not_utf8_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    lines = [json.dumps(good[0]).encode(), b"7", b"[1, 2]", b'"step"', b"null", b"",
             b'{"step": 9, "lo\xe2\x82',  # cut short inside a multi-byte character
             json.dumps(good[1]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert MetricsLog(path, start_step=5).read() == good
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in good)  # rewritten without them


def _net():
    return torch.nn.Linear(3, 2)


def _rows():
    return [{"x": torch.full((2, 3), float(i)), "y": torch.zeros(2, 2), "names": ["a", "b"]} for i in range(3)]


def _mse(engine, batch):
    assert batch["names"] == ["a", "b"]  # a batch's non-tensor leaves reach the loss as they were
    return (engine(batch["x"]) - batch["y"]).square().mean()


def _cfg(out, **kw):
    return TrainConfig(**({"out_dir": str(out), "max_steps": 3, "precision": "fp32", "device": "cpu", "progress": False,
                           "plot": False, "optim": OptimConfig(lr=0.1)} | kw))


def test_a_fresh_run_into_a_folder_of_three_checkpoints_names_the_newest(tmp_path):
    train(_cfg(tmp_path, ckpt_every=1, keep_last=0), _net, _rows, _mse)
    with pytest.raises(UserError) as err:
        train(_cfg(tmp_path), _net, _rows, _mse)
    assert str(err.value) == (f"{tmp_path / 'checkpoints'} holds checkpoints of an earlier run (newest step-00000003); "
                              "continue it with resume=latest (--resume latest), or write this run elsewhere (--out)")


def test_an_empty_loader_is_named_in_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        train(_cfg(tmp_path), _net, lambda: [], _mse)
    assert str(err.value) == "the data loader yielded no batches (is the dataset empty or the batch size too big?)"


def _draws(engine, batch):
    _drawn.append((random.random(), float(np.random.random_sample()), float(torch.rand(()))))
    return _mse(engine, batch)


_drawn: list = []


def test_a_seed_beyond_32_bits_seeds_python_and_torch_with_it_and_numpy_with_its_low_32_bits(tmp_path):
    seed = 2**32 + 1000
    _drawn.clear()
    train(_cfg(tmp_path, max_steps=1, seed=seed), _net, _rows, _draws)
    torch_gen = torch.Generator().manual_seed(seed)
    assert _drawn == [(random.Random(seed).random(), float(np.random.RandomState(1000).random_sample()),
                      float(torch.rand((), generator=torch_gen)))]
