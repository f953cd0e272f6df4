"""LayerNorm where eps matters: rows whose variance is of the order of eps.

At the default eps=1e-5 on rows of variance ~1, eps changes the output in the sixth digit, so a
kernel that drops eps, adds it twice or adds it to the standard deviation instead of the variance
passes every parity check at the default (the pattern "one configuration only" of issue #22). Here
the rows' variance is 1e-4 and eps is 1e-4, 1e-2 and 0.5, so each of those bugs moves the output by
tens of percent, on the reference path, the Triton path and the module.
"""

import pytest
import torch

from ferryman.kernels import LayerNorm, layer_norm, layer_norm_ref

from .utils import check_parity, leaf


def _by_hand(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm's
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


@pytest.mark.parametrize("eps", [1e-4, 1e-2, 0.5])
def test_layer_norm_where_eps_is_as_large_as_the_variance(eps):
    x = leaf((5, 37), torch.float32, scale=1e-2)  # variance ~1e-4
    weight = (1 + 0.2 * torch.randn(37)).requires_grad_()
    bias = (0.2 * torch.randn(37)).requires_grad_()
    want = _by_hand(x.detach(), weight.detach(), bias.detach(), eps)
    torch.testing.assert_close(layer_norm_ref(x, weight, bias, eps).double(), want, rtol=1e-5, atol=1e-6)
    out = check_parity(lambda *a: layer_norm(*a, eps, backend="triton"), lambda *a: layer_norm_ref(*a, eps),
                       [x, weight, bias], torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    module = LayerNorm(37, eps=eps, backend="triton")
    module.load_state_dict({"weight": weight.detach(), "bias": bias.detach()})
    torch.testing.assert_close(module(x.detach()).double(), want, rtol=1e-4, atol=1e-5)
