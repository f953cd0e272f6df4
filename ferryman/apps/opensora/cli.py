"""The ``opensora`` command: STDiT text-to-video diffusion."""

from __future__ import annotations

from pathlib import Path

import click

from ferryman.core.cli import FerrymanGroup, config_options, resolve_config
from ferryman.core.errors import UserError


@click.group(cls=FerrymanGroup)
@click.version_option(package_name="ferryman")
def main() -> None:
    """STDiT text-to-video diffusion: train on a CSV of clips and captions, sample to mp4."""


def _parse_buckets(specs: tuple[str, ...]) -> list[dict] | None:
    """--bucket RES:FRAMES:BATCH, e.g. 256:16:2 (frames of about 256x256 px, 16 frames, batches of 2)."""
    if not specs:
        return None
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"--bucket {spec!r}: expected RES:FRAMES:BATCH, e.g. 256:16:2")
        out.append(dict(resolution=int(parts[0]), num_frames=int(parts[1]), batch_size=int(parts[2])))
    return out


def _data_options(func):
    func = click.option("--backend", type=click.Choice(["pyav", "decord"]), default=None,
                        help="Video reader (default pyav).")(func)
    func = click.option("--frame-stride", type=int, default=None, help="Take every N-th frame.")(func)
    func = click.option("--bucket", "buckets", multiple=True, metavar="RES:FRAMES:BATCH",
                        help="A bucket: resolution (px per side of a square of equal area), frames, batch size. Repeatable.")(func)
    return func


def _data_flags(csv, buckets, frame_stride, backend) -> dict:
    return {"data.csv": None if csv is None else str(csv), "data.buckets": _parse_buckets(buckets),
            "data.frame_stride": frame_stride, "data.backend": backend}


@main.group(cls=FerrymanGroup)
def data() -> None:
    """Inspect clip tables before training."""


@data.command("check")
@click.argument("csv", type=click.Path(dir_okay=False, path_type=Path))
@_data_options
@click.option("--dp", type=int, default=1, show_default=True, help="Data-parallel ranks that will share the batches.")
@config_options
def data_check(csv, buckets, frame_stride, backend, dp, config_file, overrides) -> None:
    """Validate a clip table and print its bucket table, with the reason for each empty bucket.

    \b
    The CSV (or parquet) has columns path,text[,num_frames,height,width,fps]; clip paths are
    relative to the table's folder. Unreadable clips are listed, not fatal.
    \b
    Examples:
      opensora data check data/opensora/clips.csv
      opensora data check clips.csv --bucket 256:16:2 --bucket 512:16:1 --frame-stride 2
      opensora data check clips.csv --config run/config.yaml
    """
    from .config import OpenSoraConfig
    from .data import describe, index_clips
    from .data.buckets import bucket_table

    cfg = resolve_config(OpenSoraConfig(), config_file=config_file,
                         flags=_data_flags(csv, buckets, frame_stride, backend), overrides=overrides)
    index = index_clips(cfg.data)
    click.echo(describe(index, cfg.data, dp))
    if sum(row.num_batches for row in bucket_table(index.infos, index.keys, cfg.data, dp)) == 0:
        raise UserError(f"{csv}: no bucket has a full batch, so training would get an empty loader (see the table)")


