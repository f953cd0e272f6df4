"""run_distributed's bookkeeping with its processes replaced by threads: what each rank's worker
sets up, how results come back by rank, and how a failed, silent or hung rank ends the run.

The processes themselves (spawned Pythons joined by gloo) are what the ``distributed`` tests run;
here ``mp.get_context`` hands out a context whose ``Process`` is a thread and whose queue is an
in-process one, and the workers join torch's in-process "threaded" process group (the one
tests/threaded.py uses) through the same env:// rendezvous a spawned worker uses. Everything
run_distributed and its worker do around the process boundary is then real and in this process,
where the mutation job can see it.
"""

import contextlib
import os
import queue
import socket
import threading
import time
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist

from ferryman.core.parallel import launch, run_distributed

RELEASE = threading.Event()  # a "hung" rank waits for this; killing a fake process sets it


class _ThreadProcess:
    """The part of ``multiprocessing.Process`` that run_distributed uses, as a thread."""

    started: ClassVar[list["_ThreadProcess"]] = []
    exit_codes: ClassVar[dict[int, int]] = {}  # rank -> exit code of a process that dies without running
    exit_s: ClassVar[float] = 0.0  # how long a process takes to exit after its worker returned

    def __init__(self, target, args, daemon):
        self.target, self.args, self.daemon = target, args, daemon
        self.exitcode, self.killed, self.left_a_group = None, False, None
        self.join_timeouts: list[float | None] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        code = self.exit_codes.get(self.args[0])
        if code is None:
            try:
                self.target(*self.args)
            except BaseException:
                code = 1  # what a process ended by an uncaught exception exits with
            self.left_a_group = dist.is_initialized()  # this thread's group, after the worker's cleanup
            RELEASE.wait(self.exit_s)  # interpreter shutdown; cut short by a kill
        self.exitcode = code or 0

    def start(self):
        self.started.append(self)
        self.thread.start()

    def join(self, timeout=None):
        self.join_timeouts.append(timeout)
        self.thread.join(timeout)

    def is_alive(self):
        return self.thread.is_alive()

    def kill(self):
        self.killed = True
        RELEASE.set()


class _Queue:
    def __init__(self):
        self.items = queue.SimpleQueue()

    def put(self, item):
        self.items.put(item)

    def get(self):
        return self.items.get(timeout=5)  # a get that would block for good fails instead

    def empty(self):
        return self.items.empty()


class _Context:
    Process = _ThreadProcess
    SimpleQueue = _Queue


@pytest.fixture
def threads(monkeypatch):
    """run_distributed with threads for processes; yields the start methods it asked for."""
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    methods = []

    def get_context(method):
        methods.append(method)
        return _Context

    monkeypatch.setattr(launch.mp, "get_context", get_context)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "unset")  # recorded, so that what the workers set is undone
        monkeypatch.delenv(name)
    _ThreadProcess.started, _ThreadProcess.exit_codes, _ThreadProcess.exit_s = [], {}, 0.0
    RELEASE.clear()
    RAISING.clear()
    threaded._install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    threads_before = torch.get_num_threads()
    try:
        yield methods
    finally:
        RELEASE.set()
        torch.set_num_threads(threads_before)  # a worker sets one intra-op thread per process
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        threaded.ProcessLocalGroup.reset()
        threaded._uninstall_threaded_pg()


def _sum_of_ranks(rank, world, scale):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t * scale, "group_rank": dist.get_rank(), "group_size": dist.get_world_size()}


def test_results_come_back_by_rank_from_an_initialised_group(threads):
    results = run_distributed(_sum_of_ranks, 3, 2.0, backend="threaded", timeout_s=20)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["group_rank"] for r in results] == [0, 1, 2]
    assert [r["group_size"] for r in results] == [3, 3, 3]
    for r in results:
        assert torch.equal(r["sum"], torch.tensor([12.0]))  # (1 + 2 + 3) * 2, a tensor through pickle
    assert threads == ["spawn"]  # spawned, not forked: a fork would copy this process's threads and CUDA
    assert len(_ThreadProcess.started) == 3
    assert all(p.daemon is True for p in _ThreadProcess.started)  # cannot outlive the caller
    assert not any(p.killed for p in _ThreadProcess.started)  # finished ranks are joined, not killed
    assert [p.left_a_group for p in _ThreadProcess.started] == [False] * 3  # each worker tears its group down


