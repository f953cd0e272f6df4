"""Ranks as threads: ``run_threaded(fn, world_size)`` is ``run_distributed`` inside this process.

The gloo tests (marker ``distributed``) spawn a Python process per rank, which costs seconds each
and hides the ranks' work from anything that watches this process: mutmut, which maps each
mutated function to the tests that call it, sees none of the code that only runs with several
ranks. Here each rank is a thread joined by torch's in-process "threaded" process group (the one
torch's own distributed tests use, from ``torch.testing._internal``): collectives have their real
semantics, all in one process, in milliseconds. ``init_parallel(backend="threaded")`` builds the
DAP/sequence/data groups on it.

The gloo tests stay the reference (real processes, a real transport); these exist so that code
which only runs with several ranks is checked quickly and seen by the mutation job.

What processes have of their own, threads share: the global RNG above all. A rank that seeds it
and draws (building a model) must do so inside ``with one_rank_at_a_time():``, or the ranks'
draws interleave; under ``run_distributed`` the lock is a no-op. Code that seeds the RNG without
the lock (the training loop does, for dropout) can still reset it under another rank's draws:
there, load the initial weights from a state drawn before the ranks start.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

_SERIAL = threading.Lock()


@contextlib.contextmanager
def one_rank_at_a_time() -> Iterator[None]:
    """Let one rank at a time through (for global state such as the RNG); never around a collective."""
    with _SERIAL:
        yield


def run_threaded(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` threads, each a rank of one default
    process group; return the results by rank. A rank that raises makes this raise."""
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    world = threaded._install_threaded_pg()
    store = dist.HashStore()
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def rank_main(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            results[rank] = fn(rank, world_size, *args)
        except BaseException as err:  # handed to the caller below
            errors.append((rank, err))
            threaded.ProcessLocalGroup.exception_handle(err)  # wake the ranks waiting in a collective
        finally:
            if dist.distributed_c10d._world is world:
                dist.destroy_process_group()

    saved_world = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets, and init_parallel reads first
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    try:
        threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        _join(threads, errors, timeout_s)
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        threaded.ProcessLocalGroup.reset()
        threaded._uninstall_threaded_pg()
        if saved_world is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = saved_world
    if errors:
        rank, err = min(errors, key=lambda e: e[0])
        raise RuntimeError(f"rank {rank} failed: {err!r}") from err
    return results


def _join(threads: list[threading.Thread], errors: list, timeout_s: float, grace_s: float = 2.0) -> None:
    """Wait for every rank, or until ``grace_s`` after the first rank failed: a rank that raised
    before a collective that is not a ProcessLocalGroup one (a store barrier in ``new_group``)
    leaves the others waiting for it, and the failure is known already. Left-over ranks are
    daemon threads blocked on a group that ``run_threaded`` then tears down."""
    start, failed_at = time.monotonic(), None
    while any(thread.is_alive() for thread in threads):
        now = time.monotonic()
        if errors:
            failed_at = failed_at or now
            if now - failed_at > grace_s:
                return
        if now - start > timeout_s:
            raise TimeoutError(f"threaded run did not finish within {timeout_s:.0f} s")
        for thread in threads:
            thread.join(0.05)


def launchers():
    """``pytest.param``s of both ways to start ranks, for ``parametrize``: spawned gloo processes
    (marked ``distributed``) and threads."""
    import pytest

    from ferryman.core.parallel import run_distributed

    return [pytest.param(run_distributed, id="processes", marks=pytest.mark.distributed),
            pytest.param(run_threaded, id="threads")]
