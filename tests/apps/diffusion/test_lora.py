"""LoRA runs: Gemini == plain in fp32, adapter-only checkpoints and outputs, exact resume across engines."""

import json

import pytest
import torch
from safetensors import safe_open

from ferryman.apps.diffusion.config import LoraConfig
from ferryman.apps.diffusion.train import finetune
from tests.tolerance import assert_close

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, about the embeddings

# UNet and text-encoder adapters at alpha 8 = 2 x rank (a scale of 2: at alpha = rank a lost alpha
# goes unseen), EMA with diffusers' warm-up; no clipping (plain takes the norm in fp32, Gemini in
# fp64: clipped runs agree only to rounding).
COMMON = dict(lora=LoraConfig(rank=4, alpha=8), train_text_encoder=True, lr=1e-2, ema_decay=0.9,
              max_grad_norm=0.0, precision="fp32", ckpt_every=2)


@pytest.fixture(scope="module")
def plain(tiny_model, tmp_path_factory):
    """Four uninterrupted steps with the plain engine; checkpoint-2 and checkpoint-4 on the way."""
    out = tmp_path_factory.mktemp("lora-plain")
    return finetune(tiny_config(tiny_model, out, memory="plain", max_steps=4, **COMMON), progress=False)


@pytest.fixture(scope="module")
def gemini_half(tiny_model, tmp_path_factory):
    """The first two steps under Gemini with full host offload (the frozen base in its chunks too)."""
    out = tmp_path_factory.mktemp("lora-gemini")
    return finetune(tiny_config(tiny_model, out, memory="gemini-offload", max_steps=2, **COMMON), progress=False)


def _same_adapters(a, b):
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    lora = [name for name in state_a if "lora_" in name]
    assert lora
    for name in lora:
        assert torch.equal(state_a[name], state_b[name]), name


def test_gemini_trains_lora_like_plain(plain, gemini_half):
    assert gemini_half.losses == plain.losses[:2]
    trainable = [n for n, p in gemini_half.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base stayed frozen under Gemini


def _tensor_keys(path):
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_lora_checkpoint_and_output_hold_adapters_only(plain, tiny_model):
    from diffusers import StableDiffusionPipeline

    for folder in (plain.out / "checkpoint-2", plain.out / "checkpoint-4", plain.out):
        assert not (folder / "unet").exists() and not (folder / "model_index.json").exists()
        files = [p for p in folder.rglob("*.safetensors") if not p.name.startswith("rng-")]
        assert folder / "pytorch_lora_weights.safetensors" in files
        for path in files:
            keys = _tensor_keys(path)
            assert keys and all("lora" in k for k in keys), (path, [k for k in keys if "lora" not in k][:3])
    assert _tensor_keys(plain.out / "checkpoint-2" / "pytorch_lora_weights.safetensors") == _tensor_keys(
        plain.out / "pytorch_lora_weights.safetensors")

    ids, x, t = torch.randint(0, 600, (1, 77)), torch.randn(1, 4, 16, 16), torch.tensor([10])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))  # the saved base the run started from
    with torch.no_grad():
        base = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        pipe.load_lora_weights(str(plain.out / "checkpoint-2"))
        at_two = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(plain.out))
        hidden = pipe.text_encoder(ids)[0]
        final = pipe.unet(x, t, hidden).sample
        torch.testing.assert_close(hidden, plain.model.text_encoder(ids)[0])  # the EMA weights are the result
        torch.testing.assert_close(final, plain.model.unet(x, t, hidden).sample)
    assert not torch.allclose(at_two, base) and not torch.allclose(final, at_two)


def test_resume_from_lora_checkpoint_repeats_run_on_either_engine(plain, gemini_half, tiny_model, tmp_path):
    state = json.loads((gemini_half.out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["lora"] and state["losses"] == gemini_half.losses
    # Gemini's checkpoint resumed by the plain engine, and plain's by Gemini: the adapter state is
    # engine-neutral, and the frozen base is rebuilt from --model.
    for memory, source in (("plain", gemini_half.out), ("gemini-auto", plain.out)):
        cfg = tiny_config(tiny_model, tmp_path / memory, memory=memory, max_steps=4,
                          resume=str(source / "checkpoint-2"), **COMMON)
        resumed = finetune(cfg, progress=False)
        assert resumed.start_step == 2
        assert resumed.losses == plain.losses, memory
        _same_adapters(plain, resumed)


def test_lora_output_is_base_plus_alpha_over_rank_times_b_a_and_survives_saving(tiny_model, tmp_path):
    """to_q(x) = W x + (alpha / rank) B A x with alpha 10, rank 4, by hand; the saved file loads back
    into diffusers at that scale (it once loaded at 1: the file did not carry alpha)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ferryman.apps.diffusion.lora import UNET_TARGETS, add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    add_lora(unet, rank=4, alpha=10, targets=UNET_TARGETS)
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in (layer.lora_A["default"], layer.lora_B["default"]):  # B starts at zero: make it count
            adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=gen))
    x = torch.randn(3, layer.in_features, generator=gen)
    base, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.T + 2.5 * (x @ a.T @ b.T)  # [3, out]; to_q has no bias
    with torch.no_grad():
        assert_close(layer(x), expected, ulps=64)
        save_lora(tmp_path, unet)
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
        pipe.load_lora_weights(str(tmp_path))
        loaded = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert_close(loaded(x), expected, ulps=64)
