"""Confidence metrics from head logits and the JSON files AlphaFold2 users read.

pLDDT (AF2 Suppl. 1.9.6): expected lDDT-Cα over 50 equal bins of [0, 1], times 100.
PAE and pTM (Suppl. 1.9.7): 64 error bins; the last bin is open, the others are 0.5 Å wide up to
31 Å; pTM maximises the expected TM-score over alignment frames, d0 from the chain length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ferryman.core.io import write_text


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def compute_plddt(logits: np.ndarray) -> np.ndarray:
    """[N, num_bins] lDDT logits -> [N] pLDDT in 0..100."""
    num_bins = logits.shape[-1]
    centers = (np.arange(num_bins) + 0.5) / num_bins
    return (softmax(logits.astype(np.float64)) @ centers * 100).astype(np.float32)


def _error_bin_centers(num_bins: int, max_bin: float) -> np.ndarray:
    breaks = np.linspace(0.0, max_bin, num_bins - 1)
    step = breaks[1] - breaks[0]
    centers = breaks + step / 2
    return np.concatenate([centers, [centers[-1] + step]])  # AF2: 64 bins -> last centre 31.75 Å


def compute_pae(logits: np.ndarray, max_bin: float = 31.0) -> tuple[np.ndarray, float]:
    """[N, N, num_bins] aligned-error logits -> ([N, N] expected error in Å, the largest possible)."""
    centers = _error_bin_centers(logits.shape[-1], max_bin)
    pae = softmax(logits.astype(np.float64)) @ centers
    return pae.astype(np.float32), float(centers[-1])


def compute_ptm(logits: np.ndarray, max_bin: float = 31.0, residue_weights: np.ndarray | None = None) -> float:
    """Predicted TM-score from [N, N, num_bins] aligned-error logits."""
    num_res = logits.shape[0]
    weights = np.ones(num_res) if residue_weights is None else residue_weights.astype(np.float64)
    centers = _error_bin_centers(logits.shape[-1], max_bin)
    clipped = max(int(weights.sum()), 19)  # d0 is undefined below 19 residues
    d0 = 1.24 * (clipped - 15) ** (1.0 / 3) - 1.8
    tm_per_bin = 1.0 / (1 + (centers / d0) ** 2)
    expected = softmax(logits.astype(np.float64)) @ tm_per_bin  # [N, N]
    per_frame = (expected * weights[None]).sum(-1) / (1e-8 + weights.sum())
    return float((per_frame * weights).max())


def plddt_category(plddt: np.ndarray) -> list[str]:
    """AF2's letters: D (disordered, < 50), L (low, 50-70), M (medium, 70-90), H (high, >= 90)."""
    return ["D" if p < 50 else "L" if p < 70 else "M" if p < 90 else "H" for p in np.clip(plddt, 0, 100)]


def confidence_json(plddt: np.ndarray, *, random_weights: bool = False) -> dict:
    """AF2 v2.3's confidence_<model>.json: residue numbers, pLDDT (2 decimals) and categories."""
    plddt = np.asarray(plddt, np.float64)
    record = {
        "residueNumber": list(range(1, len(plddt) + 1)),
        "confidenceScore": [round(float(p), 2) for p in plddt],
        "confidenceCategory": plddt_category(plddt),
    }
    if random_weights:
        record["warning"] = RANDOM_WEIGHTS_NOTE
    return record


def pae_json(pae: np.ndarray, max_pae: float) -> list[dict]:
    """AF2 v2.3's pae_<model>.json: one object, the [N, N] matrix rounded to 2 decimals."""
    return [{
        "predicted_aligned_error": np.round(np.asarray(pae, np.float64), 2).tolist(),
        "max_predicted_aligned_error": float(max_pae),
    }]  # fmt: skip


RANDOM_WEIGHTS_NOTE = "random weights: this structure is NOT a prediction, only a test of the pipeline"


def write_json(path: str | Path, obj, *, compact: bool = False) -> Path:
    """Pretty JSON, or AF2's compact form (no spaces) for the per-model files tools read."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    write_text(path, text + "\n")
    return Path(path)


def rank_models(scores: dict[str, float]) -> list[str]:
    """Best first: AF2 and ColabFold rank monomer models (_ptm included) by mean pLDDT and
    multimer models by 0.8 ipTM + 0.2 pTM."""
    return sorted(scores, key=lambda name: -scores[name])


def ranking_debug_multimer(scores: dict[str, float], iptms: dict[str, float], ptms: dict[str, float],
                           plddts: dict[str, float], random_weights: bool = False) -> dict:  # fmt: skip
    """AF2 v2.3's ranking_debug.json for multimer models: {"iptm+ptm": ..., "order": ...}, best
    first by 0.8 ipTM + 0.2 pTM; the parts ("iptm", "ptm") and mean pLDDTs are added."""
    record: dict = {"iptm+ptm": {k: round(v, 6) for k, v in scores.items()}, "order": rank_models(scores),
                    "iptm": iptms, "ptm": ptms, "plddts": plddts}  # fmt: skip
    if random_weights:
        record["warning"] = RANDOM_WEIGHTS_NOTE
    return record


def ranking_debug(plddts: dict[str, float], ptms: dict[str, float] | None = None, random_weights: bool = False) -> dict:
    """AF2 v2.3's ranking_debug.json for monomer presets: {"plddts": ..., "order": ...}; the pTM of
    _ptm models is added under "ptms" (AF2 keeps it in its result pickles, which we do not write)."""
    record: dict = {"plddts": plddts, "order": rank_models(plddts)}
    if ptms:
        record["ptms"] = ptms
    if random_weights:
        record["warning"] = RANDOM_WEIGHTS_NOTE
    return record
