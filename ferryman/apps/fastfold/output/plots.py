"""PNG plots of a prediction: pLDDT per residue per model, PAE matrices, MSA coverage.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed) and
saved under a temporary name, then renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferryman.core.io import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def plot_plddt(plddts: dict[str, np.ndarray], path: str | Path, *, title: str = "", note: str = "") -> Path:
    """One line per model (ranked order as given), with the AF DB confidence bands shaded."""
    fig = _figure(8, 4)
    ax = fig.add_subplot(1, 1, 1)
    for lo, hi, colour in ((0, 50, "#ff7d45"), (50, 70, "#ffdb13"), (70, 90, "#65cbf3"), (90, 100, "#0053d6")):
        ax.axhspan(lo, hi, color=colour, alpha=0.12, lw=0)
    for name, values in plddts.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name, lw=1.2)
    ax.set_xlabel("residue")
    ax.set_ylabel("pLDDT")
    ax.set_ylim(0, 100)
    ax.set_title(" ".join(t for t in (title, "predicted lDDT per residue", note) if t))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_pae(pae: np.ndarray, path: str | Path, *, max_pae: float = 31.75, title: str = "") -> Path:
    """Predicted aligned error: row = residue the frame is aligned on, column = scored residue."""
    fig = _figure(5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    n = pae.shape[0]
    image = ax.imshow(pae, vmin=0, vmax=max_pae, cmap="Greens_r", extent=(0.5, n + 0.5, n + 0.5, 0.5))
    fig.colorbar(image, ax=ax, label="expected position error (Å)")
    ax.set_xlabel("scored residue")
    ax.set_ylabel("aligned residue")
    ax.set_title(f"{title} predicted aligned error".strip())
    return _save(fig, path)


def plot_msa_coverage(msa: np.ndarray, path: str | Path, *, gap_index: int, title: str = "") -> Path:
    """Rows sorted by identity to the query, coloured by identity; black line = sequences per column.

    `msa` is [num_seqs, num_res] integer codes with row 0 the query and `gap_index` the gap code.
    """
    fig = _figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    non_gap = msa != gap_index  # [S, N]
    identity = (msa == msa[:1]).sum(axis=1) / max(msa.shape[1], 1)
    order = np.argsort(-identity, kind="stable")
    shown = np.where(non_gap[order], identity[order][:, None], np.nan)
    num_seqs, num_res = msa.shape
    image = ax.imshow(
        shown, aspect="auto", interpolation="nearest", cmap="rainbow_r", vmin=0, vmax=1,
        extent=(0.5, num_res + 0.5, num_seqs - 0.5, -0.5),
    )  # fmt: skip
    ax.plot(np.arange(1, num_res + 1), non_gap.sum(axis=0), color="black", lw=1)
    fig.colorbar(image, ax=ax, label="sequence identity to query")
    ax.set_xlim(0.5, num_res + 0.5)
    ax.set_ylim(-0.5, num_seqs - 0.5)
    ax.set_xlabel("residue")
    ax.set_ylabel("sequences")
    ax.set_title(f"{title} MSA coverage ({num_seqs} sequences)".strip())
    return _save(fig, path)
