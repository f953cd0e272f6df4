"""Gemini vs plain mixed-precision AdamW vs FSDP2 + CPUOffloadPolicy on GPT-style models.

For each method, GPT-2-architecture models (transformers config, random weights) of growing size
are trained for a few steps; the table gives the step time, model TFLOP/s, MFU (GPU) and whether
the size fits, and the summary the largest size each method trains. Activation checkpointing is
on for every method, so the comparison is about where model state lives.

    python benchmarks/gemini.py                       # GPU: sequence 1024, sizes 125M .. 13B
    python benchmarks/gemini.py --device cpu --small  # CPU smoke run (a few minutes), notional budget

On a CPU "device" and "host" are one memory, so --small uses a notional device budget
(--budget-mib): plain fits when 16 B/param of model state plus its measured activations fit;
Gemini runs with ``device_budget_bytes`` set to the budget, and fits when its own accounting of
model data plus the activations it measured stay under it; FSDP2 offload cannot be placed against
a CPU budget (its "device" copy is the host copy), so only its speed is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, is_oom, print_table, synchronize, write_json
from benchmarks.memory_ladder import fits, largest_per_method
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.tracer import MemTracer
from ferryman.core.training.plain import PlainEngine

# (name, layers, hidden, heads): the GPT-2/GPT-3 ladder
GPU_SIZES = [
    ("125M", 12, 768, 12), ("350M", 24, 1024, 16), ("760M", 24, 1536, 16), ("1.3B", 24, 2048, 32),
    ("2.7B", 32, 2560, 32), ("4.1B", 36, 3072, 24), ("5.3B", 40, 3328, 26), ("6.7B", 32, 4096, 32),
    ("13B", 40, 5120, 40),
]
CPU_SIZES = [("0.2M", 2, 64, 2), ("0.8M", 3, 128, 4), ("2.3M", 4, 192, 4)]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build(layers: int, hidden: int, heads: int, seq: int, vocab: int):
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, n_positions=seq, vocab_size=vocab,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def model_flops(num_params: int, layers: int, hidden: int, seq: int, tokens: int) -> float:
    """Training FLOPs of one step without recomputation: 6N per token plus attention scores."""
    return tokens * (6 * num_params + 12 * layers * hidden * seq)


def _ensure_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def make_engine(method: str, model, device: torch.device, budget: int):
    optim = OptimConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0)
    if method == "plain":
        return PlainEngine(model, optim, torch.bfloat16, device)
    if method == "gemini":
        cfg = GeminiConfig(placement="auto", precision="bf16", device_budget_bytes=budget)
        return gemini(model, cfg, optim, device=device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _ensure_group(device)
    mesh = init_device_mesh(device.type, (1,))
    policy = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda"),
    )
    for block in model.transformer.h:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    return _FSDPEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True))


class _FSDPEngine:
    def __init__(self, model, optimizer) -> None:
        self.module, self.optimizer = model, optimizer

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


def run_one(method: str, size: tuple, args, device: torch.device) -> dict:
    name, layers, hidden, heads = size
    row = {"method": method, "size": name}
    budget = args.budget_mib * 2**20 if device.type == "cpu" else 0
    need_host = 0
    try:
        model = build(layers, hidden, heads, args.seq, args.vocab)
        num_params = sum(p.numel() for p in model.parameters())
        need_host = 20 * num_params if method != "plain" else 0
        if need_host > psutil.virtual_memory().available * 0.85:
            return row | {"params_M": num_params / 1e6, "fits": "no (host RAM)"}
        engine = make_engine(method, model, device, budget)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        tracer, activation_bytes, times = MemTracer(), 0, []
        for step in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            probe = contextlib.nullcontext()
            if step == 0 and method == "plain":  # activations saved for backward, weights excluded
                weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
                probe = tracer.saved_tensor_hooks(lambda t, w=weights: t.untyped_storage().data_ptr() in w)
            with probe:
                loss = engine(input_ids=ids, labels=ids).loss
            activation_bytes = max(activation_bytes, tracer.saved_bytes)  # forward only adds
            engine.backward(loss)
            engine.step()
            engine.zero_grad()
            synchronize(device)
            times.append(time.perf_counter() - start)
        step_s = sorted(times[1:])[len(times[1:]) // 2]
        tflops = model_flops(num_params, layers, hidden, args.seq, args.batch * args.seq) / step_s / 1e12
        row |= {"params_M": num_params / 1e6, "step_s": step_s, "tflops": tflops, "loss": loss.item()}
        row |= fits(method, engine, device, budget, num_params, activation_bytes)
        peak = PEAK_TFLOPS.get(next((k for k in PEAK_TFLOPS if k in environment(device)["device"]), ""))
        if device.type == "cuda":
            row["mfu"] = tflops / peak if peak else None
            row["gpu_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as exc:  # an OOM (or a Gemini budget refusal) means: does not fit
        if not (is_oom(exc) or type(exc).__name__ == "UserError"):
            raise
        row["fits"] = "no (OOM)" if is_oom(exc) else "no (budget)"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes and sequence 64 (CPU smoke run)")
    parser.add_argument("--methods", default="plain,gemini,fsdp2")
    parser.add_argument("--sizes", default="", help="comma-separated size names to run (default: all)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per run; the first is not timed")
    parser.add_argument("--budget-mib", type=float, default=12.0, help="notional device budget on CPU")
    parser.add_argument("--json", default="benchmarks/results/gemini.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = args.small or device.type == "cpu"
    args.seq = args.seq or (64 if small else 1024)
    args.batch = args.batch or (2 if small else 8)
    args.vocab = args.vocab or (512 if small else 50304)
    args.steps = args.steps or (3 if small else 6)
    sizes = CPU_SIZES if small else GPU_SIZES
    if args.sizes:
        sizes = [s for s in sizes if s[0] in args.sizes.split(",")]
    rows = []
    for method in args.methods.split(","):
        for size in sizes:
            row = run_one(method, size, args, device)
            rows.append(row)
            print(row, flush=True)
            if str(row.get("fits", "")).startswith("no") and device.type == "cuda":
                break  # larger sizes will not fit either
    columns = ["method", "size", "params_M", "step_s", "tflops", "mfu", "fits", "device_MiB", "gpu_peak_GiB", "loss"]
    print()
    print_table(rows, columns)
    summary = largest_per_method(rows, [s[0] for s in sizes])
    print()
    print_table(summary, ["method", "largest", "largest_M", "x_plain"])
    write_json(args.json, {"env": environment(device), "args": vars(args), "rows": rows, "largest": summary})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
