"""Sequence parallelism for a built STDiT (Ulysses, Jacobs et al. 2023), applied from outside the model.

``parallelize(model, group)`` shards the patches of every frame across ``group``:

- a forward hook on ``model.x_embedder`` (the entry of the token trunk) keeps this rank's slice of
  each frame's patches, padded to a multiple of the group size;
- each spatial block's attention becomes ``UlyssesSelfAttention``, which swaps the sharded axis
  from patches to heads with an all_to_all, attends over the whole frame and swaps back; temporal
  attention, cross-attention and the MLPs act on each patch alone and need no change;
- a forward hook on ``model.final_layer`` (the trunk's exit) gathers the patches again.

Every rank of the group must see the same batch and draw the same noise: each then computes the
same loss from the whole output, and its backward covers only its own patches (the slice and the
gather keep only this rank's part of the gradient). So every parameter's gradient is a partial sum
over the group, declared once with ``mark_partial_grads``; the core sums it before it reaches
``.grad`` (or an engine's hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from ferryman.core.parallel import all_to_all, gather, mark_partial_grads, pad_to_multiple

from .model import STDiT
from .model.blocks import SelfAttention


@dataclass
class _Tokens:
    """What the entry hook learns and the sharded modules need: the unsharded patches per frame.

    Set by each forward and read again when checkpointed blocks are recomputed in its backward, so
    forwards of different frame sizes must not be interleaved before their backwards (training
    runs forward and backward per micro-batch).
    """

    group: dist.ProcessGroup
    seq_len: int = 0


class UlyssesSelfAttention(SelfAttention):
    """Self-attention over a sequence sharded across ``tokens.group``: all_to_all to whole sequences
    on a share of the heads, attention, all_to_all back (head counts that the group size does not
    divide are padded)."""

    def __init__(self, attn: SelfAttention, tokens: _Tokens):
        """Take over ``attn``'s submodules: the same parameter objects under the same names."""
        nn.Module.__init__(self)  # not SelfAttention's: that would draw new weights
        self.num_heads, self.head_dim, self.backend = attn.num_heads, attn.head_dim, attn.backend
        self.qkv, self.q_norm, self.k_norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.proj
        self.tokens = tokens

    def attend(self, qkv: Tensor) -> Tensor:
        """[N, L_shard, 3, H, Dh] -> [N, L_shard, H, Dh]."""
        group = self.tokens.group
        qkv = all_to_all(qkv, 3, 1, group, gather_size=self.tokens.seq_len)  # [N, L, 3, H_local, Dh]
        out = super().attend(qkv)  # [N, L, H_local, Dh]
        return all_to_all(out, 1, 2, group, gather_size=self.num_heads)  # [N, L_shard, H, Dh]


def _shard_hook(tokens: _Tokens):
    def hook(_module: nn.Module, _args, out: Tensor) -> Tensor:
        """[B, T', S, D] -> [B, T', S_shard, D], this rank's slice of the padded patches."""
        tokens.seq_len = out.shape[2]
        world, rank = dist.get_world_size(tokens.group), dist.get_rank(tokens.group)
        out = pad_to_multiple(out, 2, world)
        length = out.shape[2] // world
        # A plain slice: its backward keeps only this rank's part of the gradient (see the module doc).
        return out[:, :, rank * length : (rank + 1) * length]

    return hook


def _gather_hook(tokens: _Tokens):
    def hook(_module: nn.Module, _args, out: Tensor) -> Tensor:
        """[B, T', S_shard, P] -> [B, T', S, P]; the backward keeps this rank's slice, unsummed."""
        return gather(out, 2, tokens.group, size=tokens.seq_len, reduce_grad=False)

    return hook


def parallelize(model: STDiT, sp_group: dist.ProcessGroup | None) -> STDiT:
    """Shard each frame's patches over ``sp_group`` (None or a group of one: leave the model as it is).

    Call it on a freshly built model, before an engine wraps it; the model's parameters stay the
    same objects with the same names, so its checkpoints load into an unparallelized STDiT.
    """
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return model
    tokens = _Tokens(group=sp_group)
    for block in model.spatial_blocks:
        block.attn = UlyssesSelfAttention(block.attn, tokens)
    model.x_embedder.register_forward_hook(_shard_hook(tokens))
    model.final_layer.register_forward_hook(_gather_hook(tokens))
    mark_partial_grads(model.parameters(), sp_group)
    return model
