"""Write one target's outputs in AlphaFold2's layout.

<out>/<target>/
  msas/                          alignments used (AF2 names)
  features.npz                   raw AF2 feature dict (strings as unicode, no pickles)
  unrelaxed_<model>.pdb|.cif     per model, pLDDT in the B-factor column
  relaxed_<model>.pdb|.cif       per model when relaxing
  ranked_<i>.pdb|.cif            best first (relaxed when relaxing)
  confidence_<model>.json        pLDDT per residue and its category (AF2 v2.3 format)
  pae_<model>.json               predicted aligned error of _ptm models (AF2 v2.3 format)
  ranking_debug.json             mean pLDDT per model and the order (AF2 ranks monomers by it);
                                 for multimer models "iptm+ptm" (0.8 ipTM + 0.2 pTM) and the order
  relax_metrics.json             energies, Cα RMSD and violations per model
  timings.json                   seconds per stage
  plddt.png, pae_<model>.png, msa_coverage.png
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.output import confidence, plots
from ferryman.apps.fastfold.output.protein import Protein, write_mmcif, write_pdb
from ferryman.core.io import atomic_path


@dataclass(kw_only=True)
class ModelResult:
    """What one model produced for one target, ready to write."""

    name: str
    unrelaxed: Protein
    plddt: np.ndarray  # [N]
    pae: np.ndarray | None = None  # [N, N]
    max_pae: float | None = None
    ptm: float | None = None
    iptm: float | None = None  # multimer models
    ranking_confidence: float | None = None  # multimer: 0.8 ipTM + 0.2 pTM, what AF2 ranks them by
    relaxed: Protein | None = None
    relax_metrics: dict = field(default_factory=dict)

    @property
    def mean_plddt(self) -> float:
        return float(np.mean(self.plddt))


def write_features(raw: dict[str, np.ndarray], path: Path) -> Path:
    """npz without object arrays, so `np.load(allow_pickle=False)` can read it."""
    arrays = {k: (np.array([s.decode() for s in v.ravel()]).reshape(v.shape) if v.dtype == object else v) for k, v in raw.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def write_relaxed_files(result: ModelResult, folder: Path, *, target: str) -> None:
    if result.relaxed is not None:
        write_pdb(result.relaxed, folder / f"relaxed_{result.name}.pdb")
        write_mmcif(result.relaxed, folder / f"relaxed_{result.name}.cif", name=f"{target}_{result.name}_relaxed")


def write_model_files(result: ModelResult, folder: Path, *, target: str, random_weights: bool, plot: bool = True) -> None:
    """Unrelaxed structure, confidence JSON and PAE plot of one model."""
    write_pdb(result.unrelaxed, folder / f"unrelaxed_{result.name}.pdb")
    write_mmcif(result.unrelaxed, folder / f"unrelaxed_{result.name}.cif", name=f"{target}_{result.name}")
    confidence.write_json(folder / f"confidence_{result.name}.json",
                          confidence.confidence_json(result.plddt, random_weights=random_weights), compact=True)  # fmt: skip
    # AF2's largest PAE (64 bins up to 31 Å) where a result gives none: the JSON and the plot agree.
    max_pae = 31.75 if result.max_pae is None else result.max_pae
    if result.pae is not None:
        confidence.write_json(folder / f"pae_{result.name}.json", confidence.pae_json(result.pae, max_pae),
                              compact=True)  # fmt: skip
    if result.pae is not None and plot:
        title = f"{target} {result.name}" + (" (random weights)" if random_weights else "")
        plots.plot_pae(result.pae, folder / f"pae_{result.name}.png", max_pae=max_pae, title=title)


def _multimer(results: list[ModelResult]) -> bool:
    return bool(results) and all(r.ranking_confidence is not None for r in results)


def rank(results: list[ModelResult]) -> list[str]:
    """Best first: by 0.8 ipTM + 0.2 pTM for multimer models, else by mean pLDDT (AF2 v2.3)."""
    if _multimer(results):
        return confidence.rank_models({r.name: r.ranking_confidence for r in results})
    return confidence.rank_models({r.name: r.mean_plddt for r in results})


def write_ranking(
    results: list[ModelResult], folder: Path, *, target: str, random_weights: bool, plot: bool = True
) -> list[str]:
    """ranked_<i> files, ranking_debug.json, relax_metrics.json and the pLDDT plot; returns the order."""
    plddts = {r.name: r.mean_plddt for r in results}
    ptms = {r.name: round(r.ptm, 6) for r in results if r.ptm is not None}
    if _multimer(results):
        scores = {r.name: r.ranking_confidence for r in results}
        iptms = {r.name: round(r.iptm, 6) for r in results}
        record = confidence.ranking_debug_multimer(scores, iptms, ptms, plddts, random_weights=random_weights)
    else:
        record = confidence.ranking_debug(plddts, ptms, random_weights=random_weights)
    by_name = {r.name: r for r in results}
    for rank, name in enumerate(record["order"]):
        result = by_name[name]
        best = result.relaxed if result.relaxed is not None else result.unrelaxed
        write_pdb(best, folder / f"ranked_{rank}.pdb")
        write_mmcif(best, folder / f"ranked_{rank}.cif", name=f"{target}_ranked_{rank}")
    confidence.write_json(folder / "ranking_debug.json", record)
    relax = {r.name: r.relax_metrics for r in results if r.relax_metrics}
    if relax:
        confidence.write_json(folder / "relax_metrics.json", relax)
    note = "(random weights)" if random_weights else ""
    if plot:
        plddt = {n: by_name[n].plddt for n in record["order"]}
        plots.plot_plddt(plddt, folder / "plddt.png", title=target, note=note)
    return record["order"]
