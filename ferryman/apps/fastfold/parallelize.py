"""Dynamic axial parallelism (DAP, FastFold) for the Evoformer, extra-MSA and template stacks.

``parallelize(model, dims)`` attaches a ``DAPRunner`` to every stack and block; the model's math
is untouched. Inside a stack each rank holds:

- the MSA split by sequence (rows) for row attention, re-sharded by residue (columns) with an
  all-to-all for column attention, the transition and the outer product mean;
- the pair representation split by rows for the outgoing triangle product and starting-node
  attention, and by columns for the incoming product and ending-node attention.

N_res and N_seq are zero-padded to a multiple of the group size with masked positions, which the
masks keep out of every real result. Parameters are replicated; their gradients are partial sums
per rank, so training sums them over the group (``allreduce_dap_grads``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ferryman.apps.fastfold.model.evoformer import (
    EvoformerBlock,
    EvoformerStack,
    PairStackBlock,
    TemplatePairStack,
)
from ferryman.apps.fastfold.model.primitives import add_
from ferryman.core.parallel import (
    ParallelDims,
    all_to_all,
    all_to_all_async,
    gather,
    gather_async,
    pad_to_multiple,
    scatter,
    wait,
)
from ferryman.core.parallel.collectives import group_rank, group_size

# Layout each pair op needs: 'row' = split over i, 'col' = split over j, None = either.
_PAIR_LAYOUT = {
    "triangle_multiplication_outgoing": "row",
    "triangle_multiplication_incoming": "col",
    "triangle_attention_starting_node": "row",
    "triangle_attention_ending_node": "col",
    "pair_transition": None,
}
_EVOFORMER_ORDER = tuple(_PAIR_LAYOUT)
_TEMPLATE_ORDER = (
    "triangle_attention_starting_node",
    "triangle_attention_ending_node",
    "triangle_multiplication_outgoing",
    "triangle_multiplication_incoming",
    "pair_transition",
)


class DAPRunner:
    """Runs stacks and blocks sharded over ``group`` (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.world = group_size(group)
        self.rank = group_rank(group)

    # --- layout helpers ---------------------------------------------------------------------
    def _mine(self, x: Tensor, dim: int) -> Tensor:
        length = x.shape[dim] // self.world
        return x.narrow(dim, self.rank * length, length)

    def _pad(self, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        for d in dims:
            x = pad_to_multiple(x, d, self.world)
        return x

    def _to_col(self, z: Tensor) -> Tensor:
        return all_to_all(z, scatter_dim=1, gather_dim=0, group=self.group)  # [N_p, N_p / P, c]

    def _to_row(self, z: Tensor) -> Tensor:
        return all_to_all(z, scatter_dim=0, gather_dim=1, group=self.group)  # [N_p / P, N_p, c]

    # --- stacks -----------------------------------------------------------------------------
    def stack_forward(self, stack: EvoformerStack, m, z, msa_mask, pair_mask, chunk_size, inplace):
        """Pad, shard, run the blocks (each dispatching to ``block_forward``), gather, unpad."""
        s, n = m.shape[0], m.shape[1]
        msa_mask = self._pad(msa_mask, (0, 1))
        pair_mask = self._pad(pair_mask, (0, 1))
        m_loc = scatter(self._pad(m, (0, 1)), 0, self.group)  # [S_p / P, N_p, c_m]
        z_loc = scatter(self._pad(z, (0, 1)), 0, self.group)  # [N_p / P, N_p, c_z]
        m_loc, z_loc = stack.run_blocks(m_loc, z_loc, msa_mask, pair_mask, chunk_size, inplace)
        # Everything after the stack is replicated, so the gather's gradient is a slice, not a sum.
        m = gather(m_loc, 0, self.group, size=s, reduce_grad=False)[:, :n]
        z = gather(z_loc, 0, self.group, size=n, reduce_grad=False)[:, :n]
        return m, z

    def template_forward(self, stack: TemplatePairStack, t, mask, chunk_size, inplace):
        n = t.shape[0]
        mask = self._pad(mask, (0, 1))
        t_loc = scatter(self._pad(t, (0, 1)), 0, self.group)
        order = _TEMPLATE_ORDER if stack.attention_first else _EVOFORMER_ORDER
        for block in stack.blocks:
            t_loc = self.pair_ops(block, t_loc, mask, chunk_size, inplace, order)
        return gather(t_loc, 0, self.group, size=n, reduce_grad=False)[:, :n]

    # --- blocks -----------------------------------------------------------------------------
    def block_forward(self, block: EvoformerBlock, m_loc, z_loc, msa_mask, pair_mask, chunk_size, inplace):
        """One Evoformer block on shards; msa_mask ``[S_p, N_p]`` and pair_mask are full (padded)."""
        rows_mask, cols_mask = self._mine(msa_mask, 0), self._mine(msa_mask, 1)
        if block.outer_product_first:  # AlphaFold-Multimer: the pair sees the block's input MSA
            m_col = all_to_all(m_loc, scatter_dim=1, gather_dim=0, group=self.group)  # [S_p, N_p / P, c_m]
            z_loc = add_(z_loc, self._outer_product_mean(block, m_col, cols_mask, msa_mask, chunk_size), inplace)
            del m_col
        row_att = block.msa_row_attention_with_pair_bias
        bias, handle = gather_async(row_att.pair_bias(z_loc, chunk_size), 1, self.group)  # [H, N_p, N_p]
        m_loc = add_(m_loc, row_att(m_loc, None, rows_mask, chunk_size, bias=wait(bias, handle)), inplace)

        m_col = all_to_all(m_loc, scatter_dim=1, gather_dim=0, group=self.group)  # [S_p, N_p / P, c_m]
        m_col = add_(m_col, block.column_attention(m_col, cols_mask, chunk_size), inplace)
        m_col = add_(m_col, block.msa_transition(m_col, cols_mask, chunk_size), inplace)
        # Start re-sharding the MSA by rows; the outer product mean works on the column shards meanwhile.
        m_next, m_handle = all_to_all_async(m_col, scatter_dim=0, gather_dim=1, group=self.group)
        if not block.outer_product_first:
            z_loc = add_(z_loc, self._outer_product_mean(block, m_col, cols_mask, msa_mask, chunk_size), inplace)
        z_loc = self.pair_ops(block.pair_stack, z_loc, pair_mask, chunk_size, inplace, _EVOFORMER_ORDER)
        return wait(m_next, m_handle), z_loc

    def _outer_product_mean(self, block: EvoformerBlock, m_col, cols_mask, msa_mask, chunk_size) -> Tensor:
        """The pair update of this rank's rows from the MSA sharded by columns."""
        opm = block.outer_product_mean
        a, b = opm.projections(m_col, cols_mask)
        b_full = gather(b, 1, self.group)  # [S_p, N_p, c]
        return opm.combine(a, b_full, cols_mask, msa_mask, chunk_size)

    def pair_ops(self, block: PairStackBlock, z_loc, pair_mask, chunk_size, inplace, order) -> Tensor:
        """The pair ops of ``block`` in ``order``, re-sharding rows <-> columns only when needed."""
        layout = "row"
        for name in order:
            want = _PAIR_LAYOUT[name]
            if want is not None and want != layout:
                z_loc = self._to_col(z_loc) if want == "col" else self._to_row(z_loc)
                layout = want
            mask = self._mine(pair_mask, 0 if layout == "row" else 1)
            z_loc = add_(z_loc, self._pair_op(getattr(block, name), name, z_loc, mask, chunk_size), inplace)
        return z_loc if layout == "row" else self._to_row(z_loc)

    def _pair_op(self, mod: nn.Module, name: str, z: Tensor, mask: Tensor, chunk_size) -> Tensor:
        if name == "pair_transition":
            return mod(z, mask, chunk_size)
        if name.startswith("triangle_multiplication"):
            # Outgoing needs b for every row j (rows layout); incoming b for every column i.
            dim = 0 if name.endswith("outgoing") else 1
            a, b = mod.projections(z, mask, chunk_size)
            b_full, handle = gather_async(b, dim, self.group)
            return mod.finish(mod.product(a, wait(b_full, handle)), z, chunk_size)
        # Triangle attention: ending node works on the transpose, whose rows are our columns.
        starting = name.endswith("starting_node")
        zt = z if starting else z.transpose(0, 1)
        mt = mask if starting else mask.transpose(0, 1)
        bias = gather(mod.bias(zt, chunk_size), 1, self.group)  # [H, N_p, N_p]
        out = mod.attend(zt, mt, bias, chunk_size)
        return out if starting else out.transpose(0, 1)


def parallelize(model: nn.Module, dims: ParallelDims | dist.ProcessGroup | None) -> nn.Module:
    """Attach DAP over ``dims.dap_group`` to every Evoformer/extra-MSA/template stack in ``model``.

    With one rank (or no group) the model is left as it is. Returns the model.
    """
    group = dims.dap_group if isinstance(dims, ParallelDims) else dims
    if group_size(group) == 1:
        return model
    runner = DAPRunner(group)
    for module in model.modules():
        if isinstance(module, EvoformerStack | EvoformerBlock | TemplatePairStack):
            module.dap = runner
    return model


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in model.modules():
        if isinstance(module, EvoformerBlock) and module.dap is not None:
            params.extend(module.parameters())
        elif isinstance(module, TemplatePairStack) and module.dap is not None:
            params.extend(module.blocks.parameters())
    return params


def allreduce_dap_grads(model: nn.Module, dims: ParallelDims | dist.ProcessGroup | None) -> None:
    """Sum the gradients of the sharded blocks' parameters over the DAP group: each rank computed
    its shard's share. Parameters outside the stacks run replicated and already hold full
    gradients."""
    group = dims.dap_group if isinstance(dims, ParallelDims) else dims
    if group_size(group) == 1:
        return
    grads = [p.grad for p in sharded_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
