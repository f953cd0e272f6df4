"""The host AdamW step: torch's fused CPU kernel over long runs of a flat shard, with the numbers
of one call per parameter.

The offloaded step is bounded by memory bandwidth (AdamW reads 16 and writes 12 bytes per fp32
element), and torch's fused CPU kernel reaches it over one long tensor but not over many views of
it, so ``host_adamw_`` makes one call per run of adjacent parameters that share a step count: in
the common case one call over the whole shard.

Exactness. torch's CPU kernel (aten/src/ATen/native/cpu/FusedAdamKernel.cpp) updates a tensor in
SIMD vectors of K lanes and its last ``numel % K`` elements in a scalar loop whose rounding differs
(other fused multiply-adds). One call per parameter rounds each parameter's last ``numel % K``
elements the scalar way; one call over a run would round them the vector way. So, with ``W`` a
multiple of K, the long call covers the first ``floor(len / W) * W`` elements of a run (vector
lanes only), and the elements it would round otherwise than per-parameter calls are recomputed
from their saved inputs in a small scratch buffer: each parameter's last ``numel % W`` elements as
a tensor of their own (the kernel rounds them as in a per-parameter call), and the run's
vector-rounded elements past the long call packed into one zero-padded block of ``W`` lanes (zero
lanes stay zero). Any multiple of K works; the smallest recomputes least. ``W`` is found once per
process: the smallest of 4, 8, 16, 32 that reproduces per-parameter calls on a probe; if none does
(another kernel in some torch release), every step falls back to per-parameter views.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

Span = tuple[int, int, int]  # (start, end, slot whose step count applies)


@dataclass(frozen=True)
class Piece:
    """One parameter's part of a flat shard: elements [start, end), step count ``steps[slot]``."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class _Plan:
    bodies: tuple[Span, ...]  # long calls on the shard
    segments: tuple[Span, ...]  # calls on the scratch buffer
    scratch: int  # scratch length, padding lanes included
    src: torch.Tensor  # shard positions recomputed in the scratch buffer
    dst: torch.Tensor  # their places in it


def _fused(tensors, spans, steps, *, lr, betas, eps, weight_decay) -> None:
    lists = [[t[a:b] for a, b, _ in spans] for t in tensors]
    torch._fused_adamw_(
        *lists, [], [steps[slot] for _, _, slot in spans],
        lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
    )  # fmt: skip


def _runs(pieces: list[Piece], counts: list[float]) -> tuple[tuple[Piece, ...], ...]:
    """Maximal runs of adjacent pieces with equal step counts."""
    runs: list[list[Piece]] = []
    for piece in pieces:
        last = runs[-1][-1] if runs else None
        if last is not None and last.end == piece.start and counts[last.slot] == counts[piece.slot]:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return tuple(tuple(run) for run in runs)


@functools.lru_cache(maxsize=64)
def _plan(runs: tuple[tuple[Piece, ...], ...], width: int) -> _Plan:
    bodies: list[Span] = []
    segments: list[Span] = []
    src: list[int] = []
    dst: list[int] = []
    cursor = 0  # end of the scratch buffer so far
    for run in runs:
        start, slot = run[0].start, run[0].slot
        body_end = start + (run[-1].end - start) // width * width
        if body_end > start:
            bodies.append((start, body_end, slot))
        tails: set[int] = set()
        for piece in run:  # the scalar loop's share of a per-parameter call: a tensor of its own
            tail = (piece.end - piece.start) % width
            if tail:
                tails.update(range(piece.end - tail, piece.end))
                src.extend(range(piece.end - tail, piece.end))
                dst.extend(range(cursor, cursor + tail))
                segments.append((cursor, cursor + tail, slot))
                cursor += tail
        lanes = [i for i in range(body_end, run[-1].end) if i not in tails]
        if lanes:  # vector-rounded per parameter but past the long call: one zero-padded block
            src.extend(lanes)
            dst.extend(range(cursor, cursor + len(lanes)))
            segments.append((cursor, cursor + width, slot))
            cursor += width
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return _Plan(tuple(bodies), tuple(segments), cursor, as_index(src), as_index(dst))


def _step(param, grad, exp_avg, exp_avg_sq, steps, pieces, width, **hyper) -> None:
    tensors = (param, grad, exp_avg, exp_avg_sq)
    plan = _plan(_runs(pieces, steps.tolist()), width)
    scratch = []
    if plan.scratch:  # inputs of the recomputed elements, saved before the long calls change them
        scratch = [t.new_zeros(plan.scratch).index_copy_(0, plan.dst, t.index_select(0, plan.src)) for t in tensors]
    if plan.bodies:
        _fused(tensors, plan.bodies, steps, **hyper)
    if scratch:
        _fused(scratch, plan.segments, steps, **hyper)
        for t, s in ((param, scratch[0]), (exp_avg, scratch[2]), (exp_avg_sq, scratch[3])):
            t.index_copy_(0, plan.src, s.index_select(0, plan.dst))


def host_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: torch.Tensor,
    pieces: list[Piece],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW on the ``pieces`` of flat fp32 host tensors, each with its own (already advanced)
    step count ``steps[piece.slot]``; equal, bit for bit, to one ``torch._fused_adamw_`` call
    per piece. Elements outside the pieces are left alone."""
    if not pieces:
        return
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    width = vector_width()
    if width is None:
        _fused((param, grad, exp_avg, exp_avg_sq), [(p.start, p.end, p.slot) for p in pieces], steps, **hyper)
    else:
        _step(param, grad, exp_avg, exp_avg_sq, steps, pieces, width, **hyper)


@functools.cache
def vector_width() -> int | None:
    """The lane count to plan with (see the module docstring), or None if none reproduces torch."""
    for width in (4, 8, 16, 32):  # a width that is not a multiple of the kernel's fails the probe
        if _reproduces(width):
            return width
    warnings.warn("the host AdamW step cannot reproduce torch's per-parameter rounding with long calls "
                  "in this torch build; it falls back to one call per parameter (slower, same numbers)", stacklevel=2)
    return None


def _reproduces(width: int) -> bool:
    """Whether ``_step`` with ``width`` equals per-parameter calls bit for bit on odd-sized pieces."""
    gen = torch.Generator().manual_seed(width)
    lengths = [*range(1, 2 * 32 + 2), 97, 130, 255, 513]
    order = torch.randperm(len(lengths), generator=gen).tolist()
    lengths = [lengths[i] for i in order]
    total = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pieces = [Piece(i, s, s + n) for i, (s, n) in enumerate(zip(starts, lengths)) if i % 11 != 10]  # some skipped
    steps = torch.tensor([3.0 if i % 7 < 5 else 8.0 for i in range(len(lengths))])
    scale = 10.0 ** torch.randint(-5, 2, (total,), generator=gen).float()
    inputs = (torch.randn(total, generator=gen), torch.randn(total, generator=gen) * scale,
              torch.randn(total, generator=gen) * 1e-2, torch.rand(total, generator=gen) * 1e-3)
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    want = [t.clone() for t in inputs]
    _fused(want, [(p.start, p.end, p.slot) for p in pieces], steps, **hyper)
    got = [t.clone() for t in inputs]
    _step(*got, steps, pieces, width, **hyper)
    return all(torch.equal(a, b) for a, b in zip(want, got))
