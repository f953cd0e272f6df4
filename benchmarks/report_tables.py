"""How each benchmark's JSON becomes tables, and which targets its issue set: used by report.py.

A renderer turns one result JSON into blocks (a paragraph string, or a ``(caption, rows, columns)``
table); a target turns a GPU result into ``(measured, holds)``, with ``holds`` None where the run
could not decide it (a ladder too short) or the issue set no bar. A benchmark without an entry here
is rendered generically (every list of records in its JSON becomes a table), so a new script shows
up on the page before anyone writes a renderer for it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

Block = str | tuple[str, list[dict], list[str]]


@dataclass(frozen=True, kw_only=True)
class Target:
    text: str
    measure: Callable[[dict], tuple[str, bool | None]]


@dataclass(frozen=True, kw_only=True)
class Bench:
    key: str  # the script's stem (benchmarks/<key>.py) and the GPU check's step name
    title: str
    render: Callable[[dict], list[Block]] | None = None
    targets: tuple[Target, ...] = ()


def fmt(value, digits: int = 3) -> str:
    """Three significant digits; thousands with separators; '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int) and 1000 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return " ".join(fmt(v) for v in value)
    return str(value)


def records(payload: dict) -> list[Block]:
    """Every list of records in a JSON, as a table of its scalar fields."""
    blocks: list[Block] = []
    for key, value in payload.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for row in value for k, v in row.items() if not isinstance(v, dict | list)))
            blocks.append((key.replace("_", " ").capitalize(), value, columns))
    return blocks


def _bar(value: float | None, bar: float, *, at_least: bool = True, unit: str = "x") -> tuple[str, bool | None]:
    if value is None:
        return "not in this run", None
    return f"{fmt(value)}{unit}", value >= bar if at_least else value <= bar


# ---------------------------------------------------------------------------------- fastfold_vs_af2
def fastfold_vs_af2(p: dict) -> list[Block]:
    depth = "full size (48 Evoformer blocks)" if p.get("full_size") else f"{p.get('blocks')} Evoformer blocks on both sides"
    facts = (f"{p.get('preset')}, {depth}, 4 extra-MSA blocks; {p.get('inputs')}; {p.get('threads')} CPU thread(s) "
             f"for both; AF2: {p.get('af2')}; PyTorch huge-page allocations: {p.get('thp_mem_alloc') or 'off'} "
             f"(kernel THP mode: {p.get('thp_host', 'not recorded')}).")  # fmt: skip
    if "method" in p:  # --memory
        columns = ["N_res", *(c for c in ("af2_peak_mib", "ferryman_peak_mib", "ferryman_compiled_peak_mib")
                              if any(c in r for r in p.get("rows", [])))]  # fmt: skip
        return [f"{facts} Peak = {p['method']}.", ("Peak memory of one forward (MiB)", p.get("rows", []), columns)]
    rows = p.get("rows", [])
    columns = ["N_res", "af2_s", "ferryman_s", "ferryman_speedup", "ferryman_max_atom_diff_A"]
    if any("compiled_s" in r for r in rows):
        columns += ["compiled_s", "compiled_speedup", "compiled_first_call_s"]
    columns.append("af2_first_call_s")
    clock = "wall" if p.get("speedup_clock") == "wall" else "CPU"
    return [facts, (f"Seconds per forward (median CPU time of the process; speedup = median over rounds of AF2 time / "
                    f"Ferryman time in the same round, {clock} time)", rows, columns)]  # fmt: skip


def _af2_speedup(p: dict) -> tuple[str, bool | None]:
    rows = [r for r in p.get("rows", []) if "ferryman_speedup" in r]
    if not rows:
        return "not in this run", None
    low = min(rows, key=lambda r: r["ferryman_speedup"])
    return f"{fmt(low['ferryman_speedup'])}x (lowest, at N_res {low['N_res']})", None


# ------------------------------------------------------------------------------------------ kernels
def _ms(row: dict, impl: str, key: str):
    return row.get(impl, {}).get(key, {}).get("ms")


def _speedup(row: dict, base: str, key: str = "fwd_bwd"):
    fused, other = _ms(row, "fused", key), _ms(row, base, key)
    return other / fused if fused and other else None


def _triple(row: dict, impls, key: str, field: str = "ms") -> str:
    cells = []
    for impl in impls:
        entry = row.get(impl, {}).get(key, {})
        cells.append(fmt(entry.get(field, entry.get("error"))))
    return " / ".join(cells)


