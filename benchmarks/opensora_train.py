"""opensora train: STDiT training samples/s and peak memory, Ferryman's path against plain PyTorch.

Both paths run the same STDiT training step (rectified-flow loss on latents, AdamW, same
precision) on random latents and caption features, so the VAE and T5 are left out:

- ``plain``: attention by the PyTorch reference (full logits), the whole model and optimizer on
  the device (fused AdamW under autocast), no activation checkpointing;
- ``ferryman``: the fused attention/LayerNorm kernels (``backend="auto"``: Triton on CUDA), the
  Gemini engine with automatic placement, and checkpointed blocks.

GPU (default): STDiT-XL/2 (1.2B parameters), bf16, batch 1, 16x256x256 and 64x256x256 pixels
(latents 4x16x32x32 and 4x64x32x32 with an 8x VAE), then the largest frame count the ferryman
path trains at 256x256 (doubling until out of memory). ``--device cpu --small``: the ``tiny``
preset at 4x64x64 and 16x64x64 in fp32, no frame search; on CPU "auto" resolves to the PyTorch
reference too, so the two paths differ only by Gemini and checkpointing.

    python benchmarks/opensora_train.py                        # GPU
    python benchmarks/opensora_train.py --device cpu --small   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import MIB, environment, is_oom, peak_bytes, print_table, synchronize, write_json
from ferryman.apps.opensora.config import DiffusionConfig, RuntimeConfig
from ferryman.apps.opensora.diffusion import RectifiedFlow
from ferryman.apps.opensora.model import num_parameters
from ferryman.apps.opensora.presets import model_preset
from ferryman.apps.opensora.runtime import build_stdit
from ferryman.core.gemini import GeminiConfig, OptimConfig
from ferryman.core.training import TrainConfig, build_engine

VAE_FACTOR = 8


def make_step(path: str, preset: str, frames: int, resolution: int, batch: int, device: torch.device, precision: str):
    ferryman = path == "ferryman"
    backend = "auto" if ferryman else "torch"
    cfg = model_preset(preset)
    torch.manual_seed(0)
    model = build_stdit(cfg, RuntimeConfig(attention_backend=backend, norm_backend=backend, grad_checkpointing=ferryman))
    tcfg = TrainConfig(engine="gemini" if ferryman else "plain", precision=precision, device=device.type,
                       optim=OptimConfig(lr=1e-4), gemini=GeminiConfig(placement="auto"), progress=False)
    engine = build_engine(model, tcfg)
    side = resolution // VAE_FACTOR
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, cfg.in_channels, frames, side, side, generator=gen).to(device)
    y = torch.randn(batch, cfg.model_max_length, cfg.caption_channels, generator=gen).to(device)
    mask = torch.ones(batch, cfg.model_max_length, dtype=torch.bool, device=device)
    cond = {k: torch.full((batch,), v, device=device) for k, v in
            (("fps", 8.0), ("height", float(resolution)), ("width", float(resolution)))}
    rf = RectifiedFlow(DiffusionConfig())

    def step():
        loss = rf.training_loss(lambda xt, t: engine(xt, t, y, mask, **cond).float(), x0,
                                height=resolution, width=resolution)
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        return loss

    return step, engine, num_parameters(model)


def total_peak_bytes(step, device: torch.device) -> int:
    """CUDA: the most memory allocated at once during a step, model and optimizer state included.
    CPU: tensor memory allocated during the step (the profiler's count; resident state excluded)."""
    if device.type != "cuda":
        return peak_bytes(step, device)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run_case(path, preset, frames, resolution, batch, device, precision, repeat) -> dict:
    row = {"path": path, "frames": frames, "resolution": resolution, "batch": batch}
    engine = None
    try:
        step, engine, params = make_step(path, preset, frames, resolution, batch, device, precision)
        row["params_M"] = params / 1e6
        step()  # warm-up: Gemini traces and places chunks, kernels compile
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeat):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - started) / repeat
        row["step_s"] = seconds
        row["samples_per_s"] = batch / seconds
        row["peak_mib"] = total_peak_bytes(step, device) / MIB
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        row["error"] = "OOM"
    finally:
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def largest_frames(preset, resolution, batch, device, precision, start: int, limit: int) -> int | None:
    best, frames = None, start
    while frames <= limit:
        row = run_case("ferryman", preset, frames, resolution, batch, device, precision, repeat=1)
        print(f"  ferryman {frames} frames at {resolution}px: {row.get('error', 'fits')}", flush=True)
        if "error" in row:
            break
        best, frames = frames, frames * 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU-sized: tiny preset, 64 px, fp32")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=1024, help="upper end of the frame search (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "opensora_train.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        preset, resolution, frame_list, precision, repeat = "tiny", 64, [4, 16], "fp32", args.repeat or 3
    else:
        preset, resolution, frame_list, precision, repeat = "XL/2", 256, [16, 64], "bf16", args.repeat or 5
    rows = []
    for frames in frame_list:
        for path in ("plain", "ferryman"):
            rows.append(run_case(path, preset, frames, resolution, 1, device, precision, repeat))
            print(rows[-1], flush=True)
    summary = []
    for frames in frame_list:
        base, new = (next(r for r in rows if r["frames"] == frames and r["path"] == p) for p in ("plain", "ferryman"))
        entry = {"frames": frames, "plain samples/s": base.get("samples_per_s"), "ferryman samples/s": new.get("samples_per_s"),
                 "plain peak MiB": base.get("peak_mib", base.get("error")), "ferryman peak MiB": new.get("peak_mib", new.get("error"))}
        if "samples_per_s" in base and "samples_per_s" in new:
            entry["speed ratio"] = new["samples_per_s"] / base["samples_per_s"]
            entry["memory ratio"] = new["peak_mib"] / base["peak_mib"]
        summary.append(entry)
    print(f"\nSTDiT {preset} training, batch 1, {resolution}x{resolution}, {precision}, {device}")
    columns = ["frames", "plain samples/s", "ferryman samples/s", "speed ratio", "plain peak MiB",
               "ferryman peak MiB", "memory ratio"]
    table = print_table(summary, columns)
    biggest = None
    if device.type == "cuda" and not args.small:
        biggest = largest_frames(preset, resolution, 1, device, precision, frame_list[-1], args.max_frames)
        print(f"largest frame count trained at {resolution}x{resolution} (ferryman path): {biggest}")
    payload = {"env": environment(device), "preset": preset, "resolution": resolution, "precision": precision,
               "threads": torch.get_num_threads(), "rows": rows, "summary": summary, "largest_frames": biggest,
               "table": table, "args": {k: str(v) for k, v in vars(args).items()}}
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
