"""Packing parameters into flat chunks: which parameter goes where, and how big a chunk is.

Parameters are packed in the order the model uses them (recorded in the warm-up step; module
registration order before that), never split across chunks, into chunks of one size searched to
leave the least padding (the chunk-size search of ColossalAI Gemini). Small models are chunked
too: the size is capped so that there are at least ``min_num_chunks`` chunks whenever the model has
that many parameters (ColossalAI's fixed 32M-element minimum folds models under ~33M parameters
into one chunk, which makes offloading all-or-nothing).

``plan_layout`` is the whole plan, a pure function of the parameter order: the chunks, where each
parameter sits, and the orders the ranks gather and reduce in. The engine builds its chunks from a
``Layout`` and nothing else, at construction and at every re-layout (after the warm-up step, on
``load_state_dict`` and on a checkpoint load).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.parallel.grads import partial_grad_group


@dataclass(kw_only=True)
class Slot:
    """One parameter's place in a chunk: elements [offset, offset + numel) of the full chunk."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass(kw_only=True)
class ChunkSpec:
    """Parameters of one chunk; all share ``trainable`` and ``decay`` so one flat update fits all,
    and ``partial_group``, so one all-reduce of the chunk's gradient sums their model-parallel
    shares (``core.parallel.grads``)."""

    slots: list[Slot]
    numel: int  # padded to a multiple of the alignment (the data-parallel world size at least)
    trainable: bool
    decay: bool
    partial_group: object = None  # a DAP / sequence-parallel process group, or None

    @property
    def used(self) -> int:
        return sum(s.numel for s in self.slots)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack(numels: list[int], chunk_numel: int) -> list[list[int]]:
    """Greedy packing in order: indices of the parameters in each chunk."""
    groups: list[list[int]] = []
    fill = chunk_numel
    for i, n in enumerate(numels):
        if fill + n > chunk_numel:
            groups.append([])
            fill = 0
        groups[-1].append(i)
        fill += n
    return groups


def waste(numels: list[int], chunk_numel: int, align: int) -> int:
    """Padding elements when packing ``numels`` into chunks of ``chunk_numel``."""
    groups = pack(numels, chunk_numel)
    used = [sum(numels[i] for i in g) for g in groups]
    # the last chunk is only as long as it needs to be
    return sum(chunk_numel - u for u in used[:-1]) + _round_up(used[-1], align) - used[-1]


def search_chunk_numel(
    numels: list[int], *, min_num_chunks: int, max_chunk_numel: int, align: int, num_candidates: int = 64
) -> int:
    """Chunk size in [largest parameter, total / min_num_chunks] that wastes the least padding."""
    if not numels:
        return align
    largest, total = max(numels), sum(numels)
    low = _round_up(largest, align)
    high = _round_up(max(low, min(max_chunk_numel, math.ceil(total / min_num_chunks))), align)
    step = max(align, _round_up(max(1, (high - low) // num_candidates), align))
    candidates = range(low, high + 1, step)
    # ties go to the larger chunk: fewer, longer transfers
    return min(candidates, key=lambda size: (waste(numels, size, align), -size))


def plan_chunks(
    named: list[tuple[str, nn.Parameter]],
    *,
    shapes: dict[str, tuple[int, ...]],
    decays: Callable[[str], bool],
    chunk_numel: int,
    min_num_chunks: int,
    max_chunk_numel: int,
    align: int,
) -> list[ChunkSpec]:
    """Split parameters by (trainable, decay, partial-gradient group) and pack each in the given order."""
    groups: dict[tuple[bool, bool, int], list[tuple[str, nn.Parameter]]] = {}
    partial: dict[int, object] = {0: None}
    for name, param in named:
        trainable = param.requires_grad
        group = partial_grad_group(param) if trainable else None
        partial.setdefault(id(group) if group is not None else 0, group)
        key = (trainable, trainable and decays(name), id(group) if group is not None else 0)
        groups.setdefault(key, []).append((name, param))
    total = sum(math.prod(shapes[n]) for n, _ in named)
    specs: list[ChunkSpec] = []
    for (trainable, decay, group_key), members in groups.items():
        numels = [math.prod(shapes[n]) for n, _ in members]
        # each group gets its share of the minimum chunk count
        share = max(1, round(min_num_chunks * sum(numels) / max(total, 1)))
        size = chunk_numel or search_chunk_numel(
            numels, min_num_chunks=min(share, len(numels)), max_chunk_numel=max_chunk_numel, align=align
        )
        size = max(size, _round_up(max(numels), align))
        for idx in pack(numels, size):
            slots, offset = [], 0
            for i in idx:
                name, param = members[i]
                slots.append(Slot(name=name, param=param, offset=offset, numel=numels[i], shape=shapes[name]))
                offset += numels[i]
            specs.append(ChunkSpec(slots=slots, numel=_round_up(offset, align), trainable=trainable, decay=decay,
                                   partial_group=partial[group_key]))
    return specs


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where every parameter goes, and the orders every rank agrees on."""

    order: tuple[str, ...]  # the parameter order the chunks were packed in
    specs: tuple[ChunkSpec, ...]
    slot_of: dict[str, tuple[int, int]]  # parameter -> (chunk, slot)
    gather_order: tuple[int, ...]  # chunks by first use in ``order``: the ranks gather in it
    reduce_order: tuple[int, ...]  # trainable chunks, reverse gather order: the ranks reduce in it
    module_chunks: dict[int, list[int]]  # hooked module -> the chunks holding its parameters
    module_slots: tuple[tuple[tuple[int, int], ...], ...]  # hooked module -> its trainable (chunk, slot)s


def plan_layout(
    order: list[str],
    params: dict[str, nn.Parameter],
    module_params: list[list[str]],
    *,
    shapes: dict[str, tuple[int, ...]],
    decays: Callable[[str], bool],
    cfg: GeminiConfig,
    world: int,
) -> Layout:
    """The layout of ``params`` packed in ``order`` (``module_params``: each hooked module's parameter names)."""
    specs = plan_chunks(
        [(n, params[n]) for n in order], shapes=shapes, decays=decays, chunk_numel=cfg.chunk_numel,
        min_num_chunks=cfg.min_num_chunks, max_chunk_numel=cfg.max_chunk_numel, align=8 * world,
    )
    slot_of = {s.name: (c, i) for c, spec in enumerate(specs) for i, s in enumerate(spec.slots)}
    position = {name: i for i, name in enumerate(order)}
    first_use = sorted(range(len(specs)), key=lambda c: min(position[s.name] for s in specs[c].slots))
    return Layout(
        order=tuple(order),
        specs=tuple(specs),
        slot_of=slot_of,
        gather_order=tuple(first_use),
        reduce_order=tuple(c for c in reversed(first_use) if specs[c].trainable),
        module_chunks={m: sorted({slot_of[n][0] for n in names}) for m, names in enumerate(module_params)},
        module_slots=tuple(tuple(slot_of[n] for n in names if params[n].requires_grad) for names in module_params),
    )
