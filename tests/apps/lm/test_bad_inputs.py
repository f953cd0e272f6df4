"""Bad inputs to `ferryman finetune` and `ferryman generate` end in one line, through the real CLI.

Every case runs the `ferryman` command group on a scene it builds (a copy of the tiny model or of
a finished run, data files, an output path) and must end with exit status 2, exactly one line
naming the file, line or flag, no traceback, and no new file anywhere in the scene. (A damaged
``latest`` pointer is not an error: the core resumes from the newest complete checkpoint, see
tests/core/training/test_checkpoint_damage.py.)
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ferryman.cli import main

from .conftest import lm_config


@dataclass
class Scene:
    root: Path
    models: dict[str, Path]
    trained: Path  # a finished 2-step plain run with a checkpoint after each step

    def model(self, family: str = "llama") -> Path:
        return Path(shutil.copytree(self.models[family], self.root / "model"))

    def run(self) -> Path:
        return Path(shutil.copytree(self.trained, self.root / "run"))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        return path


@dataclass
class Case:
    command: str  # finetune | generate
    build: Callable[[Scene], list[str]]  # the scene's arguments (after the command's defaults)
    expect: tuple[str, ...]  # each must appear in the one line
    marks: list = field(default_factory=list)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def data(name: str, content: str | bytes) -> Callable[[Scene], list[str]]:
    return lambda scene: ["--data", str(scene.file(name, content))]


def model_with(change: Callable[[Path], object], command_flag: str = "--model") -> Callable[[Scene], list[str]]:
    def build(scene: Scene) -> list[str]:
        model = scene.model()
        change(model)
        return [command_flag, str(model)]

    return build


def _pickled_weights(model: Path) -> None:
    (model / "model.safetensors.index.json").unlink()
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, model / "pytorch_model.bin")


def _t5_folder(scene: Scene) -> list[str]:
    from transformers import T5Config

    folder = scene.root / "t5"
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(folder)
    return ["--model", str(folder)]


def _parquet(scene: Scene, rows: dict, *, damage: bool = False) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = scene.root / "data.parquet"
    pq.write_table(pa.table(rows), path)
    return ["--data", str(truncate(path) if damage else path)]


def resume_with(change: Callable[[Path], object]) -> Callable[[Scene], list[str]]:
    """--resume latest on the finished run after ``change(its newest checkpoint folder)``."""

    def build(scene: Scene) -> list[str]:
        run = scene.run()
        change(run / "checkpoints" / "step-00000002")
        return ["--out", str(run), "--resume", "latest", "--max-steps", "3"]

    return build


def _adapter_without_base(scene: Scene) -> list[str]:
    folder = scene.root / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(scene.root / "gone")}))
    return ["--model", str(folder)]


NO_TEXT = '{"body": "3 plus 4 is 7."}\n'
BROKEN = '{"text": "3 plus 4 is 7."}\n{"text": \n'
LONG_TEXT = "3 plus 4 is 7.\n" * 40

CASES = {
    # the text
    "finetune/jsonl without a text field": Case("finetune", data("sums.jsonl", NO_TEXT), ("sums.jsonl line 1", "no 'text' field", "'body'")),
    "finetune/prompt without completion": Case("finetune", data("qa.jsonl", '{"prompt": "3 plus 4 is"}\n'),
                                               ("qa.jsonl line 1", "'completion'")),
    "finetune/text that is not a string": Case("finetune", data("n.jsonl", '{"text": 7}\n'), ("n.jsonl line 1", "'text' is int")),
    "finetune/malformed JSON line": Case("finetune", data("b.jsonl", BROKEN), ("b.jsonl line 2", "not valid JSON")),
    "finetune/empty .txt": Case("finetune", data("empty.txt", ""), ("empty.txt", "empty file")),
    "finetune/blank .txt": Case("finetune", data("blank.txt", "\n  \n"), ("blank.txt", "empty file")),
    "finetune/empty .jsonl": Case("finetune", data("empty.jsonl", "\n"), ("empty.jsonl", "empty file")),
    "finetune/binary .txt": Case("finetune", data("bin.txt", b"\xff\xfe\x00\x01 not UTF-8"), ("bin.txt", "cannot read")),
    "finetune/parquet without the field": Case("finetune", lambda s: _parquet(s, {"body": ["a b c"]}),
                                               ("data.parquet", "no 'text' field")),
    "finetune/damaged parquet": Case("finetune", lambda s: _parquet(s, {"text": ["a b c"] * 50}, damage=True),
                                     ("data.parquet", "damaged")),
    "finetune/unsupported file": Case("finetune", data("sums.csv", "text\n3 plus 4\n"), ("sums.csv", "--data takes")),
    "finetune/folder without text files": Case("finetune", lambda s: ["--data", str(Path(s.file("x.md", "# no").parent))],
                                               ("no .txt, .jsonl, .parquet files",)),
    "finetune/missing --data": Case("finetune", lambda s: ["--data", str(s.root / "nope.txt")], ("nope.txt", "no such file")),
    "finetune/--eval-data empty": Case("finetune", lambda s: ["--eval-data", str(s.file("held.txt", ""))],
                                       ("held.txt", "empty file")),
    # sizes
    "finetune/--seq-len 0": Case("finetune", lambda s: ["--seq-len", "0"], ("data.seq_len=0", "--seq-len")),
    "finetune/--seq-len longer than the text": Case("finetune", lambda s: ["--data", str(s.file("short.txt", "3 plus 4")),
                                                                            "--seq-len", "64"], ("fewer than --seq-len 64",)),
    "finetune/--batch-size above the blocks": Case("finetune", lambda s: ["--data", str(s.file("t.txt", LONG_TEXT)),
                                                                           "--batch-size", "64"], ("--batch-size 64", "fewer than one batch")),
    "finetune/--eval-fraction 1.5": Case("finetune", lambda s: ["--eval-fraction", "1.5"], ("data.eval_fraction=1.5",)),
    "finetune/--batch-size 0": Case("finetune", lambda s: ["--batch-size", "0"], ("batch_size=0",)),
    "finetune/--precision fp16": Case("finetune", lambda s: ["--precision", "fp16"], ("--precision",)),
    "finetune/--lora-targets that match nothing": Case("finetune", lambda s: ["--lora-rank", "2", "--lora-targets", "nope_proj"],
                                                       ("lora.targets='nope_proj'",)),
    # the model folder
    "finetune/not a causal LM": Case("finetune", _t5_folder, ("'t5' model", "not a causal language model")),
    "finetune/folder without config.json": Case("finetune", lambda s: ["--model", str(Path(s.file("a.txt", "x")).parent)],
                                                ("no config.json", "--model")),
    "finetune/missing --model": Case("finetune", lambda s: ["--model", str(s.root / "nope")], ("nope", "no such model folder")),
    "finetune/pickled weights": Case("finetune", model_with(_pickled_weights), ("pytorch_model.bin", "pickle")),
    "finetune/truncated weight shard": Case("finetune", model_with(lambda m: truncate(next(iter(sorted(m.glob("model-*")))))),
                                            ("model-00001-of-", "damaged")),
    "finetune/no weights": Case("finetune", model_with(lambda m: [p.unlink() for p in m.glob("model*")]),
                                ("no safetensors weights",)),
    "finetune/garbage config.json": Case("finetune", model_with(lambda m: (m / "config.json").write_text("{not json")),
                                         ("config.json",)),
    "finetune/no tokenizer": Case("finetune", model_with(lambda m: [p.unlink() for p in m.glob("tokenizer*")]),
                                  ("no tokenizer",)),
    # outputs, configs, resume
    "finetune/--out is a file": Case("finetune", lambda s: ["--out", str(s.file("run", "not a folder"))], ("existing file",)),
    "finetune/--config missing": Case("finetune", lambda s: ["--config", str(s.root / "none.yaml")], ("none.yaml", "does not exist")),
    "finetune/--set unknown key": Case("finetune", lambda s: ["--set", "data.seqlen=8"], ("unknown config key 'data.seqlen'",)),
    "finetune/--resume latest with nothing saved": Case("finetune", lambda s: ["--resume", "latest"], ("no checkpoint",)),
    "finetune/--resume a folder that is no checkpoint": Case("finetune", lambda s: ["--resume", str(s.root)],
                                                             ("not a complete checkpoint",)),
    "finetune/resume with damaged weights": Case("finetune", resume_with(lambda c: truncate(c / "model.safetensors")),
                                                 ("model.safetensors",)),
    "finetune/resume with damaged optimizer state": Case("finetune", resume_with(
        lambda c: truncate(c / "optimizer.safetensors")), ("optimizer.safetensors",)),
    "finetune/resume with damaged RNG state": Case("finetune", resume_with(lambda c: truncate(c / "rng-rank00000.safetensors")),
                                                   ("rng-rank00000.safetensors",)),
    # generate
    "generate/missing --model": Case("generate", lambda s: ["--model", str(s.root / "nope")], ("nope", "no such model folder")),
    "generate/not a causal LM": Case("generate", _t5_folder, ("'t5' model",)),
    "generate/pickled weights": Case("generate", model_with(_pickled_weights), ("pytorch_model.bin", "pickle")),
    "generate/adapter whose base is gone": Case("generate", _adapter_without_base, ("adapter_config.json", "--base")),
    "generate/--max-new-tokens 0": Case("generate", lambda s: ["--max-new-tokens", "0"], ("max_new_tokens=0",)),
}


def defaults(command: str, scene: Scene, sample_data: Path) -> list[str]:
    """Arguments that make the command valid, before the case's own (a later flag wins)."""
    if command == "finetune":
        return ["finetune", "--model", str(scene.models["llama"]), "--data", str(sample_data / "sums.txt"),
                "--out", str(scene.root / "out"), "--seq-len", "32", "--batch-size", "2", "--max-steps", "1",
                "--precision", "fp32", "--no-progress"]
    return ["generate", "--model", str(scene.models["llama"]), "--prompt", "3 plus 4 is", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def trained(models, sample_data, tmp_path_factory) -> Path:
    from ferryman.apps.lm.train import finetune

    out = tmp_path_factory.mktemp("trained") / "run"
    finetune(lm_config(models["llama"], out, sample_data / "sums.txt", max_steps=2, ckpt_every=1), progress=False)
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()])
def test_bad_input_ends_in_one_line_naming_it(name, models, sample_data, trained, tmp_path):
    case = CASES[name]
    scene = Scene(root=tmp_path, models=models, trained=trained)
    args = defaults(case.command, scene, sample_data) + case.build(scene)
    before = _files(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for text in case.expect:
        assert text in lines[0], (text, lines[0])
    assert _files(tmp_path) == before  # nothing new, nothing half-written


def test_the_issue_cases_are_covered():
    """No text field, an empty file, a folder that is not a causal LM, --seq-len 0 (issue #19), in both commands."""
    names = " ".join(CASES)
    for point in ("without a text field", "empty .txt", "not a causal LM", "--seq-len 0"):
        assert point in names
    assert {c.command for c in CASES.values()} == {"finetune", "generate"}
