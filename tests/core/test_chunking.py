"""chunk_layer must give the unchunked result for layers with several batch dimensions."""

import pytest
import torch

from ferryman.core.chunking import chunk_layer, chunk_size_for_budget
from ferryman.core.errors import ConfigError


def _attention_like(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [*, Q, C], k: [*, K, C], bias broadcast over the batch dims -> [*, Q, K]
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 35, 1000])
def test_chunked_equals_unchunked_over_several_batch_dims(chunk_size):
    q = torch.randn(5, 7, 6, 8, dtype=torch.float64)  # [S, N, Q, C]
    k = torch.randn(1, 7, 9, 8, dtype=torch.float64)  # broadcast over S
    bias = torch.randn(5, 1, 6, 9, dtype=torch.float64)  # broadcast over N
    inputs = {"q": q, "k": k, "bias": bias, "scale": 0.3}
    full = _attention_like(**inputs)
    chunked = chunk_layer(_attention_like, inputs, chunk_size=chunk_size, num_batch_dims=2)
    assert chunked.shape == full.shape == (5, 7, 6, 9)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)


def test_preallocated_output_may_alias_an_input_for_in_place_updates():
    x = torch.randn(4, 6, 3)
    expected = x * 2 + 1
    result = chunk_layer(lambda x: x * 2 + 1, {"x": x}, chunk_size=5, num_batch_dims=2, out=x)
    assert result.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


def test_no_chunking_and_bad_sizes():
    x = torch.randn(3, 2)
    assert torch.equal(chunk_layer(torch.sin, {"input": x}, chunk_size=None, num_batch_dims=1), x.sin())
    with pytest.raises(ConfigError, match="chunk_size"):
        chunk_layer(torch.sin, {"input": x}, chunk_size=0, num_batch_dims=1)


def test_chunk_size_for_budget():
    assert chunk_size_for_budget(num_rows=100, bytes_per_row=10, budget_bytes=2000) is None
    size = chunk_size_for_budget(num_rows=10_000, bytes_per_row=1_000, budget_bytes=300_000)
    assert size == 256  # largest power of two with size * 1000 <= 300_000
    assert chunk_size_for_budget(num_rows=10, bytes_per_row=1_000, budget_bytes=10) == 1
