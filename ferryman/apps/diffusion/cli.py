"""The sd-finetune and sd-generate commands (click). Heavy imports happen inside the commands."""

from __future__ import annotations

import dataclasses

import click

from ferryman.core.cli import (
    FerrymanCommand,
    FerrymanGroup,
    config_options,
    resolve_config,
    train_flags,
    train_options,
)

# sd-finetune's own flags -> FinetuneConfig keys. The shared training flags (--max-steps,
# --checkpoint-every, --resume, --memory, --precision, --grad-accum, --lr) come from
# core.cli.train_options and land on the embedded core TrainConfig, ``train``.
FINETUNE_FLAGS = {
    "model": "model", "data": "data.path", "out": "train.out_dir", "resolution": "data.resolution",
    "center_crop": "data.center_crop", "random_flip": "data.random_flip", "caption_column": "data.caption_column",
    "image_column": "data.image_column", "train_text_encoder": "train_text_encoder", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "snr_gamma": "loss.snr_gamma", "noise_offset": "loss.noise_offset",
    "prediction_type": "loss.prediction_type", "gradient_checkpointing": "gradient_checkpointing",
    "offload_frozen": "offload_frozen", "batch_size": "batch_size", "lr_warmup_steps": "train.warmup_steps",
    "lr_schedule": "train.schedule", "checkpoints_total_limit": "train.keep_last",
    "validation_every": "validation_every", "seed": "train.seed", "device": "train.device",
    "instance_prompt": "data.instance_prompt", "class_data": "data.class_path",
    "class_prompt": "data.class_prompt", "prior_loss_weight": "loss.prior_loss_weight",
    "ema_decay": "train.ema_decay",
}
EMA_DECAY = 0.9999  # diffusers' train_text_to_image.py default for --use_ema


@click.command(cls=FerrymanCommand, context_settings={"show_default": True})
@click.option("--model", help="Stable Diffusion 1.x/2.x folder in diffusers layout (model_index.json, unet/, ...).")
@click.option("--data", help="Image folder with metadata.jsonl, metadata.csv/captions.csv, or .txt captions.")
@click.option("--out", help="Output folder: the finetuned pipeline, checkpoint-N/, loss curve, validation grids.")
@click.option("--resolution", type=int, help="Training image size (short side resized, then cropped square).")
@click.option("--center-crop/--random-crop", default=None, help="Crop the centre (default: random crop).")
@click.option("--random-flip/--no-random-flip", default=None, help="Flip half the images left-right.")
@click.option("--caption-column", help="Caption column of metadata.jsonl / CSV.")
@click.option("--image-column", help="Image file column (default: file_name, image, path or file).")
@click.option("--batch-size", type=int, help="Images per process and micro-batch (one update: x --grad-accum x processes).")
@click.option("--train-text-encoder/--freeze-text-encoder", default=None, help="Also train the CLIP text encoder.")
@click.option("--lora-rank", type=int, help="Train LoRA adapters of this rank instead of all weights (0: off).")
@click.option("--lora-alpha", type=float, help="LoRA alpha: the adapters are scaled by alpha / rank (default: the rank).")
@click.option("--ema/--no-ema", default=None, help=f"Keep an EMA of the weights and write it as the result "
              f"(decay {EMA_DECAY} unless --ema-decay or train.ema_decay says otherwise).")
@click.option("--ema-decay", type=float, help="EMA decay (train.ema_decay; 0: no EMA).")
@click.option("--snr-gamma", type=float, help="Min-SNR loss weighting gamma (5.0 recommended; 0: off).")
@click.option("--noise-offset", type=float, help="Offset-noise strength (e.g. 0.05; 0: off).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]),
              help="Training target (default: the model's scheduler config).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--offload-frozen/--no-offload-frozen", default=None,
              help="Keep the VAE (and frozen text encoder) on the host between uses.")
