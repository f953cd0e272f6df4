"""The largest causal LM each method finetunes on one device within a memory budget, and its tokens/s.

Methods: ``plain`` (Ferryman's plain engine: the model on the device, bf16 autocast, fused torch
AdamW: `ferryman finetune --memory plain`), ``gemini`` (Gemini auto placement, bf16, device budget:
`--memory gemini-auto`), ``fsdp2`` (``fully_shard`` per decoder layer with ``CPUOffloadPolicy`` and
bf16 ``MixedPrecisionPolicy``, torch AdamW on the host) and ``deepspeed`` (ZeRO-Offload: stage 2
with the optimizer and its step on the host, DeepSpeedCPUAdam, bf16). Models are Llama-architecture
(transformers config, random weights made lazily: no method holds an extra host copy), with
activation checkpointing for every method, so the comparison is about where model state lives.

    python benchmarks/lm_finetune.py                              # GPU: budget 16 GiB, Llama 125M .. 6.7B
    python benchmarks/lm_finetune.py --budget-gib 4 --sizes 125M,760M --methods plain,gemini,fsdp2
    python benchmarks/lm_finetune.py --device cpu --small         # CPU, notional budget, tiny ladder

On a GPU the budget is enforced: the caching allocator is capped at it
(``set_per_process_memory_fraction``) for every method and Gemini also plans under it; a size
fits when three updates run. On a CPU "device" and host are one memory, so the budget is
notional (as in benchmarks/gemini.py): plain fits when 16 bytes per parameter of model state plus
its measured activations fit; Gemini when its own accounting of model data plus the activations it
measured stay under it; FSDP2 and DeepSpeed offload cannot be placed against a CPU budget (their
device copy is the host copy), so only their speed is reported. A method whose package is missing
or that cannot run on the device is skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import sys
import time
import zlib
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, is_oom, print_table, synchronize, write_json
from benchmarks.memory_ladder import fits, largest_per_method
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.lazy import empty_weights, load_later, materialize
from ferryman.core.gemini.tracer import MemTracer
from ferryman.core.training.plain import PlainEngine

# (name, layers, hidden, heads, intermediate): Llama/OPT-style widths; vocab 32000
GPU_SIZES = [
    ("125M", 12, 768, 12, 2048), ("350M", 24, 1024, 16, 2816), ("760M", 24, 1536, 16, 4096),
    ("1.3B", 24, 2048, 16, 5504), ("2.7B", 32, 2560, 20, 6912), ("4B", 36, 3072, 24, 8192),
    ("6.7B", 32, 4096, 32, 11008),
]
CPU_SIZES = [("0.3M", 2, 64, 2, 128), ("1.2M", 4, 128, 4, 256), ("3.5M", 4, 256, 4, 512), ("11M", 6, 384, 6, 1024)]
METHODS = ("plain", "gemini", "fsdp2", "deepspeed")
HOST_BYTES = {"plain": 4, "gemini": 20, "fsdp2": 20, "deepspeed": 20}  # per parameter, at their peak


class RandomWeights:
    """A weight source for ``load_later``: each tensor made when an engine reads it (1-D ones,
    the rest N(0, 0.02)), seeded by its name, so every method trains the same model."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes, self.source = shapes, "random weights"

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def read(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if len(shape) == 1:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)


def build(size: tuple, args) -> torch.nn.Module:
    """The model on the meta device, its random weights deferred to the engine."""
    import transformers

    _, layers, hidden, heads, inter = size
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                   num_key_value_heads=heads, intermediate_size=inter, vocab_size=args.vocab,
                                   max_position_embeddings=args.seq, use_cache=False)
    with empty_weights():
        model = transformers.LlamaForCausalLM(cfg)
    load_later(model, RandomWeights({n: tuple(p.shape) for n, p in model.named_parameters()}))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _ensure_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class _Wrapped:
    """FSDP2 and DeepSpeed behind the engine calls the timing loop makes."""

    def __init__(self, module, backward, step) -> None:
        self.module, self._backward, self._step = module, backward, step

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss) -> None:
        self._backward(loss)

    def step(self) -> None:
        self._step()

    def zero_grad(self) -> None:
        """Each wrapper's step clears its gradients."""


def make_engine(method: str, model, device: torch.device, budget: int):
    optim = OptimConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=1.0)
    if method == "plain":
        return PlainEngine(model, optim, torch.bfloat16, device)
    if method == "gemini":
        return gemini(model, GeminiConfig(placement="auto", precision="bf16", device_budget_bytes=budget), optim,
                      device=device)
    materialize(model, torch.device("cpu"))  # both keep the master weights on the host
    _ensure_group(device)
    if method == "fsdp2":
        return _fsdp2(model, device)
    return _deepspeed(model, device)


