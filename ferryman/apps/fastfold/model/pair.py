"""Pair-track modules: triangle multiplicative updates and triangle attention (AF2 Suppl. Alg. 11-14).

z is ``[N, N, c_z]`` (unbatched) and pair_mask ``[N, N]`` (None on the unchunked path when nothing
is masked). Each module exposes the pieces DAP
needs to run on a block of rows (``projections``/``combine``, ``bias``) besides ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.model.primitives import (
    Attention,
    Linear,
    chunk_add_,
    key_mask,
    layer_norm,
    row_slices,
    transposed,
)
from ferryman.core.chunking import chunk_layer


def channel_block(c_hidden: int, n: int, chunk_size: int) -> int:
    """Hidden channels per step of the lean triangle product: the a and b blocks of that many
    channels hold as many values as ``chunk_size`` rows of the full projections, and never fewer
    than an eighth of the width, which bounds the extra LayerNorm passes over z to eight."""
    return max(1, min(c_hidden, max(math.ceil(c_hidden * chunk_size / n), c_hidden // 8)))


class TriangleMultiplication(nn.Module):
    """AF2 Suppl. Alg. 11 (outgoing: ``z_ij = sum_k a_ik b_jk``) and Alg. 12 (incoming:
    ``z_ij = sum_k a_kj b_ki``), with AF2's left/right naming so official weights map 1:1."""

    def __init__(self, c_z: int, c_hidden: int, *, outgoing: bool, backend: str = "auto"):
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_input = layer_norm(c_z, backend)
        self.left_projection = Linear(c_z, c_hidden)
        self.right_projection = Linear(c_z, c_hidden)
        self.left_gate = Linear(c_z, c_hidden, init="gating")
        self.right_gate = Linear(c_z, c_hidden, init="gating")
        self.center_layer_norm = layer_norm(c_hidden, backend)
        self.output_projection = Linear(c_hidden, c_z, init="final")
        self.gating_linear = Linear(c_z, c_z, init="gating")

    def projections(self, z: Tensor, mask: Tensor, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Masked, gated left and right projections ``[rows, N, c]`` of (a row block of) z."""

        def run(z: Tensor, mask: Tensor) -> Tensor:
            z = self.layer_norm_input(z)
            mask = mask[..., None].to(z.dtype)
            left = mask * self.left_projection(z) * torch.sigmoid(self.left_gate(z))
            right = mask * self.right_projection(z) * torch.sigmoid(self.right_gate(z))
            return torch.cat([left, right], dim=-1)

        both = chunk_layer(run, {"z": z, "mask": mask}, chunk_size=chunk_size, num_batch_dims=1)
        return both.chunk(2, dim=-1)

    def product(self, a: Tensor, b: Tensor) -> Tensor:
        """The triangle product for this direction, as one batched matmul per channel."""
        a_c, b_c = a.permute(2, 0, 1), b.permute(2, 0, 1)  # [c, rows, N]
        if self.outgoing:  # sum_k a[i, k] b[j, k]
            out = a_c @ b_c.transpose(-1, -2)
        else:  # sum_k a[k, j] b[k, i]  ->  [i, j]
            out = b_c.transpose(-1, -2) @ a_c
        return out.permute(1, 2, 0)  # [i, j, c]

    def finish(self, x: Tensor, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """Output projection of the product x, gated by z (both ``[rows, N, *]``)."""

        def run(x: Tensor, z: Tensor) -> Tensor:
            gate = torch.sigmoid(self.gating_linear(self.layer_norm_input(z)))
            return self.output_projection(self.center_layer_norm(x)) * gate

        return chunk_layer(run, {"x": x, "z": z}, chunk_size=chunk_size, num_batch_dims=1)

    def forward(self, z: Tensor, mask: Tensor, chunk_size: int | None = None) -> Tensor:
        if chunk_size is None:
            return self._whole(z, mask)
        a, b = self.projections(z, mask, chunk_size)
        return self.finish(self.product(a, b), z, chunk_size)

    def _whole(self, z: Tensor, mask: Tensor) -> Tensor:
        """``forward`` unchunked, laid out for the matmuls: z normalised once, the four gated
        projections as one matmul straight into channel-first ``[4c, N * N]`` (the layout the
        per-channel product reads), the product batched over channels."""
        n_i, n_j, c_z = z.shape
        c = self.center_layer_norm.normalized_shape[0]
        x = self.layer_norm_input(z).reshape(n_i * n_j, c_z)  # [N * N, c_z]
        lins = (self.left_projection, self.right_projection, self.left_gate, self.right_gate)
        w, bias = torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins])
        p = torch.addmm(bias[:, None], w, x.t())  # [4c, N * N]: left, right, left gate, right gate
        inplace = not torch.is_grad_enabled()
        gates = p[2 * c :].sigmoid_() if inplace else p[2 * c :].sigmoid()
        proj = p[: 2 * c].mul_(gates) if inplace else p[: 2 * c] * gates
        if mask is not None:
            proj = proj.mul_(mask.reshape(1, -1)) if inplace else proj * mask.reshape(1, -1).to(proj.dtype)
        a, b = proj[:c].view(c, n_i, n_j), proj[c:].view(c, n_i, n_j)
        if self.outgoing:  # sum_k a[i, k] b[j, k]
            out = torch.bmm(a, b.transpose(1, 2))
        else:  # sum_k a[k, j] b[k, i]
            out = torch.bmm(b.transpose(1, 2), a)  # [c, i, j]
        # Channels last for the LayerNorm: a 2-d transpose copies at twice the speed of the 3-d permute.
        out = self.center_layer_norm(out.view(c, n_i * n_j).t().contiguous())  # [N * N, c]
        gate = self.gating_linear(x)
        gate = gate.sigmoid_() if inplace else gate.sigmoid()
        out = self.output_projection(out)
        out = out.mul_(gate) if inplace else out * gate
        return out.view(n_i, n_j, c_z)

    def _projection_block(self, z: Tensor, mask: Tensor, channels: slice, chunk_size: int) -> tuple[Tensor, Tensor]:
        """Channels ``channels`` of the gated left and right projections, channel-first
        ``[c, N, N]``, computed from row blocks of z (its LayerNorm is redone for each block)."""
        c, n = channels.stop - channels.start, z.shape[0]
        out = z.new_empty(2, c, n, z.shape[1])

        def proj(lin: nn.Linear, gate: nn.Linear, x: Tensor, m: Tensor) -> Tensor:
            p = F.linear(x, lin.weight[channels], lin.bias[channels])
            return m * p * torch.sigmoid(F.linear(x, gate.weight[channels], gate.bias[channels]))

        for rows in row_slices(n, chunk_size):
            x = self.layer_norm_input(z[rows])
            m = mask[rows][..., None].to(x.dtype)
            out[0, :, rows] = proj(self.left_projection, self.left_gate, x, m).permute(2, 0, 1)
            out[1, :, rows] = proj(self.right_projection, self.right_gate, x, m).permute(2, 0, 1)
        return out[0], out[1]

    def update_(self, z: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``z += forward(z)`` holding one hidden-width product besides z (the lean path).

        The product of every hidden channel must exist before the centre LayerNorm can mix them,
        so it is the one pair-sized buffer; the projections feeding it are built a channel block
        at a time and each block's product is written straight into it.
        """
        c_hidden, n = self.center_layer_norm.normalized_shape[0], z.shape[0]
        x = z.new_empty(c_hidden, n, z.shape[1])  # [c, i, j]
        step = channel_block(c_hidden, n, chunk_size)
        for start in range(0, c_hidden, step):
            channels = slice(start, min(start + step, c_hidden))
            a, b = self._projection_block(z, mask, channels, chunk_size)  # [c, N, N] each
            if self.outgoing:  # sum_k a[i, k] b[j, k]
                torch.bmm(a, b.transpose(-1, -2), out=x[channels])
            else:  # sum_k a[k, j] b[k, i]
                torch.bmm(b.transpose(-1, -2), a, out=x[channels])
            del a, b
        # Row i of the update reads only row i of x and of z (the gate), so it can land in place.
        x_rows = x.permute(1, 2, 0)  # [i, j, c] view
        return chunk_add_(z, self._finish_rows, {"x": x_rows, "z": z}, chunk_size)

    def _finish_rows(self, x: Tensor, z: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gating_linear(self.layer_norm_input(z)))
        return self.output_projection(self.center_layer_norm(x)) * gate


class TriangleAttention(nn.Module):
    """AF2 Suppl. Alg. 13 (starting node: row i attends over k with bias from z_jk) and Alg. 14
    (ending node: the same on the transposed pair representation)."""

    def __init__(self, c_z: int, c_hidden: int, num_heads: int, *, starting: bool, backend: str = "auto"):
        super().__init__()
        self.starting = starting
        self.query_norm = layer_norm(c_z, backend)
        self.feat_2d_weights = Linear(c_z, num_heads, bias=False, init="default")
        self.attention = Attention(c_z, c_z, c_hidden, num_heads, backend=backend)

    def bias(self, z_rows: Tensor, chunk_size: int | None = None) -> Tensor:
        """``[H, rows, N]`` triangle bias from rows of the (already oriented) pair representation,
        normalised ``chunk_size`` rows at a time so no LayerNorm of the whole pair exists."""

        def run(z: Tensor) -> Tensor:
            return self.feat_2d_weights(self.query_norm(z))

        return chunk_layer(run, {"z": z_rows}, chunk_size=chunk_size, num_batch_dims=1).permute(2, 0, 1)

    def attend(self, z_rows: Tensor, mask_rows: Tensor, bias: Tensor, chunk_size: int | None = None) -> Tensor:
        """Update for rows ``[rows, N, c_z]`` of the oriented z given the full bias ``[H, N, N]``."""

        def run(z: Tensor, mask: Tensor) -> Tensor:
            z = self.query_norm(z)
            return self.attention(z, z, (bias[None],), mask[:, None, None, :])

        return chunk_layer(run, {"z": z_rows, "mask": mask_rows}, chunk_size=chunk_size, num_batch_dims=1)

    def forward(self, z: Tensor, mask: Tensor | None, chunk_size: int | None = None) -> Tensor:
        if not self.starting:
            z, mask = z.transpose(0, 1), transposed(mask)
        if chunk_size is None:  # one LayerNorm of z feeds both the bias and the attention
            x = self.query_norm(z)
            bias = self.feat_2d_weights(x).permute(2, 0, 1)  # [H, N, N]
            out = self.attention(x, x, (bias[None],), key_mask(mask))
        else:
            out = self.attend(z, mask, self.bias(z, chunk_size), chunk_size)
        return out if self.starting else out.transpose(0, 1)

    def update_(self, z: Tensor, mask: Tensor, chunk_size: int) -> Tensor:
        """``z += forward(z)`` in place (the lean path): with the bias fixed first, row i of the
        (oriented) update depends on row i alone, so each row block is added as it is made; the
        ending node adds into column blocks of z through the transposed view."""
        zt, mt = (z, mask) if self.starting else (z.transpose(0, 1), mask.transpose(0, 1))
        bias = self.bias(zt, chunk_size)[None]  # [1, H, N, N]

        def run(z: Tensor, mask: Tensor) -> Tensor:
            x = self.query_norm(z)
            return self.attention(x, x, (bias,), mask[:, None, None, :], query_chunk=chunk_size)

        chunk_add_(zt, run, {"z": zt, "mask": mt}, chunk_size)
        return z
