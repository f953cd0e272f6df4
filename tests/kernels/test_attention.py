"""Flash attention with biases and masks (Triton, interpreted on CPU) against the float64 reference.

Shapes follow the attention modules of the AF2 Evoformer, extra MSA and template stacks
(Suppl. Alg. 7, 8, 13, 14, 17, 19) and the STDiT blocks, at tiny odd sizes.
"""

import pytest
import torch

from ferryman.kernels import attention, attention_ref

from .utils import check_parity, leaf


def _fused(q, k, v, *biases, mask=None, scale=None):
    return attention(q, k, v, biases, mask, scale=scale, backend="triton")


def _ref(q, k, v, *biases, mask=None, scale=None):
    return attention_ref(q, k, v, biases, mask, scale=scale)


def _key_mask(shape, hide_first_row=True):
    mask = torch.rand(shape) > 0.25
    if hide_first_row:
        mask.view(-1, shape[-1])[0] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_msa_row_attention_with_pair_bias(dtype):
    # Alg. 7: q [B, S, H, N, c], pair bias [B, 1, H, N, N] shared by MSA rows, mask [B, S, 1, 1, N].
    b, s, h, n, c = 1, 3, 2, 37, 24
    q, k, v = (leaf((b, s, h, n, c), dtype) for _ in range(3))
    pair_bias = leaf((b, 1, h, n, n), dtype)
    mask = _key_mask((b, s, 1, 1, n))
    out = check_parity(_fused, _ref, [q, k, v, pair_bias], dtype, mask=mask)
    assert out[0, 0].abs().max() == 0  # every key of MSA row 0 is masked
    assert q.grad[0, 0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_msa_column_attention_on_transposed_views(dtype):
    # Alg. 8: attention along the sequence dim; q/k/v are non-contiguous views of the MSA layout.
    b, s, n, h, c = 2, 7, 5, 2, 16
    qkv = [leaf((b, s, n, h, c), dtype) for _ in range(3)]
    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in qkv)  # [B, N, H, S, c]
    mask = _key_mask((b, n, 1, 1, s))
    out = _fused(q, k, v, mask=mask)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    wide = [t.detach().double().requires_grad_() for t in qkv]
    want = _ref(*(t.permute(0, 2, 3, 1, 4) for t in wide), mask=mask)
    (want * grad.double()).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    for t, w in zip(qkv, wide):
        torch.testing.assert_close(t.grad.double(), w.grad, **tol)


def _pair_bias(z_proj):
    """linear(z) [B, N, N, H] -> the bias [B, 1, H, N, N] as AF2 builds it: a strided view."""
    return z_proj.permute(0, 3, 1, 2).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triangle_attention_starting_node(dtype):
    # Alg. 13: pair rows as batch, triangle bias [B, 1, H, N, N], mask [B, N, 1, 1, N].
    b, n, h, c = 1, 9, 2, 8
    q, k, v = (leaf((b, n, h, n, c), dtype) for _ in range(3))
    z_proj = leaf((b, n, n, h), dtype)
    mask = _key_mask((b, n, 1, 1, n))
    check_parity(lambda q, k, v, z, mask: _fused(q, k, v, _pair_bias(z), mask=mask),
                 lambda q, k, v, z, mask: _ref(q, k, v, _pair_bias(z), mask=mask),
                 [q, k, v, z_proj], dtype, mask=mask)


def test_extra_msa_global_column_attention_layout():
    # Alg. 19: one averaged query per head against single-head keys: heads become the query dim.
    b, n, s, h, c = 1, 6, 11, 4, 8
    q = leaf((b, n, 1, h, c), torch.float32)  # [B, N, 1, H, c]
    k, v = (leaf((b, n, 1, s, c), torch.float32) for _ in range(2))
    mask = _key_mask((b, n, 1, 1, s))
    check_parity(_fused, _ref, [q, k, v], torch.float32, mask=mask)


