"""The offloaded optimizer step: Ferryman's host AdamW against DeepSpeed's CPUAdam and the memory bandwidth.

Offloaded training (Gemini with optimizer state on the host, ZeRO-Offload) waits for the host
AdamW step, which streams 28 bytes per fp32 parameter (read parameter, gradient and two moments,
write parameter and moments). For each shard size (a flat fp32 shard holding parameters of about
1M elements and odd lengths, all stepped equally, as in a Gemini chunk) this times:

- ``ferryman``: ``host_adamw_`` (what ``ShardAdamW`` runs for host shards: one long fused call
  per run of parameters plus a few recomputed tail elements, numbers equal to per-parameter calls);
- ``views``: torch's fused AdamW over per-parameter views of the shard (Ferryman's step before);
- ``whole``: torch's fused AdamW over the shard as one tensor (the kernel's own bound);
- ``deepspeed``: ``DeepSpeedCPUAdam`` (AVX C++, OpenMP; ColossalAI's HybridAdam derives from it)
  on one flat fp32 parameter of the same size, as ZeRO-Offload flattens its partitions;
- ``copy``: a tensor copy of the same size, the machine's bandwidth (read + write).

The methods are timed in turns, one call each per round, and the median of the rounds is reported,
so that load from other processes falls on all of them alike. Ratios are throughputs against
DeepSpeed measured in the same run (``x_deepspeed`` > 1: faster).
DeepSpeed is a benchmark-only dependency (``pip install deepspeed``; it builds its CPU op with the
system compiler and ninja on first use, a minute or two); without it its column is skipped.

    python benchmarks/host_adam.py                      # sizes 1M .. 256M elements
    python benchmarks/host_adam.py --sizes 1,16,64 --repeat 9
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, print_table, write_json
from ferryman.core.gemini.host_adam import Piece, host_adamw_, vector_width

MI = 1 << 20
BYTES_PER_ELEMENT = 28  # AdamW reads p, g, m, v (16 B) and writes p, m, v (12 B) per fp32 element
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _round_robin(methods: dict, repeat: int) -> dict[str, float]:
    """Median ms of each method, timed in turns (one call of each per round) so that load from
    other processes falls on all of them alike; one untimed round first (page first touch, the
    DeepSpeed op's first call)."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeat + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if round_:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {f"{name}_ms": statistics.median(times) for name, times in samples.items()}


def _pieces(numel: int) -> list[Piece]:
    """Parameters of about 1M elements with odd lengths (so per-parameter tails exist), filling ``numel``."""
    count = max(1, numel // MI)
    lengths = [MI - 7 * (i % 5) - (i % 3) for i in range(count)]
    lengths[-1] += numel - sum(lengths)
    starts = [sum(lengths[:i]) for i in range(count)]
    return [Piece(i, s, s + n) for i, (s, n) in enumerate(zip(starts, lengths))]


def _methods(numel: int, with_deepspeed: bool) -> tuple[dict, int]:
    """The timed calls for a shard of ``numel`` elements, and its number of parameters."""
    tensors = (torch.randn(numel), torch.randn(numel) * 1e-3, torch.zeros(numel), torch.zeros(numel))
    pieces = _pieces(numel)
    steps = torch.full((len(pieces),), 1.0)
    hyper = dict(lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], weight_decay=HYPER["weight_decay"],
                 eps=HYPER["eps"], amsgrad=False, maximize=False)
    views = [[t[p.start : p.end] for p in pieces] for t in tensors]
    view_steps = [steps[p.slot] for p in pieces]
    whole = [[t] for t in tensors]
    dst = torch.empty_like(tensors[0])
    methods = {
        "ferryman": lambda: host_adamw_(*tensors, steps, pieces, **HYPER),
        "views": lambda: torch._fused_adamw_(*views, [], view_steps, **hyper),
        "whole": lambda: torch._fused_adamw_(*whole, [], [steps[0]], **hyper),
        "copy": lambda: dst.copy_(tensors[0]),
    }
    if with_deepspeed:
        methods["deepspeed"] = _deepspeed_step(numel)
    return methods, len(pieces)


def _deepspeed_step(numel: int):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(torch.randn(numel))
    param.grad = torch.randn(numel) * 1e-3
    opt = DeepSpeedCPUAdam([param], lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                           weight_decay=HYPER["weight_decay"], adamw_mode=True)
    return opt.step


def _deepspeed_version() -> str | None:
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


def _row(numel: int, timings: dict[str, float]) -> dict:
    gbps = lambda ms, nbytes: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    row = {"size_M": numel // MI, "params": timings["num_params"], **{k: v for k, v in timings.items() if k.endswith("_ms")}}
    row["ferryman_GBps"] = gbps(timings["ferryman_ms"], BYTES_PER_ELEMENT * numel)
    row["copy_GBps"] = gbps(timings["copy_ms"], 8 * numel)
    row["x_views"] = timings["views_ms"] / timings["ferryman_ms"]
    row["of_bandwidth"] = row["ferryman_GBps"] / row["copy_GBps"]
    if "deepspeed_ms" in timings:
        row["x_deepspeed"] = timings["deepspeed_ms"] / timings["ferryman_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16,64,256", help="shard sizes in Mi elements (fp32)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repeats per measurement; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", default="benchmarks/results/host_adam.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds_version = _deepspeed_version()
    if ds_version is None:
        print("deepspeed is not installed: its column is skipped (pip install deepspeed to compare)", flush=True)
    load_before = os.getloadavg()
    rows = []
    for numel in (int(s) * MI for s in args.sizes.split(",")):
        methods, num_params = _methods(numel, ds_version is not None)
        timings = _round_robin(methods, args.repeat) | {"num_params": num_params}
        del methods
        gc.collect()
        rows.append(_row(numel, timings))
        print(rows[-1], flush=True)
    columns = ["size_M", "params", "ferryman_ms", "views_ms", "whole_ms", "deepspeed_ms", "copy_ms",
               "ferryman_GBps", "copy_GBps", "of_bandwidth", "x_views", "x_deepspeed"]
    print()
    print_table(rows, columns)
    load_after = os.getloadavg()
    meta = {"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "deepspeed": ds_version, "lane_width": vector_width(), "repeat": args.repeat,
            "loadavg_before": load_before, "loadavg_after": load_after}
    print(f"\ntorch threads {meta['torch_threads']}, deepspeed {ds_version}, load average {load_before} -> {load_after}")
    write_json(args.json, {"env": environment("cpu"), "args": vars(args), "meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
