"""Damaged checkpoints end a resume in one line naming the file, and change nothing on disk;
the folders, not the ``latest`` pointer, say what is complete; crash leftovers are cleared."""

import pytest

from ferryman.core.errors import UserError
from ferryman.core.training import train
from tests.core.training.test_loop import Net, _cfg, _loader, _loss


@pytest.fixture(params=["plain", "gemini"])
def run(tmp_path, request):
    """A run stopped after 4 updates with a checkpoint every 2 (steps 2 and 4 on disk)."""
    cfg = _cfg(tmp_path / "run", request.param, stop_after=4, ckpt_every=2, keep_last=0, plot=False)
    train(cfg, Net, _loader, _loss)
    return tmp_path / "run", request.param


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("victim", ["ema.safetensors", "rng-rank00000.safetensors", "rng-rank00000.json", "trainer.json",
                                    "engine"])
def test_a_damaged_file_is_named_and_nothing_changes(run, victim):
    out, engine = run
    step = out / "checkpoints" / "step-00000004"
    if victim == "engine":  # the engine's own weights: plain model.safetensors, Gemini shard files
        victim = sorted(p.name for p in step.glob("*.safetensors") if not p.name.startswith(("ema", "rng")))[0]
    _truncate(step / victim)
    before = _snapshot(out)
    with pytest.raises(UserError, match=rf"step-00000004/{victim}: cannot read this checkpoint file"):
        train(_cfg(out, engine, resume="latest"), Net, _loader, _loss)
    assert _snapshot(out) == before  # not even the run's config.yaml was rewritten


@pytest.mark.parametrize("pointer", [b"\x00\xff\xfe garbage", b"step-00000099\n", b"../../etc\n", b""])
def test_a_damaged_latest_pointer_falls_back_to_the_newest_complete_folder(run, pointer):
    out, engine = run
    (out / "checkpoints" / "latest").write_bytes(pointer)
    resumed = train(_cfg(out, engine, resume="latest", max_steps=5, plot=False), Net, _loader, _loss)
    assert len(resumed.losses) == 1  # continued from step 4, not from scratch
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000005"


def test_leftovers_of_a_crash_are_cleared_by_the_next_save(run):
    out, engine = run
    ckpts = out / "checkpoints"
    for name in (".tmp-step-00000006", ".old-step-00000002"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.safetensors").write_bytes(b"\0" * 10)
    train(_cfg(out, engine, resume="latest", max_steps=6, ckpt_every=2, keep_last=0, plot=False), Net, _loader, _loss)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000004", "step-00000006"]
