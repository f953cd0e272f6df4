"""Backend selection for the fused ops: Triton when it can run, the PyTorch reference otherwise.

Triton is optional. ``import ferryman.kernels`` works without it; the ops then use their
PyTorch references. On a CPU-only machine Triton kernels run only under its interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before the kernel modules are imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as missing
        return False
    return True


# Triton decides at kernel definition (this package's import) whether kernels are
# interpreted; switching the variable on later cannot make them run on CPU tensors.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_enabled() -> bool:
    """Read at call time: the test harness sets it before importing the kernels."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on_cuda(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def resolve_backend(backend: str, *tensors) -> str:
    """Map ``auto|triton|torch`` to the backend that will run for these tensors.

    ``auto`` picks Triton when the tensors live on CUDA or the Triton interpreter is on,
    and the reference otherwise. ``triton`` insists, and raises a ValueError that says why
    when it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    interpreted = interpreter_enabled() and _INTERPRETED_AT_IMPORT
    usable = triton_available() and (_on_cuda(tensors) or interpreted)
    if backend == "auto":
        return "triton" if usable else "torch"
    if not triton_available():
        raise ValueError(
            "kernel backend 'triton' was requested but triton is not installed "
            "(pip install 'ferryman[kernels]'), or use backend='torch'"
        )
    if not usable and interpreter_enabled():
        raise ValueError(
            "kernel backend 'triton' on CPU tensors: TRITON_INTERPRET=1 was set after "
            "ferryman.kernels was imported; set it before the import, or use backend='torch'"
        )
    if not usable:
        raise ValueError(
            "kernel backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "ferryman.kernels is imported to run the kernels on CPU; use backend='torch' instead"
        )
    return "triton"
