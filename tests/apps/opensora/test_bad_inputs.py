"""Damaged files, wrong formats and unwritable outputs, each through the real CLI: a non-zero exit,
exactly one line that names the file or flag at fault, no traceback, and nothing new left behind.

Each case gets a fresh folder holding its inputs and outputs; any file or folder that appears in it
(or changes size) counts as half-written output. Checkpoint files that the core training loop
loads on --resume are marked xfail until core reads them through core/files (see the reason).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from ferryman.apps.opensora.cli import main as opensora

from .conftest import CLIPS

TRAIN_FLAGS = ["--bucket", "32:8:2", "--precision", "fp32", "--set", "data.size_multiple=8",
               "--set", "train.progress=false", "--set", "train.plot=false",
               "--set", "runtime.attention_backend=torch", "--set", "runtime.norm_backend=torch"]


@dataclass
class Inputs:
    t5: Path
    vae: Path
    run: Path  # a finished 2-step plain run: checkpoints step-1 and step-2, ema, model, optimizer, rng
    gemini_run: Path  # the same on the Gemini engine (sharded weights)


def _train(out: Path, t5: Path, vae: Path, *extra: str) -> Result:
    args = ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5), "--vae", str(vae), "--out", str(out),
            "--max-steps", "2", "--checkpoint-every", "1", *TRAIN_FLAGS, *extra]
    return CliRunner().invoke(opensora, args)


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> Inputs:
    t5, vae = tiny_models
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, memory in (("run", "plain"), ("gemini_run", "gemini-offload")):
        result = _train(root / name, t5, vae, "--memory", memory)
        assert result.exit_code == 0, result.output
    return Inputs(t5=t5, vae=vae, run=root / "run", gemini_run=root / "gemini_run")


# -- damage ------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _pickle(path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, path)


def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 16)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _step2(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002"


def _lock(folder: Path) -> Path:
    """A folder nothing can be written in: immutable where chattr works (root), else read-only."""
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("root without chattr: no folder here is unwritable")
        folder.chmod(0o555)
    return folder


def _unlock(tmp: Path) -> None:
    for folder in tmp.rglob("*"):
        if folder.is_dir():
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
            folder.chmod(0o755)


def _sample_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--prompt", "a red circle", "--num-frames", "2", "--resolution", "16",
            "--steps", "2", "--out", str(out), *extra]


def _train_args(tmp: Path, inp: Inputs, *, csv: Path = CLIPS / "clips.csv", t5: Path | None = None,
                vae: Path | None = None, out: Path | None = None) -> list[str]:
    return ["train", "--csv", str(csv), "--text-encoder", str(t5 or inp.t5), "--vae", str(vae or inp.vae),
            "--out", str(out or tmp / "run"), "--max-steps", "1", *TRAIN_FLAGS]


def _resume_args(run: Path) -> list[str]:
    return ["train", "--out", str(run), "--resume", "latest", "--max-steps", "3"]


# -- the cases: (tmp, inputs) -> (argv, text the one line must contain) ------------------------------

Case = Callable[[Path, Inputs], tuple[list[str], str]]


def t5_weights_truncated(tmp, inp):
    t5 = _copy(inp.t5, tmp / "t5")
    _truncate(t5 / "model.safetensors")
    return _train_args(tmp, inp, t5=t5), str(t5 / "model.safetensors")


def t5_weights_pickled_beside_safetensors(tmp, inp):
    t5 = _copy(inp.t5, tmp / "t5")
    _pickle(t5 / "pytorch_model.bin")
    return _train_args(tmp, inp, t5=t5), "pytorch_model.bin"


def vae_header_overwritten(tmp, inp):
    vae = _copy(inp.vae, tmp / "vae")
    _overwrite_header(vae / "diffusion_pytorch_model.safetensors")
    return _sample_args(inp.run, tmp / "clip.mp4", "--vae", str(vae)), "diffusion_pytorch_model.safetensors"


def vae_pickle_named_safetensors(tmp, inp):
    vae = _copy(inp.vae, tmp / "vae")
    _pickle(vae / "diffusion_pytorch_model.safetensors")
    return _train_args(tmp, inp, vae=vae), "diffusion_pytorch_model.safetensors"


def sample_ema_truncated(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _truncate(_step2(run) / "ema.safetensors")
    return _sample_args(run, tmp / "clip.mp4"), "ema.safetensors"


def sample_model_weights_overwritten(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _overwrite_header(_step2(run) / "model.safetensors")
    return _sample_args(run, tmp / "clip.mp4", "--no-ema"), "model.safetensors"


def sample_gemini_shard_truncated(tmp, inp):
    run = _copy(inp.gemini_run, tmp / "run")
    _truncate(_step2(run) / "shard-00000-of-00001.safetensors")
    return _sample_args(_step2(run), tmp / "clip.mp4", "--no-ema"), "shard-00000-of-00001.safetensors"


def sample_run_config_garbage(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _binary(run / "opensora.yaml")
    return _sample_args(run, tmp / "clip.mp4"), "opensora.yaml"


def sample_missing_ckpt(tmp, inp):
    return _sample_args(tmp / "no-such-run", tmp / "clip.mp4"), "no-such-run"


def sample_bad_resolution(tmp, inp):
    return _sample_args(inp.run, tmp / "clip.mp4", "--resolution", "24xforty"), "--resolution"


def sample_odd_resolution(tmp, inp):
    return _sample_args(inp.run, tmp / "clip.mp4", "--resolution", "25x40"), "--resolution"


def sample_zero_frames(tmp, inp):
    return _sample_args(inp.run, tmp / "clip.mp4", "--num-frames", "0"), "--num-frames"


def sample_out_in_immutable_folder(tmp, inp):
    return _sample_args(inp.run, _lock(tmp / "locked") / "clip.mp4"), "locked"


def sample_out_is_a_folder(tmp, inp):
    (tmp / "clip.mp4").mkdir()
    return _sample_args(inp.run, tmp / "clip.mp4"), "clip.mp4"


def sample_out_below_a_file(tmp, inp):
    (tmp / "notes.txt").write_text("a file where a folder should be\n")
    return _sample_args(inp.run, tmp / "notes.txt" / "clip.mp4"), "notes.txt"


def train_out_in_immutable_folder(tmp, inp):
    return _train_args(tmp, inp, out=_lock(tmp / "locked") / "run"), "locked"


def train_out_is_a_file(tmp, inp):
    (tmp / "run").write_text("a file where the run folder should be\n")
    return _train_args(tmp, inp, out=tmp / "run"), str(tmp / "run")


def binary_csv(tmp, inp):
    return _train_args(tmp, inp, csv=_binary(tmp / "clips.csv")), "clips.csv"


def binary_parquet(tmp, inp):
    return _train_args(tmp, inp, csv=_binary(tmp / "clips.parquet")), "clips.parquet"


def csv_missing_text_column(tmp, inp):
    (tmp / "clips.csv").write_text("path,caption\ncircle_diag.mp4,a circle\n")
    return _train_args(tmp, inp, csv=tmp / "clips.csv"), "missing column(s) text"


def data_check_binary_csv(tmp, inp):
    return ["data", "check", str(_binary(tmp / "clips.csv"))], "clips.csv"


def binary_config_file(tmp, inp):
    return [*_train_args(tmp, inp), "--config", str(_binary(tmp / "run.yaml"))], "run.yaml"


def unknown_preset(tmp, inp):
    return [*_train_args(tmp, inp), "--set", "preset=huge"], "huge"


# the core loads these on --resume (model, optimizer, RNG, EMA, the latest pointer)

def resume_model_truncated(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _truncate(_step2(run) / "model.safetensors")
    return _resume_args(run), "model.safetensors"


def resume_optimizer_truncated(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _truncate(_step2(run) / "optimizer.safetensors")
    return _resume_args(run), "optimizer.safetensors"


def resume_rng_overwritten(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _overwrite_header(_step2(run) / "rng-rank00000.safetensors")
    return _resume_args(run), "rng-rank00000.safetensors"


def resume_ema_truncated(tmp, inp):
    run = _copy(inp.run, tmp / "run")
    _truncate(_step2(run) / "ema.safetensors")
    return _resume_args(run), "ema.safetensors"


CASES: list[Case] = [
    t5_weights_truncated, t5_weights_pickled_beside_safetensors, vae_header_overwritten, vae_pickle_named_safetensors,
    sample_ema_truncated, sample_model_weights_overwritten, sample_gemini_shard_truncated,
    sample_run_config_garbage, sample_missing_ckpt, sample_bad_resolution, sample_odd_resolution, sample_zero_frames,
    sample_out_in_immutable_folder, sample_out_is_a_folder, sample_out_below_a_file, train_out_in_immutable_folder,
    train_out_is_a_file, binary_csv, binary_parquet, csv_missing_text_column, data_check_binary_csv, binary_config_file,
    unknown_preset,
]
CORE_CASES: list[Case] = [resume_model_truncated, resume_optimizer_truncated, resume_rng_overwritten,
                          resume_ema_truncated]


def _listing(folder: Path, sizes: bool) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.stat().st_size if sizes and p.is_file() else -1) for p in folder.rglob("*")}


def _fails_in_one_line(tmp: Path, inp: Inputs, case: Case, *, sizes: bool = True) -> None:
    """``sizes``: also no file changed size (a resumed run rewrites its config before it loads the
    checkpoint, so for those only new files and folders count)."""
    tmp.mkdir()
    try:
        argv, names = case(tmp, inp)
        before = _listing(tmp, sizes)
        result = CliRunner().invoke(opensora, argv)
        lines = result.output.strip().splitlines()
        assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert names in lines[0], lines[0]
        assert "Traceback" not in result.output
        assert _listing(tmp, sizes) == before  # nothing half-written, no folder created
    finally:
        _unlock(tmp)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_ends_in_one_line_naming_it(tmp_path, inputs, case):
    _fails_in_one_line(tmp_path / "case", inputs, case)


@pytest.mark.parametrize("case", CORE_CASES, ids=[c.__name__ for c in CORE_CASES])
def test_damaged_checkpoint_on_resume_ends_in_one_line(tmp_path, inputs, case):
    _fails_in_one_line(tmp_path / "case", inputs, case, sizes=False)


def test_stale_temporary_checkpoint_folder_is_cleared_on_resume(tmp_path, inputs):
    """A crash while writing step 3 left .tmp-step-00000003 behind; a resumed run carries on from
    step 2 and leaves no temporary folder (today the stale one stays forever)."""
    run = _copy(inputs.run, tmp_path / "run")
    stale = run / "checkpoints" / ".tmp-step-00000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    result = CliRunner().invoke(opensora, [*_resume_args(run)[:-1], "4", "--checkpoint-every", "2"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_damaged_text_cache_entry_is_recomputed(tmp_path, inputs):
    """A truncated or overwritten cache entry is computed again and rewritten; training goes on
    exactly as with a sound cache."""
    cache = tmp_path / "cache"
    assert _train(tmp_path / "a", inputs.t5, inputs.vae, "--text-cache", str(cache)).exit_code == 0
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) >= 2  # one per caption seen
    sound = {p: p.read_bytes() for p in entries}
    _truncate(entries[0])
    _binary(entries[1])
    result = _train(tmp_path / "b", inputs.t5, inputs.vae, "--text-cache", str(cache))
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in sorted(cache.rglob("*.safetensors"))} == sound
    losses = [json.loads(line)["loss"] for run in ("a", "b") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses[:2] == losses[2:]


def test_a_real_process_writes_only_the_error_line_to_stderr(tmp_path, inputs):
    """The same contract outside CliRunner: the console script's stderr holds one line, stdout nothing."""
    import sys

    argv, _ = binary_csv(tmp_path, inputs)
    run = subprocess.run([sys.executable, "-m", "ferryman.apps.opensora.cli", *argv], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"Error: {tmp_path / 'clips.csv'}: not a UTF-8"), run.stderr


def test_a_garbage_latest_pointer_samples_the_newest_complete_checkpoint(tmp_path, inputs):
    from ferryman.apps.opensora.sample import find_checkpoint

    run = _copy(inputs.run, tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    _binary(run / "checkpoints" / "latest")
    assert find_checkpoint(run) == newest
