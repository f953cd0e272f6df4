"""A training loader over a folder of structures (AF2 Suppl. 1.2): each epoch visits every chain
once in a seeded order, crops it, samples its MSA clusters and BERT mask, and draws the step's
recycling count and whether backbone FAPE is clamped (Suppl. 1.10, 1.11.5).

The loop seeds torch's global RNG before each epoch's ``iter``; the epoch seed is drawn from it,
so a resumed run replays the same examples. Under data parallelism every rank draws the same
order and data-parallel rank r of R takes its places r, R + r, 2R + r, ...: the examples of one
step across the R ranks are those one process reads with R times the gradient accumulation, and
the ranks of one DAP group (same data-parallel rank) read the same examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ferryman.apps.fastfold.data.msa import Msa, read_msa
from ferryman.apps.fastfold.train.config import TrainPresetConfig
from ferryman.apps.fastfold.train.crop import crop_chain, crop_indices, crop_msa
from ferryman.apps.fastfold.train.features import training_example
from ferryman.apps.fastfold.train.structure import Chain, load_structures
from ferryman.core.errors import UserError

MSA_SUFFIXES = (".a3m", ".sto")


def find_msa(msa_dir: Path | None, stem: str) -> Msa | None:
    if msa_dir is None:
        return None
    for suffix in MSA_SUFFIXES:
        path = Path(msa_dir) / f"{stem}{suffix}"
        if path.is_file():
            return read_msa(path)
    return None


class StructureDataset:
    """Iterable of training examples (dicts of tensors, one protein each, no batch dimension)."""

    def __init__(self, chains: list[Chain], preset: TrainPresetConfig, *, msas: dict[str, Msa] | None = None,
                 skipped: list[str] | None = None, dp_rank: int = 0, dp: int = 1) -> None:  # fmt: skip
        if not chains:
            raise UserError("no readable structures to train on")
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp={dp})")
        self.chains, self.preset, self.msas = chains, preset, msas or {}
        self.dp_rank, self.dp = dp_rank, dp
        self.skipped_reasons = list(skipped or [])  # one line per file that could not be read
        self.skipped = len(self.skipped_reasons)
        self.inputs = preset.input_config()

    @classmethod
    def from_folder(cls, folder: str | Path, preset: TrainPresetConfig, *, msa_dir: str | Path | None = None,
                    dp_rank: int = 0, dp: int = 1) -> StructureDataset:  # fmt: skip
        """Every readable PDB/mmCIF in ``folder``, this data-parallel rank's share of each epoch;
        ``skipped`` counts the files that were not readable."""
        chains, skipped = load_structures(folder)
        if not chains:
            raise UserError(f"{folder}: no readable structure files (.pdb, .cif); {len(skipped)} skipped")
        msas = {}
        for chain in chains:
            stem = chain.source or chain.name
            msa = find_msa(Path(msa_dir) if msa_dir else None, stem)
            if msa is not None:
                if len(msa.sequences[0]) != len(chain):
                    raise UserError(f"{msa_dir}/{stem}: the alignment has {len(msa.sequences[0])} columns, "
                                    f"the structure {len(chain)} residues")  # fmt: skip
                msas[chain.name] = msa
        return cls(chains, preset, msas=msas, skipped=[reason for _, reason in skipped], dp_rank=dp_rank, dp=dp)

    def __len__(self) -> int:
        """The number of structures (each rank reads ``ceil(len / dp)`` examples an epoch)."""
        return len(self.chains)

    def example(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        """The example of chain ``index`` for ``seed``: crop, MSA sample, recycling draw."""
        rng = np.random.default_rng(seed)
        chain = self.chains[index]
        keep = crop_indices(chain, self.preset.crop_size, self.preset.crop_mode, rng)
        msa = self.msas.get(chain.name)
        example = training_example(crop_chain(chain, keep), crop_msa(msa, keep) if msa else None, self.inputs,
                                   seed=int(rng.integers(2**31)))  # fmt: skip
        example["num_recycle"] = torch.tensor(int(rng.integers(0, self.preset.max_recycle + 1)))
        example["use_clamped_fape"] = torch.tensor(float(rng.random() < self.preset.fape_clamp_prob))
        return example

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        order = np.random.default_rng(epoch_seed).permutation(len(self.chains))
        # Padded cyclically to a multiple of dp, so that every rank takes as many steps an epoch
        # (a rank that ran out first would leave the others waiting in the gradient reduction).
        order = np.resize(order, -(-len(order) // self.dp) * self.dp)
        for position in range(self.dp_rank, len(order), self.dp):
            yield self.example(int(order[position]), epoch_seed + position)
