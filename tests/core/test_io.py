"""Atomic outputs: all or nothing, and as readable as a file written with a plain open()."""

import os
import stat

import pytest

from ferryman.core.io import atomic_open, atomic_path, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    write_text(tmp_path / "text.txt", "x")
    with atomic_open(tmp_path / "bin.dat", "wb") as handle:
        handle.write(b"x")
    with atomic_path(tmp_path / "weights.safetensors") as tmp:
        tmp.write_bytes(b"x")
    for name in ("text.txt", "bin.dat", "weights.safetensors"):
        assert _mode(tmp_path / name) == expected, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
