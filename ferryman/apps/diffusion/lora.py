"""LoRA adapters (Hu et al. 2021) on the UNet and text-encoder attention projections, via peft.

Weights are saved with diffusers' own LoRA writer, so ``pipe.load_lora_weights(out)`` on the
base pipeline loads them back, as users of diffusers' train_text_to_image_lora.py expect. The
adapters' config (rank and alpha) goes into the file's metadata: without it diffusers loads the
adapters at alpha = rank, a scale of 1 instead of alpha / rank.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(module: nn.Module, *, rank: int, alpha: float, targets: list[str]) -> None:
    """Freeze ``module`` and add trainable rank-``rank`` adapters to ``targets``."""
    from peft import LoraConfig

    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    module.add_adapter(config)


def lora_state(module: nn.Module) -> dict:
    """The adapter weights of ``module`` under diffusers' key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def save_lora(out: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    from diffusers import StableDiffusionPipeline

    from ferryman.core.io import atomic_path

    out = Path(out)
    text_layers = lora_state(text_encoder) if text_encoder is not None else None
    text_metadata = _adapter_config(text_encoder) if text_encoder is not None else None
    with atomic_path(out / WEIGHT_NAME) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp.parent), unet_lora_layers=lora_state(unet), text_encoder_lora_layers=text_layers,
            unet_lora_adapter_metadata=_adapter_config(unet), text_encoder_lora_adapter_metadata=text_metadata,
            weight_name=tmp.name, safe_serialization=True,
        )
    return out / WEIGHT_NAME


def _adapter_config(module: nn.Module) -> dict:
    """The peft LoraConfig of ``module``'s adapter as a plain dict (what diffusers stores as metadata)."""
    return module.peft_config["default"].to_dict()
