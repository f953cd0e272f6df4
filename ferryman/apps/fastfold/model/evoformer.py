"""Evoformer blocks and stacks (AF2 Suppl. Alg. 6), the extra-MSA stack (Alg. 18) and the
template pair stack (Alg. 16).

Plain math on whole tensors; ``ferryman.apps.fastfold.parallelize`` runs the same modules on
shards across ranks from outside.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ferryman.apps.fastfold.model.config import AlphaFoldConfig, TemplateConfig
from ferryman.apps.fastfold.model.msa import (
    MSAColumnAttention,
    MSAColumnGlobalAttention,
    MSARowAttentionWithPairBias,
    OuterProductMean,
)
from ferryman.apps.fastfold.model.pair import TriangleAttention, TriangleMultiplication
from ferryman.apps.fastfold.model.primitives import Linear, Transition, add_, layer_norm, lean


class PairStackBlock(nn.Module):
    """The pair half of an Evoformer block (Alg. 6 lines 6-10); also one template pair block."""

    def __init__(self, c_z: int, *, c_hidden_mul: int, c_hidden_att: int, num_heads: int,
                 transition_factor: int, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.triangle_multiplication_outgoing = TriangleMultiplication(c_z, c_hidden_mul, outgoing=True, backend=backend)
        self.triangle_multiplication_incoming = TriangleMultiplication(c_z, c_hidden_mul, outgoing=False, backend=backend)
        self.triangle_attention_starting_node = TriangleAttention(
            c_z, c_hidden_att, num_heads, starting=True, backend=backend
        )
        self.triangle_attention_ending_node = TriangleAttention(
            c_z, c_hidden_att, num_heads, starting=False, backend=backend
        )
        self.pair_transition = Transition(c_z, transition_factor, backend)

    def forward(self, z: Tensor, mask: Tensor, chunk_size: int | None, inplace: bool, *, template_order: bool = False):
        # AF2 runs the template pair stack with attention first, the Evoformer with products first.
        mods = [
            self.triangle_multiplication_outgoing,
            self.triangle_multiplication_incoming,
            self.triangle_attention_starting_node,
            self.triangle_attention_ending_node,
        ]
        if template_order:
            mods = mods[2:] + mods[:2]
        if lean(chunk_size, inplace):
            for mod in mods:
                z = mod.update_(z, mask, chunk_size)
            return self.pair_transition.update_(z, chunk_size)
        for mod in [*mods, self.pair_transition]:
            z = add_(z, mod(z, mask, chunk_size), inplace)
        return z


class EvoformerBlock(nn.Module):
    """One Evoformer block (AF2 Suppl. Alg. 6); with ``extra=True`` an extra-MSA block whose
    column attention is global (Alg. 18-19). ``outer_product_first`` moves the outer product mean
    to the start of the block, where AlphaFold-Multimer has it (AF2 ``outer_product_mean.first``)."""

    def __init__(self, *, c_m: int, c_z: int, c_hidden_msa: int, msa_heads: int, c_hidden_opm: int,
                 c_hidden_mul: int, c_hidden_pair: int, pair_heads: int, transition_factor: int,
                 extra: bool = False, outer_product_first: bool = False, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.extra = extra
        self.outer_product_first = outer_product_first
        self.msa_row_attention_with_pair_bias = MSARowAttentionWithPairBias(c_m, c_z, c_hidden_msa, msa_heads, backend)
        if extra:
            self.msa_column_global_attention = MSAColumnGlobalAttention(c_m, c_hidden_msa, msa_heads, backend)
        else:
            self.msa_column_attention = MSAColumnAttention(c_m, c_hidden_msa, msa_heads, backend)
        self.msa_transition = Transition(c_m, transition_factor, backend)
        self.outer_product_mean = OuterProductMean(c_m, c_z, c_hidden_opm, backend)
        self.pair_stack = PairStackBlock(
            c_z,
            c_hidden_mul=c_hidden_mul,
            c_hidden_att=c_hidden_pair,
            num_heads=pair_heads,
            transition_factor=transition_factor,
            backend=backend,
        )

    @property
    def column_attention(self) -> nn.Module:
        return self.msa_column_global_attention if self.extra else self.msa_column_attention

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        if lean(chunk_size, inplace):
            return self._lean_forward(m, z, msa_mask, pair_mask, chunk_size)
        if self.outer_product_first:
            z = add_(z, self.outer_product_mean(m, msa_mask, chunk_size), inplace)
        m = add_(m, self.msa_row_attention_with_pair_bias(m, z, msa_mask, chunk_size), inplace)
        m = add_(m, self.column_attention(m, msa_mask, chunk_size), inplace)
        m = add_(m, self.msa_transition(m, msa_mask, chunk_size), inplace)
        if not self.outer_product_first:
            z = add_(z, self.outer_product_mean(m, msa_mask, chunk_size), inplace)
        z = self.pair_stack(z, pair_mask, chunk_size, inplace)
        return m, z

    def _lean_forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                      chunk_size: int) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Alg. 6 with every update added into m or z in place, block by block."""
        if self.outer_product_first:
            z = self.outer_product_mean.update_(z, m, msa_mask, chunk_size)
        m = self.msa_row_attention_with_pair_bias.update_(m, z, msa_mask, chunk_size)
        m = self.column_attention.update_(m, msa_mask, chunk_size)
        m = self.msa_transition.update_(m, chunk_size)
        if not self.outer_product_first:
            z = self.outer_product_mean.update_(z, m, msa_mask, chunk_size)
        z = self.pair_stack(z, pair_mask, chunk_size, True)
        return m, z