def _backend(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return dist.get_backend(), t.item()


def test_the_default_backend_is_gloo(threads):
    assert run_distributed(_backend, 2, timeout_s=20) == [("gloo", 3.0), ("gloo", 3.0)]


def test_ranks_that_reported_are_given_time_to_exit_cleanly(threads):
    _ThreadProcess.exit_s = 1.0  # longer than the grace of a failed run: this one did not fail
    assert run_distributed(_backend, 2, backend="threaded", timeout_s=20) == [("threaded", 3.0)] * 2
    assert [p.killed for p in _ThreadProcess.started] == [False, False]


def _environment(rank, world):
    return {
        "env": {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")},
        "threads": torch.get_num_threads(),
        "initialised": dist.is_initialized(),
        "backend": dist.get_backend(),
    }


def test_a_worker_sees_what_torchrun_would_set(threads):
    [got] = run_distributed(_environment, 1, backend="threaded", timeout_s=20)
    env = got["env"]
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert 1024 < int(env["MASTER_PORT"]) < 65536
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("0", "0", "1")
    assert got["threads"] == 1  # ranks share the host's cores
    assert got["initialised"] and got["backend"] == "threaded"


RAISING = threading.Event()


def _fails_on_one(rank, world):
    if rank == 1:
        RAISING.set()
        raise ValueError("rank one cannot go on")
    # rank 0 (which holds the rendezvous store) returns once rank 1 is past joining: a rank that
    # tears its group down while another still talks to the store makes that one fail in joining
    RAISING.wait(10)
    return rank


def test_a_rank_that_raises_fails_the_run_with_its_traceback(threads):
    with pytest.raises(RuntimeError) as err:
        run_distributed(_fails_on_one, 2, backend="threaded", timeout_s=20)
    message = str(err.value)
    assert message.startswith("rank 1 failed:\nTraceback (most recent call last):\n")
    assert "ValueError: rank one cannot go on" in message
    assert "rank 0" not in message


def _hangs_on_zero(rank, world):
    if rank == 0:
        RELEASE.wait(30)  # blocked, as a rank waiting in a collective for a peer that died
        return "released"
    raise ValueError("rank one cannot go on")


def test_a_failed_rank_ends_the_run_without_waiting_for_a_blocked_one(threads):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^rank 1 failed:"):
        run_distributed(_hangs_on_zero, 2, backend="threaded", timeout_s=20)
    assert time.monotonic() - start < 10  # not the 20 s timeout, nor the 30 s the rank would wait
    blocked, failed = _ThreadProcess.started
    assert blocked.killed and not failed.killed
    assert 0 < max(blocked.join_timeouts) <= 1  # a short grace for a rank that may be stuck for good


def test_a_rank_that_dies_without_a_message_fails_the_run(threads):
    _ThreadProcess.exit_codes = {0: 0, 1: 3}  # neither reports; rank 1's process exits with status 3
    with pytest.raises(RuntimeError, match=r"^rank 1 failed:\nprocess exited with code 3 and no message$"):
        run_distributed(_hangs_on_zero, 2, backend="threaded", timeout_s=20)


def _sleeps(rank, world):
    RELEASE.wait(1.5)
    return rank


def test_a_run_that_outlasts_its_timeout_raises(threads):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^distributed run did not finish within 1 s$"):
        run_distributed(_sleeps, 1, backend="threaded", timeout_s=1)
    assert time.monotonic() - start >= 1


class _Proc:
    def __init__(self, alive: bool, exitcode: int | None):
        self.alive, self.exitcode = alive, exitcode

    def is_alive(self):
        return self.alive


def test_get_returns_a_message_before_looking_for_dead_processes():
    messages = _Queue()
    messages.put((1, True, b"payload"))
    assert launch._get(messages, [_Proc(True, None), _Proc(False, 3)], 5) == (1, True, b"payload")


def test_get_names_the_first_process_that_died_with_an_error():
    procs = [_Proc(True, None), _Proc(False, -9), _Proc(False, 1)]
    assert launch._get(_Queue(), procs, 5) == (1, False, "process exited with code -9 and no message")


def test_get_waits_past_processes_that_finished_cleanly():
    messages = _Queue()
    procs = [_Proc(False, 0), _Proc(True, None)]  # rank 0 reported and exited: not a failure
    timer = threading.Timer(0.2, messages.put, args=((1, True, b"late"),))
    timer.start()
    try:
        assert launch._get(messages, procs, 10) == (1, True, b"late")
    finally:
        timer.cancel()
    with pytest.raises(TimeoutError, match=r"^distributed run did not finish within 0 s$"):
        launch._get(_Queue(), procs, 0.1)


def test_free_port_is_a_free_local_port():
    port = launch._free_port()
    assert 1024 < port < 65536
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", port))  # free again once the probe socket is closed
