"""What ``opensora train`` hands the core training loop: a model builder, a loader builder and a loss.

One training example goes pixels -> VAE latents, caption -> T5 features (both frozen, no
gradients), then the diffusion loss of the STDiT on the latents with captions dropped at
``diffusion.caption_dropout`` so that classifier-free guidance works at sampling time. The noise
is seeded by the batch, so sequence-parallel ranks sharing a batch draw the same noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ferryman.core.config import save_config
from ferryman.core.errors import ConfigError, UserError
from ferryman.core.files import check_writable
from ferryman.core.parallel import ParallelDims
from ferryman.core.runtime import pick_device

from .config import APP_CONFIG, OpenSoraConfig
from .data import build_loader as build_clip_loader
from .diffusion import build_scheduler
from .model import STDiT
from .parallel import parallelize
from .runtime import build_stdit
from .text import T5TextEncoder, check_weights, require_config
from .vae import VideoVAE


@dataclass
class Encoders:
    """The frozen pieces: caption features and pixel latents."""

    text: T5TextEncoder
    vae: VideoVAE


def check_encoder_folders(text_dir: Path | None, vae_dir: Path | None) -> None:
    """Both folders exist with a config and sound safetensors weights; checked before either is
    loaded, so a damaged VAE is found before the T5 encoder (perhaps many GB) is read."""
    if text_dir is None or vae_dir is None:
        raise ConfigError("a text_encoder (a T5 folder, --text-encoder) and a vae (a diffusers VAE folder, --vae) "
                          "are needed; `python -m ferryman.apps.opensora.tiny --out DIR` writes tiny ones")
    hint = "expected a transformers T5 folder: config.json, model.safetensors and tokenizer files"
    check_weights(require_config(text_dir, "text encoder", hint), "text encoder")
    hint = "expected a diffusers VAE folder: config.json and diffusion_pytorch_model.safetensors"
    check_weights(require_config(vae_dir, "VAE", hint), "VAE")


def build_encoders(cfg: OpenSoraConfig, device: torch.device) -> Encoders:
    check_encoder_folders(cfg.text_encoder, cfg.vae)
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
    model = build_stdit(cfg.model, cfg.runtime)
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
    # Never None: without dropout, an all-False mask still puts the null caption in the graph (with a
    # zero gradient), which data-parallel reductions that wait for every parameter need.
    drop = torch.zeros(latents.shape[0], dtype=torch.bool, device=latents.device)
    if cfg.diffusion.caption_dropout > 0:
        drop = torch.rand(latents.shape[0], generator=generator, device=latents.device) < cfg.diffusion.caption_dropout

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
        """A loss of 0 through the graph of a real step: the STDiT gets the conditioning a batch
        gives (fps, frame size, caption dropout), so every trainable parameter receives a (zero)
        gradient and the data-parallel reduction (DDP's buckets, Gemini's chunks), which waits for
        every one, completes beside ranks that train on real clips."""
        m = self.cfg.model
        device = engine.device
        latents = torch.zeros(1, m.in_channels, m.patch_size[0], 2 * m.patch_size[1], 2 * m.patch_size[2], device=device)
        side = torch.tensor([8.0 * m.patch_size[1]], device=device)  # any size: its embedding is multiplied by 0
        inputs = {"latents": latents, "y": torch.zeros(1, 1, m.caption_channels, device=device),
                  "mask": torch.ones(1, 1, dtype=torch.bool, device=device), "fps": torch.ones(1, device=device),
                  "height": side, "width": side}  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(0)
        return diffusion_loss(self.cfg, engine, inputs, generator) * 0.0


def absolute_paths(cfg: OpenSoraConfig) -> OpenSoraConfig:
    """The config with every input and output path absolute, so that the run folder's saved config
    (which ``opensora sample`` and ``--resume`` read) works from any working directory."""

    def full(path):
        return None if path is None else Path(path).expanduser().absolute()

    data = dataclasses.replace(cfg.data, csv=full(cfg.data.csv), root=full(cfg.data.root))
    train = dataclasses.replace(cfg.train, out_dir=str(full(cfg.train.out_dir)))
    return dataclasses.replace(cfg, data=data, train=train, text_encoder=full(cfg.text_encoder),
                               vae=full(cfg.vae), text_cache=full(cfg.text_cache))


def run_train(cfg: OpenSoraConfig, *, quiet: bool = False):
    """Train with the core loop (plain or Gemini engine; ``cfg.train.resume`` to continue); returns
    its TrainResult. Every input is checked, and the run folder found writable, before any output."""
    from ferryman.core.parallel import init_parallel
    from ferryman.core.training import train

    cfg = absolute_paths(cfg)
    out = Path(cfg.train.out_dir)
    check_writable(out, "run folder (--out)")
    if cfg.text_cache is not None:
        check_writable(cfg.text_cache, "text cache folder (--text-cache)")
    check_encoder_folders(cfg.text_encoder, cfg.vae)
    dims = init_parallel(sp=cfg.sp)
    device = pick_device(cfg.train.device, dims)  # where the loop puts the engine too
    loader = build_loader(cfg, dims)  # a bad table or bucket config is found before any model is loaded
    encoders = build_encoders(cfg, device)
    if dims.is_main:  # the run's settings; whether to resume is each command's own choice
        save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=None)), out / APP_CONFIG)
    loss_fn = LossFn(cfg, encoders)
    result = train(cfg.train, lambda: build_model(cfg, dims), lambda: loader, loss_fn,
                   dims=dims if dims.world_size > 1 else None)
    result.num_skipped = loss_fn.num_skipped  # type: ignore[attr-defined]
    if dims.is_main and not quiet:
        print(f"trained {result.step} steps; last loss {result.losses[-1]:.4f}; "
              f"{loss_fn.num_skipped} unreadable clip read(s) skipped; outputs in {out}")
    return result
