"""Dynamic axial parallelism (DAP, FastFold) for the Evoformer, extra-MSA and template stacks,
applied to a built model from outside.

``parallelize(model, dims)`` turns every stack and block into its DAP subclass below, in place:
the same module objects, parameters and names (so one checkpoint and one official npz load in
both), a different ``forward``. Inside a stack each rank holds:

- the MSA split by sequence (rows) for row attention, re-sharded by residue (columns) with an
  all-to-all for column attention, the transition and the outer product mean;
- the pair representation split by rows for the outgoing triangle product and starting-node
  attention, and by columns for the incoming product and ending-node attention.

N_res and N_seq are zero-padded to a multiple of the group size with masked positions, which the
masks keep out of every real result. Parameters are replicated; inside the stacks each rank's
gradient is its shard's share, declared once with ``mark_partial_grads`` so that the core sums it
over the group before it reaches ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    mark_partial_grads,
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
# AF2 runs the template pair stack with attention first, the Evoformer with products first.
_TEMPLATE_ORDER = (
    "triangle_attention_starting_node",
    "triangle_attention_ending_node",
    "triangle_multiplication_outgoing",
    "triangle_multiplication_incoming",
    "pair_transition",
)


@dataclass
class _Shards:
    """The DAP group and the layout helpers every sharded module shares."""

    group: dist.ProcessGroup

    def __post_init__(self) -> None:
        self.world, self.rank = group_size(self.group), group_rank(self.group)

    def mine(self, x: Tensor, dim: int) -> Tensor:
        length = x.shape[dim] // self.world
        return x.narrow(dim, self.rank * length, length)

    def pad(self, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        for d in dims:
            x = pad_to_multiple(x, d, self.world)
        return x

    def to_col(self, z: Tensor) -> Tensor:
        return all_to_all(z, scatter_dim=1, gather_dim=0, group=self.group)  # [N_p, N_p / P, c]

    def to_row(self, z: Tensor) -> Tensor:
        return all_to_all(z, scatter_dim=0, gather_dim=1, group=self.group)  # [N_p / P, N_p, c]

    def split(self, x: Tensor) -> Tensor:
        """This rank's rows of the replicated ``x``, both leading dims padded: ``[S_p / P, N_p, c]``."""
        return scatter(self.pad(x, (0, 1)), 0, self.group)

    def join(self, x_loc: Tensor, rows: int, cols: int) -> Tensor:
        """The whole ``[rows, cols, c]`` from every rank's rows. Everything after a stack is
        replicated, so the gather's gradient is a slice, not a sum."""
        return gather(x_loc, 0, self.group, size=rows, reduce_grad=False)[:, :cols]


class DAPPairStackBlock(PairStackBlock):
    """The pair ops on a row shard ``[N_p / P, N_p, c]`` of z, re-sharding rows <-> columns only
    where an op needs the other layout; ``mask`` is the whole (padded) pair mask."""

    shards: _Shards

    def forward(self, z_loc: Tensor, mask: Tensor, chunk_size: int | None, inplace: bool, *,
                template_order: bool = False) -> Tensor:  # fmt: skip
        layout = "row"
        for name in _TEMPLATE_ORDER if template_order else _EVOFORMER_ORDER:
            want = _PAIR_LAYOUT[name]
            if want is not None and want != layout:
                z_loc = self.shards.to_col(z_loc) if want == "col" else self.shards.to_row(z_loc)
                layout = want
            mask_loc = self.shards.mine(mask, 0 if layout == "row" else 1)
            z_loc = add_(z_loc, self._pair_op(name, z_loc, mask_loc, chunk_size), inplace)
        return z_loc if layout == "row" else self.shards.to_row(z_loc)

    def _pair_op(self, name: str, z: Tensor, mask: Tensor, chunk_size: int | None) -> Tensor:
        mod = getattr(self, name)
        if name == "pair_transition":
            return mod(z, mask, chunk_size)
        if name.startswith("triangle_multiplication"):
            # Outgoing needs b for every row j (rows layout); incoming b for every column i.
            dim = 0 if name.endswith("outgoing") else 1
            a, b = mod.projections(z, mask, chunk_size)
            b_full, handle = gather_async(b, dim, self.shards.group)
            return mod.finish(mod.product(a, wait(b_full, handle)), z, chunk_size)
        # Triangle attention: ending node works on the transpose, whose rows are our columns.
        starting = name.endswith("starting_node")
        zt = z if starting else z.transpose(0, 1)
        mt = mask if starting else mask.transpose(0, 1)
        bias = gather(mod.bias(zt, chunk_size), 1, self.shards.group)  # [H, N_p, N_p]
        out = mod.attend(zt, mt, bias, chunk_size)
        return out if starting else out.transpose(0, 1)


