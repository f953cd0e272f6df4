"""Shared fixtures: one tiny Stable Diffusion pipeline built from config, written once per session."""

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


def tiny_config(model: Path, out: Path, **changes):
    """A FinetuneConfig for the tiny model on the shipped sample images, 32 px."""
    from ferryman.apps.diffusion.config import DataConfig, FinetuneConfig

    data = changes.pop("data", None) or DataConfig(path=str(SAMPLES), resolution=32, center_crop=True)
    base = dict(model=str(model), out=str(out), data=data, max_steps=6, batch_size=2, lr=1e-3,
                checkpoint_every=0, weight_decay=0.0, log_every=1)
    return FinetuneConfig(**{**base, **changes})

