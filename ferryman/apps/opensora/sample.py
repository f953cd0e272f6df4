"""Text-to-video sampling: caption -> T5 features -> noise -> guided sampler -> VAE decode -> mp4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ferryman.core.config import from_dict
from ferryman.core.errors import UserError

from .config import DiffusionConfig, OpenSoraConfig
from .diffusion import build_scheduler, guided
from .model import STDiT
from .train import APP_CONFIG, Encoders


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
    return sizes[0], sizes[1]


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint, from checkpoints/latest)."""
    path = Path(path)
    markers = ("trainer.json", "ema.safetensors", "model.safetensors", "gemini.json")
    if any((path / m).is_file() for m in markers):
        return path
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        return path / "checkpoints" / pointer.read_text().strip()
    raise UserError(f"{path}: no checkpoint here (expected a run folder with checkpoints/latest, "
                    "or a checkpoint folder with ema.safetensors or model.safetensors)")


def _app_config(ckpt: Path) -> OpenSoraConfig:
    from ferryman.core.config import read_mapping

    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / APP_CONFIG).is_file():
            return from_dict(OpenSoraConfig, read_mapping(folder / APP_CONFIG))
    raise UserError(f"{ckpt}: no {APP_CONFIG} in the checkpoint or its run folder, so the model size is unknown")


def _weights(ckpt: Path, use_ema: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if use_ema and (ckpt / "ema.safetensors").is_file():
        return load_file(str(ckpt / "ema.safetensors"))
    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    if (ckpt / "gemini.json").is_file():
        from ferryman.core.gemini.checkpoint import consolidate

        return consolidate(ckpt)
    raise UserError(f"{ckpt}: no weights (ema.safetensors, model.safetensors or gemini.json)")


def load_for_sampling(ckpt: Path, device: torch.device, *, use_ema: bool = True) -> tuple[STDiT, OpenSoraConfig]:
    """The model (EMA weights when saved) and the app config of a checkpoint."""
    ckpt = find_checkpoint(ckpt)
    cfg = _app_config(ckpt)
    model = STDiT(cfg.model)
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
