"""The pieces of a Stable Diffusion folder: checked, loaded, and prepared for training.

Every folder a user names (``--model``, a ``checkpoint-N/``) is checked with
``core.files.check_model_folder`` before transformers or diffusers read it: a damaged safetensors
file or a pickled ``pytorch_model.bin`` they would fall back to ends in one line naming the file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ferryman.apps.diffusion.lora import TEXT_TARGETS, UNET_TARGETS, add_lora
from ferryman.apps.diffusion.loss import TrainModule
from ferryman.core.errors import UserError
from ferryman.core.files import check_model_folder
from ferryman.core.runtime import DTYPES


@dataclass(kw_only=True)
class Parts:
    """The pieces of a Stable Diffusion folder that training touches."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def check_model_dir(path: str | Path, flag: str = "--model") -> Path:
    """``path`` if it is a diffusers pipeline folder whose files can be read safely."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such folder")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{flag} {path}: not a diffusers pipeline folder (no model_index.json); a single "
                        "checkpoint file must first be converted with StableDiffusionPipeline.from_single_file")
    check_model_folder(path, "model folder")
    return path


@contextlib.contextmanager
def loading_bars(show: bool):
    """diffusers' and transformers' loading progress bars off for the block when ``show`` is
    False (--no-progress), then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    turned_off = [] if show else [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in turned_off:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in turned_off:
            module.enable_progress_bar()


def load_parts(model_dir: str | Path, *, progress: bool = True) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(check_model_dir(model_dir))
    try:
        with loading_bars(progress):
            return Parts(
                tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            )
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path}: cannot load the pipeline parts: {str(err).splitlines()[0]}") from None


def prepare_model(cfg, parts: Parts, device: torch.device) -> TrainModule:
    """Freeze what is not trained, add LoRA, place the frozen parts; returns the trained module.

    ``cfg`` is a FinetuneConfig. The trained module stays where it is: the engine (plain or
    Gemini) places it.
    """
    frozen_dtype = DTYPES[cfg.train.precision]
    parts.vae.requires_grad_(False).eval()
    if frozen_dtype != torch.float32:
        parts.vae.to(frozen_dtype)
    text_encoder = None
    if cfg.use_lora:
        alpha = cfg.lora.alpha or cfg.lora.rank
        add_lora(parts.unet, rank=cfg.lora.rank, alpha=alpha, targets=UNET_TARGETS)
        if cfg.train_text_encoder:
            add_lora(parts.text_encoder, rank=cfg.lora.rank, alpha=alpha, targets=TEXT_TARGETS)
    if cfg.train_text_encoder:
        text_encoder = parts.text_encoder.train()
        if not cfg.use_lora:
            text_encoder.requires_grad_(True)
    else:
        parts.text_encoder.requires_grad_(False).eval().to(frozen_dtype)  # diffusers' weight_dtype
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
            enable()
    model = TrainModule(parts.unet.train(), text_encoder)
    for module in (parts.vae, parts.text_encoder):
        if module is not text_encoder:
            module.to("cpu" if cfg.offload_frozen else device)
    return model
