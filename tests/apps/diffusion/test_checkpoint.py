"""Finding checkpoint-N folders: numeric order, unfinished ones ignored, clear errors."""

import pytest

from ferryman.apps.diffusion.checkpoint import STATE_FILE, list_checkpoints, resolve_resume
from ferryman.core.errors import UserError


def _make(root, name, finished=True):
    folder = root / name
    folder.mkdir(parents=True)
    if finished:
        (folder / STATE_FILE).write_text("{}")
    return folder


def test_latest_is_the_highest_finished_step(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: start fresh
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-100.tmp", "checkpoint-x"):
        _make(tmp_path, name)
    _make(tmp_path, "checkpoint-200", finished=False)  # crashed while writing
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_resume(tmp_path, "") is None


def test_explicit_folder_must_be_a_checkpoint(tmp_path):
    good = _make(tmp_path, "checkpoint-5")
    assert resolve_resume(tmp_path, str(good)) == good
    with pytest.raises(UserError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "elsewhere"))
