"""Run a layer over chunks of its batch dimensions so that N_res x N_res work fits in memory.

``chunk_layer`` flattens the leading batch dimensions of every input, feeds the layer slices of at
most ``chunk_size`` rows, and writes each result into an output allocated once. Inputs whose batch
dimensions are 1 are broadcast, as the layer itself would broadcast them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ferryman.core.errors import ConfigError


def _batch_shape(inputs: Mapping[str, Tensor], num_batch_dims: int) -> torch.Size:
    shapes = [t.shape[:num_batch_dims] for t in inputs.values() if isinstance(t, Tensor)]
    if not shapes:
        raise ValueError("chunk_layer needs at least one tensor input")
    return torch.broadcast_shapes(*shapes)


def _flat_batch(t: Tensor, batch: torch.Size, num_batch_dims: int) -> Tensor:
    # [*batch, *rest] -> [prod(batch), *rest], expanding broadcast dimensions as views.
    t = t.expand(*batch, *t.shape[num_batch_dims:])
    return t.reshape(-1, *t.shape[num_batch_dims:])


def chunk_layer(
    layer: Callable[..., Tensor],
    inputs: Mapping[str, Tensor],
    *,
    chunk_size: int | None,
    num_batch_dims: int,
    out: Tensor | None = None,
) -> Tensor:
    """``layer(**inputs)`` computed ``chunk_size`` flattened batch rows at a time.

    ``layer`` must treat the first ``num_batch_dims`` dimensions of every tensor as independent
    batch dimensions and return a tensor of shape ``[*batch, *out_rest]``. Non-tensor inputs are
    passed through unchanged. ``out``, if given, receives the result (it may alias an input the
    layer no longer needs, for in-place residual updates at inference). ``chunk_size=None`` runs
    the layer once.
    """
    if chunk_size is None:
        result = layer(**inputs)
        if out is None:
            return result
        return out.copy_(result)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    batch = _batch_shape(inputs, num_batch_dims)
    total = batch.numel()
    flat = {k: _flat_batch(v, batch, num_batch_dims) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    flat_out: Tensor | None = None
    for start in range(0, total, chunk_size):
        piece = {k: v[start : start + chunk_size] if isinstance(v, Tensor) else v for k, v in flat.items()}
        result = layer(**piece)  # [chunk, *out_rest]
        if flat_out is None:
            if out is None:
                out = result.new_empty((*batch, *result.shape[1:]))
            flat_out = out.view(total, *out.shape[num_batch_dims:])  # [prod(batch), *out_rest]
        flat_out[start : start + result.shape[0]] = result
    assert out is not None
    return out


def free_memory_bytes(device: torch.device) -> int:
    """Bytes the allocator can still hand out on ``device`` (host memory for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def chunk_size_for_budget(*, num_rows: int, bytes_per_row: int, budget_bytes: int, minimum: int = 1) -> int | None:
    """The largest power-of-two chunk whose transient memory stays within ``budget_bytes``.

    ``bytes_per_row`` is the memory one flattened batch row needs while the layer runs (its
    activations, not the inputs). Returns ``None`` (no chunking) when all rows fit at once.
    """
    if num_rows <= 0 or bytes_per_row <= 0:
        raise ValueError("num_rows and bytes_per_row must be positive")
    if num_rows * bytes_per_row <= budget_bytes:
        return None
    rows = max(budget_bytes // bytes_per_row, minimum)
    return max(1 << (int(rows).bit_length() - 1), minimum)
