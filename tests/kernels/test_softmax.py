"""Fused masked softmax (Triton, interpreted on CPU) against the float64 reference."""

import pytest
import torch

from ferryman.kernels import softmax, softmax_ref

from .utils import check_parity, leaf


def _fused(x, mask=None, bias=None):
    return softmax(x, mask, bias, backend="triton")


def _ref(x, mask=None, bias=None):
    return softmax_ref(x, mask, bias)


def _key_mask(shape, hide_rows=True):
    mask = torch.rand(shape) > 0.3
    if hide_rows:
        mask.view(-1, shape[-1])[0] = False  # a whole row of keys hidden
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 100), (1, 1023), (1023,), (2, 3, 2, 5, 33)])
def test_plain_softmax_matches_reference(shape, dtype):
    check_parity(_fused, _ref, [leaf(shape, dtype, scale=3.0)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_msa_row_pattern_pair_bias_and_key_mask(dtype):
    # Logits [B, S, H, Q, K]; pair bias shared over MSA rows, mask per row over keys.
    b, s, h, n = 2, 3, 2, 37
    x = leaf((b, s, h, n, n), dtype, scale=2.0)
    bias = leaf((b, 1, h, n, n), dtype)
    mask = _key_mask((b, s, 1, 1, n))
    out = check_parity(_fused, _ref, [x, mask, bias], dtype)
    # Row (0, 0) hides every key: zero probabilities, zero gradient, no NaN.
    assert out[0, 0].abs().max() == 0
    assert x.grad[0, 0].abs().max() == 0


def test_triangle_pattern_with_float_mask_and_fp32():
    b, i, h, n = 1, 5, 3, 19
    x = leaf((b, i, h, n, n), torch.float32)
    bias = leaf((b, 1, h, n, n), torch.float32)
    mask = _key_mask((b, i, 1, 1, n)).float()  # 0/1 masks are accepted as well as bool
    check_parity(_fused, _ref, [x, mask, bias], torch.float32)


def test_bias_broadcast_over_rows_and_heads_gets_reduced_gradient():
    x = leaf((2, 4, 6, 130), torch.float32)  # K not a multiple of any block size
    bias = leaf((1, 1, 130), torch.float32)  # fewer dims than x
    check_parity(_fused, _ref, [x, None, bias], torch.float32)
    assert bias.grad.shape == (1, 1, 130)


def test_fully_masked_input_gives_zeros_not_nan():
    x = leaf((2, 3, 9), torch.float32)
    mask = torch.zeros(9, dtype=torch.bool)
    out = _fused(x, mask)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_negative_infinity_bias_masks_like_a_mask():
    x = torch.randn(4, 11)
    bias = torch.zeros(4, 11)
    bias[:, 5:] = float("-inf")
    bias[2] = float("-inf")
    got = _fused(x, bias=bias)
    want = softmax_ref(x, mask=torch.isfinite(bias))
    torch.testing.assert_close(got, want)
    assert got[2].abs().max() == 0


def test_non_contiguous_input_and_strided_gradient():
    base = torch.randn(5, 40, 6)
    x = base.transpose(-1, -2).requires_grad_()  # [5, 6, 40], last-dim stride 6
    (_fused(x).sum() * 2).backward()  # grad_out is an expanded (stride 0) tensor
    assert torch.allclose(x.grad, torch.zeros_like(x), atol=1e-6)  # softmax rows sum to a constant
    torch.testing.assert_close(_fused(x), softmax_ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pair_bias_pattern(dtype):
    b, s, h, n = 1, 4, 4, 300
    x = leaf((b, s, h, n, n), dtype, device="cuda")
    bias = leaf((b, 1, h, n, n), dtype, device="cuda")
    mask = _key_mask((b, s, 1, 1, n)).cuda()
    check_parity(_fused, _ref, [x, mask, bias], dtype)
