"""The ``opensora`` command: STDiT text-to-video diffusion."""

from __future__ import annotations

from pathlib import Path

import click

from ferryman.core.cli import FerrymanGroup, config_options, train_flags, train_options
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
@click.argument("csv", type=click.Path(path_type=Path))
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
      opensora data check clips.csv --config run/opensora.yaml
    """
    from .config import resolve
    from .data import describe, index_clips
    from .data.buckets import bucket_table

    cfg = resolve(config_file=config_file, flags=_data_flags(csv, buckets, frame_stride, backend), overrides=overrides)
    index = index_clips(cfg.data)
    click.echo(describe(index, cfg.data, dp))
    if sum(row.num_batches for row in bucket_table(index.infos, index.keys, cfg.data, dp)) == 0:
        raise UserError(f"{csv}: no bucket has a full batch, so training would get an empty loader (see the table)")


def _saved_config(resume: str, out: Path | None) -> Path | None:
    """The opensora.yaml of the run that ``--resume`` continues, when there is one."""
    from .config import APP_CONFIG

    if resume == "latest":
        folders = [Path(out)] if out is not None else []
    else:
        folders = [Path(resume), Path(resume).parent, Path(resume).parent.parent]
    return next((f / APP_CONFIG for f in folders if (f / APP_CONFIG).is_file()), None)


@main.command()
@click.option("--csv", type=click.Path(path_type=Path), default=None, help="Clip table.")
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
              help="Local transformers folder with a T5 encoder and its tokenizer.")
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="Local diffusers folder with an AutoencoderKL, applied per frame, or a video VAE (AutoencoderKLWan, "
                   "-HunyuanVideo, -LTXVideo, -CogVideoX), whose buckets then need 1 + r k frames (r: its time compression).")
@click.option("--preset", default=None,
              help="Model sizes: debug, tiny, S/2, B/2, XL/2 (also from --config or --set preset=...); "
                   "model fields given explicitly override it.")
@_data_options
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None,
              help="Recompute blocks in backward (runtime.grad_checkpointing).")
@click.option("--ema-decay", type=float, default=None, help="Weight EMA decay (0: none); sampling uses the EMA.")
@click.option("--sp", type=int, default=None, help="Sequence-parallel ranks (start with torchrun --nproc-per-node).")
@click.option("--text-cache", type=click.Path(path_type=Path), default=None,
              help="Folder for cached caption features.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder.")
@train_options()
def train(csv, text_encoder, vae, preset, buckets, frame_stride, backend, grad_checkpointing, ema_decay, sp,
          text_cache, out, config_file, overrides, **shared) -> None:
    """Train an STDiT on clips and captions; writes checkpoints, opensora.yaml, metrics.jsonl and loss.png to --out.

    \b
    Examples:
      python -m ferryman.apps.opensora.tiny --out tiny
      opensora train --csv data/opensora/clips.csv --text-encoder tiny/t5 --vae tiny/vae \\
          --preset debug --bucket 32:8:2 --set data.size_multiple=8 --max-steps 20 --out run
      opensora train --out run --resume latest --max-steps 40
      opensora train --config run/opensora.yaml --set preset=tiny --memory gemini-offload --out run-tiny
      torchrun --nproc-per-node 2 -m ferryman.apps.opensora.cli train --sp 2 --config run/opensora.yaml --out run-sp
      torchrun --nproc-per-node 4 -m ferryman.apps.opensora.cli train --sp 2 --config run/opensora.yaml --out run-dp-sp
        (2 data-parallel groups of 2 sequence-parallel ranks; the global batch is 2 x the bucket batch)
    \b
    --resume latest (or a checkpoint folder) continues a run; its saved opensora.yaml supplies every
    setting not given on the command line.
    """
    from .config import resolve
    from .train import run_train

    if shared.get("resume") is not None and config_file is None:
        config_file = _saved_config(shared["resume"], out)
    flags = {**_data_flags(csv, buckets, frame_stride, backend), "preset": preset, "text_encoder": text_encoder,
             "vae": vae, "runtime.grad_checkpointing": grad_checkpointing, "train.ema_decay": ema_decay, "sp": sp,
             "text_cache": text_cache, "train.out_dir": out, **train_flags(shared)}
    run_train(resolve(config_file=config_file, flags=flags, overrides=overrides))


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
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
              help="T5 folder (default: the one the checkpoint was trained with).")
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="VAE folder (default: the one the checkpoint was trained with).")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("sample.mp4"), show_default=True,
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
    from .train import Encoders, check_encoder_folders
    from .vae import VideoVAE

    height, width = parse_resolution(resolution)
    if num_frames < 1 or steps < 1:
        raise UserError("--num-frames and --steps must be at least 1")
    paths = _sample_paths(out, len(prompts))  # an output that cannot be written fails before any work
    device = pick_device("auto")
    model, cfg = load_for_sampling(ckpt, device, use_ema=not no_ema)
    text_dir, vae_dir = text_encoder or cfg.text_encoder, vae or cfg.vae
    check_encoder_folders(text_dir, vae_dir)
    encoders = Encoders(text=T5TextEncoder(text_dir, max_length=cfg.model.model_max_length, device=device),
                        vae=VideoVAE(vae_dir, device=device, micro_batch=cfg.vae_micro_batch))
    latents = sample_latents(model, encoders, cfg.diffusion, list(prompts), num_frames=num_frames, height=height,
                             width=width, steps=steps, cfg_scale=cfg_scale, fps=fps, seed=seed)
    videos = encoders.vae.decode(latents)  # [B, 3, T, H, W]
    if tuple(videos.shape[2:]) != (num_frames, height, width):
        raise UserError(f"the VAE in {vae_dir} decoded {tuple(videos.shape[2:])} frames x height x width, "
                        f"not the requested {(num_frames, height, width)}")
    for path, prompt, video in zip(paths, prompts, videos):
        write_mp4(path, to_uint8(video), fps)
        write_sidecar(path, {"prompt": prompt, "num_frames": num_frames, "height": height, "width": width,
                             "steps": steps, "cfg_scale": cfg_scale, "fps": fps, "seed": seed, "ckpt": str(ckpt)})
        click.echo(f"wrote {path}")


def _sample_paths(out: Path, count: int) -> list[Path]:
    """The mp4 of each prompt (NAME-i.mp4 for several), each checked writable with its .json sidecar."""
    from ferryman.core.files import check_writable

    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.mp4'}") for i in range(count)]
    for path in paths:
        check_writable(path, "output video (--out)", is_dir=False)
        check_writable(path.with_suffix(".json"), "sidecar of the output video (--out)", is_dir=False)
    return paths


if __name__ == "__main__":
    main()
