"""The README's sd-finetune quick start, run command by command as written (in a scratch folder
holding a link to the repository's data/), DreamBooth and torchrun lines included.

The commands run in this process through their click entry points (torchrun's line through
core.parallel.run_distributed, which sets the environment torchrun sets), so no console script
has to be installed; a README command this test does not know fails it.
"""

import os
import shlex
import sys

import pytest
from click.testing import CliRunner

from ferryman.apps.diffusion.cli import finetune_main, generate_main, main

from .conftest import REPO


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### sd-finetune"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash"))]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _torchrun_worker(rank, world_size, cwd, args):
    os.chdir(cwd)
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _run(argv: list[str], monkeypatch) -> str:
    from ferryman.apps.diffusion import presets
    from ferryman.core.parallel import run_distributed

    if argv[:3] == ["python", "-m", "ferryman.apps.diffusion.presets"]:
        monkeypatch.setattr(sys, "argv", ["presets", *argv[3:]])
        presets.main()
        return ""
    if argv[0] == "torchrun":
        assert argv[1] == "--nproc-per-node" and argv[3:5] == ["-m", "ferryman.apps.diffusion.cli"], argv
        results = run_distributed(_torchrun_worker, int(argv[2]), os.getcwd(), argv[5:], timeout_s=240)
        assert all(code == 0 for code, _ in results), results
        return results[0][1]
    command = {"sd-finetune": finetune_main, "sd-generate": generate_main}.get(argv[0])
    assert command is not None, f"README command this test cannot run: {argv}"
    result = CliRunner().invoke(command, argv[1:])
    assert result.exit_code == 0, (argv, result.output)
    return result.output


@pytest.mark.distributed
def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    outputs = [_run(argv, monkeypatch) for argv in readme_commands()]
    assert len(outputs) >= 10
    assert any("trained to step 25" in out for out in outputs)  # the resumed run went on from step 20
    assert any("class images: 4 images" in out for out in outputs)  # DreamBooth read the generated class images
    for folder in ("run", "big-batch", "sks", "data-parallel"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / folder))
    assert (tmp_path / "run" / "checkpoint-10").is_dir() and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    for folder, count in (("images", 1), ("images-10", 1), ("lora-images", 1), ("class-images", 4)):
        assert len(list((tmp_path / folder).glob("*.png"))) == count, folder
