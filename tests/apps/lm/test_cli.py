"""The commands as users type them: `ferryman finetune` writes config.yaml and takes it back with
--config (flags and --set on top), `ferryman generate` reads what finetune wrote, both are
registered in the `ferryman` group and runnable as `python -m ferryman.cli` (torchrun's form)."""

import subprocess
import sys

import yaml
from click.testing import CliRunner

from ferryman.cli import main


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_config_yaml_is_written_and_accepted_back(models, sample_data, tmp_path):
    out = tmp_path / "run"
    first = _invoke(["finetune", "--model", str(models["opt"]), "--data", str(sample_data / "sums.jsonl"), "--out", str(out),
                     "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--precision", "fp32", "--lr", "3e-3",
                     "--eval-fraction", "0.1", "--memory", "gemini-offload", "--no-progress"])
    assert "trained 2 updates" in first and "held-out loss" in first
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(models["opt"].resolve()) and saved["data"]["seq_len"] == 32
    assert saved["train"]["engine"] == "gemini" and saved["train"]["gemini"]["param_host_fraction"] == 1.0
    assert saved["train"]["optim"]["lr"] == 3e-3
    again = _invoke(["finetune", "--config", str(out / "config.yaml"), "--resume", "latest",
                     "--set", "train.max_steps=3", "--no-progress"])
    assert "trained 1 updates" in again
    resaved = yaml.safe_load((out / "config.yaml").read_text())
    assert resaved == saved | {"train": saved["train"] | {"max_steps": 3, "resume": "latest"}}


def test_generate_continues_with_the_finetuned_model(models, sample_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    _invoke(["finetune", "--model", str(models["llama"]), "--data", str(sample_data / "sums.txt"), "--out", str(out),
             "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--precision", "fp32", "--no-progress"])
    printed = _invoke(["generate", "--model", str(out), "--prompt", "3 plus 4 is", "--prompt", "1", "--max-new-tokens", "5"])
    tokenizer, model = AutoTokenizer.from_pretrained(str(out)), AutoModelForCausalLM.from_pretrained(str(out))
    for prompt in ("3 plus 4 is", "1"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert prompt + tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) + "\n" in printed


def test_commands_are_registered_and_run_as_a_module():
    listing = _invoke(["--help"])
    assert "finetune" in listing and "generate" in listing and "env" in listing
    for command in ("finetune", "generate"):
        text = _invoke([command, "--help"])
        assert "Examples:" in text
    proc = subprocess.run([sys.executable, "-m", "ferryman.cli", "finetune", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--memory [plain|gemini-auto|gemini-offload]" in proc.stdout, proc.stderr
