"""Run a function on several local processes joined by torch.distributed (for tests and tools)."""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # ranks share the host's cores
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        # Plain pickle copies tensor data into the message; torch's shared-memory reducers would
        # hand the parent file descriptors that vanish when this process exits.
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 300
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes and return their results.

    The processes are spawned (not forked), so ``fn`` must be importable at module level and its
    arguments and result picklable. The environment torchrun would set (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) is set in each, and the default process group is already initialised. A rank
    that raises makes this raise with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, backend, fn, args, queue), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = _get(queue, procs, timeout_s)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may now block in a collective; do not wait for them
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]


def _get(queue, procs, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not queue.empty():
            return queue.get()
        dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
        if dead and queue.empty():
            return (procs.index(dead[0]), False, f"process exited with code {dead[0].exitcode} and no message")
        time.sleep(0.02)
    raise TimeoutError(f"distributed run did not finish within {timeout_s:.0f} s")
