"""Pixels <-> latents with a diffusers VAE from a local folder, frame by frame or as a video VAE.

An image ``AutoencoderKL`` (Open-Sora 1.0/1.1 use SD's, scaling 0.18215) is applied to each frame,
``micro_batch`` frames per call so that long clips fit in memory. A video VAE (a diffusers class
whose encoder takes [B, C, T, H, W]) is applied to whole clips, ``micro_batch`` clips per call.
Latents are ``(z - shift_factor) * scaling_factor`` with both numbers read from the VAE's config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ferryman.core.errors import UserError

from .text import check_model_folder

VIDEO_VAES = ("AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
              "AutoencoderKLMochi", "AutoencoderKLWan", "AutoencoderKLTemporalDecoder")


class VideoVAE:
    """Encode [B, 3, T, H, W] videos in [-1, 1] to scaled latents [B, C, T', H/f, W/f] and back."""

    def __init__(self, folder: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch: int = 8, sample: bool = True):
        import diffusers

        hint = "expected a diffusers VAE folder: config.json and diffusion_pytorch_model.safetensors"
        folder = check_model_folder(folder, "VAE", hint)
        config = diffusers.AutoencoderKL.load_config(folder)
        name = config.get("_class_name", "AutoencoderKL")
        cls = getattr(diffusers, name, None)
        if cls is None or not name.startswith("Autoencoder"):
            raise UserError(f"VAE folder {folder}: class {name!r} is not a diffusers autoencoder")
        try:
            self.model = cls.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the VAE in {folder}: {str(err).splitlines()[0]}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.per_frame = name not in VIDEO_VAES
        self.scaling = float(config.get("scaling_factor") or 1.0)
        self.shift = float(config.get("shift_factor") or 0.0)
        self.latent_channels = int(config.get("latent_channels", 4))
        self.downsample = 2 ** (len(config.get("block_out_channels", [0])) - 1)
        self.micro_batch, self.device, self.dtype = micro_batch, torch.device(device), dtype
        self.sample = sample  # draw from the posterior (Open-Sora) or take its mean

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        video = video.to(self.device, self.dtype)
        if not self.per_frame:
            parts = [self._encode(chunk, generator) for chunk in video.split(self.micro_batch)]
            return torch.cat(parts)
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, 3, H, W]
        z = torch.cat([self._encode(chunk, generator) for chunk in frames.split(self.micro_batch)])
        return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)  # [B, C, T, h, w]

    def _encode(self, x: Tensor, generator) -> Tensor:
        dist = self.model.encode(x).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mean
        return (z - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        z = z.to(self.device, self.dtype) / self.scaling + self.shift
        if not self.per_frame:
            return torch.cat([self.model.decode(chunk).sample for chunk in z.split(self.micro_batch)])
        b, c, t, h, w = z.shape
        frames = z.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, h, w]
        x = torch.cat([self.model.decode(chunk).sample for chunk in frames.split(self.micro_batch)])
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # [B, 3, T, H, W]
