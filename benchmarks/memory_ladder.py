"""What the memory benchmarks (gemini.py, lm_finetune.py) share: whether a method's run fit its
device budget, and the largest model each method trained on a ladder of sizes."""

from __future__ import annotations

import torch


def fits(method: str, engine, device: torch.device, budget: int, num_params: int, activation_bytes: int) -> dict:
    """On CUDA the allocator's peak is the truth. On a CPU "device" and host share RAM, so the
    budget is notional: plain AdamW needs its fp32 weights, gradients and two moments (16 bytes a
    parameter) plus activations; Gemini what its chunk manager held at peak plus the largest
    non-model memory it traced. Other methods cannot be judged on a CPU."""
    if device.type == "cuda":
        return {"fits": "yes", "device_MiB": torch.cuda.max_memory_allocated(device) / 2**20}
    if method == "plain":
        notional = 16 * num_params + activation_bytes
    elif method == "gemini":
        notional = engine.manager.peak_bytes + max(engine.manager.tracer.non_model or [0])
    else:
        return {"fits": "n/a (CPU)"}
    return {"fits": "yes" if notional <= budget else "no (budget)", "device_MiB": notional / 2**20}


def largest_per_method(rows: list[dict], ladder: list[str]) -> list[dict]:
    """Largest size each method trained (">=" at the top of the ladder), and its ratio to plain's."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        fitted = [r for r in mine if r.get("fits") == "yes"]
        if not fitted:
            skipped = next((r["fits"] for r in mine if str(r.get("fits", "")).startswith(("n/a", "skipped"))), "none")
            out.append({"method": method, "largest": skipped})
            continue
        top = max(fitted, key=lambda r: r["params_M"])
        out.append({"method": method, "largest": (">= " if top["size"] == ladder[-1] else "") + top["size"],
                    "largest_M": top["params_M"]} | ({"tokens_s": top["tokens_s"]} if "tokens_s" in top else {}))
    plain = next((r.get("largest_M") for r in out if r["method"] == "plain"), None)
    for row in out:
        if plain and row.get("largest_M"):
            row["x_plain"] = row["largest_M"] / plain
    return out
