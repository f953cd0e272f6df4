"""What ``opensora train`` hands the core training loop: a model builder, a loader builder and a loss.

One training example goes pixels -> VAE latents, caption -> T5 features (both frozen, no
gradients), then the diffusion loss of the STDiT on the latents with captions dropped at
``model.class_dropout_prob`` so that classifier-free guidance works at sampling time. The noise
is seeded by the batch, so sequence-parallel ranks sharing a batch draw the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ferryman.core.config import save_config
from ferryman.core.errors import ConfigError, UserError
from ferryman.core.parallel import ParallelDims
from ferryman.core.runtime import pick_device

from .config import OpenSoraConfig
from .data import build_loader as build_clip_loader
from .diffusion import build_scheduler
from .model import STDiT
from .parallel import parallelize
from .text import T5TextEncoder
from .vae import VideoVAE

APP_CONFIG = "opensora.yaml"


@dataclass
class Encoders:
    """The frozen pieces: caption features and pixel latents."""

    text: T5TextEncoder
    vae: VideoVAE


def build_encoders(cfg: OpenSoraConfig, device: torch.device) -> Encoders:
    if cfg.text_encoder is None or cfg.vae is None:
        raise ConfigError("training needs text_encoder (a T5 folder) and vae (a diffusers VAE folder); "
                          "`python -m ferryman.apps.opensora.tiny --out DIR` writes tiny ones")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    text = T5TextEncoder(cfg.text_encoder, max_length=cfg.model.model_max_length, device=device, dtype=dtype,
                         cache_dir=cfg.text_cache)
    vae = VideoVAE(cfg.vae, device=device, dtype=dtype, micro_batch=cfg.vae_micro_batch, sample=cfg.vae_sample)
    check_compatible(cfg, text, vae)
    return Encoders(text=text, vae=vae)


def check_compatible(cfg: OpenSoraConfig, text: T5TextEncoder, vae: VideoVAE) -> None:
    if text.hidden_size != cfg.model.caption_channels:
        raise ConfigError(f"model.caption_channels={cfg.model.caption_channels} but the T5 encoder in "
                          f"{cfg.text_encoder} has width {text.hidden_size}; pass --set model.caption_channels="
                          f"{text.hidden_size}")
    if vae.latent_channels != cfg.model.in_channels:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the VAE in {cfg.vae} has "
                          f"{vae.latent_channels} latent channels")
    need = vae.downsample * cfg.model.patch_size[1]
    if cfg.data.size_multiple % need:
        raise ConfigError(f"data.size_multiple={cfg.data.size_multiple} must be a multiple of the VAE's "
                          f"downsampling x patch size = {need}")
    for bucket in cfg.data.buckets:  # a video VAE takes only some frame counts: say so before any decoding
        try:
            vae.latent_frames(bucket.num_frames, f"bucket {bucket.resolution}:{bucket.num_frames} num_frames")
        except UserError as err:
            raise ConfigError(str(err)) from None


def build_model(cfg: OpenSoraConfig, dims: ParallelDims | None = None) -> STDiT:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = STDiT(cfg.model)
    if dims is not None and dims.sp > 1:
        parallelize(model, dims.sp_group)
    return model


def build_loader(cfg: OpenSoraConfig, dims: ParallelDims | None = None):
    """Sequence-parallel ranks of one group read the same batches; data-parallel groups differ."""
    dp_rank, dp_size = (dims.dp_rank, dims.dp) if dims is not None else (0, 1)
    return build_clip_loader(cfg.data, dp_rank=dp_rank, dp_size=dp_size)[0]


@torch.no_grad()
def encode_batch(batch: dict, encoders: Encoders, generator: torch.Generator | None = None) -> dict:
    """Pixels and captions of a loader batch -> the model inputs (latents, features, mask, conditions)."""
    latents = encoders.vae.encode(batch["video"], generator=generator).float()  # [B, C, T, h, w]
    y, mask = encoders.text.encode(batch["text"])  # [B, L, C_cap], [B, L]
    device = latents.device
    return {
        "latents": latents, "y": y.to(device), "mask": mask.to(device),
        "fps": batch["fps"].to(device), "height": batch["height"].to(device), "width": batch["width"].to(device),
    }


def diffusion_loss(cfg: OpenSoraConfig, model, inputs: dict, generator: torch.Generator | None = None) -> Tensor:
    """The scheduler's loss of ``model`` (an STDiT or an engine wrapping one) on encoded inputs."""
    scheduler = build_scheduler(cfg.diffusion)
    latents = inputs["latents"]
    drop = None
    if cfg.model.class_dropout_prob > 0:
        drop = torch.rand(latents.shape[0], generator=generator, device=latents.device) < cfg.model.class_dropout_prob

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t, inputs["y"], inputs["mask"], fps=inputs["fps"], height=inputs["height"],
                     width=inputs["width"], drop=drop)

    return scheduler.training_loss(model_fn, latents, height=float(inputs["height"][0]),
                                   width=float(inputs["width"][0]), generator=generator)


class LossFn:
    """``loss_fn(engine, batch)`` for the core loop; counts the clips the loader had to skip."""

    def __init__(self, cfg: OpenSoraConfig, encoders: Encoders):
        self.cfg, self.encoders = cfg, encoders
        self.num_skipped = 0
        self.skipped: list[str] = []

    def __call__(self, engine, batch: dict) -> tuple[Tensor, dict[str, float]]:
        self.num_skipped += batch["num_skipped"]
        self.skipped += batch["skipped"][:10]
        if batch["video"] is None:  # every clip of the batch unreadable: a zero step keeps ranks in step
            return self._zero(engine), {"skipped_clips": float(batch["num_skipped"])}
        device = self.encoders.vae.device
        generator = torch.Generator(device=device).manual_seed(batch["seed"])
        inputs = encode_batch(batch, self.encoders, generator)
        loss = diffusion_loss(self.cfg, engine, inputs, generator)
        return loss, {"skipped_clips": float(batch["num_skipped"])}

    def _zero(self, engine) -> Tensor:
        m = self.cfg.model
        device = self.encoders.vae.device
        x = torch.zeros(1, m.in_channels, m.patch_size[0], 2 * m.patch_size[1], 2 * m.patch_size[2], device=device)
        y = torch.zeros(1, 1, m.caption_channels, device=device)
        return engine(x, torch.zeros(1, device=device), y).float().sum() * 0.0


def run_train(cfg: OpenSoraConfig, *, resume: bool = False, quiet: bool = False):
    """Train with the core loop (plain or Gemini engine); returns its TrainResult."""
    import dataclasses

    from ferryman.core.parallel import init_parallel
    from ferryman.core.training import train

    if resume:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="latest"))
    dims = init_parallel(sp=cfg.sp)
    device = pick_device(cfg.train.device, dims)  # where the loop puts the engine too
    encoders = build_encoders(cfg, device)
    loader = build_loader(cfg, dims)  # indexing errors surface before the model is built
    out = Path(cfg.train.out_dir)
    if dims.is_main:
        save_config(cfg, out / APP_CONFIG)
    loss_fn = LossFn(cfg, encoders)
    result = train(cfg.train, lambda: build_model(cfg, dims), lambda: loader, loss_fn,
                   dims=dims if dims.world_size > 1 else None)
    result.num_skipped = loss_fn.num_skipped  # type: ignore[attr-defined]
    if dims.is_main and not quiet:
        print(f"trained {result.step} steps; last loss {result.losses[-1]:.4f}; "
              f"{loss_fn.num_skipped} unreadable clip read(s) skipped; outputs in {out}")
    return result
