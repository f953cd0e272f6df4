"""Text-to-video sampling: caption -> T5 features -> noise -> guided sampler -> VAE decode -> mp4."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ferryman.core.config import from_dict, read_mapping
from ferryman.core.errors import UserError
from ferryman.core.files import check_safetensors, load_safetensors, reading
from ferryman.core.training.checkpoint import CheckpointStore

from .config import APP_CONFIG, DiffusionConfig, OpenSoraConfig, RuntimeConfig, migrate
from .diffusion import build_scheduler, guided
from .model import STDiT
from .runtime import build_stdit
from .train import Encoders


def parse_resolution(text: str) -> tuple[int, int]:
    """'HxW' (e.g. 48x64) or one number for a square frame -> (height, width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--resolution {text!r}: expected HEIGHTxWIDTH such as 48x64, or one number") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 2:
        raise UserError(f"--resolution {text!r}: expected HEIGHTxWIDTH such as 48x64, or one number")
    if sizes[0] % 2 or sizes[1] % 2:
        raise UserError(f"--resolution {text!r}: height and width must be even (H.264 video in yuv420p)")
    return sizes[0], sizes[1]


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint under checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--ckpt {path}: no such run or checkpoint folder")
    markers = ("trainer.json", "ema.safetensors", "model.safetensors", "gemini.json")
    if any((path / m).is_file() for m in markers):
        return path
    newest = CheckpointStore(path / "checkpoints").newest()
    if newest is not None:
        return newest
    raise UserError(f"{path}: no checkpoint here (expected a run folder with checkpoints/step-*, "
                    "or a checkpoint folder with ema.safetensors or model.safetensors)")


def _app_config(ckpt: Path) -> OpenSoraConfig:
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / APP_CONFIG).is_file():
            return from_dict(OpenSoraConfig, migrate(read_mapping(folder / APP_CONFIG)))
    raise UserError(f"{ckpt}: no {APP_CONFIG} in the checkpoint or its run folder, so the model size is unknown")


def _weights(ckpt: Path, use_ema: bool) -> dict[str, Tensor]:
    if use_ema and (ckpt / "ema.safetensors").is_file():
        return load_safetensors(ckpt / "ema.safetensors", "EMA weights file")
    if (ckpt / "model.safetensors").is_file():
        return load_safetensors(ckpt / "model.safetensors", "model weights file")
    if (ckpt / "gemini.json").is_file():
        from ferryman.core.gemini.checkpoint import consolidate

        for shard in sorted(ckpt.glob("*.safetensors")):  # name the damaged shard, not just the folder
            check_safetensors(shard, "Gemini checkpoint shard")
        with reading(ckpt / "gemini.json", "Gemini checkpoint"):
            return consolidate(ckpt)
    raise UserError(f"{ckpt}: no weights (ema.safetensors, model.safetensors or gemini.json)")


def load_for_sampling(ckpt: Path, device: torch.device, *, use_ema: bool = True,
                      runtime: RuntimeConfig | None = None) -> tuple[STDiT, OpenSoraConfig]:
    """The model (EMA weights when saved) and the app config of a checkpoint; ``runtime``: how the
    model runs (default: the run's own, without activation checkpointing, which only saves memory
    in training)."""
    ckpt = find_checkpoint(ckpt)
    cfg = _app_config(ckpt)
    runtime = runtime or dataclasses.replace(cfg.runtime, grad_checkpointing=False)
    model = build_stdit(cfg.model, runtime)
    try:
        model.load_state_dict(_weights(ckpt, use_ema))
    except RuntimeError as err:
        raise UserError(f"{ckpt}: the weights do not fit the model in {APP_CONFIG} ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), cfg


@torch.no_grad()
def sample_latents(
    model: STDiT, encoders: Encoders, diffusion: DiffusionConfig, prompts: list[str], *, num_frames: int,
    height: int, width: int, steps: int, cfg_scale: float, fps: float, seed: int = 0,
) -> Tensor:
    device = next(model.parameters()).device
    f = encoders.vae.downsample
    latent_frames = encoders.vae.latent_frames(num_frames, "--num-frames")  # an impossible count fails first
    if height % f or width % f:
        raise UserError(f"--resolution {height}x{width}: height and width must be multiples of {f} (the VAE's downsampling)")
    y, mask = encoders.text.encode(prompts)
    y, mask = y.to(device), mask.to(device)
    b = len(prompts)
    cond = {"fps": torch.full((b,), float(fps), device=device),
            "height": torch.full((b,), float(height), device=device),
            "width": torch.full((b,), float(width), device=device)}

    def cond_fn(x: Tensor, t: Tensor, both: bool) -> Tensor:
        if not both:
            return model(x, t, y, mask, **cond)
        drop = torch.arange(2 * b, device=device) >= b  # second half: the null caption
        twice = {k: torch.cat([v, v]) for k, v in cond.items()}
        return model(x, t, torch.cat([y, y]), torch.cat([mask, mask]), drop=drop, **twice)

    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (b, encoders.vae.latent_channels, latent_frames, height // f, width // f)
    noise = torch.randn(shape, generator=generator, device=device)
    scheduler = build_scheduler(diffusion)
    return scheduler.sample(guided(cond_fn, cfg_scale), noise, steps=steps, height=height, width=width,
                            generator=generator)


def to_uint8(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_sidecar(path: Path, info: dict) -> None:
    from ferryman.core.io import write_text

    write_text(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
