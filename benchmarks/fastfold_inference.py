"""AlphaFold2 inference at full model size: the eager path against Ferryman's default path.

    python benchmarks/fastfold_inference.py                       # CUDA: N_res 256.. until OOM, bf16
    python benchmarks/fastfold_inference.py --device cpu --small  # CPU: full-size model, N_res 16-48

The model is a full-size AF2 monomer (``--preset``, default model_3_ptm: 48 Evoformer blocks,
c_m=256, c_z=128, no templates) with seeded random weights, fed a single-sequence MSA (one MSA
row, one extra-MSA row) and run for one recycling iteration (``num_recycle=0``: one pass through
the network). Two paths are timed in the same run (on CPU: one run each, peak = resident-memory
growth; on CUDA: median of 3 after a warm-up, peak = allocator high-water mark):

- eager: PyTorch reference kernels, no chunking, out-of-place residual adds, fp32;
- default: fused kernels (``kernels=auto``: Triton on CUDA, the reference on CPU), chunk size
  chosen from free memory, in-place residual adds, bf16 trunk on CUDA (fp32 on CPU).

For each N_res the table gives wall time, peak extra memory and the eager/default time ratio;
``--find-max`` then searches the longest N_res the default path runs in bf16 on this GPU.

    python benchmarks/fastfold_inference.py --device cpu --memory   # CPU peak memory vs N_res

``--memory`` measures how peak memory grows with N_res on CPU, in units of one pair tensor
(N_res^2 x c_z x 4 bytes): a full-width model (model_3_ptm widths) with ``--blocks`` Evoformer
blocks and one extra-MSA block, one pass, single-sequence MSA. Each (path, N_res) point runs in a
fresh subprocess with glibc told to serve every allocation over 1 MiB by mmap (so freed tensors
leave the resident set at once); the subprocess builds the model and features, resets the
kernel's resident high-water mark (``/proc/self/clear_refs``), and reports peak resident memory
(VmHWM) minus resident memory just before the forward. The default path runs with a fixed
``--chunk-size`` (the chunk auto-chunking picks once memory is short) and ``pair_logits=False``
(the [N, N, 64] distogram and PAE logits that structure prediction does not use).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from ferryman.apps.fastfold.model import RunOptions, apply_run_options, randomize_
from ferryman.apps.fastfold.model.alphafold import AlphaFold
from ferryman.apps.fastfold.presets import get_preset


def single_sequence_features(n_res: int, device: torch.device, seed: int = 0) -> dict:
    """AF2 features of a random sequence whose MSA is the sequence alone (one extra row too)."""
    g = torch.Generator().manual_seed(seed)
    aatype = torch.randint(0, 20, (n_res,), generator=g)
    onehot = torch.nn.functional.one_hot(aatype, 23).float()
    msa_feat = torch.cat([onehot, torch.zeros(n_res, 2), onehot, torch.zeros(n_res, 1)], dim=-1)[None]
    batch = {
        "aatype": aatype,
        "residue_index": torch.arange(n_res),
        "seq_mask": torch.ones(n_res),
        "target_feat": torch.nn.functional.one_hot(aatype + 1, 22).float(),
        "msa_feat": msa_feat,  # [1, N, 49]
        "msa_mask": torch.ones(1, n_res),
        "extra_msa": aatype[None],
        "extra_msa_mask": torch.ones(1, n_res),
        "extra_has_deletion": torch.zeros(1, n_res),
        "extra_deletion_value": torch.zeros(1, n_res),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(preset: str, device: torch.device, seed: int, **overrides) -> AlphaFold:
    with torch.device("meta"):  # shapes only: randomize_ writes every value
        model = AlphaFold(get_preset(preset, num_recycle=0, **overrides))
    return randomize_(model.to_empty(device="cpu"), seed=seed).to(device).eval()


def run_options(path: str, device: torch.device, chunk_size: int | None = None) -> RunOptions:
    """The eager path, or the default one (auto chunking unless ``chunk_size`` fixes it)."""
    if path == "eager":
        return RunOptions(kernels="torch", inplace=False, precision="fp32")
    precision = "bf16" if device.type == "cuda" else "fp32"
    return RunOptions(kernels="auto", chunk_size=chunk_size, auto_chunk=chunk_size is None, precision=precision)


def configure(model: AlphaFold, path: str, device: torch.device, chunk_size: int | None = None) -> None:
    apply_run_options(model, run_options(path, device, chunk_size))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc mallinfo2): live tensor memory on CPU,
    where torch allocates straight from malloc, unlike resident memory which freed pages inflate."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def cpu_time_and_peak(fn) -> dict:
    """One timed run with malloc's bytes in use sampled every millisecond (the profiler's
    allocation records cost more than the full-size model run itself)."""
    base = peak = _heap_in_use()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _heap_in_use())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    done.set()
    thread.join()
    return {"ms": ms, "peak_mib": (peak - base) / common.MIB}


def run_path(model: AlphaFold, path: str, n_res: int, device: torch.device, repeat: int, warmup: int) -> dict:
    configure(model, path, device)
    batch = single_sequence_features(n_res, device)

    def forward():
        with torch.no_grad():
            return model(batch, pair_logits=path == "eager")["final_atom_positions"]

    if device.type == "cpu":
        gc.collect()
        return cpu_time_and_peak(forward)
    result = common.measure(forward, device, warmup=warmup, repeat=repeat)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def find_max_n_res(model: AlphaFold, device: torch.device, start: int, step: int, limit: int | None = None) -> int | None:
    """Largest multiple of ``step`` the default path runs without OOM (doubling, then bisection);
    the doubling stops at ``limit`` (a time bound: each try is one forward), which is returned if it fits."""
    configure(model, "default", device)

    def fits(n: int) -> bool:
        try:
            with torch.no_grad():
                model(single_sequence_features(n, device))
            return True
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not common.is_oom(exc):
                raise
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = None, start
    while fits(hi):
        print(f"  N_res={hi} fits", file=sys.stderr)
        if limit and hi >= limit:
            return hi
        lo, hi = hi, min(hi * 2, limit) if limit else hi * 2
    if lo is None:
        return None
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        print(f"  bracket [{lo}, {hi})", file=sys.stderr)
    return lo


# ---------------------------------------------------------------- CPU memory mode

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_point(path: str, n_res: int, blocks: int, chunk_size: int, preset: str) -> dict:
    """One measurement, meant to run alone in a fresh process (see ``--memory``)."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model = build(preset, device, seed=0, num_evoformer_blocks=blocks, num_extra_msa_blocks=1)
    configure(model, path, device, chunk_size)
    with torch.no_grad():  # one-time allocations (kernel libraries, lazily built state) go into the base
        model(single_sequence_features(16, device), pair_logits=path == "eager")
    batch = single_sequence_features(n_res, device)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    base = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        model(batch, pair_logits=path == "eager")
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM") - base
    pair_bytes = n_res * n_res * model.cfg.c_z * 4
    return {"peak_mib": peak / 1024, "pair_mib": pair_bytes / common.MIB, "peak_pairs": peak * 1024 / pair_bytes, "s": seconds}


