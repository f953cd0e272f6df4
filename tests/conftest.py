"""Test harness: Triton's interpreter on CPU-only machines, and the gpu/distributed/slow markers."""

import os
import threading

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


@pytest.fixture(autouse=True)
def _a_tqdm_lock_of_this_process(monkeypatch):
    """Progress bars take a lock of the test's own process. tqdm guards its output with a
    process-shared semaphore made once and inherited by forked processes (mutmut forks one per
    mutant from the process that ran the tests first), and releases it without a ``finally``: a bar
    whose display raises (a mutant's ``unit=None``) leaves it held when its process exits, and every
    later process blocks in ``tqdm()`` until killed, so later mutants read as timeouts whatever
    their tests would say (docs/testing.md, "Known trouble")."""
    from tqdm import std
    from tqdm.auto import tqdm

    for cls in dict.fromkeys((std.tqdm, tqdm)):  # the base first (undone last); once if they are one
        monkeypatch.setattr(cls, "_lock", threading.RLock(), raising=False)  # absent until a first bar