def _kernel_table(rows: list[dict], impls: tuple[str, ...], bandwidth: bool) -> tuple[list[dict], list[str]]:
    label = "/".join(impls)
    out = []
    for r in rows:
        row = {"case": r["case"], f"fwd ms {label}": _triple(r, impls, "fwd"),
               f"fwd+bwd ms {label}": _triple(r, impls, "fwd_bwd"), "fwd+bwd x eager": _speedup(r, "eager")}
        if not bandwidth:
            row["fwd+bwd x sdpa"] = _speedup(r, "sdpa")
        row[f"peak MiB {label}"] = _triple(r, impls, "fwd_bwd", "peak_mib")
        if bandwidth:
            row |= {"GB/s fwd": r.get("fused_gbps_fwd"), "% copy fwd": r.get("pct_of_copy_fwd"),
                    "GB/s fwd+bwd": r.get("fused_gbps_fwd_bwd"), "% copy fwd+bwd": r.get("pct_of_copy_fwd_bwd")}  # fmt: skip
        else:
            row |= {"TFLOP/s fwd+bwd": r.get("fused_tflops_fwd_bwd"), "% matmul": r.get("pct_of_matmul_peak")}
        out.append(row)
    return out, list(out[0]) if out else []


def kernels(p: dict) -> list[Block]:
    blocks: list[Block] = [f"dtype {p.get('dtype', '-')}; measured in the same run: matmul "
                           f"{fmt(p.get('matmul_peak_tflops'))} TFLOP/s ({p.get('matmul_peak_dtype', '-')}), "
                           f"copy {fmt(p.get('copy_gbps'))} GB/s."]  # fmt: skip
    for op, caption, impls in (("attention", "Attention (fused / eager / SDPA)", ("fused", "eager", "sdpa")),
                               ("softmax", "Softmax with pair bias and mask (fused / eager)", ("fused", "eager")),
                               ("layer_norm", "LayerNorm (fused / eager / F.layer_norm)", ("fused", "eager", "torch"))):  # fmt: skip
        if p.get(op):
            blocks.append((caption, *_kernel_table(p[op], impls, op != "attention")))
    return blocks


def _af2(p: dict) -> list[dict]:
    return [r for r in p.get("attention", []) if r["case"].startswith("af2_")]


def _min(values) -> float | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


def _scaling(p: dict) -> tuple[str, bool | None]:
    rows = sorted((r for r in p.get("attention", []) if r["case"].startswith("scaling")), key=lambda r: r["k_len"])
    peaks = [r.get("fused", {}).get("fwd_bwd", {}).get("peak_mib") for r in rows]
    steps = [b / a for a, b in itertools.pairwise(peaks) if a and b]
    if not steps:
        return "not in this run", None
    return f"x{fmt(max(steps))} per doubling of K (linear: 2, quadratic: 4)", max(steps) <= 2.5


