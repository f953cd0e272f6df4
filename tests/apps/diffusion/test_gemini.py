"""Gemini placement of the trained UNet gives the plain PyTorch run's numbers exactly (fp32)."""

import pytest
import torch

from ferryman.apps.diffusion.train import finetune

from .conftest import tiny_config

# Clipping is off: the plain engine takes the gradient norm in fp32, Gemini in fp64, so a clipped
# run agrees only to rounding; everything else must match bit for bit.
COMMON = dict(max_steps=3, ema_decay=0.9, max_grad_norm=0.0, precision="fp32")


@pytest.fixture(scope="module")
def plain(tiny_model, tmp_path_factory):
    return finetune(tiny_config(tiny_model, tmp_path_factory.mktemp("plain"), memory="plain", **COMMON),
                    progress=False)


def _same(a, b):
    assert a.losses == b.losses
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


def test_gemini_full_host_offload_equals_plain(plain, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    offload = finetune(tiny_config(tiny_model, tmp_path, memory="gemini-offload", **COMMON), progress=False)
    _same(plain, offload)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path))
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, plain.model.unet.state_dict()[name]), name


def test_gemini_auto_resumed_equals_plain(plain, tiny_model, tmp_path):
    first = dict(COMMON, max_steps=2, ckpt_every=2)
    finetune(tiny_config(tiny_model, tmp_path, memory="gemini-auto", **first), progress=False)
    assert (tmp_path / "checkpoint-2" / "unet" / "config.json").is_file()
    resumed = finetune(tiny_config(tiny_model, tmp_path, memory="gemini-auto", resume="latest", **COMMON),
                       progress=False)
    assert resumed.start_step == 2
    _same(plain, resumed)


def test_gemini_trains_the_text_encoder_like_plain(tiny_model, tmp_path):
    # CLIP's embeddings read position_embedding.weight.shape before that module runs: released
    # Gemini parameters must keep their shape for this to work.
    both = dict(COMMON, max_steps=2, train_text_encoder=True)
    ref = finetune(tiny_config(tiny_model, tmp_path / "plain", memory="plain", **both), progress=False)
    offload = finetune(tiny_config(tiny_model, tmp_path / "gemini", memory="gemini-offload", **both), progress=False)
    _same(ref, offload)