def _fsdp2(model, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policy = dict(mesh=init_device_mesh(device.type, (1,)),
                  mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda"))
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _Wrapped(model, lambda loss: loss.backward(), step)


def _deepspeed(model, device: torch.device):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": device.type == "cuda"}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      dist_init_required=False)
    return _Wrapped(engine, engine.backward, engine.step)


def skip_reason(method: str, device: torch.device) -> str | None:
    """Why a method cannot run here (None: it can)."""
    if method == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return "DeepSpeed is not installed (pip install deepspeed)"
    if method == "fsdp2":
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: F401
        except ImportError:
            return f"this torch ({torch.__version__}) has no FSDP2 fully_shard/CPUOffloadPolicy"
    return None


def run_one(method: str, size: tuple, args, device: torch.device) -> dict:
    row = {"method": method, "size": size[0]}
    budget = int(args.budget_gib * 2**30)
    try:
        model = build(size, args)
        num_params = sum(p.numel() for p in model.parameters())
        row["params_M"] = num_params / 1e6
        if HOST_BYTES[method] * num_params > psutil.virtual_memory().available * 0.85:
            return row | {"fits": "no (host RAM)"}
        try:
            engine = make_engine(method, model, device, budget)
        except Exception as exc:  # a peer that cannot run on this device says so and is skipped
            if is_oom(exc) or type(exc).__name__ == "UserError" or method in ("plain", "gemini"):
                raise
            return row | {"fits": f"skipped: cannot run here ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})"}
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        tracer, activation_bytes, times = MemTracer(), 0, []
        for step in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            probe = contextlib.nullcontext()
            if step == 0 and method == "plain" and device.type == "cpu":  # activations saved for backward
                weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
                probe = tracer.saved_tensor_hooks(lambda t, w=weights: t.untyped_storage().data_ptr() in w)
            with probe:
                loss = engine(input_ids=ids, labels=ids).loss
            activation_bytes = max(activation_bytes, tracer.saved_bytes)
            engine.backward(loss)
            engine.step()
            engine.zero_grad()
            synchronize(device)
            times.append(time.perf_counter() - start)
        step_s = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        row |= {"step_s": step_s, "tokens_s": args.batch * args.seq / step_s, "loss": loss.item()}
        row |= fits(method, engine, device, budget, num_params, activation_bytes)
    except Exception as exc:  # an OOM (or Gemini refusing the budget) means: does not fit
        if not (is_oom(exc) or type(exc).__name__ == "UserError"):
            raise
        row["fits"] = "no (OOM)" if is_oom(exc) else "no (budget)"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return row


def versus(rows: list[dict]) -> list[dict]:
    """Gemini's tokens/s over each baseline's at every size both ran."""
    by = {(r["method"], r["size"]): r for r in rows if r.get("tokens_s")}
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        gem = by.get(("gemini", size))
        if gem is None:
            continue
        row = {"size": size, "params_M": gem["params_M"], "both_fit": True}
        for base in ("plain", "fsdp2", "deepspeed"):
            other = by.get((base, size))
            row[f"gemini / {base}"] = gem["tokens_s"] / other["tokens_s"] if other else None
            if other and base == "fsdp2":
                row["both_fit"] = {gem.get("fits"), other.get("fits")} <= {"yes", "n/a (CPU)"}
        out.append(row)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny ladder, sequence 64 (the CPU run)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sizes", default="", help="comma-separated size names (default: the whole ladder)")
    parser.add_argument("--budget-gib", type=float, default=None, help="device memory budget (GPU: 16; CPU: 0.03)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="updates per run; the first is not timed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="result file (default: benchmarks/results/lm_finetune-<device>.json)")
    args = parser.parse_args()
    small = args.small or args.device == "cpu"
    args.seq = args.seq or (64 if small else 1024)
    args.batch = args.batch or (2 if small else 4)
    args.vocab = args.vocab or (512 if small else 32000)
    args.steps = args.steps or 3
    args.budget_gib = args.budget_gib or (0.03 if small else 16.0)
    args.json = args.json or f"benchmarks/results/lm_finetune-{torch.device(args.device).type}.json"
    args.ladder = [s for s in (CPU_SIZES if small else GPU_SIZES) if not args.sizes or s[0] in args.sizes.split(",")]
    return args


def main() -> None:
    args = parse_args()
    device, sizes = torch.device(args.device), args.ladder
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # every method lives within the budget
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
    rows = []
    for method in args.methods.split(","):
        why = skip_reason(method, device)
        if why:
            print(f"{method}: skipped: {why}", flush=True)
            rows.append({"method": method, "size": "-", "fits": f"skipped: {why}"})
            continue
        for size in sizes:
            row = run_one(method, size, args, device)
            rows.append(row)
            print(row, flush=True)
            if str(row.get("fits", "")).startswith("skipped"):
                print(f"{method}: {row['fits']}", flush=True)
                break
            if str(row.get("fits", "")).startswith("no") and device.type == "cuda":
                break  # larger sizes will not fit either
    print()
    print_table(rows, ["method", "size", "params_M", "fits", "step_s", "tokens_s", "device_MiB", "loss"])
    largest, ratios = largest_per_method(rows, [s[0] for s in sizes]), versus(rows)
    print()
    print_table(largest, ["method", "largest", "largest_M", "x_plain", "tokens_s"])
    print()
    print_table(ratios, ["size", "params_M", "gemini / plain", "gemini / fsdp2", "gemini / deepspeed"])
    write_json(args.json, {"env": environment(device), "args": vars(args), "rows": rows, "largest": largest,
                           "throughput": ratios})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
