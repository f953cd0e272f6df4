"""Structure-quality metrics: lDDT-Cα, RMSD after Kabsch superposition, GDT-TS and TM-score.

Coordinates are ``[*, N, 3]`` tensors of one atom per residue (usually Cα) in Angstrom; masks are
``[*, N]``. lDDT follows AF2's ``lddt`` (Suppl. 1.9.6; Mariani et al. 2013): pairs closer than
``cutoff`` in the TRUE structure, self-pairs excluded, scored at the 0.5/1/2/4 Å thresholds.
TM-score (Zhang & Skolnick 2004) and GDT-TS (Zemla 2003) search superpositions the way the
TM-score program does: Kabsch fits on seed fragments, refined iteratively on the residues that
lie within a distance cutoff; the best score over all seeds is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)


def _pair_dists(x: Tensor) -> Tensor:
    return torch.sqrt(((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1) + 1e-10)  # [*, N, N]


def lddt(pred: Tensor, true: Tensor, mask: Tensor | None = None, *, cutoff: float = 15.0,
         per_residue: bool = False, eps: float = 1e-10) -> Tensor:  # fmt: skip
    """lDDT in [0, 1]: ``[*]`` pooled over all scored pairs, or ``[*, N]`` per residue.

    A pair (i, j), i != j, is scored when both residues are present and their TRUE distance is
    below ``cutoff``; its score is the fraction of thresholds its distance error stays under.
    """
    mask = true.new_ones(true.shape[:-1]) if mask is None else mask.to(true.dtype)
    d_true, d_pred = _pair_dists(true), _pair_dists(pred)
    n = true.shape[-2]
    scored = (d_true < cutoff).to(true.dtype) * mask[..., :, None] * mask[..., None, :]
    scored = scored * (1.0 - torch.eye(n, dtype=true.dtype, device=true.device))
    err = (d_true - d_pred).abs()
    score = sum((err < t).to(true.dtype) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    dims = (-1,) if per_residue else (-2, -1)
    return (eps + (scored * score).sum(dims)) / (eps + scored.sum(dims))


def kabsch(mobile: Tensor, target: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rotation ``[*, 3, 3]`` and translation ``[*, 3]`` minimising the weighted RMSD of
    ``mobile @ R^T + t`` to ``target`` (both ``[*, N, 3]``); proper rotations only (det = +1)."""
    w = mobile.new_ones(mobile.shape[:-1]) if weights is None else weights.to(mobile.dtype)
    w = w[..., None] / w.sum(-1, keepdim=True)[..., None].clamp_min(1e-12)  # [*, N, 1]
    mu_m, mu_t = (mobile * w).sum(-2), (target * w).sum(-2)
    cov = ((target - mu_t[..., None, :]) * w).transpose(-1, -2) @ (mobile - mu_m[..., None, :])  # [*, 3, 3]
    u, _, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], -1))
    rot = u @ fix @ vh
    return rot, mu_t - torch.einsum("...ij,...j->...i", rot, mu_m)


