"""Defaults and odd lines that the loop's own runs never reach: a store built without options keeps
the two newest checkpoints, a metrics log opened without a start step keeps no earlier history,
and lines of metrics.jsonl that are JSON but not a record, or not UTF-8 at all, are dropped."""

import json

import torch

from ferryman.core.optim import OptimConfig
from ferryman.core.training import CheckpointStore, PlainEngine
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
