"""An in-process engine for darknet_bn.distributed: ranks are threads of one process.

``ThreadGroup(size).communicators()`` gives one object per rank with the four
members of ``darknet_bn.distributed.Communicator`` (rank, size, allgather,
allreduce_sum). It exists to test the protocol without MPI or
torch.distributed, and shows that another engine is a small class. Every
collective waits on a barrier with a timeout, so a rank that never calls in
breaks the barrier (threading.BrokenBarrierError) instead of hanging the test.

``run_ranks(size, fn)`` runs ``fn(comm)`` on one thread per rank and returns
each rank's result or exception.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional

import numpy as np

DEFAULT_TIMEOUT = 30.0


class ThreadGroup:
    """The shared state of one group of thread ranks."""

    def __init__(self, size: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: List[Optional[np.ndarray]] = [None] * size

    def communicators(self) -> List["ThreadCommunicator"]:
        return [ThreadCommunicator(self, r) for r in range(self.size)]


class ThreadCommunicator:
    """darknet_bn.distributed.Communicator for one thread rank of a ThreadGroup."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank
        self.calls: List[str] = []  # which collectives this rank ran, in order

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._group.size

    def _exchange(self, values: np.ndarray) -> np.ndarray:
        g = self._group
        g.slots[self._rank] = np.array(values, dtype=np.float64, copy=True)
        g.barrier.wait()
        rows = np.stack(g.slots)  # every slot written
        g.barrier.wait()  # every rank has read before the next collective overwrites
        return rows

    def allgather(self, values: np.ndarray) -> np.ndarray:
        self.calls.append("allgather")
        return self._exchange(values)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        self.calls.append("allreduce_sum")
        rows = self._exchange(values)
        total = rows[0].copy()
        for r in range(1, rows.shape[0]):  # rank order: the same bits on every rank
            total += rows[r]
        return total


def run_ranks(size: int, fn: Callable[[ThreadCommunicator], Any], timeout: float = DEFAULT_TIMEOUT) -> List[Any]:
    """Run ``fn(comm)`` on ``size`` thread ranks; return each rank's result or the exception it raised."""
    comms = ThreadGroup(size, timeout).communicators()
    results: List[Any] = [None] * size

    def body(r: int) -> None:
        try:
            results[r] = fn(comms[r])
        except BaseException as exc:  # reported to the caller
            results[r] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
        assert not t.is_alive(), "a thread rank hung"
    return results
