"""sd-generate: text-to-image from a diffusers Stable Diffusion folder, a checkpoint-N/ folder or a
LoRA file, with fused attention and host offload, writing one PNG per image.

Memory levers, from least to most saving: half precision (fp16 on a GPU), the fused attention
(torch SDPA or ferryman.kernels: no [Q, K] score matrix kept in memory), VAE tiling for large
images, ``--offload model`` (one component on the GPU at a time) and ``--offload sequential``
(one layer at a time; slowest).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ferryman.apps.diffusion.attention import set_attention
from ferryman.apps.diffusion.config import GenerateConfig
from ferryman.apps.diffusion.lora import WEIGHT_NAME
from ferryman.apps.diffusion.loss import PREDICTION_TYPES
from ferryman.apps.diffusion.parts import check_model_dir, loading_bars
from ferryman.apps.diffusion.report import save_png
from ferryman.core.errors import UserError
from ferryman.core.files import check_model_folder, check_safetensors, check_writable, reading, refuse_pickled
from ferryman.core.io import write_text
from ferryman.core.runtime import DTYPES, pick_device

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
              "dpm++": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler"}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp16" and device.type == "cpu":
        return torch.float32  # CPU half-precision convolutions are slow or missing
    return DTYPES[precision]


def dtype_kw(dtype: torch.dtype) -> dict:
    """The dtype argument under the name this diffusers release reads (``dtype`` from 0.36 on)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("diffusers").split(".")[:2])
    return {"dtype" if (major, minor) >= (0, 36) else "torch_dtype": dtype}


def load_pipeline(model: str | Path, *, dtype: torch.dtype = torch.float32, lora: str = ""):
    """A StableDiffusionPipeline from a pipeline folder or an sd-finetune checkpoint-N/ folder.

    Every file is checked before diffusers reads any (damaged safetensors, pickled weights).
    """
    from diffusers import StableDiffusionPipeline

    path = Path(model)
    lora_file = lora_weights_file(lora) if lora else None
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        return _from_checkpoint(path, _checkpoint_state(state_file), dtype, lora_file)
    check_model_dir(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), **dtype_kw(dtype))
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path}: cannot load the pipeline: {str(err).splitlines()[0]}") from None
    if lora_file:
        _load_lora(pipe, lora_file, f"--lora {lora}")
    return pipe


def _checkpoint_state(state_file: Path) -> dict:
    with reading(state_file, "checkpoint state file"):
        state = json.loads(state_file.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("base_model"), str):
        raise UserError(f"{state_file}: no base_model recorded; not a checkpoint sd-finetune wrote")
    kind = state.get("prediction_type", "")
    if kind and kind not in PREDICTION_TYPES:
        raise UserError(f"{state_file}: prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return state


def _from_checkpoint(path: Path, state: dict, dtype: torch.dtype, lora_file: Path | None):
    """Base model from the checkpoint's record, with the checkpoint's trained weights swapped in."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_model_folder(path, "checkpoint folder")
    base = check_model_dir(state["base_model"], flag=f"base model of {path}:")
    parts = {}
    unet_dir = path / "unet_ema" if (path / "unet_ema").is_dir() else path / "unet"
    if unet_dir.is_dir():
        parts["unet"] = UNet2DConditionModel.from_pretrained(str(unet_dir), **dtype_kw(dtype))
    if (path / "text_encoder").is_dir():
        parts["text_encoder"] = CLIPTextModel.from_pretrained(str(path / "text_encoder"), **dtype_kw(dtype))
    pipe = StableDiffusionPipeline.from_pretrained(str(base), **dtype_kw(dtype), **parts)
    trained = state.get("prediction_type")  # absent in checkpoints written before it was recorded
    if trained and pipe.scheduler.config.get("prediction_type") != trained:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=trained)
    if (path / WEIGHT_NAME).is_file():
        _load_lora(pipe, path / WEIGHT_NAME, f"--model {path}")
    if lora_file:
        _load_lora(pipe, lora_file, f"--lora {lora_file}")
    return pipe


def lora_weights_file(lora: str) -> Path:
    """The LoRA safetensors file ``--lora`` names (the file, or the one in a folder), checked:
    a pickle-based file is refused by name and contents, a damaged one named."""
    path = Path(lora)
    if not path.exists():
        raise UserError(f"--lora {lora}: no such file or folder")
    file = path if path.is_file() else path / WEIGHT_NAME
    if not file.is_file():
        raise UserError(f"--lora {lora}: no {WEIGHT_NAME} inside")
    refuse_pickled(file, "LoRA weights file")
    check_safetensors(file, "LoRA weights file")
    return file


def _load_lora(pipe, file: Path, where: str) -> None:
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{where}: {file} holds no LoRA weights this pipeline takes "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def set_scheduler(pipe, name: str) -> None:
    if not name:
        return
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name}: choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def place(pipe, cfg: GenerateConfig, device: torch.device) -> None:
    """Put the pipeline on ``device``, or set up host offload, and the memory options."""
    set_attention(pipe, cfg.attention)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()  # decode one image at a time: no cost, bounded peak
    if cfg.offload == "none" or device.type == "cpu":
        pipe.to(device)
    elif cfg.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def generate(cfg: GenerateConfig, *, progress: bool = True) -> list[Path]:
    """Render every prompt ``num_images`` times; returns the PNG paths written."""
    if not cfg.model or not cfg.out or not cfg.prompts:
        raise UserError("--model, --prompt and --out are required")
    check_writable(cfg.out, "output folder (--out)")  # before the sampling work, not after it
    device = pick_device(cfg.device, flag="--device")
    dtype = compute_dtype(cfg.precision, device)
    with loading_bars(progress):
        pipe = load_pipeline(cfg.model, dtype=dtype, lora=cfg.lora)
    set_scheduler(pipe, cfg.scheduler)
    place(pipe, cfg, device)
    pipe.set_progress_bar_config(disable=not progress)
    out = Path(cfg.out)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = cfg.height or size, cfg.width or size
    written, records = [], []
    for index, prompt in enumerate(cfg.prompts):
        seeds = [cfg.seed + index * cfg.num_images + k for k in range(cfg.num_images)]
        result = pipe(prompt, negative_prompt=cfg.negative_prompt or None, height=height, width=width,
                      num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                      num_images_per_prompt=cfg.num_images,
                      generator=[torch.Generator().manual_seed(s) for s in seeds])
        for k, (image, seed) in enumerate(zip(result.images, seeds)):
            path = save_png(image, out / f"{index:03d}-{k:02d}-{slug(prompt)}.png")
            written.append(path)
            records.append({"file": path.name, "prompt": prompt, "seed": seed})
    settings = {"model": str(cfg.model), "lora": cfg.lora, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                "height": height, "width": width, "dtype": str(dtype).removeprefix("torch."),
                "scheduler": type(pipe.scheduler).__name__, "images": records}
    write_text(out / "generate.json", json.dumps(settings, indent=1) + "\n")
    return written
