"""`fastfold predict` from the command line: flags reach predict(), errors are one line, and the
run_config.json a run writes can be passed back with --config."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main

DATA = Path(__file__).parents[3] / "data" / "fastfold"
QUICK = ["--random-weights", "--msa-mode", "single-sequence", "--no-relax", "--no-plots", "--kernels", "torch", "--num-recycles", "1",
         "--set", "inputs.max_msa_clusters=4", "--set", "inputs.max_extra_msa=4"]  # fmt: skip



def test_predict_writes_structures_and_its_config_runs_again(tmp_path):
    runner = CliRunner()
    first = runner.invoke(main, ["predict", str(DATA / "villin.fasta"), "--out", str(tmp_path / "a"), "--seed", "5", *QUICK])
    assert first.exit_code == 0, first.output
    folder = tmp_path / "a" / "villin_n68h"
    assert (folder / "ranked_0.pdb").is_file() and (folder / "ranking_debug.json").is_file()
    config = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert config["seed"] == 5 and config["num_recycles"] == 1 and config["inputs"] == {"max_msa_clusters": 4, "max_extra_msa": 4}
    assert config["relax"] is False and config["kernels"] == "torch"

    again = runner.invoke(main, ["predict", str(DATA / "villin.fasta"), "--out", str(tmp_path / "b"),
                                 "--config", str(tmp_path / "a" / "run_config.json"), "--set", "progress=false"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "b" / "run_config.json").read_text()) == dict(config, progress=False)
    assert (tmp_path / "b" / "villin_n68h" / "ranked_0.pdb").read_text() == (folder / "ranked_0.pdb").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "o"], "no weights given: pass --params"),
        (["--out", "o", "--random-weights", "--chunk-size", "big"], "--chunk-size must be a positive integer or 'auto'"),
        (["--out", "o", "--random-weights", "--set", "num_recycle=2"], "did you mean 'num_recycles'"),
        (["--out", "o", "--random-weights", "--gpus", "0"], "--gpus must be at least 1"),
    ],
)
def test_predict_refuses_bad_input_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["predict", str(DATA / "villin.fasta"), *args])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o" / "villin_n68h").exists()


def _fastfold_script() -> str:
    import shutil
    import sys

    path = shutil.which("fastfold", path=str(Path(sys.executable).parent))
    assert path, "the fastfold console script is not installed next to this Python"
    return path


@pytest.mark.distributed
def test_gpus_flag_starts_dap_processes_with_torchrun(tmp_path):
    import subprocess

    cmd = [_fastfold_script(), "predict", str(DATA / "villin.fasta"), "--out", str(tmp_path / "dap"), "--gpus", "2", *QUICK]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "dap" / "run_info.json").read_text())["dap"] == 2
    assert (tmp_path / "dap" / "villin_n68h" / "ranked_0.pdb").is_file()

    bad = subprocess.run([*cmd[:4], str(tmp_path / "bad"), "--gpus", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("Error: no weights given") and bad.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(("args", "compiled"), [([], False), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flag_reaches_the_run_options(tmp_path, monkeypatch, args, compiled):
    """--compile is read into the options predict runs with, and from them into the model's RunOptions."""
    from ferryman.apps.fastfold import predict
    from ferryman.apps.fastfold.inference import run_options

    seen = []
    monkeypatch.setattr(predict, "run", lambda fasta, out, opts: seen.append(opts) or {})
    result = CliRunner().invoke(main, ["predict", str(DATA / "villin.fasta"), "--out", str(tmp_path / "o"), *QUICK, *args])
    assert result.exit_code == 0, result.output
    [opts] = seen
    assert run_options(opts).compile is compiled and run_options(opts).kernels == "torch"
