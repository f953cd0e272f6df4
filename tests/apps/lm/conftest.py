"""Shared fixtures: tiny OPT (tied output layer) and Llama (untied, weights in shards) folders with
random weights around the byte-level tokenizer in tests/assets, and the sample sums."""

import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "tests" / "assets" / "lm_tokenizer"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    from ferryman.apps.lm.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("lm-models")
    return {"opt": write_tiny_model(root / "opt", "opt", tokenizer_dir=TOKENIZER),
            "llama": write_tiny_model(root / "llama", "llama", tokenizer_dir=TOKENIZER, max_shard_size="30KB")}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    from ferryman.apps.lm.tiny import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("lm-data"))


TRAIN_KEYS = {"max_steps", "precision", "seed", "grad_accum", "resume", "ckpt_every", "warmup_steps", "schedule",
              "keep_last", "stop_after", "device"}
OPTIM_KEYS = {"lr", "weight_decay", "max_grad_norm", "eps"}
DATA_KEYS = {"seq_len", "eval_fraction", "eval_path", "text_field", "train_on_prompt"}


def lm_config(model: Path, out: Path, data: Path, **changes):
    """A FinetuneConfig for a tiny model: 3 fp32 updates of 2 blocks of 32 tokens, lr 3e-3.

    ``changes``: FinetuneConfig fields; fields of the core TrainConfig (max_steps, ckpt_every ...),
    of its optimizer (lr, weight_decay, max_grad_norm, eps) or of DataConfig (seq_len ...); ``memory``
    as --memory means it; ``budget`` for gemini.device_budget_bytes; ``lora_rank``.
    """
    from ferryman.apps.lm.config import DataConfig, FinetuneConfig, LoraConfig, finetune_train
    from ferryman.core.cli import MEMORY_MODES
    from ferryman.core.config import merge

    train = {"max_steps": 3, "precision": "fp32", "progress": False} | {k: changes.pop(k) for k in TRAIN_KEYS & set(changes)}
    optim = {"lr": 3e-3} | {k: changes.pop(k) for k in OPTIM_KEYS & set(changes)}
    base = finetune_train()
    loop = dataclasses.replace(base, out_dir=str(out), optim=dataclasses.replace(base.optim, **optim), **train)
    loop = merge(loop, MEMORY_MODES[changes.pop("memory", "plain")])
    if "budget" in changes:
        loop = merge(loop, {"gemini": {"device_budget_bytes": changes.pop("budget")}})
    loop = merge(loop, {"gemini": {"precision": loop.precision}})
    data = DataConfig(path=str(data), **({"seq_len": 32, "eval_fraction": 0.1} | {k: changes.pop(k) for k in DATA_KEYS & set(changes)}))
    lora = LoraConfig(rank=changes.pop("lora_rank", 0))
    return FinetuneConfig(**{"model": str(model), "data": data, "lora": lora, "train": loop, "batch_size": 2, **changes})
