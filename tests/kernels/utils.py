"""Parity helpers: run an op on low-precision inputs and its reference in float64."""

from __future__ import annotations

import torch

# (forward atol, forward rtol, gradient atol, gradient rtol), on values of order 1.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4, 1e-4, 1e-4),
    torch.float16: (2e-3, 1e-2, 1e-2, 1e-2),
    torch.bfloat16: (2e-2, 5e-2, 5e-2, 5e-2),
}


def leaf(shape, dtype, grad=True, scale=1.0, device=None):
    t = (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype)
    return t.requires_grad_(grad)


def as_float64(t):
    if t is None or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close(actual, expected, atol, rtol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    # Scale by the tensor's magnitude: gradients summed over many rows grow with the row count.
    bound = atol * max(1.0, expected.abs().max().item()) + rtol * expected.abs()
    err = (actual - expected).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: max error {err.max().item():.3g} (at {worst.item()}: got {actual.flatten()[worst].item():.6g}, "
        f"want {expected.flatten()[worst].item():.6g})"
    )


def check_parity(op, ref, inputs: list, dtype, **kwargs):
    """op(*inputs) against ref(*float64 inputs): forward and every input's gradient."""
    fa, fr, ga, gr = TOLERANCES[dtype]
    out = op(*inputs, **kwargs)
    grad_out = torch.randn(out.shape, dtype=torch.float32, device=out.device).to(out.dtype)
    (out.float() * grad_out.float()).sum().backward()
    wide = [as_float64(t) for t in inputs]
    out64 = ref(*wide, **kwargs)
    (out64 * grad_out.double()).sum().backward()
    assert out.dtype == dtype
    assert_close(out, out64, fa, fr, "forward")
    for i, (t, t64) in enumerate(zip(inputs, wide)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            assert t.grad is not None, f"input {i} got no gradient"
            assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
            assert_close(t.grad, t64.grad, ga, gr, f"grad of input {i} {tuple(t.shape)}")
    return out