def superimpose(mobile: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mobile`` moved onto ``target`` by the Kabsch fit over the masked residues."""
    rot, trans = kabsch(mobile, target, mask)
    return torch.einsum("...ij,...nj->...ni", rot, mobile) + trans[..., None, :]


def rmsd(pred: Tensor, true: Tensor, mask: Tensor | None = None, *, superpose: bool = True) -> Tensor:
    """Cα RMSD ``[*]`` over the masked residues, after the optimal superposition of pred on true."""
    mask = true.new_ones(true.shape[:-1]) if mask is None else mask.to(true.dtype)
    moved = superimpose(pred, true, mask) if superpose else pred
    sq = ((moved - true) ** 2).sum(-1)
    return torch.sqrt((sq * mask).sum(-1) / mask.sum(-1).clamp_min(1))


def tm_d0(length: int) -> float:
    """TM-score distance scale for a reference of ``length`` residues (floored at 0.5 Å as in TM-score)."""
    return max(1.24 * max(length - 15, 0) ** (1.0 / 3.0) - 1.8, 0.5) if length > 21 else 0.5


def _seed_masks(n: int, present: Tensor, min_len: int = 4) -> Tensor:
    """Contiguous fragments of length n, n/2, n/4 ... >= ``min_len`` at every start, as ``[S, N]``."""
    seeds, length = [], n
    while True:
        length = max(length, min(min_len, n))
        for start in range(n - length + 1):
            seed = torch.zeros(n, dtype=torch.bool, device=present.device)
            seed[start : start + length] = True
            seeds.append(seed & present)
        if length <= min_len:
            break
        length //= 2
    seeds = torch.stack(seeds)
    return seeds[seeds.sum(-1) >= 3]


def _search_superpositions(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float, iters: int = 20) -> Tensor:
    """Per-residue distances ``[S, N]`` of pred to true under each refined seed superposition.

    Each seed's fit is refined by re-fitting on the residues within ``cutoff`` (widened by 0.5 Å
    until at least three residues qualify), as in the TM-score program's search.
    """
    present = mask.bool()
    selected = _seed_masks(pred.shape[-2], present)  # [S, N]
    dists_all = []
    for _ in range(iters + 1):
        rot, trans = kabsch(pred.expand(len(selected), -1, -1), true.expand(len(selected), -1, -1), selected)
        moved = torch.einsum("sij,nj->sni", rot, pred) + trans[:, None, :]
        dists = torch.linalg.vector_norm(moved - true, dim=-1)  # [S, N]
        dists_all.append(dists)
        new = _within(dists, present, cutoff)
        if torch.equal(new, selected):
            break
        selected = new
    return torch.cat(dists_all)


def _within(dists: Tensor, present: Tensor, cutoff: float) -> Tensor:
    within = (dists < cutoff) & present
    c = cutoff
    while bool(((within.sum(-1) < 3) & (present.sum() >= 3)).any()):
        c += 0.5
        short = within.sum(-1, keepdim=True) < 3
        within = torch.where(short, (dists < c) & present, within)
    return within


def tm_score(pred: Tensor, true: Tensor, mask: Tensor | None = None, *, superpose: bool = True) -> Tensor:
    """TM-score of ``pred`` against the reference ``true`` (``[N, 3]`` each, residues paired by
    index), normalised by the number of reference residues, d0 = 1.24 (L-15)^(1/3) - 1.8.

    With ``superpose`` the best superposition is searched; without, coordinates are used as given.
    """
    pred, true = pred.double(), true.double()
    mask = true.new_ones(true.shape[:-1]) if mask is None else mask.double()
    length = int(mask.sum().item())
    d0 = tm_d0(length)
    if not superpose:
        dists = torch.linalg.vector_norm(pred - true, dim=-1)[None]
    else:
        dists = _search_superpositions(pred, true, mask, cutoff=min(max(d0, 4.5), 8.0))
    scores = ((1.0 / (1.0 + (dists / d0) ** 2)) * mask).sum(-1) / length
    return scores.max().float()


def gdt(pred: Tensor, true: Tensor, mask: Tensor | None = None, cutoffs=GDT_TS_CUTOFFS) -> Tensor:
    """GDT score in [0, 1] (``[N, 3]`` each): the mean over ``cutoffs`` of the largest fraction of
    residues brought within the cutoff by one superposition (searched separately per cutoff)."""
    pred, true = pred.double(), true.double()
    mask = true.new_ones(true.shape[:-1]) if mask is None else mask.double()
    length = mask.sum()
    fractions = []
    for c in cutoffs:
        dists = _search_superpositions(pred, true, mask, cutoff=c)
        fractions.append((((dists <= c).double() * mask).sum(-1) / length).max())
    return torch.stack(fractions).mean().float()


def gdt_ts(pred: Tensor, true: Tensor, mask: Tensor | None = None) -> Tensor:
    """GDT-TS: GDT at 1, 2, 4 and 8 Å."""
    return gdt(pred, true, mask, GDT_TS_CUTOFFS)