def test_template_pointwise_attention_with_mask_bias():
    # Alg. 17: each pair position attends over N_templ templates; the mask comes in as a bias.
    b, n2, h, t, c = 1, 12, 2, 4, 16
    q = leaf((b, n2, h, 1, c), torch.float32)
    k, v = (leaf((b, n2, h, t, c), torch.float32) for _ in range(2))
    mask_bias = torch.zeros(b, 1, 1, 1, t)
    mask_bias[..., -1] = -1e9
    check_parity(_fused, _ref, [q, k, v, mask_bias], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stdit_self_attention(dtype):
    b, h, n, c = 1, 2, 70, 72  # STDiT heads are 1152 / 16 = 72 wide: padded to 128 in the kernel
    q, k, v = (leaf((b, h, n, c), dtype) for _ in range(3))
    check_parity(_fused, _ref, [q, k, v], dtype)


def test_stdit_cross_attention_with_text_mask():
    b, h, n, text_len, c = 2, 2, 30, 13, 72
    q = leaf((b, h, n, c), torch.float32)
    k, v = (leaf((b, h, text_len, c), torch.float32) for _ in range(2))
    lengths = torch.tensor([9, 13])[:, None, None, None]
    mask = torch.arange(text_len)[None, None, None, :] < lengths  # [B, 1, 1, L]: padding tokens hidden
    check_parity(_fused, _ref, [q, k, v], torch.float32, mask=mask)


@pytest.mark.parametrize("head_dim", [8, 48, 128, 160])  # 160: the widest SD UNet heads
def test_head_dims_and_custom_scale(head_dim):
    q = leaf((1, 2, 7, head_dim), torch.float32)
    k, v = (leaf((1, 2, 100, head_dim), torch.float32) for _ in range(2))
    bias = leaf((1, 2, 7, 100), torch.float32)
    check_parity(_fused, _ref, [q, k, v, bias], torch.float32, scale=0.3)


def test_only_requested_gradients_are_computed():
    q = leaf((1, 2, 9, 16), torch.float32)
    k, v = (leaf((1, 2, 20, 16), torch.float32, grad=False) for _ in range(2))
    bias = leaf((2, 9, 20), torch.float32)
    check_parity(_fused, _ref, [q, k, v, bias], torch.float32)
    assert k.grad is None and v.grad is None
    q2 = leaf((1, 2, 9, 16), torch.float32, grad=False)
    bias2 = leaf((2, 9, 20), torch.float32)
    check_parity(_fused, _ref, [q2, k, v, bias2], torch.float32)
    assert q2.grad is None


def test_three_biases_with_different_broadcasts_all_get_gradients():
    b, s, h, n, c = 1, 2, 2, 10, 16
    q, k, v = (leaf((b, s, h, n, c), torch.float32) for _ in range(3))
    biases = [leaf((b, 1, h, n, n), torch.float32), leaf((b, s, 1, 1, n), torch.float32),
              leaf((n, n), torch.float32)]
    check_parity(_fused, _ref, [q, k, v, *biases], torch.float32)
    assert [tuple(x.grad.shape) for x in biases] == [(b, 1, h, n, n), (b, s, 1, 1, n), (n, n)]


def test_plain_matrices_without_batch_dims():
    q = leaf((5, 16), torch.float32)
    k, v = (leaf((9, 16), torch.float32) for _ in range(2))
    check_parity(_fused, _ref, [q, k, v, leaf((5, 9), torch.float32)], torch.float32)


def test_broadcast_keys_and_float_mask():
    q = leaf((3, 2, 5, 16), torch.float32)
    k, v = (leaf((1, 2, 20, 16), torch.float32) for _ in range(2))  # shared over the batch
    mask = (torch.rand(3, 1, 5, 20) > 0.5).float()  # a per-query 0/1 mask
    mask[1, 0, 2] = 0
    out = check_parity(_fused, _ref, [q, k, v], torch.float32, mask=mask)
    assert out[1, :, 2].abs().max() == 0


def test_fully_masked_batch_gives_zero_output_and_grads():
    q, k, v = (leaf((2, 1, 7, 24), torch.float32) for _ in range(3))
    bias = leaf((1, 1, 7, 7), torch.float32)
    out = _fused(q, k, v, bias, mask=torch.zeros(7, dtype=torch.bool))
    out.sum().backward()
    for t in (out, q.grad, k.grad, v.grad, bias.grad):
        assert torch.equal(t, torch.zeros_like(t))


def test_rejects_mismatched_shapes():
    q = torch.randn(1, 2, 7, 24)
    with pytest.raises(ValueError, match="head dims differ"):
        _fused(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="5 keys but v has 6"):
        _fused(q, torch.randn(1, 2, 5, 24), torch.randn(1, 2, 6, 24))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 72])
def test_cuda_pair_bias_attention(dtype, head_dim):
    b, s, h, n = 1, 4, 4, 257
    q, k, v = (leaf((b, s, h, n, head_dim), dtype, device="cuda") for _ in range(3))
    bias = leaf((b, 1, h, n, n), dtype, device="cuda")
    mask = _key_mask((b, s, 1, 1, n)).cuda()
    check_parity(_fused, _ref, [q, k, v, bias], dtype, mask=mask)
