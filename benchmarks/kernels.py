"""Fused kernels against eager PyTorch and SDPA at sizes from the apps' real configs.

    python benchmarks/kernels.py                       # CUDA, bf16, full sizes
    python benchmarks/kernels.py --device cpu --small  # CPU: Triton interpreter, tiny sizes

Attention: AF2 MSA-row attention with pair bias (8 heads x c=32) and triangle attention
(4 heads x c=32) at N_res 256-2048 (AF2 Suppl. Alg. 7, 13; rows per call chosen like a chunked
Evoformer so the eager logits stay at 2^27 elements), STDiT (hidden 1152 = 16 heads x 72)
spatial, temporal and cross attention for 16 frames at 512x512 (Open-Sora 1.0 config), and a
key-length sweep for peak memory. Each row times the fused kernel, the eager reference
(``attention_ref``) and ``scaled_dot_product_attention`` given the same bias as a float
``attn_mask``, forward (no grad) and forward+backward, with peak extra memory. TFLOP/s are set
against a bf16 matmul and GB/s (softmax, LayerNorm) against a device copy, both measured here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(kw_only=True)
class AttnCase:
    name: str
    q_shape: tuple  # [*, H, Q, D]
    k_len: int
    bias_shape: tuple | None = None  # broadcast to [*, H, Q, K]; trained (needs grad)
    mask_shape: tuple | None = None  # bool, broadcast to [*, H, Q, K]
    kv_batch: tuple | None = None  # k/v leading dims when they differ from q's
    extra: dict = field(default_factory=dict)

    def flops(self) -> float:
        *batch, n_q, d = self.q_shape
        return 4.0 * math.prod(batch) * n_q * self.k_len * d  # QK^T and PV


def af2_cases(n_values, rows_budget: int, heads_msa=8, heads_tri=4, c=32) -> list[AttnCase]:
    cases = []
    for n in n_values:
        for name, heads in (("af2_msa_row", heads_msa), ("af2_triangle", heads_tri)):
            rows = max(1, min(n, rows_budget // (heads * n * n)))
            cases.append(AttnCase(
                name=f"{name} N={n}", q_shape=(1, rows, heads, n, c), k_len=n,
                bias_shape=(1, 1, heads, n, n), mask_shape=(1, rows, 1, 1, n), extra={"rows": rows},
            ))
    return cases


def stdit_cases(batch, frames, tokens, text_len, heads=16, head_dim=72) -> list[AttnCase]:
    return [
        AttnCase(name="stdit_spatial", q_shape=(batch * frames, heads, tokens, head_dim), k_len=tokens),
        AttnCase(name="stdit_temporal", q_shape=(batch * tokens, heads, frames, head_dim), k_len=frames),
        AttnCase(name="stdit_cross", q_shape=(batch, heads, frames * tokens, head_dim), k_len=text_len,
                 mask_shape=(batch, 1, 1, text_len)),
    ]


def scaling_cases(k_values, heads=16, head_dim=72) -> list[AttnCase]:
    return [AttnCase(name=f"scaling K={k}", q_shape=(1, heads, k, head_dim), k_len=k) for k in k_values]


def make_attention_inputs(case: AttnCase, device, dtype):
    *batch, _, d = case.q_shape
    kv_shape = (*(case.kv_batch or batch), case.k_len, d)
    q = torch.randn(case.q_shape, device=device).to(dtype).requires_grad_()
    k = torch.randn(kv_shape, device=device).to(dtype).requires_grad_()
    v = torch.randn(kv_shape, device=device).to(dtype).requires_grad_()
    biases = []
    if case.bias_shape:
        biases.append(torch.randn(case.bias_shape, device=device).to(dtype).requires_grad_())
    mask = None
    if case.mask_shape:
        mask = torch.rand(case.mask_shape, device=device) > 0.1
        mask[..., 0] = True  # no fully masked rows: SDPA would return NaN there
    return q, k, v, biases, mask


def sdpa_with_bias(q, k, v, biases, mask):
    """SDPA given the same bias: the float attn_mask is bias + (-inf where masked).

    SDPA's fused kernels take 4-D inputs, so AF2's [B, S, H, Q, D] is flattened to
    [B*S, H, Q, D] and the mask materialised at [B*S, H, Q, K]: the price of this baseline.
    """
    attn_mask = None
    for b in biases:
        attn_mask = b if attn_mask is None else attn_mask + b
    if mask is not None:
        neg = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        attn_mask = neg if attn_mask is None else attn_mask + neg
    *batch, n_q, d = q.shape
    if len(batch) > 2:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))  # [B*S, H, L, D]
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*batch, n_q, k.shape[-2]).reshape(-1, *q4.shape[-3:-1], k.shape[-2])
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=attn_mask)
        return out.view(*batch, n_q, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _repeats(impl: str, repeat: int) -> int:
    # Baselines are cheap even on CPU, where a median of several damps scheduler noise;
    # the interpreted kernels are not.
    return repeat if impl == "fused" else max(repeat, 5)


def run_pair(fn, leaves, device, repeat, warmup) -> dict:
    """Forward (no grad) and forward+backward measurements of fn()."""
    grad = None

    def forward():
        with torch.no_grad():
            return fn()

    def forward_backward():
        nonlocal grad
        out = fn()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for t in leaves:  # freed here so the next call's peak counts its own gradients
            t.grad = None

    fwd = common.measure(forward, device, warmup=warmup, repeat=repeat)
    both = common.measure(forward_backward, device, warmup=warmup, repeat=repeat)
    return {"fwd": fwd, "fwd_bwd": both}


def _attention_impls(kernels) -> dict:
    return {
        "fused": lambda q, k, v, b, m: kernels.attention(q, k, v, b, m, backend="triton"),
        "eager": lambda q, k, v, b, m: kernels.attention_ref(q, k, v, b, m),
        "sdpa": sdpa_with_bias,
    }


def attention_case(case: AttnCase, device, dtype, repeat, warmup, kernels, peak_tflops) -> dict:
    q, k, v, biases, mask = make_attention_inputs(case, device, dtype)
    row = {"op": "attention", "case": case.name, "q": list(case.q_shape), "k_len": case.k_len,
           "bias": case.bias_shape and list(case.bias_shape), "mask": case.mask_shape and list(case.mask_shape),
           **case.extra}
    for name, impl in _attention_impls(kernels).items():
        try:
            row[name] = run_pair(lambda impl=impl: impl(q, k, v, biases, mask), [q, k, v, *biases],
                                 device, _repeats(name, repeat), warmup)
        except RuntimeError as exc:  # e.g. an SDPA backend refusing a shape
            row[name] = {"fwd": {"error": str(exc)[:80]}, "fwd_bwd": {"error": str(exc)[:80]}}
    both_ms, fwd_ms = row["fused"]["fwd_bwd"].get("ms"), row["fused"]["fwd"].get("ms")
    if both_ms:  # FlashAttention convention: the backward counts 2.5x the forward's FLOPs
        row["fused_tflops_fwd_bwd"] = 3.5 * case.flops() / (both_ms * 1e-3) / 1e12
        row["pct_of_matmul_peak"] = 100 * row["fused_tflops_fwd_bwd"] / peak_tflops
    if fwd_ms:
        row["fused_tflops_fwd"] = case.flops() / (fwd_ms * 1e-3) / 1e12
    return row


@dataclass(kw_only=True)
class BandwidthCase:
    name: str
    x_shape: tuple
    bias_shape: tuple | None = None
    mask_shape: tuple | None = None


def softmax_cases(n_values, rows_budget: int, heads=8) -> list[BandwidthCase]:
    out = []
    for n in n_values:
        rows = max(1, min(n, rows_budget // (heads * n * n)))
        out.append(BandwidthCase(name=f"af2_logits N={n}", x_shape=(1, rows, heads, n, n),
                                 bias_shape=(1, 1, heads, n, n), mask_shape=(1, rows, 1, 1, n)))
    return out


def layer_norm_cases(n_values, stdit_tokens: int, c_z=128, hidden=1152) -> list[BandwidthCase]:
    out = [BandwidthCase(name=f"af2_pair N={n} c_z={c_z}", x_shape=(n, n, c_z)) for n in n_values]
    out.append(BandwidthCase(name=f"stdit {stdit_tokens}x{hidden}", x_shape=(stdit_tokens, hidden)))
    return out


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _bandwidth_impls(op, case, device, dtype, kernels):
    """(impls, leaves, bytes of inputs) for one softmax or LayerNorm case."""
    x = torch.randn(case.x_shape, device=device).to(dtype).requires_grad_()
    if op == "softmax":
        bias = torch.randn(case.bias_shape, device=device).to(dtype).requires_grad_()
        mask = torch.rand(case.mask_shape, device=device) > 0.1
        impls = {"fused": lambda: kernels.softmax(x, mask, bias, backend="triton"),
                 "eager": lambda: kernels.softmax_ref(x, mask, bias)}
        return impls, [x, bias], _bytes(x, bias, mask)
    n = case.x_shape[-1]
    w = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    impls = {"fused": lambda: kernels.layer_norm(x, w, b, backend="triton"),
             "eager": lambda: kernels.layer_norm_ref(x, w, b),
             "torch": lambda: F.layer_norm(x, (n,), w, b)}
    return impls, [x, w, b], _bytes(x, w, b)


def bandwidth_case(op, case, device, dtype, repeat, warmup, kernels, copy_gbps) -> dict:
    impls, leaves, in_bytes = _bandwidth_impls(op, case, device, dtype, kernels)
    row = {"op": op, "case": case.name, "x": list(case.x_shape)}
    for name, impl in impls.items():
        row[name] = run_pair(impl, leaves, device, _repeats(name, repeat), warmup)
    x_bytes = _bytes(leaves[0])
    fwd_bytes = in_bytes + x_bytes  # inputs read, output written
    both_bytes = fwd_bytes + 3 * x_bytes  # the backward reads y (or x) and dy, writes dx
    for key, nbytes in (("fwd", fwd_bytes), ("fwd_bwd", both_bytes)):
        ms = row["fused"][key].get("ms")
        if ms:
            row[f"fused_gbps_{key}"] = nbytes / (ms * 1e-3) / 1e9
            row[f"pct_of_copy_{key}"] = 100 * row[f"fused_gbps_{key}"] / copy_gbps
    return row


def run_cases(fn, cases, *args) -> list[dict]:
    rows = []
    for case in cases:
        rows.append(fn(case, *args))
        print(f"  {case.name}: done", file=sys.stderr)
    return rows


def _ms(row, impl, key):
    return row.get(impl, {}).get(key, {}).get("ms")


def _ratio(row, base, key):
    fused, other = _ms(row, "fused", key), _ms(row, base, key)
    return other / fused if fused and other else None


def _cell(row, impl, key, field_name="ms"):
    entry = row.get(impl, {}).get(key, {})
    return entry.get(field_name, entry.get("error"))


def attention_table(rows) -> list[dict]:
    return [{
        "case": r["case"],
        "fwd ms fused/eager/sdpa": " / ".join(common.fmt(_cell(r, i, "fwd")) for i in ("fused", "eager", "sdpa")),
        "fwd+bwd ms fused/eager/sdpa": " / ".join(common.fmt(_cell(r, i, "fwd_bwd")) for i in ("fused", "eager", "sdpa")),
        "fwd+bwd x eager": _ratio(r, "eager", "fwd_bwd"),
        "fwd+bwd x sdpa": _ratio(r, "sdpa", "fwd_bwd"),
        "peak MiB fused/eager/sdpa": " / ".join(
            common.fmt(_cell(r, i, "fwd_bwd", "peak_mib")) for i in ("fused", "eager", "sdpa")),
        "TFLOP/s fwd+bwd": r.get("fused_tflops_fwd_bwd"),
        "% matmul": r.get("pct_of_matmul_peak"),
    } for r in rows]


def bandwidth_table(rows) -> list[dict]:
    impls = [i for i in ("fused", "eager", "torch") if i in rows[0]]
    label = "/".join(impls)
    return [{
        "case": r["case"],
        f"fwd ms {label}": " / ".join(common.fmt(_cell(r, i, "fwd")) for i in impls),
        f"fwd+bwd ms {label}": " / ".join(common.fmt(_cell(r, i, "fwd_bwd")) for i in impls),
        "fwd+bwd x eager": _ratio(r, "eager", "fwd_bwd"),
        f"peak MiB {label}": " / ".join(common.fmt(_cell(r, i, "fwd_bwd", "peak_mib")) for i in impls),
        "GB/s fwd": r.get("fused_gbps_fwd"),
        "% copy fwd": r.get("pct_of_copy_fwd"),
        "GB/s fwd+bwd": r.get("fused_gbps_fwd_bwd"),
        "% copy fwd+bwd": r.get("pct_of_copy_fwd_bwd"),
    } for r in rows]


def sizes(small: bool) -> dict:
    if small:  # CPU + Triton interpreter: tiny, but the same shapes of problem
        return dict(n_values=(32, 48), rows_budget=8 * 32 * 32 * 2, stdit=dict(batch=1, frames=4, tokens=8,
                    text_len=12, heads=2), scaling=(32, 64, 128), scaling_heads=1, ln_tokens=64,
                    matmul_n=512, copy_bytes=1 << 26, repeat=1, warmup=1)
    # AF2 N_res 256-2048; STDiT 16 frames at 512x512 -> 32x32 latent patches, 120 text tokens.
    return dict(n_values=(256, 512, 1024, 2048), rows_budget=1 << 27, stdit=dict(batch=2, frames=16, tokens=1024,
                text_len=120, heads=16), scaling=(1024, 2048, 4096, 8192, 16384), scaling_heads=16,
                ln_tokens=2 * 16 * 1024, matmul_n=8192, copy_bytes=1 << 30, repeat=10, warmup=3)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for CPU and the Triton interpreter)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--ops", default="attention,softmax,layer_norm", help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/kernels-<device>.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        # Must precede the import below: Triton picks interpreted kernels at definition time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # One thread: on a shared machine a descheduled worker stalls every parallel op.
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device; use --device cpu --small")
    from ferryman import kernels

    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    cfg = sizes(args.small)
    device, repeat, warmup = torch.device(args.device), cfg["repeat"], cfg["warmup"]
    peak_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = common.matmul_tflops(device, peak_dtype, cfg["matmul_n"])
    copy = common.copy_gbps(device, cfg["copy_bytes"])
    print(f"{common.environment(device)['device']}  dtype={dtype}  matmul peak {peak:.3g} TFLOP/s "
          f"({peak_dtype}), copy {copy:.3g} GB/s", file=sys.stderr)
    ops = set(args.ops.split(","))
    result = {"env": common.environment(device), "dtype": str(dtype), "small": args.small,
              "matmul_peak_tflops": peak, "matmul_peak_dtype": str(peak_dtype), "copy_gbps": copy}
    tables = []
    if "attention" in ops:
        cases = af2_cases(cfg["n_values"], cfg["rows_budget"]) + stdit_cases(**cfg["stdit"])
        cases += scaling_cases(cfg["scaling"], heads=cfg["scaling_heads"])
        result["attention"] = run_cases(attention_case, cases, device, dtype, repeat, warmup, kernels, peak)
        tables.append(("attention", attention_table(result["attention"])))
    if "softmax" in ops:
        cases = softmax_cases(cfg["n_values"], cfg["rows_budget"])
        result["softmax"] = run_cases(partial(bandwidth_case, "softmax"), cases, device, dtype, repeat, warmup, kernels, copy)
        tables.append(("softmax (pair bias + mask)", bandwidth_table(result["softmax"])))
    if "layer_norm" in ops:
        cases = layer_norm_cases(cfg["n_values"], cfg["ln_tokens"])
        result["layer_norm"] = run_cases(partial(bandwidth_case, "layer_norm"), cases, device, dtype, repeat, warmup,
                                         kernels, copy)
        tables.append(("layer_norm", bandwidth_table(result["layer_norm"])))
    print(f"\ndevice: {result['env']['device']}, dtype {dtype}; matmul peak {peak:.3g} TFLOP/s ({peak_dtype}), "
          f"copy {copy:.3g} GB/s; speedups are eager/fused and sdpa/fused time")
    for title, rows in tables:
        print(f"\n{title}\n")
        common.print_table(rows, list(rows[0]))
    path = args.json or Path("benchmarks/results") / f"kernels-{args.device}{'-small' if args.small else ''}.json"
    print(f"\nwrote {common.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
