"""sd-finetune: set up the models, the data stream and the loss, run the core loop, write the outputs.

The train step is ``NoisePredictionLoss(model, batch) -> loss`` (loss.py); this file hands it to the
core training loop (``ferryman.core.training.train``: plain PyTorch or Gemini engine, LR schedule,
EMA, checkpoints, exact resume, progress bar) together with the run's hooks (run.py) and its
checkpoint-N/ store (checkpoint.py), then writes the final diffusers pipeline folder or LoRA file.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ferryman.apps.diffusion import data as data_mod
from ferryman.apps.diffusion.config import FinetuneConfig
from ferryman.apps.diffusion.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, save_lora
from ferryman.apps.diffusion.loss import NoisePredictionLoss, TrainModule
from ferryman.apps.diffusion.report import plot_loss_curve, write_loss_csv
from ferryman.core.config import save_config
from ferryman.core.errors import UserError
from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.optim import OptimConfig
from ferryman.core.runtime import DTYPES, pick_device
from ferryman.core.training import TrainConfig


@dataclass(kw_only=True)
class Parts:
    """The pieces of a Stable Diffusion folder that training touches."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


@dataclass(kw_only=True)
class FinetuneResult:
    out: Path
    losses: list[float] = field(default_factory=list)  # every step's loss, from step 1
    start_step: int = 0
    data_summary: str = ""
    model: torch.nn.Module | None = None  # the trained module, final (EMA) weights


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"--model {path}: not a diffusers pipeline folder (no model_index.json); a single "
                        "checkpoint file must first be converted with StableDiffusionPipeline.from_single_file")
    return path


def load_parts(model_dir: str | Path) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(check_model_dir(model_dir))
    try:
        return Parts(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path}: cannot load the pipeline parts: {str(err).splitlines()[0]}") from None


def prepare_model(cfg: FinetuneConfig, parts: Parts, device: torch.device) -> TrainModule:
    """Freeze what is not trained, add LoRA, place the frozen parts; returns the trained module.

    The trained module stays where it is: the engine (plain or Gemini) places it.
    """
    frozen_dtype = DTYPES[cfg.precision]
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


def build_stream(cfg: FinetuneConfig, tokenizer) -> tuple[data_mod.CaptionStream, str]:
    d = cfg.data
    if d.instance_prompt:  # DreamBooth: one prompt for every image
        scan = data_mod.scan_prompt_folder(d.path, d.instance_prompt, on_bad=d.on_bad)
    else:
        scan = data_mod.scan_folder(d.path, caption_column=d.caption_column, image_column=d.image_column,
                                    on_bad=d.on_bad)
    prior = data_mod.scan_prompt_folder(d.class_path, d.class_prompt, on_bad=d.on_bad) if d.class_path else None
    summary = scan.summary() + (f"; class images: {prior.summary()}" if prior else "")
    stream = data_mod.CaptionStream(scan.records, tokenizer, resolution=d.resolution, center_crop=d.center_crop,
                                    random_flip=d.random_flip, seed=cfg.seed,
                                    prior=prior.records if prior else None)
    return stream, summary


def train_config(cfg: FinetuneConfig, device: torch.device, *, progress: bool = True) -> TrainConfig:
    """The core loop's config for ``cfg``: ``memory`` picks plain PyTorch, Gemini auto, or Gemini
    with everything on the host; diffusers' LR schedule (to zero), EMA warm-up and checkpointing."""
    # diffusers' script decays every parameter; the norm scales and biases included
    optim = OptimConfig(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, no_decay_1d=False,
                        max_grad_norm=cfg.max_grad_norm)
    placement = {"placement": "auto"} if cfg.memory != "gemini-offload" else {
        "placement": "static", "param_host_fraction": 1.0, "optim_host_fraction": 1.0}
    return TrainConfig(
        out_dir=cfg.out, max_steps=cfg.max_steps, precision=cfg.precision, device=str(device),
        engine="plain" if cfg.memory == "plain" else "gemini", gemini=GeminiConfig(precision=cfg.precision, **placement),
        optim=optim, schedule=cfg.lr_schedule, warmup_steps=cfg.lr_warmup_steps, min_lr_ratio=0.0,
        ema_decay=cfg.ema_decay if cfg.ema else 0.0, ema_warmup=True, ckpt_every=cfg.checkpoint_every,
        ckpt_at_end=False, keep_last=cfg.checkpoints_total_limit, log_every=max(1, cfg.log_every),
        resume=cfg.resume or None, seed=cfg.seed, progress=progress, plot=False, config_file="",
    )


