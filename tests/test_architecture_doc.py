"""docs/architecture.md's 'Adding an app' example is a working app: run it as written."""

import re
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def app():
    text = DOC.read_text(encoding="utf-8").split("## Adding an app", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.splitlines()) <= 70, "the example promises an app in about 60 lines"
    module = types.ModuleType("line_app")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


def _run(app, *args):
    result = CliRunner().invoke(app.main, [*args, "--lr", "0.2", "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    return float(result.output.rsplit("loss ", 1)[1])


@pytest.mark.parametrize("memory", ["plain", "gemini-offload"])
def test_the_example_app_learns_and_resumes(app, tmp_path, memory):
    loss = _run(app, "--out", str(tmp_path), "--memory", memory, "--max-steps", "60", "--checkpoint-every", "30")
    assert loss < 1e-2  # the line is found (the noise floor is 1e-4)
    halfway = _run(app, "--out", str(tmp_path / "b"), "--memory", memory, "--max-steps", "60",
                   "--set", "train.stop_after=30")  # a job stopped (time-boxed, killed) at step 30
    resumed = _run(app, "--out", str(tmp_path / "b"), "--memory", memory, "--max-steps", "60", "--resume", "latest")
    assert resumed == loss and halfway > resumed  # exactly where the uninterrupted run is


def test_the_example_app_refuses_bad_input_in_one_line(app, tmp_path):
    result = CliRunner().invoke(app.main, ["--out", str(tmp_path), "--set", "points=4"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "points=4 must be at least batch_size=8" in result.output
