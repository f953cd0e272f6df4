"""Residue crops for training (AF2 Suppl. 1.2.8): a contiguous window, or the residues nearest a
randomly chosen interface-free anchor in space (the spatial crop AlphaFold-Multimer introduced,
used here for monomers too because it keeps 3-D neighbourhoods whole)."""

from __future__ import annotations

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.train.structure import Chain

CROP_MODES = ("contiguous", "spatial")


def contiguous_crop(num_res: int, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random window of ``crop_size`` residues (all of them when shorter)."""
    if num_res <= crop_size:
        return np.arange(num_res)
    start = int(rng.integers(0, num_res - crop_size + 1))
    return np.arange(start, start + crop_size)


def spatial_crop(ca: np.ndarray, ca_mask: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of the ``crop_size`` residues whose Cα lie nearest a random resolved Cα.

    Residues without a Cα rank last, so they enter a crop only when nothing else is left.
    """
    num_res = ca.shape[0]
    if num_res <= crop_size:
        return np.arange(num_res)
    present = np.flatnonzero(ca_mask > 0)
    if present.size == 0:
        return contiguous_crop(num_res, crop_size, rng)
    anchor = ca[int(rng.choice(present))]
    dist = np.linalg.norm(ca - anchor, axis=-1) + np.where(ca_mask > 0, 0.0, 1e9)
    # A tiny index term breaks ties the same way on every run.
    order = np.argsort(dist + 1e-6 * np.arange(num_res), kind="stable")
    return np.sort(order[:crop_size])


def crop_indices(chain: Chain, crop_size: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r} must be one of {', '.join(CROP_MODES)}")
    if mode == "contiguous":
        return contiguous_crop(len(chain), crop_size, rng)
    ca = rc.atom_order["CA"]
    return spatial_crop(chain.atom_positions[:, ca], chain.atom_mask[:, ca], crop_size, rng)


def crop_chain(chain: Chain, index: np.ndarray) -> Chain:
    return Chain(
        name=chain.name, aatype=chain.aatype[index], atom_positions=chain.atom_positions[index],
        atom_mask=chain.atom_mask[index], residue_index=chain.residue_index[index], resolution=chain.resolution,
        source=chain.source,
    )  # fmt: skip


def crop_msa(msa: Msa, index: np.ndarray) -> Msa:
    """The alignment's columns at ``index``; every row keeps its deletions at those columns."""
    rows = [("".join(seq[i] for i in index), [dels[i] for i in index]) for seq, dels in zip(msa.sequences, msa.deletions)]
    return Msa(sequences=[r[0] for r in rows], deletions=[r[1] for r in rows], descriptions=list(msa.descriptions))
