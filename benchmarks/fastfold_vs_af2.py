"""Ferryman's AlphaFold2 forward against AlphaFold2's own JAX code, in one process.

    python benchmarks/fastfold_vs_af2.py                          # CPU: N_res 64 128 256 512, full size
    python benchmarks/fastfold_vs_af2.py --n-res 512 --blocks 8   # reduced depth on both sides (say so)
    python benchmarks/fastfold_vs_af2.py --memory --n-res 512     # peak RSS, fresh process per point

Both models are model_1_ptm at full size (48 Evoformer blocks unless ``--blocks``) with the same
random weights in the official npz layout (0.15/sqrt(fan_in) in the trunk, as the parity suite,
so neither side runs on denormals or a chaotic network), fed the same processed features of a
random sequence: single sequence (one MSA row, one masked extra-MSA row), no templates, no
recycling. AlphaFold2 is ``alphafold-colabfold`` (the ``parity`` extra) in fp32 as the parity
suite runs it (``AlphaFold_noE`` under ``jax.jit``, no subbatching); Ferryman is its default
inference path (``RunOptions()``, ``pair_logits=False``), plus ``RunOptions(compile=True)`` with
``--compile``. Each N_res: AF2's first call compiles (timed apart, as is each Ferryman variant's
first call), then AF2 and the Ferryman variants run in turn ``--repeat`` times. The table gives
median CPU seconds of the process per call (``*_s``: on a shared machine the steadier measure,
since waiting for a core is not counted) and median wall seconds (``*_wall_s``), the median over
rounds of Ferryman's time over AF2's in the same round (``*_ratio``, CPU; ``*_wall_ratio``), the
median over rounds of AF2's time over Ferryman's (``*_speedup``: CPU time on the CPU, wall time on a
GPU, where CPU time only measures how each side waits for the device) and the largest
atom-position difference from AF2's output.

Threads: ``--threads`` for both (torch.set_num_threads; XLA's Eigen pool off at 1, and the
process pinned to that many CPUs). ``--memory`` runs every (implementation, N_res) in a fresh
process with glibc serving allocations over 1 MiB by mmap, and reports the resident high-water
mark of the second (timed) call above the resident size before it (VmHWM - VmRSS, in MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import ferryman  # noqa: E402,F401  (before torch allocates: it turns on PyTorch's huge-page CPU allocations)

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def _set_threads(threads: int, device: str) -> None:
    """Before jax and torch are imported: the same number of CPU threads on both sides."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    eigen = "false" if threads == 1 else "true"
    flags = f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def features(n_res: int, seed: int = 0) -> dict:
    """Processed single-sequence features of a random sequence (numpy), as fastfold predict makes them."""
    import numpy as np

    from ferryman.apps.fastfold.common import residue_constants as rc
    from ferryman.apps.fastfold.data.features import make_features
    from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs

    rng = np.random.default_rng(seed)
    sequence = "".join(rng.choice(list(rc.restypes), n_res))
    raw = make_features(sequence, "random", [], None)
    feats = make_model_inputs(raw, InputConfig(max_msa_clusters=1, max_extra_msa=1, max_templates=0), seed)
    if feats["extra_msa"].shape[0] == 0:  # AF2 pads the extra MSA; one masked row stands for it
        for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
            feats[key] = np.zeros((1, *feats[key].shape[1:]), feats[key].dtype)
    return {k: v for k, v in feats.items() if not k.startswith("template_")}


