"""MSA-track modules of the Evoformer: row attention with pair bias, column attention, global
column attention and the outer product mean. Inputs are unbatched: m ``[S, N, c_m]``,
z ``[N, N, c_z]``, msa_mask ``[S, N]`` (None on the unchunked path when nothing is masked);
chunks are rows of the leading axis."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ferryman.apps.fastfold.model.primitives import (
    Attention,
    GlobalAttention,
    Linear,
    chunk_add_,
    key_mask,
    layer_norm,
    transposed,
)
from ferryman.core.chunking import chunk_layer


class MSARowAttentionWithPairBias(nn.Module):
    """AF2 Suppl. Alg. 7: each MSA row attends over residues, biased by the pair representation."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.query_norm = layer_norm(c_m, backend)
        self.feat_2d_norm = layer_norm(c_z, backend)
        self.feat_2d_weights = Linear(c_z, num_heads, bias=False, init="default")
        self.attention = Attention(c_m, c_m, c_hidden, num_heads, backend=backend)

    def pair_bias(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """``[H, N_rows_of_z, N]`` bias from (a row block of) the pair representation, normalised
        ``chunk_size`` rows at a time so no LayerNorm of the whole pair exists."""

        def run(z: Tensor) -> Tensor:
            return self.feat_2d_weights(self.feat_2d_norm(z))

        return chunk_layer(run, {"z": z}, chunk_size=chunk_size, num_batch_dims=1).permute(2, 0, 1)

    def forward(self, m: Tensor, z: Tensor | None, mask: Tensor, chunk_size: int | None = None,
                *, bias: Tensor | None = None) -> Tensor:  # fmt: skip
        bias = self.pair_bias(z, chunk_size) if bias is None else bias  # [H, N, N]

        def run(m: Tensor, mask: Tensor | None) -> Tensor:
            m = self.query_norm(m)
            return self.attention(m, m, (bias[None],), key_mask(mask))

        return chunk_layer(run, {"m": m, "mask": mask}, chunk_size=chunk_size, num_batch_dims=1)

    def update_(self, m: Tensor, z: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``m += forward(m, z)`` in place, row blocks of the MSA at a time (the lean path)."""
        bias = self.pair_bias(z, chunk_size)[None]  # [1, H, N, N]

        def run(m: Tensor, mask: Tensor) -> Tensor:
            x = self.query_norm(m)
            return self.attention(x, x, (bias,), mask[:, None, None, :], query_chunk=chunk_size)

        return chunk_add_(m, run, {"m": m, "mask": mask}, chunk_size)


class MSAColumnAttention(nn.Module):
    """AF2 Suppl. Alg. 8: each residue column attends over the sequences."""

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.query_norm = layer_norm(c_m, backend)
        self.attention = Attention(c_m, c_m, c_hidden, num_heads, backend=backend)

    def _run(self, m: Tensor, mask: Tensor | None) -> Tensor:
        m = self.query_norm(m)
        return self.attention(m, m, (), key_mask(mask))

    def forward(self, m: Tensor, mask: Tensor | None, chunk_size: int | None = None) -> Tensor:
        m_t, mask_t = m.transpose(0, 1), transposed(mask)  # [N, S, c_m], [N, S]
        out = chunk_layer(self._run, {"m": m_t, "mask": mask_t}, chunk_size=chunk_size, num_batch_dims=1)
        return out.transpose(0, 1)

    def update_(self, m: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``m += forward(m)`` in place, column blocks at a time through the transposed view."""
        chunk_add_(m.transpose(0, 1), self._run, {"m": m.transpose(0, 1), "mask": mask.transpose(0, 1)}, chunk_size)
        return m


class MSAColumnGlobalAttention(nn.Module):
    """AF2 Suppl. Alg. 19: column attention with one mean query per column (extra MSA stack)."""

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.query_norm = layer_norm(c_m, backend)
        self.attention = GlobalAttention(c_m, c_hidden, num_heads, backend=backend)

    def _run(self, m: Tensor, mask: Tensor | None) -> Tensor:
        return self.attention(self.query_norm(m), mask)

    def forward(self, m: Tensor, mask: Tensor | None, chunk_size: int | None = None) -> Tensor:
        m_t, mask_t = m.transpose(0, 1), transposed(mask)  # [N, S, c_m], [N, S]
        out = chunk_layer(self._run, {"m": m_t, "mask": mask_t}, chunk_size=chunk_size, num_batch_dims=1)
        return out.transpose(0, 1)

    def update_(self, m: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``m += forward(m)`` in place, column blocks at a time through the transposed view."""
        chunk_add_(m.transpose(0, 1), self._run, {"m": m.transpose(0, 1), "mask": mask.transpose(0, 1)}, chunk_size)
        return m


class OuterProductMean(nn.Module):
    """AF2 Suppl. Alg. 10: pair update from the mean over sequences of outer products.

    ``output`` maps the flattened ``[c, c]`` outer product to c_z (AF2's output_w/output_b).
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, backend: str = "auto", eps: float = 1e-3):
        super().__init__()
        self.c_hidden, self.eps = c_hidden, eps
        self.layer_norm_input = layer_norm(c_m, backend)
        self.left_projection = Linear(c_m, c_hidden)
        self.right_projection = Linear(c_m, c_hidden)
        self.output = Linear(c_hidden * c_hidden, c_z, init="final")

    def projections(self, m: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Masked left and right projections ``[S, N, c]`` of the MSA (or of a column block)."""
        m = self.layer_norm_input(m)
        if mask is None:
            return self.left_projection(m), self.right_projection(m)
        mask = mask[..., None].to(m.dtype)
        return self.left_projection(m) * mask, self.right_projection(m) * mask

    def combine(self, a: Tensor, b: Tensor, mask_a: Tensor, mask_b: Tensor, chunk_size: int | None = None) -> Tensor:
        """Pair update ``[N_a, N_b, c_z]`` from projections a ``[S, N_a, c]``, b ``[S, N_b, c]``."""
        # Counts of shared sequences in fp32: bf16 holds integers exactly only up to 256.
        if mask_a is None:  # nothing masked: every pair shares every sequence
            norm = a.new_full((a.shape[1], b.shape[1]), float(a.shape[0]), dtype=torch.float32)
        else:
            norm = torch.einsum("si,sj->ij", mask_a.float(), mask_b.float())  # [N_a, N_b]
        if chunk_size is None and self._shallow(*a.shape[:2], b.shape[1]):
            return self._combine_shallow(a, b, norm)

        def run(a: Tensor, norm: Tensor) -> Tensor:
            outer = torch.einsum("isc,sjd->ijcd", a, b).flatten(-2)  # [i, N_b, c * c]
            return (self.output(outer).float() / (self.eps + norm[..., None])).to(a.dtype)

        a_t = a.transpose(0, 1)  # [N_a, S, c]
        return chunk_layer(run, {"a": a_t, "norm": norm}, chunk_size=chunk_size, num_batch_dims=1)

    def _shallow(self, s: int, n_a: int, n_b: int) -> bool:
        """Whether contracting b with the output weights first costs fewer operations than the
        outer product (AF2 sizes: MSAs of up to ~40 rows, such as single sequence or a shallow
        extra MSA), with its ``[S, c, N_b, c_z]`` intermediate smaller than the outer product's."""
        c, c_z = self.c_hidden, self.output.out_features
        outer_first = n_a * n_b * c * c * (s + c_z)
        weights_first = s * c * c_z * (n_b * c + n_a * n_b)
        return weights_first < outer_first and s * c_z < n_a * c

    def _combine_shallow(self, a: Tensor, b: Tensor, norm: Tensor) -> Tensor:
        """``combine`` reassociated: sum_{s,c} a[s,i,c] (sum_d b[s,j,d] W[z,c,d]), one matmul each
        (XLA makes the same reordering of AF2's einsums)."""
        s, n_a, c = a.shape
        n_b, c_z = b.shape[1], self.output.out_features
        w = self.output.weight.view(c_z, c, c).permute(2, 1, 0).reshape(c, c * c_z)  # [d, c * c_z]
        bw = (b.reshape(s * n_b, c) @ w).view(s, n_b, c, c_z).transpose(1, 2)  # [S, c, N_b, c_z]
        out = a.permute(1, 0, 2).reshape(n_a, s * c) @ bw.reshape(s * c, n_b * c_z)  # [N_a, N_b * c_z]
        out = (out.view(n_a, n_b, c_z) + self.output.bias).float()
        return (out / (self.eps + norm[..., None])).to(a.dtype)

    def forward(self, m: Tensor, mask: Tensor | None, chunk_size: int | None = None) -> Tensor:
        a, b = self.projections(m, mask)
        return self.combine(a, b, mask, mask, chunk_size)

    def update_(self, z: Tensor, m: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``z += forward(m)`` in place, row blocks of z at a time, each with its own block of
        the normaliser (no ``[N, N]`` count or ``[N, N, c_z]`` update is ever whole)."""
        a, b = self.projections(m, mask)
        mask_b = mask.float()

        def run(a: Tensor, mask_a: Tensor) -> Tensor:
            norm = mask_a.float() @ mask_b  # [i, N_b]
            outer = torch.einsum("isc,sjd->ijcd", a, b).flatten(-2)  # [i, N_b, c * c]
            return (self.output(outer).float() / (self.eps + norm[..., None])).to(a.dtype)

        # An outer-product row has c_hidden^2 channels (1024 in AF2, 8x a pair row): fewer rows per
        # block keep its transient the size of chunk_size rows of the pair.
        rows = max(1, chunk_size * z.shape[-1] // (self.c_hidden * self.c_hidden))
        return chunk_add_(z, run, {"a": a.transpose(0, 1), "mask_a": mask.transpose(0, 1)}, rows)