@main.command()
@click.option("--csv", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Clip table.")
@click.option("--text-encoder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local transformers folder with a T5 encoder and its tokenizer.")
@click.option("--vae", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local diffusers folder with an AutoencoderKL, applied per frame, or a video VAE (AutoencoderKLWan, "
                   "-HunyuanVideo, -LTXVideo, -CogVideoX), whose buckets then need 1 + r k frames (r: its time compression).")
@click.option("--preset", default=None, help="Model size: debug, tiny, S/2, B/2, XL/2.")
@_data_options
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Recompute blocks in backward.")
@click.option("--gemini/--no-gemini", "use_gemini", default=None, help="Chunked CPU/GPU memory for weights and optimizer.")
@click.option("--ema-decay", type=float, default=None)
@click.option("--sp", type=int, default=None, help="Sequence-parallel ranks (start with torchrun --nproc-per-node).")
@click.option("--text-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for cached caption features.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@config_options
def train(csv, text_encoder, vae, preset, buckets, frame_stride, backend, steps, lr, precision, grad_checkpointing,
          use_gemini, ema_decay, sp, text_cache, out, resume, config_file, overrides) -> None:
    """Train an STDiT on clips and captions; writes checkpoints, opensora.yaml, metrics.jsonl and loss.png to --out.

    \b
    Examples:
      python -m ferryman.apps.opensora.tiny --out tiny
      opensora train --csv data/opensora/clips.csv --text-encoder tiny/t5 --vae tiny/vae \\
          --preset debug --bucket 32:8:2 --set data.size_multiple=8 --steps 20 --out run
      opensora train --out run --resume --steps 40
      torchrun --nproc-per-node 2 -m ferryman.apps.opensora.cli train --sp 2 --config run/opensora.yaml
      torchrun --nproc-per-node 4 -m ferryman.apps.opensora.cli train --sp 2 --config run/opensora.yaml
        (2 data-parallel groups of 2 sequence-parallel ranks; the global batch is 2 x the bucket batch)
    """
    from ferryman.core.config import read_mapping

    from .config import OpenSoraConfig
    from .presets import model_preset
    from .train import APP_CONFIG, run_train

    if resume and config_file is None and out is not None and (Path(out) / APP_CONFIG).is_file():
        config_file = Path(out) / APP_CONFIG
    # The preset gives the model sizes; a config file's own model fields still override them.
    preset = preset or (read_mapping(config_file).get("preset") if config_file is not None else None) or "debug"
    base = OpenSoraConfig(preset=str(preset), model=model_preset(str(preset)))
    engine = None if use_gemini is None else ("gemini" if use_gemini else "plain")
    flags = {**_data_flags(csv, buckets, frame_stride, backend), "text_encoder": text_encoder, "vae": vae,
             "train.max_steps": steps, "train.optim.lr": lr, "train.precision": precision,
             "model.grad_checkpointing": grad_checkpointing, "train.engine": engine, "train.ema_decay": ema_decay,
             "sp": sp, "text_cache": text_cache, "train.out_dir": out}
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    cfg = resolve_config(base, config_file=config_file, flags=flags, overrides=overrides)
    run_train(cfg, resume=resume)


@main.command()
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="A run folder or a checkpoint folder.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Caption; repeat for several videos.")
@click.option("--num-frames", type=int, default=16, show_default=True,
              help="Frames to write; with a video VAE one of 1 + r k (r: its time compression, e.g. 9, 13, 17 for r=4).")
@click.option("--resolution", default="64x64", show_default=True, help="HEIGHTxWIDTH in pixels, or one number.")
@click.option("--steps", type=int, default=30, show_default=True, help="Sampler steps.")
@click.option("--cfg-scale", type=float, default=4.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--fps", type=float, default=8.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--text-encoder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="T5 folder (default: the one the checkpoint was trained with).")
@click.option("--vae", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="VAE folder (default: the one the checkpoint was trained with).")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("sample.mp4"), show_default=True,
              help="Output mp4; with several prompts, NAME-0.mp4, NAME-1.mp4, ...")
def sample(ckpt, prompts, num_frames, resolution, steps, cfg_scale, fps, seed, text_encoder, vae, no_ema, out) -> None:
    """Generate videos from text with a trained STDiT and write them as H.264 mp4.

    \b
    Examples:
      opensora sample --ckpt run --prompt "a red circle moving right on a blue background" \\
          --num-frames 8 --resolution 48x64 --steps 20 --cfg-scale 4 --out circle.mp4
    """
    from ferryman.core.runtime import pick_device

    from .data import write_mp4
    from .sample import load_for_sampling, parse_resolution, sample_latents, to_uint8, write_sidecar
    from .text import T5TextEncoder
    from .train import Encoders
    from .vae import VideoVAE

    height, width = parse_resolution(resolution)
    if num_frames < 1 or steps < 1:
        raise UserError("--num-frames and --steps must be at least 1")
    device = pick_device("auto")
    model, cfg = load_for_sampling(ckpt, device, use_ema=not no_ema)
    text_dir, vae_dir = text_encoder or cfg.text_encoder, vae or cfg.vae
    if text_dir is None or vae_dir is None:
        raise UserError("the checkpoint names no text encoder or VAE folder; pass --text-encoder and --vae")
    encoders = Encoders(text=T5TextEncoder(text_dir, max_length=cfg.model.model_max_length, device=device),
                        vae=VideoVAE(vae_dir, device=device, micro_batch=cfg.vae_micro_batch))
    latents = sample_latents(model, encoders, cfg.diffusion, list(prompts), num_frames=num_frames, height=height,
                             width=width, steps=steps, cfg_scale=cfg_scale, fps=fps, seed=seed)
    videos = encoders.vae.decode(latents)  # [B, 3, T, H, W]
    if tuple(videos.shape[2:]) != (num_frames, height, width):
        raise UserError(f"the VAE in {vae_dir} decoded {tuple(videos.shape[2:])} frames x height x width, "
                        f"not the requested {(num_frames, height, width)}")
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = out if len(prompts) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.mp4'}")
        write_mp4(path, to_uint8(video), fps)
        write_sidecar(path, {"prompt": prompt, "num_frames": num_frames, "height": height, "width": width,
                             "steps": steps, "cfg_scale": cfg_scale, "fps": fps, "seed": seed, "ckpt": str(ckpt)})
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
