"""Input, relative-position, recycling and extra-MSA embedders (AF2 Suppl. Alg. 3-5, 32, 1.7.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.common.protein import pseudo_beta
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.primitives import Linear, layer_norm
from ferryman.core.chunking import chunk_layer


def dgram_from_positions(rows: Tensor, cols: Tensor, num_bins: int, min_bin: float, max_bin: float) -> Tensor:
    """One-hot fp32 distance bins ``[R, C, num_bins]`` between positions ``rows`` ``[R, 3]`` and
    ``cols`` ``[C, 3]`` (AF2 ``dgram_from_positions``): ``num_bins`` lower edges evenly spaced from
    ``min_bin`` to ``max_bin`` Angstrom; the last bin is open."""
    lower = torch.linspace(min_bin, max_bin, num_bins, device=rows.device, dtype=torch.float32) ** 2
    upper = torch.cat([lower[1:], lower.new_tensor([1e8])])
    d2 = ((rows[:, None, :].float() - cols[None, :, :].float()) ** 2).sum(-1, keepdim=True)  # [R, C, 1]
    return ((d2 > lower) & (d2 < upper)).float()


class InputEmbedder(nn.Module):
    """AF2 Suppl. Alg. 3 (with the relative position encoding of Alg. 4-5).

    target_feat ``[N, 22]``, msa_feat ``[S, N, 49]``, residue_index ``[N]`` ->
    m ``[S, N, c_m]`` and z ``[N, N, c_z]``.
    """

    def __init__(self, cfg: AlphaFoldConfig, tf_dim: int = 22, msa_dim: int = 49):
        super().__init__()
        self.max_relative_feature = cfg.max_relative_feature
        self.preprocess_1d = Linear(tf_dim, cfg.c_m)
        self.preprocess_msa = Linear(msa_dim, cfg.c_m)
        self.left_single = Linear(tf_dim, cfg.c_z)
        self.right_single = Linear(tf_dim, cfg.c_z)
        self.pair_activiations = Linear(2 * cfg.max_relative_feature + 1, cfg.c_z)  # AF2's spelling

    def relpos(self, ri_rows: Tensor, ri_all: Tensor) -> Tensor:
        """AF2 Suppl. Alg. 4: one-hot of the clipped residue offset, projected to c_z."""
        offset = ri_rows[:, None].long() - ri_all[None, :].long()
        bins = (offset + self.max_relative_feature).clamp(0, 2 * self.max_relative_feature)
        onehot = F.one_hot(bins, 2 * self.max_relative_feature + 1).to(self.pair_activiations.weight.dtype)
        return self.pair_activiations(onehot)

    def forward(self, target_feat: Tensor, msa_feat: Tensor, residue_index: Tensor,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        m = self.preprocess_msa(msa_feat) + self.preprocess_1d(target_feat)[None]
        right = self.right_single(target_feat)

        def pair_rows(tf: Tensor, ri: Tensor) -> Tensor:
            return self.left_single(tf)[:, None] + right[None, :] + self.relpos(ri, residue_index)

        inputs = {"tf": target_feat, "ri": residue_index}
        z = chunk_layer(pair_rows, inputs, chunk_size=chunk_size, num_batch_dims=1)  # [N, N, c_z]
        return m, z


class RecyclingEmbedder(nn.Module):
    """AF2 Suppl. Alg. 32: add the previous iteration's first MSA row, pair representation and
    pseudo-beta distogram to this iteration's inputs."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.bins = (cfg.prev_pos_num_bins, cfg.prev_pos_min_bin, cfg.prev_pos_max_bin)
        self.prev_pos_linear = Linear(cfg.prev_pos_num_bins, cfg.c_z)
        self.prev_msa_first_row_norm = layer_norm(cfg.c_m)
        self.prev_pair_norm = layer_norm(cfg.c_z)

    def forward(self, z: Tensor, aatype: Tensor, prev_pos: Tensor, prev_msa_first_row: Tensor,
                prev_pair: Tensor | None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The update ``[N, c_m]`` for the first MSA row, and z plus the recycled pair terms (written
        into z itself when no gradient is recorded)."""
        dtype = self.prev_pos_linear.weight.dtype
        cb = pseudo_beta(aatype, prev_pos)  # [N, 3]
        num_bins, min_bin, max_bin = self.bins

        def pair_rows(z: Tensor, cb_rows: Tensor, prev: Tensor | None = None) -> Tensor:
            dgram = dgram_from_positions(cb_rows, cb, num_bins, min_bin, max_bin).to(dtype)
            prev = torch.zeros_like(z, dtype=dtype) if prev is None else prev.to(dtype)
            return z + self.prev_pos_linear(dgram) + self.prev_pair_norm(prev)

        out = z if not torch.is_grad_enabled() else None
        # No previous pair (the first iteration) means zeros, made a row block at a time rather
        # than as a whole pair-sized tensor of zeros.
        inputs = {"z": z, "cb_rows": cb} if prev_pair is None else {"z": z, "cb_rows": cb, "prev": prev_pair}
        z = chunk_layer(pair_rows, inputs, chunk_size=chunk_size, num_batch_dims=1, out=out)
        return self.prev_msa_first_row_norm(prev_msa_first_row.to(dtype)), z


class ExtraMSAEmbedder(nn.Module):
    """AF2 Suppl. Alg. 2 line 14: one-hot extra MSA (23 classes) + deletion features -> c_e."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.extra_msa_activations = Linear(25, cfg.c_e)

    def forward(self, extra_msa: Tensor, extra_has_deletion: Tensor, extra_deletion_value: Tensor) -> Tensor:
        dtype = self.extra_msa_activations.weight.dtype
        feats = torch.cat(
            [
                F.one_hot(extra_msa.long(), 23).to(dtype),
                extra_has_deletion[..., None].to(dtype),
                extra_deletion_value[..., None].to(dtype),
            ],
            dim=-1,
        )  # [S_extra, N, 25]
        return self.extra_msa_activations(feats)
