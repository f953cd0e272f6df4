"""Which path backend="triton" takes for softmax and attention: the kernel, or the reference for
what the kernels do not cover (fp64, rows or heads wider than the kernels' limit, empty inputs).

The limits are lowered for the test so that tiny inputs cross them; each case also checks the
values against a formula written out in float64, whichever path ran.
"""

import importlib

import pytest
import torch

ATTENTION = importlib.import_module("ferryman.kernels.attention")
LAYER_NORM = importlib.import_module("ferryman.kernels.layer_norm")
SOFTMAX = importlib.import_module("ferryman.kernels.softmax")


def _spy(monkeypatch, module, ref_name, fn):
    taken = []
    ref, apply = getattr(module, ref_name), fn.apply

    def via_ref(*args, **kwargs):
        taken.append("ref")
        return ref(*args, **kwargs)

    def via_kernel(*args):
        taken.append("kernel")
        return apply(*args)

    monkeypatch.setattr(module, ref_name, via_ref)
    monkeypatch.setattr(fn, "apply", via_kernel)
    return taken


def _softmax_by_hand(logits, keep):
    logits = logits.double().masked_fill(~keep, float("-inf"))
    top = logits.amax(-1, keepdim=True).clamp_min(-1e300)  # a fully hidden row: shift by a finite value
    e = torch.exp(logits - top)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize(("shape", "dtype", "path"), [
    ((2, 3, 4), torch.float32, "kernel"),
    ((2, 6, 4), torch.float16, "kernel"),  # more rows than MAX_COLS: only the row length counts
    ((4,), torch.float32, "kernel"),
    ((2, 3, 5), torch.float32, "ref"),
    ((2, 3, 4), torch.float64, "ref"),
    ((0, 3, 4), torch.float32, "ref"),
])
def test_softmax_path(monkeypatch, shape, dtype, path):
    taken = _spy(monkeypatch, SOFTMAX, "softmax_ref", SOFTMAX._SoftmaxFn)
    monkeypatch.setattr(SOFTMAX, "MAX_COLS", 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    bias = torch.randn(shape[-1:], generator=g).to(dtype)
    mask = torch.arange(shape[-1]) != 1  # key 1 hidden
    out = SOFTMAX.softmax_triton(x, mask, bias)
    assert taken == [path]
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), _softmax_by_hand(x.double() + bias.double(), mask), rtol=tol, atol=tol)


def _attention_by_hand(q, k, v, biases, keep, scale):
    logits = torch.einsum("...qd,...kd->...qk", q.double(), k.double()) * scale
    for b in biases:
        logits = logits + b.double()
    logits, keep = torch.broadcast_tensors(logits, keep)
    return torch.einsum("...qk,...kd->...qd", _softmax_by_hand(logits, keep), v.double())