class Pair:
    """Both implementations with the same weights: ``af2(feats)`` and ``ferryman(feats)`` return
    final atom positions (numpy) and block until they are computed."""

    def __init__(self, blocks: int, device: str, compile: bool = False, seed: int = 0):
        import jax
        import torch

        from ferryman.apps.fastfold.model import RunOptions
        from ferryman.apps.fastfold.presets import alphafold
        from tests.apps.fastfold.parity._af2 import (
            af2_config,
            ferryman_model,
            haiku_params,
            random_official_params,
            whole_model,
        )
        from tests.apps.fastfold.parity._inputs import OUTPUT_SCALES, WHOLE_MODEL_SCALE

        self.cfg = alphafold("model_1_ptm", num_recycle=0, num_evoformer_blocks=blocks)
        c = af2_config(self.cfg)
        c.embeddings_and_evoformer.template.enabled = False  # no template features: both skip the embedder
        params = random_official_params(self.cfg, scale=WHOLE_MODEL_SCALE, scales=OUTPUT_SCALES, seed=seed)
        self.hparams = jax.device_put(haiku_params(params))
        self.apply = whole_model(c)
        self.device = torch.device(device)
        self.model = ferryman_model(self.cfg, params, RunOptions(compile=compile)).to(self.device)
        self.torch, self.jax = torch, jax

    def af2(self, feats: dict):
        import jax.numpy as jnp
        import numpy as np

        from tests.apps.fastfold.parity._inputs import to_af2

        n = feats["aatype"].shape[0]
        prev = {"prev_msa_first_row": jnp.zeros((n, self.cfg.c_m)), "prev_pair": jnp.zeros((n, n, self.cfg.c_z)),
                "prev_pos": jnp.zeros((n, 37, 3))}  # fmt: skip
        out = self.apply(self.hparams, {**to_af2(feats, templates=False), "prev": prev})
        return np.asarray(out["structure_module"]["final_atom_positions"])

    def use(self, compile: bool) -> None:
        from ferryman.apps.fastfold.model import RunOptions, apply_run_options

        apply_run_options(self.model, RunOptions(compile=compile))

    def ferryman(self, feats: dict):
        torch = self.torch
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in feats.items() if v.dtype != object}
        with torch.inference_mode():
            out = self.model(batch, num_recycle=0, pair_logits=False)["final_atom_positions"]
        return out.cpu().numpy()


def _clock(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _cpu_and_wall(fn, *args) -> tuple[float, float]:
    """CPU seconds of this process (all threads) and wall seconds of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn(*args)
    return time.process_time() - c0, time.perf_counter() - t0


def time_point(pair: Pair, n_res: int, repeat: int, variants: dict[str, bool]) -> dict:
    """AF2 and each Ferryman variant (name -> compile) in turn, ``repeat`` rounds after a first call each."""
    import numpy as np

    feats = features(n_res)
    mask = feats["atom37_atom_exists"][..., None]
    row = {"N_res": n_res}
    row["af2_first_call_s"], ref = _clock(pair.af2, feats)
    for name, compile in variants.items():
        pair.use(compile)
        row[f"{name}_first_call_s"], ours = _clock(pair.ferryman, feats)
        row[f"{name}_max_atom_diff_A"] = float(np.abs((ours - ref) * mask).max())
    cpu, wall = {name: [] for name in ("af2", *variants)}, {name: [] for name in ("af2", *variants)}
    for _ in range(repeat):
        for name, compile in {"af2": None, **variants}.items():
            if compile is not None:
                pair.use(compile)
            c, w = _cpu_and_wall(pair.af2 if compile is None else pair.ferryman, feats)
            cpu[name].append(c)
            wall[name].append(w)
    for name in cpu:
        row[f"{name}_s"], row[f"{name}_wall_s"] = statistics.median(cpu[name]), statistics.median(wall[name])
        row[f"{name}_all_s"], row[f"{name}_all_wall_s"] = cpu[name], wall[name]
        if name != "af2":  # per round: the two ran back to back, under the same load
            row[f"{name}_ratio"] = statistics.median(f / a for f, a in zip(cpu[name], cpu["af2"], strict=True))
            row[f"{name}_wall_ratio"] = statistics.median(f / a for f, a in zip(wall[name], wall["af2"], strict=True))
            # On a GPU, CPU time measures how each framework waits for the device: wall time there.
            times = wall if pair.device.type == "cuda" else cpu
            row[f"{name}_speedup"] = statistics.median(a / f for f, a in zip(times[name], times["af2"], strict=True))
    return row


def _thp_host() -> str:
    """The kernel's transparent-huge-page mode: with 'madvise' only allocations that ask get huge
    pages (PyTorch's, with THP_MEM_ALLOC_ENABLE=1; not XLA's); with 'always' both sides get them."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.is_file() else ""
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), "unknown")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_point(impl: str, n_res: int, blocks: int, compile: bool) -> dict:
    """Peak resident memory of one forward (the second call), meant for a fresh process."""
    pair = Pair(blocks, "cpu", compile=compile)
    fn = pair.af2 if impl == "af2" else pair.ferryman
    feats = features(n_res)
    first = time.perf_counter()
    fn(feats)  # AF2 compiles here; lazily built state on both sides goes into the base
    first = time.perf_counter() - first
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    base = _status_kib("VmRSS")
    seconds, _ = _clock(fn, feats)
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024, "s": seconds, "first_call_s": first}


