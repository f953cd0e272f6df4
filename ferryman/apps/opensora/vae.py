"""Pixels <-> latents with a diffusers VAE from a local folder, frame by frame or as a video VAE.

An image ``AutoencoderKL`` (Open-Sora 1.0/1.1 use SD's, scaling 0.18215) is applied to each frame,
``micro_batch`` frames per call so that long clips fit in memory. A video VAE (Wan, HunyuanVideo,
LTX-Video, CogVideoX) is applied to whole clips, ``micro_batch`` clips per call, and compresses
time as well: a clip of ``1 + k r`` frames becomes ``1 + k`` latent frames (the first frame is
encoded alone, causally), so only those frame counts round-trip. Latents are normalised the way
each model's diffusers pipeline does it, with numbers read from the VAE itself:
``(z - mean) * scaling_factor / std``, where mean and std are the per-channel ``latents_mean`` and
``latents_std`` (config or buffers) when the class has them and ``shift_factor`` and 1 otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ferryman.core.errors import UserError
from ferryman.core.files import reading

from .text import check_weights, require_config

VIDEO_VAES = ("AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX")
# Encoders of these take [B, C, T, H, W] but are not wired here (untested frame rules, or a 2D
# encoder with a temporal decoder that needs the frame count).
UNSUPPORTED = ("AutoencoderKLMochi", "AutoencoderKLAllegro", "AutoencoderKLCosmos", "AutoencoderKLMagvit",
               "AutoencoderKLHunyuanVideo15", "AutoencoderKLLTX2Video", "AutoencoderKLTemporalDecoder")


def compression(name: str, config: dict, model=None) -> tuple[int, int, int]:
    """(spatial factor, temporal factor r, frame multiple m) of a diffusers VAE class and config.

    A pixel clip of T frames is accepted when (T - 1) % m == 0; m is r, or more where the class
    reads frames in fixed groups (Wan: 4 after the first; CogVideoX: batches of 8).
    """
    levels = len(config.get("block_out_channels") or [0]) - 1
    if name == "AutoencoderKLWan":
        temporal = 2 ** sum(bool(d) for d in config.get("temperal_downsample", [False, True, True]))
        patch = int(config.get("patch_size") or 1)  # Wan 2.2's VAE folds 2x2 pixels into channels first
        return patch * 2 ** (len(config.get("dim_mult", [1, 2, 4, 4])) - 1), temporal, math.lcm(temporal, 4)
    if name == "AutoencoderKLHunyuanVideo":
        temporal = int(config.get("temporal_compression_ratio", 4))
        return int(config.get("spatial_compression_ratio", 8)), temporal, temporal
    if name == "AutoencoderKLLTXVideo":
        return _ltx_compression(config)
    if name == "AutoencoderKLCogVideoX":
        temporal = 2 ** min(int(math.log2(config.get("temporal_compression_ratio", 4))), levels)
        batch = int(getattr(model, "num_sample_frames_batch_size", 8))
        return 2**levels, temporal, math.lcm(temporal, batch)
    return 2**levels, 1, 1


def _ltx_compression(config: dict) -> tuple[int, int, int]:
    spatial = temporal = 1
    scaling = config.get("spatio_temporal_scaling", (True, True, True, False))
    kinds = config.get("downsample_type", ("conv",) * len(scaling))
    for scales, kind in zip(scaling, kinds):
        if scales:
            spatial *= 1 if kind == "temporal" else 2
            temporal *= 1 if kind == "spatial" else 2
    spatial = config.get("spatial_compression_ratio") or spatial * int(config.get("patch_size", 4))
    temporal = config.get("temporal_compression_ratio") or temporal * int(config.get("patch_size_t", 1))
    return int(spatial), int(temporal), int(temporal)


class VideoVAE:
    """Encode [B, 3, T, H, W] videos in [-1, 1] to normalised latents [B, C, T', H/f, W/f] and back."""

    def __init__(self, folder: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch: int = 8, sample: bool = True):
        import diffusers

        hint = "expected a diffusers VAE folder: config.json and diffusion_pytorch_model.safetensors"
        self.folder = folder = require_config(folder, "VAE", hint)
        with reading(folder / "config.json", "VAE config"):
            config = dict(diffusers.AutoencoderKL.load_config(folder))
        self.name = name = config.get("_class_name", "AutoencoderKL")
        cls = getattr(diffusers, name, None)
        if cls is None or not name.startswith("Autoencoder"):
            raise UserError(f"VAE folder {folder}: class {name!r} is not a diffusers autoencoder")
        if name in UNSUPPORTED:
            raise UserError(f"VAE folder {folder}: {name} is not supported; use an image AutoencoderKL or one of "
                            f"{', '.join(VIDEO_VAES)}")
        check_weights(folder, "VAE")
        try:
            self.model = cls.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot load the VAE in {folder}: {str(err).splitlines()[0]}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.per_frame = name not in VIDEO_VAES
        self.downsample, self.temporal, self.frame_multiple = compression(name, config, self.model)
        self.latent_channels = int(config.get("latent_channels") or config.get("z_dim") or 4)
        self.scaling, self.mean, self.std = self._normalisation(config)
        self.micro_batch, self.device, self.dtype = micro_batch, torch.device(device), dtype
        self.sample = sample  # draw from the posterior (Open-Sora) or take its mean

    def _normalisation(self, config: dict) -> tuple[float, Tensor, Tensor]:
        """scaling_factor, per-channel mean and std, each as the class's own pipeline applies them."""
        scaling = float(config.get("scaling_factor") or 1.0)
        if config.get("invert_scale_latents"):  # CogVideoX 1.5 divides by its factor
            scaling = 1.0 / scaling
        c = self.latent_channels
        mean, std = config.get("latents_mean"), config.get("latents_std")
        buffers = dict(self.model.named_buffers())
        if mean is None and "latents_mean" in buffers:  # LTX-Video keeps them as buffers, not config
            mean, std = buffers["latents_mean"], buffers["latents_std"]
        if mean is None:
            mean, std = [float(config.get("shift_factor") or 0.0)] * c, [1.0] * c
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,):
            raise UserError(f"VAE folder {self.folder}: latents_mean/latents_std must have {c} values (latent_channels)")
        return scaling, mean, std

    # -- frame counts ---------------------------------------------------------------------------
    def valid_num_frames(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.frame_multiple == 0

    def latent_frames(self, num_frames: int, what: str = "num_frames") -> int:
        """Latent frames of a ``num_frames`` clip; a count the VAE cannot take is a UserError listing valid ones."""
        if not self.valid_num_frames(num_frames):
            m = self.frame_multiple
            valid = ", ".join(str(1 + k * m) for k in range(1, 6))
            near = 1 + ((num_frames - 1) // m) * m if num_frames > 1 else 1
            raise UserError(f"{what}={num_frames}: the video VAE in {self.folder} ({self.name}, {self.temporal}x "
                            f"temporal compression) takes 1 + {m}k frames: {valid}, ... (nearest below: {near})")
        return 1 + (num_frames - 1) // self.temporal

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal

    # -- encode / decode ------------------------------------------------------------------------
    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t.to(self.device, torch.float32).view(1, -1, *([1] * (ndim - 2)))  # [1, C, 1, ...]

    def normalise(self, z: Tensor) -> Tensor:
        return (z.float() - self._view(self.mean, z.ndim)) * self.scaling / self._view(self.std, z.ndim)

    def denormalise(self, z: Tensor) -> Tensor:
        return z.float() * self._view(self.std, z.ndim) / self.scaling + self._view(self.mean, z.ndim)

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        video = video.to(self.device, self.dtype)
        b, c, t, h, w = video.shape
        if not self.per_frame:
            expect = (self.latent_frames(t, "clip frames"), h // self.downsample, w // self.downsample)
            z = torch.cat([self._encode(chunk, generator) for chunk in video.split(self.micro_batch)])
            if tuple(z.shape[2:]) != expect:
                raise UserError(f"the VAE in {self.folder} ({self.name}) encoded {t}x{h}x{w} to {tuple(z.shape[2:])}, "
                                f"not the {expect} its config implies; is the config consistent with the weights?")
            return z
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, 3, H, W]
        z = torch.cat([self._encode(chunk, generator) for chunk in frames.split(self.micro_batch)])
        return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)  # [B, C, T, h, w]

    def _encode(self, x: Tensor, generator) -> Tensor:
        posterior = self.model.encode(x).latent_dist
        z = posterior.sample(generator=generator) if self.sample else posterior.mean
        return self.normalise(z)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        z = self.denormalise(z.to(self.device)).to(self.dtype)
        if not self.per_frame:
            return torch.cat([self.model.decode(chunk).sample for chunk in z.split(self.micro_batch)])
        b, c, t, h, w = z.shape
        frames = z.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, h, w]
        x = torch.cat([self.model.decode(chunk).sample for chunk in frames.split(self.micro_batch)])
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # [B, 3, T, H, W]
