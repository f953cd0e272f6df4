"""The README's `ferryman finetune` quick start, run command by command as written in a scratch
folder (the torchrun line through core.parallel.run_distributed, which sets torchrun's
environment), then its Python example as written; a README command this test does not know fails it."""

import os
import shlex
import sys

import pytest
from click.testing import CliRunner

from ferryman.cli import main

from .conftest import REPO

SECTION = "### ferryman finetune"


def _block(kind: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ")]
    start = section.index(f"```{kind}\n") + len(f"```{kind}\n")
    return section[start : section.index("```\n", start)]


def readme_commands() -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in _block("bash").replace("\\\n", " ").splitlines() if line.strip()]


def _torchrun_worker(rank, world_size, cwd, args):
    os.chdir(cwd)
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _run(argv: list[str], monkeypatch) -> str:
    from ferryman.apps.lm import tiny
    from ferryman.core.parallel import run_distributed

    if argv[:3] == ["python", "-m", "ferryman.apps.lm.tiny"]:
        monkeypatch.setattr(sys, "argv", ["tiny", *argv[3:]])
        tiny.main()
        return ""
    if argv[0] == "torchrun":
        assert argv[1] == "--nproc-per-node" and argv[3:5] == ["-m", "ferryman.cli"], argv
        results = run_distributed(_torchrun_worker, int(argv[2]), os.getcwd(), argv[5:], timeout_s=240)
        assert all(code == 0 for code, _ in results), results
        return results[0][1]
    assert argv[0] == "ferryman", f"README command this test cannot run: {argv}"
    result = CliRunner().invoke(main, argv[1:])
    assert result.exit_code == 0, (argv, result.output)
    return result.output


@pytest.mark.distributed
def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    outputs = [_run(argv, monkeypatch) for argv in readme_commands()]
    assert len(outputs) >= 8
    assert any("trained 5 updates" in out for out in outputs)  # the resumed run went on from step 20
    assert any(line.startswith("3 plus 4 is") for out in outputs for line in out.splitlines())
    for folder in ("lm-run", "lm-offload", "lm-dp"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / folder))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm-tiny")), str(tmp_path / "lm-lora"))
    assert (tmp_path / "lm-run" / "checkpoints" / "step-00000030").is_dir()
    assert (tmp_path / "lm-run" / "eval.jsonl").is_file() and (tmp_path / "lm-run" / "loss.png").is_file()

    exec(compile(_block("python"), "README.md", "exec"), {})
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm-mine"))
