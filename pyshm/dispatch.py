"""One dispatcher per suite: picks the worker a request goes to.

Policies: least-loaded (default: the worker with the fewest requests in
flight, ties broken in turn) and round-robin.  A request of a distributed
session goes to the worker it is bound to (bound()) while that one serves;
the manager's placement step (ConnectionManager.place) asks for both."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from pyshm.config import SuiteConfig


@dataclass
class WorkerRef:
    """A worker as the manager sees it."""
    index: int          # its worker index in the request memory
    gen: int            # generation of that index
    pid: int
    start: int
    suite: str
    inflight: int = 0
    served: int = 0
    draining: bool = False   # takes no new requests (being replaced or stopped)
    recycle_at: int = 0      # replaced once it served this many (max_requests + jitter; 0: never)
    recycling: bool = False  # being replaced: retired as soon as another worker of its suite serves


class Dispatcher:
    def __init__(self, suite: SuiteConfig) -> None:
        self.suite = suite
        self.workers: dict[int, WorkerRef] = {}
        self._turn = itertools.count()

    def add(self, w: WorkerRef) -> None:
        self.workers[w.index] = w

    def remove(self, index: int) -> WorkerRef | None:
        return self.workers.pop(index, None)

    def available(self) -> list[WorkerRef]:
        return [w for w in self.workers.values() if not w.draining]

    def bound(self, index: int, gen: int) -> WorkerRef | None:
        """The worker a session is bound to (index and generation), if it
        still serves this suite (draining or not)."""
        w = self.workers.get(index)
        return w if w is not None and w.gen == gen else None

    def pick(self) -> WorkerRef | None:
        """The worker for the next request, or None when none can take it."""
        ready = self.available()
        if not ready:
            return None
        turn = next(self._turn)
        if self.suite.policy == "round-robin":
            return ready[turn % len(ready)]
        n = len(ready)
        return min((ready[(turn + i) % n] for i in range(n)), key=lambda w: w.inflight)