KERNEL_TARGETS = (
    Target(text="attention with pair bias, fwd+bwd >= 2x the eager reference (every AF2 case)",
           measure=lambda p: _bar(_min(_speedup(r, "eager") for r in _af2(p)), 2.0)),
    Target(text="attention with pair bias, fwd+bwd >= 1.2x SDPA given the same bias (every AF2 case)",
           measure=lambda p: _bar(_min(_speedup(r, "sdpa") for r in _af2(p)), 1.2)),
    Target(text="attention peak memory linear in key length", measure=_scaling),
    Target(text="softmax forward >= 70% of the measured copy bandwidth (every case)",
           measure=lambda p: _bar(_min(r.get("pct_of_copy_fwd") for r in p.get("softmax", [])), 70, unit="%")),
    Target(text="LayerNorm forward >= 70% of the measured copy bandwidth (every case)",
           measure=lambda p: _bar(_min(r.get("pct_of_copy_fwd") for r in p.get("layer_norm", [])), 70, unit="%")),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- gemini
def _gemini_ratios(p: dict) -> list[dict]:
    by = {(r["method"], r["size"]): r for r in p.get("rows", []) if r.get("tflops")}
    out = []
    for size in dict.fromkeys(r["size"] for r in p.get("rows", [])):
        gem = by.get(("gemini", size))
        row = {"size": size}
        for base in ("plain", "fsdp2"):
            other = by.get((base, size))
            row[f"gemini / {base} throughput"] = gem["tflops"] / other["tflops"] if gem and other else None
        out.append(row)
    return out


def gemini(p: dict) -> list[Block]:
    columns = ["method", "size", "params_M", "step_s", "tflops", "mfu", "fits", "device_MiB", "gpu_peak_GiB", "loss"]
    return [("Per method and size", p.get("rows", []), columns),
            ("Throughput against the baselines (model TFLOP/s ratio, same size)", _gemini_ratios(p),
             ["size", "gemini / plain throughput", "gemini / fsdp2 throughput"]),
            ("Largest size trained", p.get("largest", []), ["method", "largest", "largest_M", "x_plain"])]  # fmt: skip


def _largest_x(p: dict) -> tuple[str, bool | None]:
    largest = {r["method"]: r for r in p.get("largest", [])}
    plain, gem = largest.get("plain", {}), largest.get("gemini", {})
    if not gem.get("largest_M"):
        return "not in this run", None
    if str(plain.get("largest", "")).startswith(">="):
        return f"not decided: plain trained the top of this ladder ({plain['largest']})", None
    x = gem.get("x_plain")
    if x is not None and x < 5 and str(gem["largest"]).startswith(">="):
        return f">= {fmt(x)}x (Gemini trained the top of this ladder)", None
    return _bar(x, 5.0)


def _vs_fsdp2(p: dict) -> tuple[str, bool | None]:
    ratios = [r for r in _gemini_ratios(p) if r["gemini / fsdp2 throughput"] is not None]
    if not ratios:
        return "not in this run", None
    value, holds = _bar(ratios[-1]["gemini / fsdp2 throughput"], 1.4)
    return f"{value} at {ratios[-1]['size']}", holds


GEMINI_TARGETS = (
    Target(text="largest model >= 5x plain PyTorch's on the same GPU", measure=_largest_x),
    Target(text="throughput >= 1.4x FSDP2 + CPUOffloadPolicy (largest size both train)", measure=_vs_fsdp2),
    Target(text="MFU >= 45% (best size)",
           measure=lambda p: _bar(max((100 * r["mfu"] for r in p.get("rows", []) if r["method"] == "gemini"
                                       and r.get("mfu")), default=None), 45, unit="%")),
)  # fmt: skip


# --------------------------------------------------------------------------------------- fastfold
def fastfold_inference(p: dict) -> list[Block]:
    if "method" in p:  # --memory: peak resident memory against N_res
        columns = ["N_res", "pair_mib", "eager_peak_mib", "eager_peak_pairs", "default_peak_mib", "default_peak_pairs",
                   "eager_s", "default_s"]  # fmt: skip
        return [f"{p.get('preset')} widths, {p.get('blocks')} Evoformer block(s) + 1 extra-MSA block; default chunk "
                f"size {p.get('chunk_size')}; peak = {p.get('method')}.", ("Peak memory", p.get("rows", []), columns)]  # fmt: skip
    depth = f"{p['blocks']} Evoformer block(s) + 1 extra-MSA block" if p.get("blocks") else "full depth"
    blocks: list[Block] = [f"{p.get('preset')}, {fmt(p.get('parameters', 0) / 1e6)}M parameters ({depth}), "
                           "single-sequence MSA, one pass (num_recycle=0)."]  # fmt: skip
    columns = ["N_res", "eager_ms", "default_ms", "speedup", "eager_peak_mib", "default_peak_mib", "memory_ratio"]
    blocks.append(("Eager against the default path (speedup = eager / default time)", p.get("rows", []), columns))
    if "max_n_res_bf16" in p:
        search = p.get("find_max", {})
        bound = ">= " if search.get("at_limit") else ""
        blocks.append(f"Longest N_res the default path runs in bf16: **{bound}{fmt(p['max_n_res_bf16'])}** "
                      f"(doubling from {search.get('start', '-')} up to {search.get('limit') or 'no limit'}, "
                      f"then bisection to {search.get('step', 256)}).")  # fmt: skip
    return blocks


def _max_n_res(p: dict) -> tuple[str, bool | None]:
    if "max_n_res_bf16" not in p:
        return "not in this run", None
    value = p["max_n_res_bf16"] or 0
    bound = ">= " if p.get("find_max", {}).get("at_limit") else ""
    return f"{bound}{fmt(value)} residues", value >= 10_000


def _speedup_at(p: dict, n_res: int) -> float | None:
    return next((r.get("speedup") for r in p.get("rows", []) if r.get("N_res") == n_res), None)


FASTFOLD_TARGETS = (
    Target(text="10,000 residues in bf16 on one 80 GB GPU (FastFold's figure)", measure=_max_n_res),
    Target(text=">= 2x faster than eager at N_res 1024", measure=lambda p: _bar(_speedup_at(p, 1024), 2.0)),
)


def fastfold_train(p: dict) -> list[Block]:
    s = p.get("settings", {})
    head = (f"{s.get('blocks')} Evoformer + {s.get('extra_blocks')} extra-MSA blocks, N_seq {s.get('n_seq')}, "
            f"N_extra {s.get('n_extra')}, num_recycle {s.get('num_recycle')}; median of {s.get('steps')} step(s) "
            f"after {s.get('warmup')} warm-up.")  # fmt: skip
    table = p.get("table", [])
    return [head, ("Seconds and peak memory per step", table, list(dict.fromkeys(k for r in table for k in r)))]


# ------------------------------------------------------------------------------- diffusion, video
def sd_finetune(p: dict) -> list[Block]:
    return [f"{p.get('preset')} sizes, {p.get('resolution')} px, {p.get('precision')}.",
            ("Training (ratios against the plain loop in the same run; peak_mib_ratio = plain / method)",
             p.get("training", []), ["method", "batch", "samples_per_s", "samples_per_s_ratio", "peak_mib",
                                     "peak_mib_ratio", "error"]),
            ("Generation", p.get("generation", []), ["method", "s_per_image", "peak_mib", "peak_mib_ratio"])]  # fmt: skip


def _sd_row(p: dict, part: str, method: str, batch=None) -> dict:
    return next((r for r in p.get(part, []) if r["method"] == method and (batch is None or r.get("batch") == batch)), {})


SD_TARGETS = (
    Target(text="peak GPU memory >= 3x lower than the plain loop at batch 1 with full offload",
           measure=lambda p: _bar(_sd_row(p, "training", "gemini offload", 1).get("peak_mib_ratio"), 3.0)),
    Target(text=">= 0.9x the plain loop's samples/s with Gemini auto (every batch)",
           measure=lambda p: _bar(_min(r.get("samples_per_s_ratio") for r in p.get("training", [])
                                       if r["method"] == "gemini auto"), 0.9)),
    Target(text="sd-generate peak memory >= 2.5x lower than diffusers' default pipeline at 512 px",
           measure=lambda p: _bar(_sd_row(p, "generation", "sd-generate").get("peak_mib_ratio"), 2.5)),
)  # fmt: skip


def opensora_train(p: dict) -> list[Block]:
    blocks: list[Block] = [f"STDiT {p.get('preset')}, batch 1, {p.get('resolution')}x{p.get('resolution')}, "
                           f"{p.get('precision')}; ratios are ferryman / plain."]  # fmt: skip
    summary = p.get("summary", [])
    blocks.append(("Per frame count", summary, list(dict.fromkeys(k for r in summary for k in r))))
    if p.get("largest_frames") is not None:
        blocks.append(f"Largest frame count trained at {p.get('resolution')}x{p.get('resolution')}: "
                      f"**{p['largest_frames']}**.")  # fmt: skip
    return blocks


def _recorded(value) -> tuple[str, bool | None]:
    return ("not in this run", None) if value in (None, "", []) else (value, None)


OPENSORA_TARGETS = (
    Target(text="samples/s against plain PyTorch at 16 and 64 frames of 256x256 (no bar set)",
           measure=lambda p: _recorded(", ".join(f"{r['frames']} frames x{fmt(r['speed ratio'])}"
                                                 for r in p.get("summary", []) if r.get("speed ratio")))),
    Target(text="largest frame count at 256x256 on one GPU (no bar set)",
           measure=lambda p: _recorded(p.get("largest_frames"))),
)  # fmt: skip


# ------------------------------------------------------------------------------------------ others
def pytest_gpu(p: dict) -> list[Block]:
    counts = [{k: p.get(k) for k in ("tests", "passed", "failed", "error", "skipped")}]
    bad = [c for c in p.get("cases", []) if c["outcome"] in ("failed", "error")]
    blocks: list[Block] = [("Tests marked gpu", counts, list(counts[0]))]
    if bad:
        blocks.append(("Failures", bad, ["test", "outcome", "message"]))
    return blocks


def _all_pass(p: dict) -> tuple[str, bool | None]:
    if not p.get("tests"):
        return "no tests ran", None
    return f"{p.get('passed')} passed, {p.get('failed', 0) + p.get('error', 0)} failed", (
        p.get("failed", 0) + p.get("error", 0) == 0 and p.get("passed", 0) > 0)


def _x_deepspeed(p: dict) -> tuple[str, bool | None]:
    rows = [r for r in p.get("rows", []) if r.get("x_deepspeed")]
    if not rows:
        return "not in this run (DeepSpeed not installed there)", None
    return f"x{fmt(rows[-1]['x_deepspeed'])} at {rows[-1].get('size_M')} Mi elements", None


# ------------------------------------------------------------------------------------ lm_finetune
def lm_finetune(p: dict) -> list[Block]:
    return [("Per method and size", p.get("rows", []),
             ["method", "size", "params_M", "fits", "step_s", "tokens_s", "device_MiB", "loss"]),
            ("Largest size finetuned within the budget", p.get("largest", []),
             ["method", "largest", "largest_M", "x_plain", "tokens_s"]),
            ("Gemini's tokens/s over each baseline's, same size", p.get("throughput", []),
             ["size", "params_M", "gemini / plain", "gemini / fsdp2", "gemini / deepspeed"])]  # fmt: skip


def _lm_largest_x(p: dict) -> tuple[str, bool | None]:
    largest = {r["method"]: r for r in p.get("largest", [])}
    plain, gem = largest.get("plain", {}), largest.get("gemini", {})
    if not gem.get("largest_M") or not plain.get("largest_M"):
        return "not in this run", None
    if str(plain["largest"]).startswith(">="):
        return f"not decided: plain trained the top of this ladder ({plain['largest']})", None
    if gem["x_plain"] < 5 and str(gem["largest"]).startswith(">="):
        return f">= {fmt(gem['x_plain'])}x (Gemini trained the top of this ladder)", None
    return _bar(gem["x_plain"], 5.0)


def _lm_vs_fsdp2(p: dict) -> tuple[str, bool | None]:
    both = [r for r in p.get("throughput", []) if r.get("gemini / fsdp2") is not None and r.get("both_fit")]
    if not both:
        return "not in this run", None
    value, holds = _bar(both[-1]["gemini / fsdp2"], 1.4)
    return f"{value} at {both[-1]['size']}", holds


LM_TARGETS = (
    Target(text="largest model >= 5x plain AdamW's within the same budget", measure=_lm_largest_x),
    Target(text="tokens/s >= 1.4x FSDP2 + CPUOffloadPolicy (largest size both train)", measure=_lm_vs_fsdp2),
)


BENCHES: tuple[Bench, ...] = (
    Bench(key="pytest_gpu", title="GPU tests", render=pytest_gpu,
          targets=(Target(text="every test marked gpu passes", measure=_all_pass),)),
    Bench(key="kernels", title="Kernels", render=kernels, targets=KERNEL_TARGETS),
    Bench(key="gemini", title="Gemini heterogeneous memory", render=gemini, targets=GEMINI_TARGETS),
    Bench(key="fastfold_inference", title="FastFold inference", render=fastfold_inference, targets=FASTFOLD_TARGETS),
    Bench(key="fastfold_train", title="FastFold train", render=fastfold_train),
    Bench(key="opensora_train", title="Open-Sora training", render=opensora_train, targets=OPENSORA_TARGETS),
    Bench(key="sd_finetune", title="SD finetune", render=sd_finetune, targets=SD_TARGETS),
    Bench(key="host_adam", title="Host AdamW (the offloaded optimizer step)",
          targets=(Target(text="host AdamW step against DeepSpeed's CPUAdam (no bar set)", measure=_x_deepspeed),)),
    Bench(key="msa_search", title="MSA search"),
    Bench(key="fastfold_vs_af2", title="FastFold against AlphaFold2 (JAX)", render=fastfold_vs_af2,
          targets=(Target(text="forward speedup over AF2's JAX code (no GPU bar set; on CPU: >= 1.25x at 128-512)",
                         measure=_af2_speedup),)),
    Bench(key="lm_finetune", title="LM finetune", render=lm_finetune, targets=LM_TARGETS),
)  # fmt: skip
