"""The PyTorch references (the spec of every fused op) against independent formulas.

The parity tests compare each Triton kernel with its reference, so a bug in a reference would be
copied into the expected values. Here each reference is checked against a second formula written
out by hand in float64 (LayerNorm from mean and biased variance, softmax from exp and a sum,
attention from an einsum), at settings where a wrong constant shows: the default eps on rows whose
variance is of the order of eps, logits large enough that a softmax shifted by the wrong maximum
overflows, a scale that is not the default, two biases and a mask, inputs whose dims all differ.
"""

import math

import pytest
import torch

from ferryman.kernels import (
    LayerNorm,
    attention,
    attention_ref,
    layer_norm,
    layer_norm_ref,
    softmax,
    softmax_ref,
)


def _ln_by_hand(x, weight=None, bias=None, eps=1e-5):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm's
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def _small_rows(*shape):
    """Rows of variance ~1e-5, off-centre: the default eps moves the output by tens of percent."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3e-3 + 0.7


# ---------------------------------------------------------------- LayerNorm


def test_layer_norm_ref_default_eps_on_rows_of_small_variance():
    x = _small_rows(3, 4, 6)  # 3-D: only the last dim is normalised
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    b = torch.linspace(-0.3, 0.2, 6, dtype=torch.float64)
    want = _ln_by_hand(x, w, b)
    got = layer_norm_ref(x, w, b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # fp64 in, fp64 statistics
    # The default eps is 1e-5 exactly: eps=1e-5 and eps=2e-5 differ by several percent here.
    assert (_ln_by_hand(x, w, b, eps=2e-5) - want).abs().max() > 1e-2


def test_layer_norm_ref_fp32_and_fp16_inputs_keep_their_dtype():
    x = _small_rows(5, 8)
    w = torch.linspace(0.5, 1.5, 8)
    b = torch.linspace(-0.3, 0.2, 8)
    want = _ln_by_hand(x.float(), w, b)
    got32 = layer_norm_ref(x.float(), w, b)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    # fp16 weights on fp16 rows: the statistics are still taken in fp32, the result is fp16.
    x16 = (torch.randn(4, 64) * 40 + 300).half()  # a mean of 300 and rows of 64: fp16 sums would drift
    got16 = layer_norm_ref(x16, w.repeat(8).half(), b.repeat(8).half())
    assert got16.dtype == torch.float16
    want16 = _ln_by_hand(x16, w.repeat(8).half(), b.repeat(8).half())
    torch.testing.assert_close(got16.double(), want16, rtol=2e-3, atol=2e-3)


def test_layer_norm_ref_takes_parameters_of_another_dtype():
    # fp16 parameters on fp32 rows and fp32 parameters on fp64 rows: both are widened to the
    # statistics' dtype (torch's CPU layer_norm refuses either mix as it comes).
    x = _small_rows(3, 8)
    w = torch.linspace(0.5, 1.5, 8)
    b = torch.linspace(-0.25, 0.25, 8)
    torch.testing.assert_close(layer_norm_ref(x, w, b), _ln_by_hand(x, w, b), rtol=1e-12, atol=1e-12)
    got = layer_norm_ref(x.float(), w.half(), b.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _ln_by_hand(x.float(), w.half(), b.half()), rtol=1e-4, atol=1e-4)


def test_layer_norm_ref_of_fp32_rows_is_torchs_layer_norm_bit_for_bit():
    # The module is a drop-in for torch.nn.LayerNorm: on the reference path, fp32 gives its very bits.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 100, generator=g) * 5 + 3
    ref = torch.nn.LayerNorm(100)
    with torch.no_grad():
        ref.weight.normal_(generator=g)
        ref.bias.normal_(generator=g)
    assert torch.equal(layer_norm_ref(x, ref.weight, ref.bias), ref(x))
    fused = LayerNorm(100, backend="torch")
    fused.load_state_dict(ref.state_dict())
    assert torch.equal(fused(x), ref(x))


def test_layer_norm_ref_without_weight_or_bias_and_with_each_alone():
    x = _small_rows(2, 7)
    w = torch.linspace(2.0, 3.0, 7, dtype=torch.float64)
    b = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_ref(x), _ln_by_hand(x))
    torch.testing.assert_close(layer_norm_ref(x, w), _ln_by_hand(x, w))
    torch.testing.assert_close(layer_norm_ref(x, None, b), _ln_by_hand(x, None, b))
    torch.testing.assert_close(layer_norm_ref(x, w, b, 0.25), _ln_by_hand(x, w, b, eps=0.25))


def test_layer_norm_default_backend_and_eps_on_cpu(monkeypatch):
    x = _small_rows(4, 9).float()
    want = _ln_by_hand(x)
    torch.testing.assert_close(layer_norm(x).double(), want, rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # auto on CPU: the reference
    torch.testing.assert_close(layer_norm(x).double(), want, rtol=1e-4, atol=1e-4)


def test_layer_norm_module_defaults_and_options():
    x = _small_rows(3, 10).float()
    module = LayerNorm(10)
    assert module.eps == 1e-5 and module.backend == "auto"
    assert module.weight.shape == module.bias.shape == (10,)
    torch.testing.assert_close(module(x).double(), _ln_by_hand(x), rtol=1e-4, atol=1e-4)
    bare = LayerNorm(10, elementwise_affine=False)
    assert bare.weight is None and bare.bias is None
    no_bias = LayerNorm(10, eps=0.5, bias=False, backend="torch")
    assert no_bias.bias is None and no_bias.weight is not None and no_bias.eps == 0.5
    with torch.no_grad():
        no_bias.weight.copy_(torch.linspace(1, 2, 10))
    torch.testing.assert_close(no_bias(x).double(), _ln_by_hand(x, torch.linspace(1, 2, 10), eps=0.5),
                               rtol=1e-5, atol=1e-5)
    wide = LayerNorm(10, dtype=torch.float64, backend="torch")
    assert wide.weight.dtype == torch.float64
    assert "backend='auto'" in repr(module) and "(10,), eps=1e-05" in repr(module)


def test_layer_norm_module_over_two_dims_is_torchs():
    # normalized_shape of two dims: the fused kernel covers the last dim only, torch's does this.
    x = _small_rows(2, 3, 4).float()
    module = LayerNorm((3, 4), backend="torch")
    flat = x.reshape(2, 12).double()
    want = _ln_by_hand(flat).reshape(2, 3, 4)
    torch.testing.assert_close(module(x).double(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- softmax


def _softmax_by_hand(x, mask=None, bias=None):
    """exp(x + b) / sum over the kept keys, row by row, in float64; zeros for a row with none kept."""
    logits = x.double() + (0 if bias is None else bias.double())
    keep = torch.ones_like(logits, dtype=torch.bool) if mask is None else (mask != 0).expand_as(logits)
    flat, kept = logits.reshape(-1, logits.shape[-1]), keep.reshape(-1, logits.shape[-1])
    out = torch.zeros_like(flat)
    for i in range(flat.shape[0]):
        if kept[i].any():
            top = flat[i][kept[i]].max()
            e = torch.where(kept[i], torch.exp(flat[i] - top), torch.zeros(()).double())
            out[i] = e / e.sum()
    return out.reshape(logits.shape)


def test_softmax_ref_matches_exp_over_sum_with_mask_and_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, 1, 5, generator=g) > 0.4
    mask[1, 2] = False  # a row of keys all hidden
    want = _softmax_by_hand(x, mask, bias)
    got = softmax_ref(x, mask, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert got[1, 2].abs().max() == 0
    torch.testing.assert_close(softmax_ref(x, mask.to(torch.int32), bias), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(softmax(x, mask.float(), bias, backend="torch"), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(softmax_ref(x, None, bias), _softmax_by_hand(x, None, bias), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(softmax_ref(x, mask), _softmax_by_hand(x, mask), rtol=1e-12, atol=1e-15)


def test_softmax_ref_of_large_logits_is_shifted_by_each_rows_own_maximum():
    # Rows around +-1000: exp overflows (or underflows to 0/0) unless each row is shifted by its max.
    x = torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1003.0], [0.5, 0.0, -0.5]])
    want = _softmax_by_hand(x)
    for dtype in (torch.float32, torch.float64):
        got = softmax_ref(x.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    # Square rows as well: a maximum taken along the wrong dim would still broadcast.
    sq = torch.tensor([[500.0, 0.0, -500.0], [0.0, 800.0, 1.0], [-700.0, 3.0, 2.0]])
    torch.testing.assert_close(softmax_ref(sq).double(), _softmax_by_hand(sq), rtol=1e-6, atol=1e-7)


def test_softmax_ref_gradient_matches_the_jacobian():
    x = torch.tensor([[0.3, -1.2, 2.0, 0.1]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True])
    dy = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    (softmax_ref(x, mask) * dy).sum().backward()
    p = _softmax_by_hand(x.detach(), mask)
    want = p * (dy - (p * dy).sum(-1, keepdim=True))  # J^T dy of a softmax
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-15)
    assert x.grad[0, 2] == 0


def test_softmax_ref_keeps_half_precision_dtype_and_fp32_statistics():
    x = torch.tensor([[60000.0, 59990.0, 0.0]], dtype=torch.float16)  # x - max in fp16 is exact here
    got = softmax_ref(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), _softmax_by_hand(x), rtol=1e-3, atol=1e-4)


def test_no_keys_give_empty_rows_and_a_zero_attention_output():
    # Zero keys (an empty text prompt, a crop without templates): softmax over an empty row is empty,
    # and attention over no keys is the empty sum, zero, in every path.
    x = torch.randn(2, 3, 0)
    assert softmax_ref(x.half()).dtype == torch.float16
    for backend in ("torch", "triton"):
        p = softmax(x, torch.ones(0, dtype=torch.bool), torch.zeros(3, 0), backend=backend)
        assert p.shape == (2, 3, 0)
        q, k, v = torch.randn(2, 3, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 8)
        out = attention(q, k, v, torch.zeros(3, 0), torch.ones(0, dtype=torch.bool), backend=backend)
        assert torch.equal(out, torch.zeros(2, 3, 8))


def test_softmax_ref_of_fp16_rows_is_rounded_once_from_fp32():
    # exp, sum and division in fp32 and one rounding to fp16: every probability is within half an
    # fp16 ulp (plus fp32 noise) of the exact value; computed in fp16 it is off by several ulps.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 50, generator=g) * 2).half()
    exact = _softmax_by_hand(x)
    ulp = torch.finfo(torch.float16).eps * 2.0 ** torch.floor(torch.log2(exact.clamp_min(2**-14)))
    ulp = torch.where(exact < 2**-14, torch.full_like(exact, 2.0**-24), ulp)  # subnormals
    got = softmax_ref(x)
    assert got.dtype == torch.float16
    assert ((got.double() - exact).abs() <= 0.51 * ulp).all()


def test_softmax_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 6)
    torch.testing.assert_close(softmax(x).double(), _softmax_by_hand(x), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- attention


def _attention_by_hand(q, k, v, biases=(), mask=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("...qd,...kd->...qk", q, k) * scale
    for b in biases:
        logits = logits + b.double()
    return torch.einsum("...qk,...kd->...qd", _softmax_by_hand(logits, mask), v)


def _qkv(batch, n_q, n_k, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n_q, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*batch, n_k, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(*batch, n_k, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def test_attention_ref_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv((2, 3), 4, 5, 9)  # every dim different: a scale from the wrong dim shows
    want = _attention_by_hand(q, k, v)
    torch.testing.assert_close(attention_ref(q, k, v), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention(q, k, v, backend="torch"), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_ref(q, k, v, scale=1 / 3), want, rtol=1e-12, atol=1e-12)
    other = attention_ref(q, k, v, scale=0.7)
    torch.testing.assert_close(other, _attention_by_hand(q, k, v, scale=0.7), rtol=1e-12, atol=1e-12)
    assert (other - want).abs().max() > 1e-2


def test_attention_ref_sums_every_bias_and_masks_keys():
    q, k, v = _qkv((2, 3), 4, 5, 6, seed=1)
    g = torch.Generator().manual_seed(2)
    biases = [torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64),
              torch.randn(1, 3, 1, 5, generator=g, dtype=torch.float64),
              torch.randn(4, 5, generator=g, dtype=torch.float64)]
    mask = torch.rand(2, 3, 1, 5, generator=g) > 0.3
    mask[0, 1] = False
    for n in (1, 2, 3):
        want = _attention_by_hand(q, k, v, biases[:n], mask)
        torch.testing.assert_close(attention_ref(q, k, v, biases[:n], mask), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(attention(q, k, v, biases[:n], mask, backend="torch"), want,
                                   rtol=1e-12, atol=1e-12)
    # A single tensor is one bias; None entries are skipped; None is no bias.
    torch.testing.assert_close(attention_ref(q, k, v, biases[0]), _attention_by_hand(q, k, v, biases[:1]))
    torch.testing.assert_close(attention_ref(q, k, v, [None, biases[1], None]),
                               _attention_by_hand(q, k, v, biases[1:2]))
    torch.testing.assert_close(attention_ref(q, k, v, None), _attention_by_hand(q, k, v))
    assert attention_ref(q, k, v, biases, mask)[0, 1].abs().max() == 0


def test_attention_ref_half_precision_output_and_dtype():
    q, k, v = _qkv((2,), 3, 7, 8, dtype=torch.float16, seed=4)
    got = attention_ref(q, k, v)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), _attention_by_hand(q, k, v), rtol=5e-3, atol=5e-3)


def test_attention_ref_takes_values_of_another_dtype():
    # The reference itself (unlike attention()) accepts values wider than q and k: the
    # probabilities are cast to v's dtype, and the output has it.
    q, k, v = _qkv((2,), 3, 5, 8, seed=6)
    got = attention_ref(q.float(), k.float(), v)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _attention_by_hand(q.float(), k.float(), v), rtol=1e-6, atol=1e-6)


def test_attention_rejects_mismatched_dtypes_and_dims():
    q, k, v = _qkv((1,), 3, 4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q, k, v dtypes differ \(torch.float32, torch.float64, torch.float32\)"):
        attention(q, k.double(), v, backend="torch")
    with pytest.raises(ValueError, match=r"q, k, v dtypes differ \(torch.float32, torch.float32, torch.float16\)"):
        attention(q, k, v.half(), backend="torch")
    with pytest.raises(ValueError, match=r"^attention: head dims differ: q \(1, 3, 8\), k \(1, 4, 8\), v \(1, 4, 6\)$"):
        attention(q, k, v[..., :6], backend="torch")
    with pytest.raises(ValueError, match=r"^attention: head dims differ: q \(1, 3, 8\), k \(1, 4, 7\)"):
        attention(q, k[..., :7], v, backend="torch")
    with pytest.raises(ValueError, match=r"^attention: k has 4 keys but v has 3$"):
        attention(q, k, v[..., :3, :], backend="torch")
    assert math.isfinite(attention(q, k, v, backend="torch").sum().item())
