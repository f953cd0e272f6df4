"""Validation during sd-finetune: the prompts rendered with the current weights, as one image grid."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ferryman.apps.diffusion.report import image_grid, save_png


def inference_scheduler(model_dir: str, prediction_type: str):
    """The model folder's own sampling scheduler, set to the prediction type being trained."""
    import diffusers

    config = diffusers.DDIMScheduler.load_config(model_dir, subfolder="scheduler")
    cls = getattr(diffusers, str(config.get("_class_name")), None) or diffusers.DDIMScheduler
    return cls.from_config(config, prediction_type=prediction_type)


@contextlib.contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device):
    """Bring host-resident modules (offloaded frozen parts, a Gemini export copy) over for sampling."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


@torch.no_grad()
def render_validation(run, module, path: Path) -> Path:
    """Render ``cfg.validation_prompts`` with ``module``'s weights (a TrainModule) into one grid."""
    from diffusers import StableDiffusionPipeline

    cfg = run.cfg
    text_encoder = module.text_encoder if module.text_encoder is not None else run.parts.text_encoder
    pipe = StableDiffusionPipeline(
        vae=run.parts.vae, text_encoder=text_encoder, tokenizer=run.parts.tokenizer, unet=module.unet,
        scheduler=inference_scheduler(cfg.model, cfg.loss.prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = module.training
    module.eval()
    images = []
    device = run.device
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        with _on_device([run.parts.vae, text_encoder, module.unet], device), autocast:
            for index, prompt in enumerate(cfg.validation_prompts):
                generator = torch.Generator().manual_seed(cfg.train.seed + index)
                result = pipe(prompt, height=cfg.data.resolution, width=cfg.data.resolution,
                              num_inference_steps=cfg.validation_inference_steps, generator=generator)
                images.append(result.images[0])
    finally:
        module.train(was_training)
    return save_png(image_grid(images), path)