def build_engine(cfg: FinetuneConfig, model: TrainModule, device: torch.device):
    """The core engine sd-finetune trains ``model`` with (also used by benchmarks/sd_finetune.py)."""
    from ferryman.core.training import build_engine as core_build_engine

    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("nothing to train: every parameter is frozen")
    return core_build_engine(model, train_config(cfg, device, progress=False))


def resolved(cfg: FinetuneConfig, parts: Parts) -> FinetuneConfig:
    """``cfg`` with the prediction type taken from the model's scheduler when not given."""
    if cfg.loss.prediction_type:
        return cfg
    kind = parts.noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise UserError(f"the model's scheduler predicts {kind!r}; set --prediction-type epsilon or v_prediction")
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, prediction_type=kind))


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Run sd-finetune as configured; see the command's --help for the outputs."""
    from ferryman.apps.diffusion.checkpoint import DiffusersCheckpoints
    from ferryman.apps.diffusion.run import Run
    from ferryman.core.training import train

    if not cfg.model or not cfg.out or not cfg.data.path:
        raise UserError("--model, --data and --out are required")
    device = pick_device(cfg.device, flag="--device")
    parts = load_parts(cfg.model)
    cfg = resolved(cfg, parts)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stream, summary = build_stream(cfg, parts.tokenizer)
    loss_fn = NoisePredictionLoss(
        vae=parts.vae, scheduler=parts.noise_scheduler, cfg=cfg.loss, device=device,
        frozen_text_encoder=None if cfg.train_text_encoder else parts.text_encoder, offload=cfg.offload_frozen,
    )
    run = Run(cfg=cfg, parts=parts, out=out, device=device)
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"data: {summary}")
    loader = lambda: data_mod.StreamLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers)  # noqa: E731
    result = train(train_config(cfg, device, progress=progress), run.build_model, loader, loss_fn,
                   on_step=run.on_step, checkpoints=DiffusersCheckpoints(run))
    return FinetuneResult(out=out, losses=run.losses, start_step=len(run.losses) - len(result.losses),
                          data_summary=summary, model=finish(run, result.engine, result.ema_state_dict))


def finish(run, engine, ema_named: dict | None) -> torch.nn.Module:
    """Final outputs: the pipeline folder (or LoRA file), loss.csv, loss_curve.png, last validation.

    Returns the module holding the final (EMA, when on) weights.
    """
    out, cfg = run.out, run.cfg
    write_loss_csv(out / "loss.csv", run.losses, run.lrs)
    plot_loss_curve(out / "loss_curve.png", run.losses)
    module = run.weights(engine, ema_named)  # the averaged weights are the result
    if cfg.use_lora:
        save_lora(out, module.unet, module.text_encoder)
    else:
        save_pipeline(run, module, out)
    if cfg.validation_prompts:
        from ferryman.apps.diffusion.validation import render_validation

        render_validation(run, module, out / "validation" / "final.png")
    return module


def save_pipeline(run, module: TrainModule, out: Path) -> None:
    """A full StableDiffusionPipeline folder in ``out``, written beside and moved in at the end."""
    from diffusers import StableDiffusionPipeline

    extra = {"text_encoder": module.text_encoder} if module.text_encoder is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(run.cfg.model, unet=module.unet, **extra)
    if pipe.scheduler.config.get("prediction_type") != run.cfg.loss.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=run.cfg.loss.prediction_type)
    tmp = out / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")  # the index goes last
    for entry in entries:
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()


__all__ = ["FinetuneResult", "build_engine", "finetune", "load_parts", "prepare_model", "train_config"]
