"""The LayerNorm wrapper's own logic: the backend a module was given, rows whose last dim is strided."""

import importlib

import pytest
import torch

from ferryman.kernels import LayerNorm, layer_norm, layer_norm_ref

LAYER_NORM = importlib.import_module("ferryman.kernels.layer_norm")


def test_module_keeps_the_backend_it_was_given(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("triton path called")

    monkeypatch.setattr(LAYER_NORM, "layer_norm_triton", boom)
    x = torch.randn(3, 8)
    LayerNorm(8, backend="torch")(x)  # under the interpreter "auto" would take the Triton path
    with pytest.raises(AssertionError, match="triton path called"):
        LayerNorm(8)(x)


@pytest.mark.parametrize(("with_affine", "step"), [(False, 12), (True, 12), (True, 2)])
def test_rows_with_a_strided_last_dim(with_affine, step):
    # A transposed matrix or every other column: reshape keeps it a view whose columns are `step`
    # elements apart; the kernel reads rows with unit stride, so the wrapper must copy first.
    if step == 12:
        x = (torch.randn(7, 12) * 2 + 1).t().requires_grad_()  # [12, 7], strides (1, 12)
    else:
        x = (torch.randn(12, 14) * 2 + 1)[:, ::2].requires_grad_()  # [12, 7], strides (14, 2)
    assert x.shape == (12, 7) and x.stride(-1) == step
    w = (1 + 0.3 * torch.randn(7)).requires_grad_() if with_affine else None
    b = (0.3 * torch.randn(7)).requires_grad_() if with_affine else None
    dy = torch.randn(7, 12).t()  # a strided gradient as well
    out = layer_norm(x, w, b, 1e-3, backend="triton")
    (out * dy).sum().backward()
    inputs = [t for t in (x, w, b) if t is not None]
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    want = layer_norm_ref(x.double(), None if w is None else w.double(), None if b is None else b.double(), 1e-3)
    (want * dy.double()).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, inputs):
        torch.testing.assert_close(got.double(), t.grad.double(), rtol=1e-4, atol=1e-4)


def _small_rows(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3e-3 + 0.5).to(dtype)


def _by_hand(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


@pytest.fixture
def paths(monkeypatch):
    """The path each layer_norm_triton call took: "kernel" or "ref"."""
    taken = []
    ref, fn = LAYER_NORM.layer_norm_ref, LAYER_NORM._LayerNormFn.apply

    def via_ref(*args, **kwargs):
        taken.append("ref")
        return ref(*args, **kwargs)

    def via_kernel(*args):
        taken.append("kernel")
        return fn(*args)

    monkeypatch.setattr(LAYER_NORM, "layer_norm_ref", via_ref)
    monkeypatch.setattr(LAYER_NORM._LayerNormFn, "apply", via_kernel)
    monkeypatch.setattr(LAYER_NORM, "MAX_FEATURES", 4)  # rows wider than 4 take the reference
    return taken


@pytest.mark.parametrize(("shape", "dtype", "path"), [
    ((3, 4), torch.float32, "kernel"),
    ((2, 5, 4), torch.float16, "kernel"),  # more rows (and a middle dim) wider than MAX_FEATURES
    ((6, 2), torch.float32, "kernel"),
    ((3, 5), torch.float32, "ref"),  # rows wider than MAX_FEATURES
    ((3, 4), torch.float64, "ref"),  # the kernels compute in fp32
    ((0, 4), torch.float32, "ref"),  # nothing to launch
    ((1, 1), torch.float32, "kernel"),
])
def test_fused_path_or_reference(paths, shape, dtype, path):
    x = _small_rows(*shape, dtype=dtype)
    w = torch.linspace(0.5, 1.5, shape[-1]).to(dtype)
    b = torch.linspace(-0.2, 0.2, shape[-1]).to(dtype)
    out = LAYER_NORM.layer_norm_triton(x, w, b, 2e-5)
    assert paths == [path]
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out.double(), _by_hand(x, w, b, 2e-5), rtol=tol, atol=tol)


def test_fused_path_default_eps():
    x = _small_rows(4, 9)  # variance ~1e-5: the default eps (1e-5) moves the output by ~30 %
    w, b = torch.ones(9), torch.zeros(9)
    torch.testing.assert_close(LAYER_NORM.layer_norm_triton(x).double(), _by_hand(x, w, b, 1e-5),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(LAYER_NORM.layer_norm_triton(x.double()), _by_hand(x.double(), w, b, 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_module_is_built_where_and_as_asked_like_torchs():
    """A drop-in for nn.LayerNorm takes its device and dtype (meta: a model built before its
    weights are loaded, as lazy loading does)."""
    ours = LayerNorm(8, eps=1e-3, device="meta", dtype=torch.float64)
    theirs = torch.nn.LayerNorm(8, eps=1e-3, device="meta", dtype=torch.float64)
    for name, p in theirs.named_parameters():
        mine = dict(ours.named_parameters())[name]
        assert (mine.device, mine.dtype, mine.shape) == (p.device, p.dtype, p.shape)
    assert mine.device.type == "meta" and ours.eps == 1e-3