def run_memory(args) -> dict:

    rows = []
    env = {**os.environ, **_MALLOC_ENV}
    impls = ([] if args.skip_af2 else ["af2"]) + ["ferryman"] + (["ferryman_compiled"] if args.compile else [])
    for n in args.n_res:
        row = {"N_res": n}
        for impl in impls:
            cmd = [sys.executable, __file__, "--memory-point", impl.removesuffix("_compiled"), str(n),
                   "--blocks", str(args.blocks), "--threads", str(args.threads)] + (["--compile"] if "compiled" in impl else [])  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: memory point {impl} N_res={n} failed:\n{proc.stderr[-3000:]}")
            point = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update({f"{impl}_peak_mib": point["peak_mib"], f"{impl}_s": point["s"]})
        print(f"  {row}", file=sys.stderr, flush=True)
        rows.append(row)
    columns = ["N_res", *(f"{i}_peak_mib" for i in impls), *(f"{i}_s" for i in impls)]
    return {"rows": rows, "columns": columns, "method": "VmHWM - VmRSS around the second call, fresh process, "
            "mmap threshold 1 MiB"}  # fmt: skip


def run_timing(args) -> dict:
    pair = Pair(args.blocks, args.device)
    variants = {"ferryman": False, **({"compiled": True} if args.compile else {})}
    rows = []
    for n in args.n_res:
        rows.append(time_point(pair, n, args.repeat, variants))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    columns = ["N_res", "af2_s", "af2_wall_s", "af2_first_call_s"]
    for name in variants:
        columns += [f"{name}_s", f"{name}_wall_s", f"{name}_ratio", f"{name}_wall_ratio", f"{name}_speedup",
                    f"{name}_first_call_s", f"{name}_max_atom_diff_A"]  # fmt: skip
    return {"rows": rows, "columns": columns}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n-res", type=int, nargs="*", help="default 64 128 256 512 (CPU), up to 2048 (CUDA)")
    parser.add_argument("--blocks", type=int, default=48, help="Evoformer blocks on both sides (48: full size)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both (default 1: a shared machine)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds per N_res (median reported)")
    parser.add_argument("--compile", action="store_true", help="also time Ferryman with RunOptions(compile=True)")
    parser.add_argument("--memory", action="store_true", help="peak resident memory per point, fresh processes (CPU)")
    parser.add_argument("--skip-af2", action="store_true", help="--memory: Ferryman only (e.g. against an older checkout)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/fastfold_vs_af2-<device>[-memory].json")
    parser.add_argument("--memory-point", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _set_threads(args.threads, args.device)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_point:
        impl, n = args.memory_point
        print(json.dumps(memory_point(impl, int(n), args.blocks, args.compile)))
        return {}
    import common

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device")
    args.n_res = args.n_res or ([64, 128, 256, 512] if args.device == "cpu" else [128, 256, 512, 1024, 2048])
    result = run_memory(args) if args.memory else run_timing(args)
    result.update(env=common.environment(args.device), threads=args.threads, blocks=args.blocks,
                  full_size=args.blocks == 48, thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"),
                  thp_host=_thp_host(), speedup_clock="wall" if args.device == "cuda" else "cpu", preset="model_1_ptm", inputs="single sequence, no templates, "
                  "num_recycle=0", af2="alphafold-colabfold fp32, AlphaFold_noE under jax.jit, no subbatching")  # fmt: skip
    depth = "full size" if args.blocks == 48 else f"{args.blocks} Evoformer blocks on both sides (not full size)"
    print(f"\n{result['env']['device']}; model_1_ptm, {depth}; {args.threads} thread(s); single sequence, "
          "no templates, no recycling\n")
    common.print_table(result["rows"], result.pop("columns"))
    suffix = "-memory" if args.memory else ""
    path = args.json or ROOT / "benchmarks" / "results" / f"fastfold_vs_af2-{args.device}{suffix}.json"
    print(f"\nwrote {common.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
