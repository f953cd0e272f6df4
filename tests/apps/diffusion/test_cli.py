"""sd-finetune / sd-generate end to end through click, checked with independent readers (PIL, diffusers)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ferryman.apps.diffusion.cli import finetune_main, generate_main

from .conftest import SAMPLES


def test_finetune_then_generate_from_output_and_checkpoint(tiny_model, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(finetune_main, [
        "--model", str(tiny_model), "--data", str(SAMPLES), "--out", str(out), "--resolution", "32",
        "--center-crop", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-4", "--checkpoint-every", "2",
        "--no-progress", "--set", "train.optim.weight_decay=0.0"])
    assert result.exit_code == 0, result.output
    assert "8 images with captions" in result.output and "trained to step 2" in result.output
    assert (out / "model_index.json").is_file() and (out / "checkpoint-2" / "unet").is_dir()

    images = tmp_path / "images"
    result = runner.invoke(generate_main, [
        "--model", str(out / "checkpoint-2"), "--prompt", "a red circle", "--prompt", "a black ring",
        "--num-images", "2", "--steps", "2", "--height", "32", "--width", "32", "--out", str(images),
        "--scheduler", "ddim", "--no-progress"])
    assert result.exit_code == 0, result.output
    pngs = sorted(images.glob("*.png"))
    assert [p.name for p in pngs] == ["000-00-a-red-circle.png", "000-01-a-red-circle.png",
                                      "001-00-a-black-ring.png", "001-01-a-black-ring.png"]
    for path in pngs:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    record = json.loads((images / "generate.json").read_text())
    assert record["scheduler"] == "DDIMScheduler" and [r["seed"] for r in record["images"]] == [0, 1, 2, 3]


def test_generate_is_seeded_and_attention_backends_agree(tiny_model, tmp_path):
    from ferryman.apps.diffusion.config import GenerateConfig
    from ferryman.apps.diffusion.generate import generate

    arrays = {}
    for attention in ("sdpa", "eager"):
        cfg = GenerateConfig(model=str(tiny_model), out=str(tmp_path / attention), prompts=["a red circle"],
                             steps=2, height=32, width=32, attention=attention, precision="fp32")
        [path] = generate(cfg, progress=False)
        with Image.open(path) as image:
            arrays[attention] = torch.from_numpy(np.asarray(image, dtype=np.float32))
    assert (arrays["sdpa"] - arrays["eager"]).abs().max() <= 2  # uint8 rounding of tiny float differences


@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: the Triton kernel (interpreted on CPU)
def test_ferryman_attention_processor_matches_sdpa(tiny_model, backend):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ferryman.apps.diffusion.attention import FerrymanAttnProcessor

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    x, t, hidden = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(x, t, hidden).sample
        unet.set_attn_processor(FerrymanAttnProcessor(backend=backend))
        torch.testing.assert_close(unet(x, t, hidden).sample, expected, atol=1e-5, rtol=1e-4)


def test_bad_input_ends_in_one_line(tiny_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(finetune_main, ["--model", str(tmp_path / "nope"), "--data", str(SAMPLES),
                                           "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "nope: no such folder" in result.output

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "metadata.csv").write_text("file_name,caption\na.png,hello\n")
    result = runner.invoke(finetune_main, ["--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "o"),
                                           "--no-progress"])
    assert result.exit_code == 2
    assert "metadata.csv" in result.output and "'text'" in result.output and "--caption-column" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(finetune_main, ["--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "o"),
                                           "--set", "lora.rnk=4"])
    assert result.exit_code == 2 and "did you mean 'rank'" in result.output

    result = runner.invoke(generate_main, ["--model", str(tiny_model), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "--prompt" in result.output


def test_help_lists_examples():
    for command in (finetune_main, generate_main):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and "Examples:" in result.output and "--model" in result.output