@pytest.mark.parametrize(("n_q", "n_k", "head_dim", "dtype", "path"), [
    (3, 5, 8, torch.float32, "kernel"),
    (3, 5, 8, torch.float16, "kernel"),
    (3, 5, 9, torch.float32, "ref"),  # heads wider than MAX_HEAD_DIM
    (3, 5, 8, torch.float64, "ref"),
    (0, 5, 8, torch.float32, "ref"),  # no queries
    (3, 0, 8, torch.float32, "ref"),  # no keys
])
def test_attention_path(monkeypatch, n_q, n_k, head_dim, dtype, path):
    taken = _spy(monkeypatch, ATTENTION, "attention_ref", ATTENTION._AttentionFn)
    monkeypatch.setattr(ATTENTION, "MAX_HEAD_DIM", 8)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, n_q, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(2, n_k, head_dim, generator=g).to(dtype) for _ in range(2))
    bias = torch.randn(n_q, n_k, generator=g).to(dtype)
    keep = torch.arange(n_k) != 2  # key 2 hidden
    out = ATTENTION.attention_triton(q, k, v, bias, keep.to(torch.int64), scale=0.4)
    assert taken == [path]
    assert out.dtype == dtype and out.shape == q.shape
    if n_k:
        tol = 1e-12 if dtype == torch.float64 else 3e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(out.double(), _attention_by_hand(q, k, v, [bias], keep, 0.4), rtol=tol, atol=tol)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_attention_biases_beyond_the_kernels_two_are_summed_first(monkeypatch, count):
    taken = _spy(monkeypatch, ATTENTION, "attention_ref", ATTENTION._AttentionFn)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    biases = [torch.randn(4, 4, generator=g) * (i + 1) for i in range(count)]
    keep = torch.ones(4, dtype=torch.bool)
    out = ATTENTION.attention_triton(q, k, v, biases)  # default scale: 1/sqrt(8)
    assert taken == ["kernel"]
    torch.testing.assert_close(out.double(), _attention_by_hand(q, k, v, biases, keep, 8 ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_attention_on_strided_views_with_a_permuted_pair_bias():
    # The AF2 layouts at tiny sizes: q/k/v permuted out of [B, S, N, H, c] (MSA column attention),
    # a pair bias that is a permuted view of linear(z) [B, N, N, H] (triangle attention), a key mask.
    b, s, n, h, c = 1, 3, 5, 2, 8
    qkv = [torch.randn(b, s, n, h, c, requires_grad=True) for _ in range(3)]
    z = torch.randn(b, s, s, h, requires_grad=True)
    mask = torch.ones(b, n, 1, 1, s, dtype=torch.bool)
    mask[0, 1, ..., 0] = False
    mask[0, 2] = False  # one batch row with every key hidden

    def run(tensors, z, backend):
        q, k, v = (t.permute(0, 2, 3, 1, 4) for t in tensors)  # [B, N, H, S, c], strided
        bias = z.permute(0, 3, 1, 2).unsqueeze(1)  # [B, 1, H, S, S], strided
        return ATTENTION.attention(q, k, v, bias, mask, scale=0.5, backend=backend)

    out = run(qkv, z, "triton")
    dy = torch.randn(out.shape)
    (out * dy).sum().backward()
    wide = [t.detach().double().requires_grad_() for t in qkv]
    z64 = z.detach().double().requires_grad_()
    want = run(wide, z64, "torch")
    (want * dy.double()).sum().backward()
    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in wide)
    by_hand = _attention_by_hand(q, k, v, [z64.permute(0, 3, 1, 2).unsqueeze(1)], mask, 0.5)
    torch.testing.assert_close(want, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert out[0, 2].abs().max() == 0
    for got, ref in zip([*qkv, z], [*wide, z64]):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_fused_ops_under_a_float64_default_dtype():
    # Scientific callers set float64 as torch's default dtype: the wrappers' fp32 buffers (row
    # statistics, partial sums, log-sum-exp) must not follow it.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(6, 9, generator=g, dtype=torch.float32).requires_grad_()
        w = torch.linspace(0.5, 1.5, 9, dtype=torch.float32).requires_grad_()
        y = LAYER_NORM.layer_norm(x, w, None, 1e-3, backend="triton")
        p = SOFTMAX.softmax(x, backend="triton")
        q, k, v = (torch.randn(2, 4, 8, generator=g, dtype=torch.float32).requires_grad_() for _ in range(3))
        o = ATTENTION.attention(q, k, v, backend="triton")
        assert y.dtype == p.dtype == o.dtype == torch.float32
        (y.sum() + (p * torch.arange(9.0, dtype=torch.float32)).sum() + (o * o).sum()).backward()
        grads = [t.grad.clone() for t in (x, w, q, k, v)]
        wide = [t.detach().double().requires_grad_() for t in (x, w, q, k, v)]
        x64, w64, q64, k64, v64 = wide
        y64 = LAYER_NORM.layer_norm_ref(x64, w64, None, 1e-3)
        p64 = SOFTMAX.softmax_ref(x64)
        o64 = ATTENTION.attention_ref(q64, k64, v64)
        (y64.sum() + (p64 * torch.arange(9.0)).sum() + (o64 * o64).sum()).backward()
        for got, want in ((y, y64), (p, p64), (o, o64)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for got, t in zip(grads, wide):
            torch.testing.assert_close(got.double(), t.grad, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("wanted", ["k", "v", "kv"])
def test_attention_gradient_of_keys_or_values_alone(wanted):
    # Frozen keys with trained values (or the other way round): each still gets its gradient.
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    k.requires_grad_("k" in wanted)
    v.requires_grad_("v" in wanted)
    dy = torch.randn(2, 5, 8, generator=g)
    (ATTENTION.attention(q, k, v, backend="triton") * dy).sum().backward()
    wide = [t.detach().double().requires_grad_() for t in (k, v)]
    (_attention_by_hand(q, *wide, [], torch.ones(5, dtype=torch.bool), 8 ** -0.5) * dy.double()).sum().backward()
    for name, t, t64 in zip("kv", (k, v), wide):
        if name in wanted:
            assert t.grad is not None, f"{name} got no gradient"
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-4)
        else:
            assert t.grad is None


def test_attention_default_backend_runs_where_the_tensors_are():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(ATTENTION.attention(q, k, v).double(),
                               _attention_by_hand(q, k, v, [], torch.ones(3, dtype=torch.bool), 8 ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_public_ops_with_backend_triton_run_the_kernels(monkeypatch):
    # backend="triton" must reach the fused path, not quietly the reference the parity tests compare with.
    taken = []
    for module, fn in ((ATTENTION, ATTENTION._AttentionFn), (SOFTMAX, SOFTMAX._SoftmaxFn),
                       (LAYER_NORM, LAYER_NORM._LayerNormFn)):
        monkeypatch.setattr(fn, "apply", lambda *args, _name=module.__name__: taken.append(_name))
    x = torch.randn(2, 3, 8)
    ATTENTION.attention(x, x, x, backend="triton")
    SOFTMAX.softmax(x, backend="triton")
    LAYER_NORM.layer_norm(x, backend="triton")
    assert taken == ["ferryman.kernels.attention", "ferryman.kernels.softmax", "ferryman.kernels.layer_norm"]


def test_attention_mask_with_batch_dims_of_its_own():
    # One q/k/v, three key masks: the mask's batch dim is a batch dim of the output.
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 8, generator=g) for _ in range(3))  # batch (2,)
    keep = torch.rand(3, 1, 1, 4, generator=g) > 0.3  # batch (3, 1): broadcasts to (3, 2)
    keep[0, ..., 1] = False
    out = ATTENTION.attention(q, k, v, mask=keep, backend="triton")
    assert out.shape == (3, 2, 4, 8)
    want = _attention_by_hand(q, k, v, [], keep, 8 ** -0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ATTENTION.attention(q, k, v, mask=keep, backend="torch").double(), want,
                               rtol=1e-5, atol=1e-5)


def test_more_batch_entries_than_the_offset_tables_have_columns():
    # 13 batch entries of one-query matrices: more rows than the widest offset table (11 columns),
    # so a launch grid or buffer sized by the table's width instead of its rows leaves entries out.
    g = torch.Generator().manual_seed(7)
    q = torch.randn(13, 1, 8, generator=g, requires_grad=True)
    bias = torch.randn(13, 1, 2, generator=g, requires_grad=True)
    k2, v2 = (torch.randn(13, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    out = ATTENTION.attention(q, k2, v2, bias, backend="triton")
    out.sum().backward()
    wide = [t.detach().double().requires_grad_() for t in (q, k2, v2, bias)]
    want = _attention_by_hand(*wide[:3], [wide[3]], torch.ones(2, dtype=torch.bool), 8 ** -0.5)
    want.sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for t, t64 in zip((q, k2, v2, bias), wide):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-4)
    # dq by its own launch (no bias gradient wanted), and softmax over 13 rows of logits.
    q2 = torch.randn(13, 1, 8, generator=g, requires_grad=True)
    out = ATTENTION.attention(q2, k2.detach(), v2.detach(), backend="triton")
    dy = torch.randn(out.shape, generator=g)
    (out * dy).sum().backward()
    wide = [t.detach().double().requires_grad_() for t in (q2, k2, v2)]
    (_attention_by_hand(*wide, [], torch.ones(2, dtype=torch.bool), 8 ** -0.5) * dy.double()).sum().backward()
    torch.testing.assert_close(q2.grad.double(), wide[0].grad, rtol=1e-4, atol=1e-4)
    x = torch.randn(13, 1, 3, generator=g, requires_grad=True)
    dy = torch.randn(13, 1, 3, generator=g)
    p = SOFTMAX.softmax(x, backend="triton")
    (p * dy).sum().backward()
    x64 = x.detach().double().requires_grad_()
    p64 = _softmax_by_hand(x64, torch.ones(3, dtype=torch.bool))
    (p64 * dy.double()).sum().backward()
    torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
