"""Shared fixtures: one tiny Stable Diffusion pipeline built from config, written once per session."""

import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "data" / "diffusion"
TOKENIZER = REPO / "tests" / "assets" / "clip_tokenizer"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from ferryman.apps.diffusion.presets import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model", "tiny", TOKENIZER)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)


TRAIN_KEYS = {"max_steps", "precision", "seed", "ema_decay", "grad_accum", "resume", "ckpt_every", "warmup_steps",
              "schedule", "keep_last", "log_every", "device"}
OPTIM_KEYS = {"lr", "weight_decay", "max_grad_norm", "eps"}


def tiny_config(model: Path, out: Path, **changes):
    """A FinetuneConfig for the tiny model on the shipped sample images, 32 px.

    ``changes``: FinetuneConfig fields; fields of the embedded core TrainConfig (max_steps,
    ckpt_every, ema_decay, ...) or of its optimizer (lr, weight_decay, max_grad_norm); and
    ``memory`` as the --memory flag means it (plain, gemini-auto, gemini-offload).
    """
    from ferryman.apps.diffusion.config import DataConfig, FinetuneConfig, finetune_train
    from ferryman.core.cli import MEMORY_MODES
    from ferryman.core.config import merge

    data = changes.pop("data", None) or DataConfig(path=str(SAMPLES), resolution=32, center_crop=True)
    train = {"max_steps": 6, "ckpt_every": 0, "log_every": 1} | {k: changes.pop(k) for k in TRAIN_KEYS & set(changes)}
    optim = {"lr": 1e-3, "weight_decay": 0.0} | {k: changes.pop(k) for k in OPTIM_KEYS & set(changes)}
    memory = MEMORY_MODES[changes.pop("memory", "plain")]
    base = finetune_train()
    loop = merge(dataclasses.replace(base, out_dir=str(out), optim=dataclasses.replace(base.optim, **optim), **train),
                 memory)
    return FinetuneConfig(**{"model": str(model), "data": data, "train": loop, "batch_size": 2, **changes})
