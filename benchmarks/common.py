"""Timing, peak-memory and reporting helpers shared by the benchmark scripts.

App-agnostic on purpose: it imports torch only, so any benchmark can use it. On CUDA, time
comes from events after a warm-up and peak memory from the caching allocator; on CPU from
perf_counter and the profiler's allocation records (tensor memory only).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

MIB = 1 << 20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Self memory puts each allocation on the op that made it and each free on a [memory]
    # record, so a running sum in time order is the live tensor memory added by fn.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Most tensor memory fn() holds at once beyond what was allocated before it ran."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(fn: Callable[[], object], device, *, warmup: int = 1, repeat: int = 5) -> dict:
    """{'ms': median time, 'peak_mib': peak extra memory}, or {'error': 'OOM'} when it does not fit."""
    try:
        ms = time_ms(fn, device, warmup=warmup, repeat=repeat)
        peak = peak_bytes(fn, device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return {"error": "OOM"}
    return {"ms": ms, "peak_mib": peak / MIB}


def matmul_tflops(device, dtype: torch.dtype, n: int, *, repeat: int = 5) -> float:
    """Achieved TFLOP/s of an n x n x n matmul: the compute ceiling measured in this run."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, repeat=repeat)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device, num_bytes: int, *, repeat: int = 5) -> float:
    """Achieved GB/s (read + write) of a device-to-device copy: the bandwidth ceiling."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, repeat=repeat)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device) -> dict:
    """Where and when a run happened, for the JSON (docs/benchmarks.md shows it beside the tables).
    The load average says how much else the machine was running: CPU timings need it."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": f"{device.type}: {name}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(rows: list[dict], columns: list[str], *, file=None) -> str:
    """A GitHub-markdown table of rows (missing keys print '-'); returns the text."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text


def write_json(path, payload: dict) -> Path:
    """Write payload as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
