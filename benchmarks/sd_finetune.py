"""sd-finetune and sd-generate against plain diffusers/PyTorch: samples/s and peak device memory.

Training, at SD-1.5 sizes (config only, random weights), 512 px, batch 1, 4 and 8:
- ``plain loop``: what diffusers' train_text_to_image.py does: every module on the device, frozen
  VAE/text encoder in the compute dtype, the UNet trained with fused AdamW under autocast;
- ``gemini auto``: sd-finetune's step (ferryman.apps.diffusion) on a Gemini engine with automatic
  placement, frozen modules on the device;
- ``gemini offload``: Gemini with every parameter and optimizer chunk on the host, and the frozen
  VAE/text encoder offloaded to the host between uses (``--memory gemini-offload --offload-frozen``).

Generation at 512 px: the default diffusers pipeline (fp32, on the device) against sd-generate's
placement (half precision, fused attention, VAE slicing, model offload).

    python benchmarks/sd_finetune.py                        # GPU: SD-1.5 sizes
    python benchmarks/sd_finetune.py --device cpu --small   # CPU smoke run: tiny model, 64 px

On a CPU there is no separate device memory: peak memory is reported as '-' and only speed
ratios are meaningful (and say little about a GPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import MIB, environment, is_oom, print_table, synchronize, write_json
from ferryman.apps.diffusion.presets import build_pipeline, default_tokenizer_dir

METHODS = ("plain loop", "gemini auto", "gemini offload")


def batch_of(size: int, resolution: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(size, 3, resolution, resolution, generator=gen) * 2 - 1,
            "input_ids": torch.randint(0, 600, (size, 77), generator=gen), "noise_seed": torch.tensor(seed)}


def plain_loop(pipe, device: torch.device, dtype: torch.dtype):
    """diffusers' train_text_to_image.py step, written out: the baseline."""
    import torch.nn.functional as F

    unet, vae, text = pipe.unet.to(device).train(), pipe.vae.to(device), pipe.text_encoder.to(device)
    if dtype != torch.float32:
        vae, text = vae.to(dtype), text.to(dtype)
    vae.requires_grad_(False)
    text.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    alphas = pipe.scheduler.alphas_cumprod.to(device)

    def step(batch):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample().float() * 0.18215
            hidden = text(batch["input_ids"].to(device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def ferryman_step(pipe, device: torch.device, precision: str, memory: str, offload_frozen: bool):
    """sd-finetune's own setup and step (prepare_model, build_engine, NoisePredictionLoss)."""
    from ferryman.apps.diffusion.config import FinetuneConfig
    from ferryman.apps.diffusion.loss import LossConfig, NoisePredictionLoss
    from ferryman.apps.diffusion.parts import Parts, prepare_model
    from ferryman.apps.diffusion.train import build_engine
    from ferryman.core.cli import MEMORY_MODES
    from ferryman.core.config import merge

    base = FinetuneConfig(offload_frozen=offload_frozen, loss=LossConfig(prediction_type="epsilon"))
    cfg = merge(base, {"train": {"precision": precision, **MEMORY_MODES[memory]}})
    parts = Parts(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
                  noise_scheduler=pipe.scheduler)
    engine = build_engine(cfg, prepare_model(cfg, parts, device), device)
    loss_fn = NoisePredictionLoss(vae=parts.vae, scheduler=parts.noise_scheduler, cfg=cfg.loss, device=device,
                                  frozen_text_encoder=parts.text_encoder, offload=offload_frozen)

    def step(batch):
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        return loss

    return step


def run_training(method: str, args, device: torch.device, batch: int) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    pipe = build_pipeline(args.preset, default_tokenizer_dir())
    _reset(device)
    try:
        if method == "plain loop":
            step = plain_loop(pipe, device, dtype)
        else:
            step = ferryman_step(pipe, device, args.precision, "gemini-auto" if method == "gemini auto"
                                 else "gemini-offload", offload_frozen=method == "gemini offload")
        for i in range(args.warmup):
            step(batch_of(batch, args.resolution, i))
        synchronize(device)
        start = time.perf_counter()
        for i in range(args.steps):
            loss = step(batch_of(batch, args.resolution, 100 + i))
        loss.item()
        synchronize(device)
        seconds = time.perf_counter() - start
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        return {"method": method, "batch": batch, "error": "OOM"}
    finally:
        del pipe
        gc.collect()
    return {"method": method, "batch": batch, "samples_per_s": batch * args.steps / seconds,
            "peak_mib": _peak_mib(device)}


def run_generation(mode: str, args, device: torch.device) -> dict:
    from ferryman.apps.diffusion.config import GenerateConfig
    from ferryman.apps.diffusion.generate import compute_dtype, place

    pipe = build_pipeline(args.preset, default_tokenizer_dir())
    pipe.set_progress_bar_config(disable=True)
    _reset(device)
    if mode == "diffusers default":
        pipe.to(device)
    else:
        cfg = GenerateConfig(precision="fp16", attention="sdpa", offload="model")
        pipe.to(compute_dtype(cfg.precision, device))
        place(pipe, cfg, device)
    size = args.resolution
    call = lambda: pipe("a red circle", height=size, width=size, num_inference_steps=args.gen_steps,  # noqa: E731
                        generator=torch.Generator().manual_seed(0), output_type="np")
    call()
    synchronize(device)
    _reset(device, keep_weights=True)
    start = time.perf_counter()
    call()
    synchronize(device)
    return {"method": mode, "s_per_image": time.perf_counter() - start, "peak_mib": _peak_mib(device)}


def _reset(device: torch.device, keep_weights: bool = False) -> None:
    if device.type == "cuda":
        if not keep_weights:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def ratios(rows: list[dict], key: str, base: str, invert: bool = False) -> None:
    """Add ``<key>_vs_<base>`` to each row: value / baseline (baseline / value with ``invert``)."""
    for row in rows:
        ref = next((r for r in rows if r["method"] == base and r.get("batch") == row.get("batch")), None)
        if ref and row.get(key) and ref.get(key):
            row[f"{key}_ratio"] = ref[key] / row[key] if invert else row[key] / ref[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model at 64 px, batch 1 and 2 (CPU smoke run)")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/sd_finetune.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.preset, args.resolution = ("tiny", 64) if args.small else ("sd15", 512)
    args.batches = args.batches or ([1, 2] if args.small else [1, 4, 8])
    args.steps = args.steps or (3 if args.small else 10)
    args.warmup, args.gen_steps = 2, (4 if args.small else 20)
    args.precision = "fp32" if device.type == "cpu" else "bf16"
    train_rows = [run_training(m, args, device, b) for b in args.batches for m in METHODS]
    ratios(train_rows, "samples_per_s", "plain loop")
    ratios(train_rows, "peak_mib", "plain loop", invert=True)
    gen_rows = [run_generation(m, args, device) for m in ("diffusers default", "sd-generate")]
    ratios(gen_rows, "peak_mib", "diffusers default", invert=True)
    print(f"\nTraining ({args.preset}, {args.resolution} px, {args.precision}, {args.steps} timed steps)")
    print_table(train_rows, ["method", "batch", "samples_per_s", "samples_per_s_ratio", "peak_mib", "peak_mib_ratio", "error"])
    print(f"\nGeneration ({args.resolution} px, {args.gen_steps} steps)")
    print_table(gen_rows, ["method", "s_per_image", "peak_mib", "peak_mib_ratio"])
    path = write_json(args.out, {"env": environment(device), "preset": args.preset, "resolution": args.resolution,
                                 "precision": args.precision, "training": train_rows, "generation": gen_rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
