"""End to end: a tiny Stable Diffusion model overfit on one image samples that image back.

The scene: the ``tiny`` preset with its VAE first fitted to the image (a random VAE cannot
represent any picture, a real model's VAE can, and the test is about the diffusion part), then
``sd-finetune`` on the one image and its caption (v-prediction, fp32, 100 steps of 4, cosine
schedule), then ``sd-generate`` from the output folder as a user runs it: the model's own
scheduler (PNDM), 20 steps, guidance 1.0 (the run never saw an empty prompt, so classifier-free
guidance has nothing to push against), four seeds. PSNR is taken on [0, 1] pixels.

Measured (2 cores at load 5-7): the VAE's own round trip 35.1 dB; the four samples 25.9, 27.1,
29.5 and 29.1 dB. The bound is 22 dB. Bugs planted one at a time, and the samples' PSNR:
  - the v target's sign flipped in the loss: 7.3-7.7 dB, caught;
  - the VAE scaling factor left out of training (latents 5x too large): 19.5-20.5 dB, caught;
  - the scheduler config saying epsilon for the v-prediction model (the wrong prediction type at
    sampling, the second test below): 15.8-18.2 dB, caught;
  - sqrt(1 - a) written as (1 - a) for the noise in x_t: 23.7-27.5 dB, NOT caught (one memorised
    image survives a wrong noise schedule; test_loss.py checks x_t against diffusers instead).
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ferryman.apps.diffusion.cli import finetune_main, generate_main

from .conftest import SAMPLES, TOKENIZER

CAPTION = "a red circle on a blue background"
VAE_STEPS, TRAIN_STEPS, PSNR_BOUND = 150, 100, 22.0


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # [1, 3, H, W]


def fit_vae(model_dir, image: Image.Image) -> float:
    """Train the preset's VAE to reconstruct ``image`` from a nearly deterministic latent
    (the std penalty shrinks the posterior, as a trained SD VAE's is), save it in place; returns
    the round trip's PSNR in dB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae")
    x = _pixels(image)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(VAE_STEPS):
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        loss = (decoded - x).square().mean() + 0.01 * posterior.std.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.save_pretrained(str(model_dir / "vae"), safe_serialization=True)
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(4 / (round_trip - x).square().mean().item())  # PSNR on [0, 1]: range 2 squared


def psnr(path, target: np.ndarray) -> float:
    with Image.open(path) as image:
        sample = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return 10 * math.log10(1 / np.mean((sample - target) ** 2))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    from ferryman.apps.diffusion.presets import write_pipeline

    root = tmp_path_factory.mktemp("overfit-one")
    with Image.open(SAMPLES / "00_red_circle.png") as source:
        image = source.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    data = root / "data"
    data.mkdir()
    image.save(data / "red.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": CAPTION}) + "\n")
    model = write_pipeline(root / "model", "tiny", TOKENIZER)
    assert fit_vae(model, image) > 30  # measured 35.1: the scene's autoencoder works
    out = root / "run"
    result = CliRunner().invoke(finetune_main, [
        "--model", str(model), "--data", str(data), "--out", str(out), "--resolution", "32", "--center-crop",
        "--max-steps", str(TRAIN_STEPS), "--batch-size", "4", "--lr", "2e-3", "--lr-schedule", "cosine", "--prediction-type", "v_prediction",
        "--precision", "fp32", "--checkpoint-every", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, np.asarray(image, dtype=np.float64) / 255


def _generate(model, out) -> list[float]:
    result = CliRunner().invoke(generate_main, [
        "--model", str(model), "--prompt", CAPTION, "--num-images", "4", "--steps", "20", "--guidance-scale", "1.0",
        "--precision", "fp32", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*.png"))


def test_overfit_model_samples_its_training_image(overfit, tmp_path):
    run, target = overfit
    values = [psnr(path, target) for path in _generate(run, tmp_path / "samples")]
    print("PSNR dB", [round(v, 1) for v in values])
    assert len(values) == 4 and min(values) > PSNR_BOUND, values


def test_sampling_with_the_wrong_prediction_type_is_caught(overfit, tmp_path):
    """The bound bites: the same weights sampled as an epsilon model (the scheduler config a
    run would save if it forgot the prediction type it trained) stay far below it."""
    run, target = overfit
    wrong = shutil.copytree(run, tmp_path / "wrong", ignore=shutil.ignore_patterns("checkpoint-*"))
    config = wrong / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "epsilon"}))
    values = [psnr(path, target) for path in _generate(wrong, tmp_path / "samples")]
    print("PSNR dB, sampled as epsilon", [round(v, 1) for v in values])
    assert max(values) < PSNR_BOUND, values
