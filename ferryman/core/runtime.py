"""Where a run computes and in what number format: the one device picker and the precision names.

Every command (training loop, engines, inference) resolves ``--device``/``device=`` and
``--precision``/``precision=`` here, so the accepted names and the errors are the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ferryman.core.errors import ConfigError, UserError

if TYPE_CHECKING:
    from ferryman.core.parallel import ParallelDims

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str, field_name: str = "precision") -> torch.dtype:
    """The torch dtype of a precision name (fp32, bf16, fp16); a ConfigError naming the field otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"{field_name}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def pick_device(name: str = "auto", dims: ParallelDims | None = None, *, flag: str = "device") -> torch.device:
    """The device a process computes on.

    Under torchrun with several ranks each rank's device comes from ``dims`` (its local rank);
    otherwise ``name``: "auto" (the current CUDA device if one is visible, else the CPU), "cpu",
    "cuda" or "cuda:N". ``flag`` is how the caller's users spell the option ("--device" on a
    command line), so the error names what they typed.
    """
    if dims is not None and dims.world_size > 1:
        return dims.device
    said = f"{flag} {name}" if flag.startswith("--") else f"{flag}={name}"
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{said}: not a device name (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{said}: no CUDA device is visible; use cpu or auto")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
