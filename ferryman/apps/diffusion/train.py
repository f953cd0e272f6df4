"""sd-finetune: set up the models, the data stream and the loss, run the core loop, write the outputs.

The train step is ``NoisePredictionLoss(model, batch) -> loss`` (loss.py); this file hands it to the
core training loop (``ferryman.core.training.train``: plain PyTorch or Gemini engine, gradient
accumulation, LR schedule, EMA, checkpoints, exact resume, progress bar) together with the run's
hooks (run.py) and its checkpoint-N/ store (checkpoint.py), then writes the final diffusers
pipeline folder or LoRA file.

Under torchrun every process trains on its share of each global batch (data.Share) through the
core loop's data parallelism; every process takes part in the collectives that gather weights,
and rank 0 alone writes config.yaml, the loss curve, the checkpoints' extra files and the result.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ferryman.apps.diffusion import data as data_mod
from ferryman.apps.diffusion.checkpoint import DiffusersCheckpoints
from ferryman.apps.diffusion.config import FinetuneConfig
from ferryman.apps.diffusion.lora import save_lora
from ferryman.apps.diffusion.loss import NoisePredictionLoss, TrainModule
from ferryman.apps.diffusion.parts import Parts, load_parts, prepare_model
from ferryman.apps.diffusion.report import plot_loss_curve, write_loss_csv
from ferryman.apps.diffusion.run import Run
from ferryman.core.config import save_config
from ferryman.core.errors import UserError
from ferryman.core.files import check_writable


@dataclass(kw_only=True)
class FinetuneResult:
    out: Path
    losses: list[float] = field(default_factory=list)  # every step's loss, from step 1
    start_step: int = 0
    data_summary: str = ""
    model: torch.nn.Module | None = None  # the trained module, final (EMA) weights
    is_main: bool = True  # the process that wrote the outputs (rank 0 of a data-parallel run)


def scan_data(cfg: FinetuneConfig) -> tuple[data_mod.Scan, data_mod.Scan | None]:
    """The training images with their captions, and DreamBooth's class images (or None)."""
    d = cfg.data
    if d.instance_prompt:  # DreamBooth: one prompt for every image
        scan = data_mod.scan_prompt_folder(d.path, d.instance_prompt, on_bad=d.on_bad)
    else:
        scan = data_mod.scan_folder(d.path, caption_column=d.caption_column, image_column=d.image_column,
                                    on_bad=d.on_bad)
    prior = data_mod.scan_prompt_folder(d.class_path, d.class_prompt, on_bad=d.on_bad) if d.class_path else None
    return scan, prior


def build_stream(cfg: FinetuneConfig, scans: tuple[data_mod.Scan, data_mod.Scan | None],
                 tokenizer) -> tuple[data_mod.CaptionStream, str]:
    (scan, prior), d = scans, cfg.data
    summary = scan.summary() + (f"; class images: {prior.summary()}" if prior else "")
    stream = data_mod.CaptionStream(scan.records, tokenizer, resolution=d.resolution, center_crop=d.center_crop,
                                    random_flip=d.random_flip, seed=cfg.train.seed,
                                    prior=prior.records if prior else None)
    return stream, summary


def build_engine(cfg: FinetuneConfig, model: TrainModule, device: torch.device):
    """The core engine sd-finetune trains ``model`` with (also used by benchmarks/sd_finetune.py)."""
    from ferryman.core.training import build_engine as core_build_engine

    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("nothing to train: every parameter is frozen")
    return core_build_engine(model, dataclasses.replace(cfg.train, device=str(device), progress=False))


def resolved(cfg: FinetuneConfig, parts: Parts) -> FinetuneConfig:
    """``cfg`` with the prediction type taken from the model's scheduler when not given."""
    if cfg.loss.prediction_type:
        return cfg
    kind = parts.noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise UserError(f"the model's scheduler predicts {kind!r}; set --prediction-type epsilon or v_prediction")
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, prediction_type=kind))


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Run sd-finetune as configured; see the command's --help for the outputs.

    Every input is read and checked (model folder, captions, images, output folder) before
    anything is written, so bad input leaves no new files behind.
    """
    from ferryman.core.parallel import init_parallel
    from ferryman.core.runtime import pick_device
    from ferryman.core.training import train

    if not cfg.model or not cfg.out or not cfg.data.path:
        raise UserError("--model, --data and --out are required")
    check_writable(cfg.out, "output folder (--out)")
    scans = scan_data(cfg)  # before the model: bad captions are found in a second, not after loading
    dims = init_parallel()  # one process, or the group torchrun started
    device = pick_device(cfg.train.device, dims)
    parts = load_parts(cfg.model, progress=progress)
    cfg = resolved(cfg, parts)
    stream, summary = build_stream(cfg, scans, parts.tokenizer)
    out = Path(cfg.out)
    if dims.is_main:
        save_config(cfg, out / "config.yaml")
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"data: {summary}")
    loss_fn = NoisePredictionLoss(
        vae=parts.vae, scheduler=parts.noise_scheduler, cfg=cfg.loss, device=device,
        frozen_text_encoder=None if cfg.train_text_encoder else parts.text_encoder, offload=cfg.offload_frozen,
    )
    run = Run(cfg=cfg, parts=parts, out=out, device=device, rank=dims.rank)
    share = data_mod.Share(accum=cfg.train.grad_accum, ranks=dims.dp, rank=dims.dp_rank)
    loader = lambda: data_mod.StreamLoader(stream, batch_size=cfg.batch_size, share=share,  # noqa: E731
                                           num_workers=cfg.data.num_workers)
    result = train(dataclasses.replace(cfg.train, progress=progress), run.build_model, loader, loss_fn,
                   dims=dims if dims.world_size > 1 else None, on_step=run.on_step,
                   checkpoints=DiffusersCheckpoints(run))
    return FinetuneResult(out=out, losses=run.losses, start_step=len(run.losses) - len(result.losses),
                          data_summary=summary, model=finish(run, result.engine, result.ema_state_dict),
                          is_main=dims.is_main)


def finish(run: Run, engine, ema_named: dict | None) -> torch.nn.Module:
    """Final outputs: the pipeline folder (or LoRA file), loss.csv, loss_curve.png, last validation.

    Every rank calls it (gathering Gemini's weights is a collective); rank 0 writes. Returns the
    module holding the final (EMA, when on) weights.
    """
    out, cfg = run.out, run.cfg
    module = run.weights(engine, ema_named)  # the averaged weights are the result
    if run.rank != 0:
        return module
    write_loss_csv(out / "loss.csv", run.losses, run.lrs)
    plot_loss_curve(out / "loss_curve.png", run.losses)
    if cfg.use_lora:
        save_lora(out, module.unet, module.text_encoder)
    else:
        save_pipeline(run, module, out)
    if cfg.validation_prompts:
        from ferryman.apps.diffusion.validation import render_validation

        render_validation(run, module, out / "validation" / "final.png")
    return module


def save_pipeline(run: Run, module: TrainModule, out: Path) -> None:
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


__all__ = ["FinetuneResult", "Parts", "build_engine", "finetune", "load_parts", "prepare_model"]