class DAPEvoformerBlock(EvoformerBlock):
    """One Evoformer block on shards: m ``[S_p / P, N_p, c_m]`` and z ``[N_p / P, N_p, c_z]`` by
    rows; msa_mask ``[S_p, N_p]`` and pair_mask are whole (padded)."""

    shards: _Shards

    def forward(self, m_loc: Tensor, z_loc: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        shards = self.shards
        rows_mask, cols_mask = shards.mine(msa_mask, 0), shards.mine(msa_mask, 1)
        if self.outer_product_first:  # AlphaFold-Multimer: the pair sees the block's input MSA
            m_col = all_to_all(m_loc, scatter_dim=1, gather_dim=0, group=shards.group)  # [S_p, N_p / P, c_m]
            z_loc = add_(z_loc, self._outer_product_mean(m_col, cols_mask, msa_mask, chunk_size), inplace)
            del m_col
        row_att = self.msa_row_attention_with_pair_bias
        bias, handle = gather_async(row_att.pair_bias(z_loc, chunk_size), 1, shards.group)  # [H, N_p, N_p]
        m_loc = add_(m_loc, row_att(m_loc, None, rows_mask, chunk_size, bias=wait(bias, handle)), inplace)

        m_col = all_to_all(m_loc, scatter_dim=1, gather_dim=0, group=shards.group)  # [S_p, N_p / P, c_m]
        m_col = add_(m_col, self.column_attention(m_col, cols_mask, chunk_size), inplace)
        m_col = add_(m_col, self.msa_transition(m_col, cols_mask, chunk_size), inplace)
        # Start re-sharding the MSA by rows; the outer product mean works on the column shards meanwhile.
        m_next, m_handle = all_to_all_async(m_col, scatter_dim=0, gather_dim=1, group=shards.group)
        if not self.outer_product_first:
            z_loc = add_(z_loc, self._outer_product_mean(m_col, cols_mask, msa_mask, chunk_size), inplace)
        z_loc = self.pair_stack(z_loc, pair_mask, chunk_size, inplace)
        return wait(m_next, m_handle), z_loc

    def _outer_product_mean(self, m_col: Tensor, cols_mask: Tensor, msa_mask: Tensor, chunk_size) -> Tensor:
        """The pair update of this rank's rows from the MSA sharded by columns."""
        opm = self.outer_product_mean
        a, b = opm.projections(m_col, cols_mask)
        b_full = gather(b, 1, self.shards.group)  # [S_p, N_p, c]
        return opm.combine(a, b_full, cols_mask, msa_mask, chunk_size)


class DAPEvoformerStack(EvoformerStack):
    """Pads and shards m and z by rows, runs its (DAP) blocks, gathers and unpads."""

    shards: _Shards

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        s, n = m.shape[0], m.shape[1]
        shards = self.shards
        msa_mask, pair_mask = shards.pad(msa_mask, (0, 1)), shards.pad(pair_mask, (0, 1))
        m_loc, z_loc = shards.split(m), shards.split(z)  # [S_p / P, N_p, c_m], [N_p / P, N_p, c_z]
        m_loc, z_loc = self.run_blocks(m_loc, z_loc, msa_mask, pair_mask, chunk_size, inplace)
        return shards.join(m_loc, s, n), shards.join(z_loc, n, n)


class DAPTemplatePairStack(TemplatePairStack):
    """Pads and shards one template's pair activations by rows, runs its (DAP) blocks, gathers,
    then the output LayerNorm on the whole."""

    shards: _Shards

    def forward(self, t: Tensor, mask: Tensor, chunk_size: int | None = None, inplace: bool = False) -> Tensor:
        n = t.shape[0]
        t_loc = self.run_blocks(self.shards.split(t), self.shards.pad(mask, (0, 1)), chunk_size, inplace)
        return self.output_layer_norm(self.shards.join(t_loc, n, n))


_DAP_CLASSES = {
    PairStackBlock: DAPPairStackBlock,
    EvoformerBlock: DAPEvoformerBlock,
    EvoformerStack: DAPEvoformerStack,
    TemplatePairStack: DAPTemplatePairStack,
}


def parallelize(model: nn.Module, dims: ParallelDims | dist.ProcessGroup | None) -> nn.Module:
    """Run every Evoformer, extra-MSA and template stack in ``model`` under DAP over
    ``dims.dap_group`` (or a group), and mark the gradients of their sharded parameters as partial
    sums over it. With one rank (or no group) the model is left as it is. Returns the model.

    Call it once on a built model, before an engine wraps it. Each module keeps its identity and
    parameters; only its class becomes the DAP subclass of its own (the way FSDP2's
    ``fully_shard`` swaps classes), so nothing in the model changes but ``forward``.
    """
    group = dims.dap_group if isinstance(dims, ParallelDims) else dims
    if group_size(group) == 1:
        return model
    shards = _Shards(group)
    sharded: list[nn.Parameter] = []
    for module in list(model.modules()):
        cls = _DAP_CLASSES.get(type(module))
        if cls is None:
            continue
        module.__class__ = cls
        module.shards = shards
        if isinstance(module, EvoformerBlock):
            sharded.extend(module.parameters())
        elif isinstance(module, TemplatePairStack):
            sharded.extend(module.blocks.parameters())  # its output LayerNorm runs on the gathered whole
    mark_partial_grads(sharded, group)
    return model
