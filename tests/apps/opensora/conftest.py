"""Shared fixtures: the sample clips, and tiny T5/VAE folders written once per session."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CLIPS = ROOT / "data" / "opensora"
T5_TOKENIZER = ROOT / "tests" / "assets" / "t5_tiny"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """(t5 folder, vae folder): a 2-layer T5 encoder of width 32 and an AutoencoderKL that halves H and W."""
    from ferryman.apps.opensora.tiny import write_tiny_t5, write_tiny_vae

    out = tmp_path_factory.mktemp("tiny_models")
    return write_tiny_t5(out / "t5", T5_TOKENIZER), write_tiny_vae(out / "vae")