def run_memory_mode(args) -> dict:
    sizes = args.n_res or [128, 256, 384, 512]
    result = {"env": common.environment("cpu"), "preset": args.preset, "blocks": args.blocks,
              "chunk_size": args.chunk_size, "method": "VmHWM - VmRSS before forward, fresh process, mmap threshold 1 MiB",
              "rows": []}  # fmt: skip
    env = {**os.environ, **_MALLOC_ENV}
    for n in sizes:
        row = {"N_res": n}
        for path in ("eager", "default"):
            if path == "eager" and n > args.eager_max_n:
                continue
            cmd = [sys.executable, __file__, "--memory-point", path, str(n), str(args.blocks), str(args.chunk_size),
                   "--preset", args.preset]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: memory point {path} N_res={n} failed:\n{proc.stderr[-2000:]}")
            point = json.loads(proc.stdout.strip().splitlines()[-1])
            row["pair_mib"] = point["pair_mib"]
            for key in ("peak_mib", "peak_pairs", "s"):
                row[f"{path}_{key}"] = point[key]
        print(f"  {row}", file=sys.stderr)
        result["rows"].append(row)
    columns = ["N_res", "pair_mib", "eager_peak_mib", "eager_peak_pairs", "default_peak_mib", "default_peak_pairs",
               "eager_s", "default_s"]  # fmt: skip
    print(f"\ncpu peak memory: {args.preset} widths, {args.blocks} Evoformer blocks + 1 extra-MSA block, fp32, "
          f"single-sequence MSA, one pass; default chunk size {args.chunk_size}\n")
    common.print_table(result["rows"], columns)
    path = args.json or Path("benchmarks/results") / "fastfold_inference-cpu-memory.json"
    print(f"\nwrote {common.write_json(path, result)}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="N_res 16-48 (CPU); the model stays full size")
    parser.add_argument("--preset", default="model_3_ptm")
    parser.add_argument("--n-res", type=int, nargs="*", help="default 256 512 1024 2048 3072 4096 (16 32 64 small)")
    parser.add_argument("--find-max", action="store_true", help="search the longest N_res the default path fits")
    parser.add_argument("--max-n-res", type=int, help="--find-max: stop doubling here (a bound on the search's time)")
    parser.add_argument("--step", type=int, default=256, help="--find-max: resolution of the bisection")
    parser.add_argument("--repeat", type=int, help="CUDA: timed forwards per point (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/fastfold_inference-<device>.json")
    parser.add_argument("--memory", action="store_true", help="CPU peak memory against N_res (default 128 256 384 512)")
    parser.add_argument("--blocks", type=int, help="Evoformer blocks at full width, with one extra-MSA block "
                        "(default: the preset's 48 and 4; --memory: 1)")
    parser.add_argument("--chunk-size", type=int, default=32, help="--memory: chunk size of the default path")
    parser.add_argument("--eager-max-n", type=int, default=384, help="--memory: largest N_res for the eager path "
                        "(its triangle-attention logits grow as N_res^3: 21 GB at 768)")  # fmt: skip
    parser.add_argument("--memory-point", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_point:
        path, n, blocks, chunk = args.memory_point
        print(json.dumps(memory_point(path, int(n), int(blocks), int(chunk), args.preset)))
        return {}
    if args.memory:
        args.blocks = args.blocks or 1
        return run_memory_mode(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device; use --device cpu --small")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = args.n_res or ([16, 32, 48] if args.small else [256, 512, 1024, 2048, 3072, 4096])
    repeat, warmup = (1, 0) if args.small or device.type == "cpu" else (args.repeat or 3, 1)
    depth = {"num_evoformer_blocks": args.blocks, "num_extra_msa_blocks": 1} if args.blocks else {}
    model = build(args.preset, device, seed=0, **depth)
    params = sum(p.numel() for p in model.parameters())
    result = {"env": common.environment(device), "preset": args.preset, "parameters": params,
              "blocks": args.blocks, "repeat": repeat, "rows": []}  # fmt: skip
    eager_fits = True
    for n in sizes:
        row = {"N_res": n}
        for path in ("eager", "default"):
            if path == "eager" and not eager_fits:
                row["eager_ms"] = None
                continue
            r = run_path(model, path, n, device, repeat, warmup)
            if "error" in r:
                eager_fits = eager_fits and path != "eager"
                row[f"{path}_ms"] = "OOM"
                continue
            row[f"{path}_ms"], row[f"{path}_peak_mib"] = r["ms"], r["peak_mib"]
        if isinstance(row.get("eager_ms"), float) and isinstance(row.get("default_ms"), float):
            row["speedup"] = row["eager_ms"] / row["default_ms"]
            row["memory_ratio"] = row["eager_peak_mib"] / max(row["default_peak_mib"], 1e-9)
        print(f"  {row}", file=sys.stderr)
        result["rows"].append(row)
    if args.find_max:
        if device.type != "cuda":
            raise SystemExit("error: --find-max needs a CUDA device")
        result["max_n_res_bf16"] = find_max_n_res(model, device, start=max(sizes), step=args.step, limit=args.max_n_res)
        result["find_max"] = {"start": max(sizes), "step": args.step, "limit": args.max_n_res,
                              "at_limit": bool(args.max_n_res) and result["max_n_res_bf16"] == args.max_n_res}
    columns = ["N_res", "eager_ms", "default_ms", "speedup", "eager_peak_mib", "default_peak_mib", "memory_ratio"]
    print(f"\ndevice: {result['env']['device']}; {args.preset}, {params / 1e6:.1f}M parameters, "
          f"single-sequence MSA, one pass (num_recycle=0)\n")
    common.print_table(result["rows"], columns)
    if "max_n_res_bf16" in result:
        print(f"\nlongest N_res in bf16 (default path): {result['max_n_res_bf16']}")
    path = args.json or Path("benchmarks/results") / f"fastfold_inference-{args.device}{'-small' if args.small else ''}.json"
    print(f"\nwrote {common.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
