"""The metrics log on resume, at the edges its other tests leave: a log whose folders do not exist
yet (several levels), and records without a step (an app's own notes), which belong to no step
being redone and so are kept whatever step the run resumes from."""

import json

import pytest

from ferryman.core.training.metrics import MetricsLog


def test_a_log_makes_every_missing_folder_above_it(tmp_path):
    path = tmp_path / "run" / "logs" / "train" / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": 0.5})
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    MetricsLog(path, start_step=1)  # the folders exist now: opening again is fine
    assert log.read() == [{"step": 1, "loss": 0.5}]


RECORDS = [{"note": "config changed"}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0},
           {"note": "after step 3"}]


@pytest.mark.parametrize(("start_step", "kept"), [(0, [0, 4]), (2, [0, 1, 2, 4])])
def test_records_without_a_step_are_kept_on_resume(tmp_path, start_step, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    kept = [RECORDS[i] for i in kept]  # the steps after the resumed one are redone, and logged again
    assert MetricsLog(path, start_step=start_step).read() == kept
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in kept)
