"""Stable Diffusion pipelines built from config with random weights: a tiny one for tests and the
demo, and SD-1.5 sizes for benchmarks.

SD-1.5 sizes follow the model card and config files of runwayml/stable-diffusion-v1-5
(UNet 320/640/1280/1280 channels, 2 layers per block, 768-wide cross attention; VAE 128/256/512/512
with scaling factor 0.18215; CLIP ViT-L/14 text tower, 12 layers of width 768; scaled-linear betas
0.00085..0.012 over 1000 steps). Nothing is downloaded: weights are random.

Run ``python -m ferryman.apps.diffusion.presets --out DIR [--preset tiny|sd15]`` to write a
pipeline folder in diffusers layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def unet_config(preset: str) -> dict[str, Any]:
    if preset == "tiny":
        return {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
        }
    if preset == "sd15":
        return {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    raise ValueError(f"preset must be 'tiny' or 'sd15', got {preset!r}")


def vae_config(preset: str) -> dict[str, Any]:
    channels = (32, 64) if preset == "tiny" else (128, 256, 512, 512)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "layers_per_block": 1 if preset == "tiny" else 2,
        "sample_size": 32 if preset == "tiny" else 512,
        "scaling_factor": 0.18215,
    }


def text_config(preset: str, tokenizer) -> dict[str, Any]:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if preset == "tiny":
        return {"vocab_size": max(1000, len(tokenizer)), "hidden_size": 32, "intermediate_size": 37,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77, **ids}
    return {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", **ids}


def build_pipeline(preset: str, tokenizer_dir: str | Path, seed: int = 0):
    """A StableDiffusionPipeline with random weights, no safety checker."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(preset))
    vae = AutoencoderKL(**vae_config(preset))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(preset, tokenizer)))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def write_pipeline(out: str | Path, preset: str = "tiny", tokenizer_dir: str | Path | None = None) -> Path:
    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    pipe = build_pipeline(preset, tokenizer_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def default_tokenizer_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "tests" / "assets" / "clip_tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--tokenizer", default=None, help="folder with vocab.json and merges.txt")
    args = parser.parse_args()
    print(write_pipeline(args.out, args.preset, args.tokenizer))


if __name__ == "__main__":
    main()
