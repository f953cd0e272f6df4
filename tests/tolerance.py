"""Tolerances in units of the dtype's resolution at the magnitude of the values compared.

An absolute 1e-6 means 8 ulps for fp32 values near 1 but less than one ulp for a loss near 14
(one fp32 ulp there is 9.5e-7), so such a check fails on a different BLAS summation order. Every
parity check states how many units of ``torch.finfo(dtype).eps`` it allows, relative to the
largest value it compares; a check that must be exact says so with ``==`` or ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

FP32 = torch.float32


def resolution(dtype: torch.dtype = FP32) -> float:
    """The spacing of ``dtype`` numbers at 1.0 (2^-23 for fp32, 2^-7 for bf16)."""
    return torch.finfo(dtype).eps


def approx(expected: float | Sequence[float], *, dtype: torch.dtype = FP32, ulps: float = 8):
    """``pytest.approx`` for scalars (or a list, e.g. losses per step) computed in ``dtype``.

    Each value may be off by ``ulps`` eps of its own size; values near zero by ``ulps`` eps of the
    largest value in the list, the scale their rounding errors come from.
    """
    values = [expected] if isinstance(expected, int | float) else list(expected)
    scale = max((abs(v) for v in values), default=0.0)
    eps = resolution(dtype)
    return pytest.approx(expected, rel=ulps * eps, abs=ulps * eps * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 ulps: float = 8, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` within ``ulps`` eps of ``dtype`` (default: the expected
    tensor's) times the largest magnitude in ``expected``."""
    dtype = dtype or expected.dtype
    eps = resolution(dtype)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=ulps * eps * scale, msg=msg)