def _block_kwargs(cfg: AlphaFoldConfig, extra: bool) -> dict:
    return dict(
        c_m=cfg.c_e if extra else cfg.c_m,
        c_z=cfg.c_z,
        c_hidden_msa=cfg.c_hidden_extra if extra else cfg.c_hidden_msa,
        msa_heads=cfg.extra_msa_heads if extra else cfg.msa_heads,
        c_hidden_opm=cfg.c_hidden_opm,
        c_hidden_mul=cfg.c_hidden_mul,
        c_hidden_pair=cfg.c_hidden_pair,
        pair_heads=cfg.pair_heads,
        transition_factor=cfg.transition_factor,
        extra=extra,
        outer_product_first=cfg.multimer,
    )


class EvoformerStack(nn.Module):
    """``num_blocks`` Evoformer blocks, then the single representation from the first MSA row
    (AF2 Suppl. Alg. 6 and Alg. 2 line 16). ``extra=True`` builds the extra-MSA stack
    (Alg. 18), which has no single projection."""

    def __init__(self, cfg: AlphaFoldConfig, *, extra: bool = False):
        super().__init__()
        count = cfg.num_extra_msa_blocks if extra else cfg.num_evoformer_blocks
        self.blocks = nn.ModuleList(EvoformerBlock(**_block_kwargs(cfg, extra)) for _ in range(count))
        self.single_activations = None if extra else Linear(cfg.c_m, cfg.c_s)
        self.activation_checkpointing = False

    def run_blocks(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                   chunk_size: int | None, inplace: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
        for block in self.blocks:
            if self.activation_checkpointing and m.requires_grad:
                m, z = checkpoint(block, m, z, msa_mask, pair_mask, chunk_size, False, use_reentrant=False)
            else:
                m, z = block(m, z, msa_mask, pair_mask, chunk_size, inplace)
        return m, z

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        """m ``[S, N, c]``, z ``[N, N, c_z]`` -> updated (m, z)."""
        return self.run_blocks(m, z, msa_mask, pair_mask, chunk_size, inplace)


class TemplatePairStack(nn.Module):
    """AF2 Suppl. Alg. 16: pair blocks over one template's pair features, then LayerNorm.

    The monomer runs each block's triangle attention before its triangle products
    (``attention_first``); AlphaFold-Multimer runs them in the Evoformer's order."""

    def __init__(self, cfg: TemplateConfig, backend: str = "auto", *, attention_first: bool = True):
        super().__init__()
        self.attention_first = attention_first
        self.blocks = nn.ModuleList(
            PairStackBlock(
                cfg.c_t,
                c_hidden_mul=cfg.c_hidden_mul,
                c_hidden_att=cfg.c_hidden_att,
                num_heads=cfg.num_heads,
                transition_factor=cfg.transition_factor,
                backend=backend,
            )
            for _ in range(cfg.num_blocks)
        )
        self.output_layer_norm = layer_norm(cfg.c_t, backend)

    def run_blocks(self, t: Tensor, mask: Tensor, chunk_size: int | None, inplace: bool) -> Tensor:
        for block in self.blocks:
            t = block(t, mask, chunk_size, inplace, template_order=self.attention_first)
        return t

    def forward(self, t: Tensor, mask: Tensor, chunk_size: int | None = None, inplace: bool = False) -> Tensor:
        """t ``[N, N, c_t]`` for one template, mask ``[N, N]``."""
        return self.output_layer_norm(self.run_blocks(t, mask, chunk_size, inplace))