@click.option("--lr-warmup-steps", type=int, help="Linear warm-up steps (train.warmup_steps).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), help="After the warm-up (train.schedule).")
@click.option("--checkpoints-total-limit", type=int, help="Keep only the newest N checkpoints (train.keep_last; 0: all).")
@click.option("--validation-prompt", "validation_prompts", multiple=True, help="Rendered into validation/ (repeatable).")
@click.option("--validation-every", type=int, help="Render the validation prompts every N steps (0: at the end).")
@click.option("--instance-prompt", help="DreamBooth: one prompt for every image in --data (e.g. 'a photo of sks dog').")
@click.option("--class-data", help="DreamBooth: folder of class images for prior preservation "
              "(make them first, e.g. sd-generate --prompt 'a photo of a dog' --num-images 100 --out class/).")
@click.option("--class-prompt", help="DreamBooth: prompt of the class images (e.g. 'a photo of a dog').")
@click.option("--prior-loss-weight", type=float, help="DreamBooth: weight of the prior-preservation loss.")
@click.option("--seed", type=int, help="train.seed: data order, crops, flips, noise and initial LoRA weights.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (train.device; under torchrun each process's own GPU).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@train_options(precisions=("fp32", "bf16", "fp16"))
def finetune_main(config_file, overrides, validation_prompts, no_progress, ema, **flags) -> None:
    """Finetune a Stable Diffusion model on captioned images.

    Writes a full diffusers pipeline folder to --out (or pytorch_lora_weights.safetensors with
    --lora-rank), loadable with StableDiffusionPipeline.from_pretrained, plus checkpoint-N/,
    loss.csv, loss_curve.png, validation/ grids and config.yaml. --config takes that config.yaml
    back; --set reaches any field, the core training loop's under train (e.g. --set
    train.optim.weight_decay=0). Under torchrun every process trains on its share of each batch.

    \b
    Examples:
      sd-finetune --model sd15/ --data pets/ --out runs/pets --resolution 512 --max-steps 2000
      sd-finetune --model sd15/ --data pets/ --out runs/lora --lora-rank 8 --lr 1e-4 --precision bf16
      sd-finetune --model sd21/ --data art/ --out runs/art --snr-gamma 5 --ema --resume latest
      sd-finetune --config runs/pets/config.yaml --set train.max_steps=4000 --resume latest
      sd-finetune --model sd15/ --data pets/ --out runs/big --batch-size 2 --grad-accum 8 --memory gemini-offload
      sd-finetune --model sd15/ --data my-dog/ --out runs/sks --instance-prompt "a photo of sks dog" \\
                  --class-data dogs/ --class-prompt "a photo of a dog" --lr 5e-6 --max-steps 400
      torchrun --nproc-per-node 4 -m ferryman.apps.diffusion.cli finetune --model sd15/ --data pets/ --out runs/dp
    """
    from ferryman.apps.diffusion.config import FinetuneConfig
    from ferryman.apps.diffusion.train import finetune

    dotted = train_flags(flags, prefix="train.")
    dotted |= {FINETUNE_FLAGS[name]: value for name, value in flags.items()}
    if ema is False:
        dotted["train.ema_decay"] = 0.0
    if validation_prompts:
        dotted["validation_prompts"] = list(validation_prompts)
    cfg = resolve_config(FinetuneConfig(), config_file=config_file, flags=dotted, overrides=overrides)
    if ema and not cfg.use_ema:  # --ema switches it on at the default decay unless one was given
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=EMA_DECAY))
    result = finetune(cfg, progress=not no_progress)
    if not result.is_main:  # under torchrun, rank 0 reports
        return
    click.echo(f"data: {result.data_summary}")
    if result.losses:
        tail = result.losses[-min(10, len(result.losses)):]
        click.echo(f"trained to step {len(result.losses)}; mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
    click.echo(f"wrote {result.out}")


GENERATE_FLAGS = {
    "model": "model", "out": "out", "negative_prompt": "negative_prompt", "lora": "lora", "num_images": "num_images",
    "height": "height", "width": "width", "steps": "steps", "guidance_scale": "guidance_scale",
    "scheduler": "scheduler", "precision": "precision", "attention": "attention", "offload": "offload",
    "vae_tiling": "vae_tiling", "device": "device", "seed": "seed",
}


@click.command(cls=FerrymanCommand, context_settings={"show_default": True})
@click.option("--model", help="Pipeline folder (diffusers layout) or an sd-finetune checkpoint-N/ folder.")
@click.option("--prompt", "prompts", multiple=True, help="Text prompt (repeatable).")
@click.option("--out", help="Folder for the PNGs and generate.json.")
@click.option("--negative-prompt")
@click.option("--lora", help="LoRA weights: a .safetensors file or a folder holding pytorch_lora_weights.safetensors.")
@click.option("--num-images", type=int, help="Images per prompt.")
@click.option("--height", type=int, help="Default: the model's native size.")
@click.option("--width", type=int)
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance-scale", type=float)
@click.option("--scheduler", type=click.Choice(["ddim", "euler", "euler-a", "dpm++", "pndm"]),
              help="Sampler (default: the model's own).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="fp16 falls back to fp32 on CPU.")
@click.option("--attention", type=click.Choice(["sdpa", "ferryman", "eager"]),
              help="Fused torch SDPA, ferryman.kernels flash attention, or eager.")
@click.option("--offload", type=click.Choice(["none", "model", "sequential"]),
              help="Host offload: one component (model) or one layer (sequential) on the GPU at a time.")
@click.option("--vae-tiling/--no-vae-tiling", default=None, help="Decode large images tile by tile.")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, help="Image k of prompt p uses seed + p * num_images + k.")
@click.option("--no-progress", is_flag=True)
@config_options
def generate_main(config_file, overrides, prompts, no_progress, **flags) -> None:
    """Generate images from text with a Stable Diffusion pipeline, writing PNGs.

    \b
    Examples:
      sd-generate --model runs/pets --prompt "a photo of a corgi" --out images/
      sd-generate --model runs/pets/checkpoint-1500 --prompt "a corgi" --out images/ --num-images 4
      sd-generate --model sd15/ --lora runs/lora --prompt "a corgi" --out images/ --offload model
    """
    from ferryman.apps.diffusion.config import GenerateConfig
    from ferryman.apps.diffusion.generate import generate

    dotted = {GENERATE_FLAGS[name]: value for name, value in flags.items()}
    if prompts:
        dotted["prompts"] = list(prompts)
    cfg = resolve_config(GenerateConfig(), config_file=config_file, flags=dotted, overrides=overrides)
    for path in generate(cfg, progress=not no_progress):
        click.echo(str(path))


@click.group(cls=FerrymanGroup)
def main() -> None:
    """sd-finetune and sd-generate as subcommands, for `torchrun -m ferryman.apps.diffusion.cli finetune ...`."""


main.add_command(finetune_main, "finetune")
main.add_command(generate_main, "generate")

if __name__ == "__main__":
    main()
