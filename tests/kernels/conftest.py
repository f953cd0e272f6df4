"""Kernel tests run where the Triton kernels run: on CUDA when there is a GPU, else on CPU under
the interpreter (tests/conftest.py switches it on). Factory calls in the tests use the default
device, so the same parity tests check the compiled kernels on a GPU machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _kernel_device():
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(previous)
