"""Test harness: Triton's interpreter on CPU-only machines, and the gpu/distributed/slow markers."""

import os

import pytest
import torch

# Must happen before anything imports ferryman.kernels: Triton decides at kernel definition
# time whether it runs compiled or interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test models are tiny, so each op is dominated by per-op overhead, and the machines that run the
# suite have two cores shared with the gloo worker processes some tests spawn: a second intra-op
# thread makes these tests several times slower, not faster.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
