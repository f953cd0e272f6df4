"""Output heads and confidence metrics (AF2 Suppl. 1.9.6-1.9.10; AF2 ``confidence.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.primitives import Linear, layer_norm, row_slices
from ferryman.core.chunking import chunk_layer


def bin_edges(first: float, last: float, num_bins: int, device=None, dtype=None) -> Tensor:
    """The ``num_bins - 1`` inner edges of ``num_bins`` distance or error bins, evenly spaced from
    ``first`` to ``last`` Angstrom; the outer bins are open (AF2's distogram and PAE binning)."""
    return torch.linspace(first, last, num_bins - 1, device=device, dtype=dtype)


class PredictedLDDTHead(nn.Module):
    """AF2 Suppl. Alg. 29: binned per-residue lDDT-Ca from the structure module's single output."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        c = cfg.heads.plddt_channels
        self.input_layer_norm = layer_norm(cfg.c_s)
        self.act_0 = Linear(cfg.c_s, c, init="relu")
        self.act_1 = Linear(c, c, init="relu")
        self.logits = Linear(c, cfg.heads.plddt_bins, init="final")

    def forward(self, s: Tensor) -> Tensor:
        s = torch.relu(self.act_0(self.input_layer_norm(s)))
        return self.logits(torch.relu(self.act_1(s)))


class DistogramHead(nn.Module):
    """AF2 Suppl. 1.9.8: symmetric distance-bin logits ``[N, N, bins]``."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        h = cfg.heads
        self.half_logits = Linear(cfg.c_z, h.distogram_bins, init="final")
        self.breaks = (h.distogram_first_break, h.distogram_last_break, h.distogram_bins)

    def forward(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """Logits in z's dtype; row block i needs z's rows i and columns i for the symmetrisation."""

        def run(rows: Tensor, cols: Tensor) -> Tensor:
            return (self.half_logits(rows.float()) + self.half_logits(cols.float())).to(z.dtype)

        return chunk_layer(run, {"rows": z, "cols": z.transpose(0, 1)}, chunk_size=chunk_size, num_batch_dims=1)

    def bin_edges(self, device=None) -> Tensor:
        return bin_edges(*self.breaks, device=device)


class MaskedMsaHead(nn.Module):
    """AF2 Suppl. 1.9.9: logits over 23 classes for each MSA position."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.logits = Linear(cfg.c_m, cfg.heads.masked_msa_classes, init="final")

    def forward(self, m: Tensor) -> Tensor:
        return self.logits(m)


class ExperimentallyResolvedHead(nn.Module):
    """AF2 Suppl. 1.9.10: per-atom37 logits that the atom is resolved experimentally."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.logits = Linear(cfg.c_s, 37, init="final")

    def forward(self, s: Tensor) -> Tensor:
        return self.logits(s)


class PredictedAlignedErrorHead(nn.Module):
    """AF2 Suppl. 1.9.7: binned aligned error of residue j in the frame of residue i."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        h = cfg.heads
        self.logits = Linear(cfg.c_z, h.pae_bins, init="final")
        self.max_error_bin, self.num_bins = h.pae_max_error_bin, h.pae_bins

    def forward(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        def run(z: Tensor) -> Tensor:
            return self.logits(z.float()).to(z.dtype)

        return chunk_layer(run, {"z": z}, chunk_size=chunk_size, num_batch_dims=1)

    def breaks(self, device=None) -> Tensor:
        return bin_edges(0.0, self.max_error_bin, self.num_bins, device=device)


def compute_plddt(logits: Tensor) -> Tensor:
    """Expected lDDT-Ca x 100 per residue from ``[N, bins]`` logits."""
    bins = logits.shape[-1]
    centers = (torch.arange(bins, device=logits.device, dtype=torch.float32) + 0.5) / bins
    return (torch.softmax(logits.float(), dim=-1) * centers).sum(-1) * 100


def _bin_centers(breaks: Tensor) -> Tensor:
    step = breaks[1] - breaks[0]
    centers = breaks + step / 2
    return torch.cat([centers, centers[-1:] + step])


def compute_predicted_aligned_error(logits: Tensor, breaks: Tensor, chunk_size: int | None = None) -> dict[str, Tensor]:
    """Expected aligned error ``[N, N]`` (Angstrom) and the largest value it can take.

    Computed over row blocks so that the ``[N, N, bins]`` probabilities never exist at once.
    """
    centers = _bin_centers(breaks.float())
    pae = torch.empty(logits.shape[:2], device=logits.device)
    for rows in row_slices(logits.shape[0], chunk_size):
        pae[rows] = (torch.softmax(logits[rows].float(), dim=-1) * centers).sum(-1)
    return {"predicted_aligned_error": pae, "max_predicted_aligned_error": centers[-1]}


def _tm_terms(n: int, breaks: Tensor, residue_weights: Tensor | None, eps: float, device) -> tuple[Tensor, ...]:
    """Per-bin TM term, per-residue weights and their normalised form (AF2 Suppl. 1.9.7 eq. 40)."""
    weights = torch.ones(n, device=device) if residue_weights is None else residue_weights.float()
    clipped = max(int(weights.sum().item()), 19)
    d0 = 1.24 * (clipped - 15) ** (1.0 / 3) - 1.8
    tm_per_bin = 1.0 / (1 + (_bin_centers(breaks.float()) / d0) ** 2)
    return tm_per_bin, weights, weights / (eps + weights.sum())  # pair weights w_i w_j normalised over j


def compute_tm(logits: Tensor, breaks: Tensor, residue_weights: Tensor | None = None, eps: float = 1e-8,
               chunk_size: int | None = None) -> Tensor:  # fmt: skip
    """Predicted TM-score (pTM, AF2 Suppl. 1.9.7 eq. 40): the best over alignment frames i of the
    expected TM term of every residue j aligned on i."""
    n = logits.shape[0]
    tm_per_bin, weights, normed = _tm_terms(n, breaks, residue_weights, eps, logits.device)
    per_alignment = torch.empty(n, device=logits.device)
    for rows in row_slices(n, chunk_size):
        tm_term = (torch.softmax(logits[rows].float(), dim=-1) * tm_per_bin).sum(-1)  # [rows, N]
        per_alignment[rows] = (tm_term * normed).sum(-1)
    return per_alignment[(per_alignment * weights).argmax()]


def confidence_from_pair(head: PredictedAlignedErrorHead, z: Tensor, chunk_size: int | None = None,
                         eps: float = 1e-8) -> dict[str, Tensor]:  # fmt: skip
    """PAE, its maximum and pTM straight from the pair, one row block of logits at a time: the
    same values as ``compute_predicted_aligned_error`` and ``compute_tm`` on ``head(z)``, without
    the ``[N, N, bins]`` logits ever existing whole (25.6 GB in fp32 at 10,000 residues)."""
    n = z.shape[0]
    breaks = head.breaks(z.device)
    centers = _bin_centers(breaks.float())
    tm_per_bin, weights, normed = _tm_terms(n, breaks, None, eps, z.device)
    pae = torch.empty(n, n, device=z.device)
    per_alignment = torch.empty(n, device=z.device)
    for rows in row_slices(n, chunk_size):
        probs = torch.softmax(head(z[rows]).float(), dim=-1)  # [rows, N, bins]
        pae[rows] = (probs * centers).sum(-1)
        per_alignment[rows] = ((probs * tm_per_bin).sum(-1) * normed).sum(-1)
    return {
        "predicted_aligned_error": pae,
        "max_predicted_aligned_error": centers[-1],
        "ptm": per_alignment[(per_alignment * weights).argmax()],
    }
