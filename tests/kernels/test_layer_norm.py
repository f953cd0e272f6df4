"""Fused LayerNorm (Triton, interpreted on CPU) against the float64 reference."""

import pytest
import torch

from ferryman.kernels import LayerNorm, layer_norm, layer_norm_ref

from .utils import check_parity, leaf


def _fused(x, weight, bias, eps=1e-5):
    return layer_norm(x, weight, bias, eps, backend="triton")


def _affine(n, dtype, device=None):
    weight = (1 + 0.2 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    bias = (0.2 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    return weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1023), (3, 7, 100), (5, 4096)])
def test_layer_norm_matches_reference(shape, dtype):
    x = leaf(shape, dtype, scale=2.0)
    x.data += 3.0  # an offset mean exercises the centring
    check_parity(_fused, layer_norm_ref, [x, *_affine(shape[-1], dtype)], dtype)


def test_without_affine_and_with_fp32_params_on_fp16_input():
    x = leaf((6, 50), torch.float16)
    check_parity(_fused, layer_norm_ref, [x, None, None], torch.float16)
    weight, bias = _affine(50, torch.float32)
    x = leaf((6, 50), torch.float16)
    out = _fused(x, weight, bias)
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    want = layer_norm_ref(x.detach().double(), weight.detach().double(), bias.detach().double())
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=1e-2)


def test_many_rows_split_over_programs_sum_weight_grads():
    # More rows than one program handles, so dweight/dbias come from several partial sums.
    x = leaf((300, 24), torch.float32)  # 5 blocks of 64 rows over 3 programs
    check_parity(_fused, layer_norm_ref, [x, *_affine(24, torch.float32)], torch.float32)


def test_module_is_interchangeable_with_torch_layernorm():
    ref = torch.nn.LayerNorm(48)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = LayerNorm(48, backend="triton")
    fused.load_state_dict(ref.state_dict())
    assert set(fused.state_dict()) == {"weight", "bias"}
    back = torch.nn.LayerNorm(48)
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    fused.backend = "torch"
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    assert "backend='torch'" in repr(fused)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_layer_norm(dtype):
    x = leaf((4096, 1152), dtype, device="cuda")
    check_parity(_fused, layer_norm_ref, [x, *_affine(1152, dtype, "cuda")], dtype)
