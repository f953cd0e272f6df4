"""AlphaFold-Multimer input embedding: one-hot target features and the relative chain and entity
encoding (Evans et al. 2021, Suppl. 2.2; AF2 ``modules_multimer.EmbeddingsAndEvoformer``).

The monomer embedder (``embedders.InputEmbedder``) reads a 22-channel target feature and one-hot
residue offsets; the multimer one reads ``one_hot(aatype, 21)`` and, for each residue pair, the
clipped offset within a chain (an extra bin for "other chain"), whether the two chains are copies
of one sequence (same entity), and the clipped difference of their copy numbers (sym_id) within
an entity. Chain features (one complex, no batch dimension)::

    residue_index  [N]  int, numbered from 0 within each chain
    asym_id        [N]  int, 1.. per chain
    entity_id      [N]  int, 1.. per distinct sequence
    sym_id         [N]  int, 1.. per copy of a sequence
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.primitives import Linear
from ferryman.core.chunking import chunk_layer

MULTIMER_TARGET_FEAT_DIM = 21  # one_hot(aatype, 21): no between-segment channel in the multimer
MSA_FEAT_DIM = 49
CHAIN_FEATURES = ("residue_index", "asym_id", "entity_id", "sym_id")


class RelativeChainEncoding(nn.Module):
    """AF2-Multimer ``_relative_encoding`` with ``use_chain_relative``: for residues i, j,
    one-hot(clip(ri_i - ri_j) or "other chain") ``[2k+2]`` + same-entity ``[1]`` +
    one-hot(clip(sym_i - sym_j) or "other entity") ``[2c+2]`` -> c_z (``position_activations``)."""

    def __init__(self, c_z: int, max_relative_idx: int, max_relative_chain: int):
        super().__init__()
        self.max_idx, self.max_chain = max_relative_idx, max_relative_chain
        width = (2 * max_relative_idx + 2) + 1 + (2 * max_relative_chain + 2)
        self.position_activations = Linear(width, c_z)

    def features(self, rows: dict[str, Tensor], cols: dict[str, Tensor]) -> Tensor:
        """``[rows, N, 73]`` (for AF2's k=32, c=2) between residues ``rows`` and all ``cols``."""
        k, c = self.max_idx, self.max_chain
        same_chain = rows["asym_id"][:, None] == cols["asym_id"][None, :]
        offset = rows["residue_index"][:, None].long() - cols["residue_index"][None, :].long()
        offset = torch.where(same_chain, (offset + k).clamp(0, 2 * k), torch.full_like(offset, 2 * k + 1))
        same_entity = rows["entity_id"][:, None] == cols["entity_id"][None, :]
        rel_sym = rows["sym_id"][:, None].long() - cols["sym_id"][None, :].long()
        rel_sym = torch.where(same_entity, (rel_sym + c).clamp(0, 2 * c), torch.full_like(rel_sym, 2 * c + 1))
        dtype = self.position_activations.weight.dtype
        return torch.cat(
            [
                F.one_hot(offset, 2 * k + 2).to(dtype),
                same_entity[..., None].to(dtype),
                F.one_hot(rel_sym, 2 * c + 2).to(dtype),
            ],
            dim=-1,
        )

    def forward(self, rows: dict[str, Tensor], cols: dict[str, Tensor]) -> Tensor:
        return self.position_activations(self.features(rows, cols))  # [rows, N, c_z]


class MultimerInputEmbedder(nn.Module):
    """AF2-Multimer input embedding: target_feat ``[N, 21]``, msa_feat ``[S, N, 49]`` and the
    chain features -> m ``[S, N, c_m]`` and z ``[N, N, c_z]`` (relative encoding included).

    Parameter names follow AF2 (``preprocess_1d`` ... under ``evoformer/``, the encoding under
    ``evoformer/~_relative_encoding/``), so official multimer weights load one to one.
    """

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        tf = MULTIMER_TARGET_FEAT_DIM
        self.preprocess_1d = Linear(tf, cfg.c_m)
        self.preprocess_msa = Linear(MSA_FEAT_DIM, cfg.c_m)
        self.left_single = Linear(tf, cfg.c_z)
        self.right_single = Linear(tf, cfg.c_z)
        self.relative_encoding = RelativeChainEncoding(cfg.c_z, cfg.max_relative_feature, cfg.max_relative_chain)

    def forward(self, target_feat: Tensor, msa_feat: Tensor, chains: dict[str, Tensor],
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        m = self.preprocess_msa(msa_feat) + self.preprocess_1d(target_feat)[None]
        right = self.right_single(target_feat)
        cols = {k: chains[k] for k in CHAIN_FEATURES}

        def pair_rows(tf: Tensor, **rows: Tensor) -> Tensor:
            return self.left_single(tf)[:, None] + right[None, :] + self.relative_encoding(rows, cols)

        z = chunk_layer(pair_rows, {"tf": target_feat, **cols}, chunk_size=chunk_size, num_batch_dims=1)  # [N, N, c_z]
        return m, z
