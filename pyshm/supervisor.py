"""The supervisor: starts the configured workers, learns at once when one
dies (its control connection, served by pyshm.control_server, closes), tells
its one listener (the manager, which cleans up after the dead worker: its
requests, slots and pins) and starts a replacement.  It knows processes,
never requests.

Runs inside the manager's event loop.  SIGHUP replaces the workers one by
one: the new one joins before the old one stops taking requests, and the
old one is told to stop only when it has none in flight.  Recycling
(max_requests, max_rss) replaces one worker the same way.

Restarts: a worker that dies is replaced at once.  Only a worker that exits
by itself (not killed by a signal from outside, not killed for a request
timeout) before joining or within QUICK_DEATH seconds of it counts towards a
crash loop, and from the second such death in a row its suite's next start
waits (RESTART_BACKOFF).  A worker that cannot import its application says
why on its control connection; at start that stops the instance with one
line naming the error."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from pyshm import procmem
from pyshm.config import Config
from pyshm.control_server import ControlConn, ControlServer
from pyshm.dispatch import WorkerRef
from pyshm.errors import WorkerStartError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0     # seconds a new worker has to join
RESTART_BACKOFF = (0.0, 0.0, 0.5, 1.0, 2.0, 5.0)   # by consecutive quick deaths of a suite's workers
QUICK_DEATH = 2.0        # seconds after joining within which exiting counts as a crash
STOP_TIMEOUT = 5.0


@dataclass
class Child:
    """A worker process this supervisor started."""
    proc: subprocess.Popen
    suite: str
    started: float
    worker: WorkerRef | None = None
    joined: float = 0.0
    retiring: bool = False       # replaced (SIGHUP, recycling) or stopping: not restarted
    replacing: bool = False      # a replacement is starting
    killed: bool = False         # killed by the manager (request timeout): not a crash
    replacement: bool = False    # started by SIGHUP to replace another: not restarted if it fails to join


class Refused(Exception):
    """A worker may not join (the reason is sent to it)."""


class WorkerEvents(Protocol):
    """What the supervisor tells its one listener (the connection manager),
    which owns the request memory and the workers' requests."""

    def worker_joining(self, pid: int, start: int, suite: str) -> tuple[WorkerRef, dict, list[int]]:
        """Admits a worker: its record, the reply for it and the file
        descriptors to pass it.  Raises Refused."""

    def worker_joined(self, w: WorkerRef) -> None:
        """w takes requests from now on."""

    def worker_left(self, w: WorkerRef) -> None:
        """w is gone: the clean-up after it (its requests, slots, pins)."""


class Supervisor:
    """Processes only: it knows the workers' pids and suites, never their
    requests.  status: what `pyshm status` reports (the control server asks)."""

    def __init__(self, config: Config, events: WorkerEvents, status: Callable[[], dict],
                 drain: Callable[[], dict] | None = None) -> None:
        self.config = config
        self.events = events
        self.control = ControlServer(config.name, self, status, drain)
        self.children: dict[int, Child] = {}      # by pid
        self.conns: dict[int, ControlConn] = {}   # by worker index: the joined workers
        self.started = False                      # all workers of the start joined
        self.stopping = False
        self._quick_deaths: dict[str, int] = {}
        self.restarts: dict[str, int] = {}          # by suite: workers started to replace dead ones
        self._joined = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.start_errors: dict[int, str] = {}      # by pid: why a worker could not start

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.control.start()
        for suite in cfg.suites.values():
            for _ in range(suite.workers):
                self.spawn(suite.name)
        await self._wait_joined(sum(s.workers for s in cfg.suites.values()))
        self.started = True
        self._task(self._watch_children())

    def workers(self) -> list[WorkerRef]:
        """The joined workers."""
        return [conn.owner for conn in self.conns.values()]

    async def _wait_joined(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        exited: dict[int, float] = {}
        while len(self.conns) < n:
            for c in self._unjoined_exited():
                why = self.start_errors.get(c.proc.pid)
                if why is not None:
                    raise WorkerStartError(f"suite {c.suite}: {why}")
                # Its reason may still be on the way: give it a moment.
                if time.monotonic() - exited.setdefault(c.proc.pid, time.monotonic()) > 0.5:
                    raise WorkerStartError(f"a worker of suite {c.suite!r} exited with status "
                                           f"{c.proc.returncode} before joining; its error is above")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"only {len(self.conns)} of {n} workers joined within "
                                       f"{START_TIMEOUT:g} s")
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    def spawn(self, suite: str, *, replacement: bool = False) -> Child:
        cfg = self.config
        cmd = [sys.executable, "-m", "pyshm.worker", "--instance", cfg.name, "--suite", suite,
               "--app", cfg.suites[suite].app, "--interface", cfg.suites[suite].interface, "--supervised"]
        if log.isEnabledFor(logging.INFO):
            cmd.append("-v")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        child = Child(proc, suite, time.monotonic(), replacement=replacement)
        self.children[proc.pid] = child
        log.info("started worker pid %d for suite %s", proc.pid, suite)
        return child

    def _task(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- control connections (ControlHandler) ---------------------------------------------

    def on_failed(self, conn: ControlConn, failed: dict) -> None:
        """A worker we started says why it cannot start (then exits)."""
        pid, uid = conn.peer()
        child = self.children.get(pid)
        if uid == os.getuid() and child is not None and pid not in self.start_errors:
            why = str(failed.get("error", "unknown error"))[:2000]
            self.start_errors[pid] = why
            if self.started:
                log.error("a worker of suite %s could not start: %s", child.suite, why)
        self.control.close(conn)

    def on_hello(self, conn: ControlConn, hello: dict) -> None:
        suite = str(hello["suite"])
        pid, start = int(hello["pid"]), int(hello["start"])
        # The socket is abstract (no file permissions): the kernel says who
        # connected, and only this user's processes, as who they claim, join.
        peer_pid, peer_uid = conn.peer()
        if peer_uid != os.getuid() or peer_pid != pid:
            log.warning("refused a worker: uid %d pid %d (claimed pid %d)", peer_uid, peer_pid, pid)
            self.control.close(conn)
            return
        try:
            if self.stopping:
                raise Refused("shutting down")
            w, reply, fds = self.events.worker_joining(pid, start, suite)
        except Refused as e:
            self.control.send(conn, {"error": str(e)})
            self.control.close(conn)
            return
        conn.owner = w
        self.conns[w.index] = conn
        self.control.send(conn, reply, fds)
        child = self.children.get(pid)
        if child is not None:
            child.worker = w
            child.joined = time.monotonic()
            child.replacement = False
        self.events.worker_joined(w)
        self._retire_recycled(suite)
        self._joined.set()
        log.info("worker pid %d joined suite %s as index %d", pid, suite, w.index)

    def on_closed(self, conn: ControlConn) -> None:
        w, conn.owner = conn.owner, None
        if w is None:
            return
        self.conns.pop(w.index, None)
        self.events.worker_left(w)
        child = self.children.pop(w.pid, None)
        if child is not None:
            self._reap(child)
        log.info("worker pid %d (suite %s) left", w.pid, w.suite)

    def _reap(self, child: Child, tries: int = 0) -> None:
        """Collects an exited worker without blocking the loop, then
        restarts it unless it was retired; one that closed its control
        connection but still runs after 2 s is broken and is killed."""
        if child.proc.poll() is None:
            if tries == 40:
                child.killed = True
                child.proc.kill()
            asyncio.get_running_loop().call_later(0.05, self._reap, child, tries + 1)
            return
        status = child.proc.returncode
        if status not in (0, -signal.SIGTERM) and not child.killed:
            log.warning("worker pid %d of suite %s died (%s)", child.proc.pid, child.suite, _status_text(status))
        if not child.retiring and not self.stopping:
            self._restart(child)

    def _restart(self, child: Child) -> None:
        """Starts a worker in place of `child`, at once unless its suite is
        in a crash loop (see the module's docstring)."""
        suite = child.suite
        self.restarts[suite] = self.restarts.get(suite, 0) + 1
        delay = RESTART_BACKOFF[min(self._count_death(child), len(RESTART_BACKOFF) - 1)]
        if delay:
            log.error("workers of suite %s keep dying; next start in %g s", suite, delay)
        asyncio.get_running_loop().call_later(delay, self._spawn_unless_stopping, suite)

    def _count_death(self, child: Child) -> int:
        """The suite's consecutive crash-like deaths, this one included."""
        status = child.proc.returncode
        if child.killed or status in (0, -signal.SIGTERM):
            return self._quick_deaths.get(child.suite, 0)   # we killed it, or it was stopped: no crash
        if child.joined and status == -signal.SIGKILL:
            return self._quick_deaths.get(child.suite, 0)   # killed from outside while serving (an operator, OOM)
        quick = not child.joined or time.monotonic() - child.joined < QUICK_DEATH
        n = self._quick_deaths[child.suite] = self._quick_deaths.get(child.suite, 0) + 1 if quick else 0
        return n

    def _spawn_unless_stopping(self, suite: str) -> None:
        if self.stopping:
            return
        try:
            self.spawn(suite)
        except OSError as e:        # no memory or pids left for a fork: try again
            log.error("cannot start a worker of suite %s (%s); trying again in 1 s", suite, e)
            asyncio.get_running_loop().call_later(1.0, self._spawn_unless_stopping, suite)

    async def _watch_children(self) -> None:
        """Workers that die before joining never close a control connection."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            for c in self._unjoined_exited():
                del self.children[c.proc.pid]
                why = self.start_errors.pop(c.proc.pid, None)
                if why is None:
                    log.error("worker pid %d of suite %s exited (%s) before joining", c.proc.pid, c.suite,
                              _status_text(c.proc.returncode))
                if not (c.retiring or c.replacement or self.stopping):   # (_replace reports its own)
                    self._restart(c)

    def _unjoined_exited(self) -> list[Child]:
        """Children that exited without ever joining."""
        return [c for c in self.children.values() if c.worker is None and c.proc.poll() is not None]

    # -- stop, replace ----------------------------------------------------------------------

    def tell_stop(self, w: WorkerRef) -> None:
        conn = self.conns.get(w.index)
        if conn is not None and conn.owner is w:
            self.control.send(conn, {"stop": True})

    def kill(self, w: WorkerRef, why: str) -> None:
        """SIGKILLs worker w (its control connection then closes and it is
        replaced).  A hand-started worker is signalled through a pidfd after
        checking its start time, so a recycled pid is never hit."""
        log.warning("killing worker pid %d of suite %s: %s", w.pid, w.suite, why)
        w.draining = True
        child = self.children.get(w.pid)
        if child is not None:
            child.killed = True
            if child.proc.poll() is None:
                child.proc.kill()
            return
        try:
            fd = os.pidfd_open(w.pid)
        except OSError:
            return      # gone already
        try:
            if procmem.start_time(w.pid) == w.start:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)

    def recycle(self, w: WorkerRef, why: str) -> None:
        """Replaces worker w gracefully: a new worker starts, and w takes no
        new requests (then stops once it answered the ones it holds) as soon
        as another worker of its suite serves: at once when there is one,
        else when the new one joined."""
        child = self.children.get(w.pid)
        if self.stopping or w.recycling or w.draining or (child is not None and child.replacing):
            return
        log.info("replacing worker pid %d of suite %s: %s", w.pid, w.suite, why)
        w.recycling = True
        if child is not None:
            child.retiring = True       # not restarted: its replacement is starting
            self._spawn_unless_stopping(w.suite)
        self._retire_recycled(w.suite)

    def _retire_recycled(self, suite: str) -> None:
        """Retires the recycled workers of `suite` while another serves."""
        serving = [x for x in self.workers() if x.suite == suite and not x.draining]
        for w in [x for x in serving if x.recycling]:
            if len(serving) > 1:
                self.retire(w)
                serving.remove(w)

    def worker_idle(self, w: WorkerRef) -> None:
        if w.draining and w.inflight == 0:
            self.tell_stop(w)

    def retire(self, w: WorkerRef) -> None:
        """No new requests for w; it stops once its last one is answered."""
        child = self.children.get(w.pid)
        if child is not None:
            child.retiring = True
        w.draining = True
        self.worker_idle(w)

    def reload(self) -> None:
        """SIGHUP: replace every worker, one at a time."""
        if not self.stopping:
            log.info("SIGHUP: replacing workers one by one")
            self._task(self._replace_all())

    async def _replace_all(self) -> None:
        for child in [c for c in self.children.values() if c.worker is not None and not c.retiring]:
            if self.stopping:
                return
            await self._replace(child)

    async def _replace(self, child: Child) -> None:
        """Starts a worker of child's suite; once it joined, retires child
        and waits until it is gone.  If the new one does not join, child
        stays."""
        if child.replacing or child.retiring or self.children.get(child.proc.pid) is not child:
            return      # being replaced already, or gone meanwhile (and restarted as usual)
        child.replacing = True
        try:
            new = self.spawn(child.suite, replacement=True)
            deadline = time.monotonic() + START_TIMEOUT
            while new.worker is None and new.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if new.worker is None:
                log.error("replacement worker for suite %s did not join; keeping pid %d", child.suite,
                          child.proc.pid)
                return
            old = child.worker
            if old is not None:
                self.retire(old)
                while old.index in self.conns and self.conns[old.index].owner is old:
                    await asyncio.sleep(0.02)
        finally:
            child.replacing = False

    async def stop_all(self) -> None:
        self.stopping = True
        for w in self.workers():
            self.retire(w)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.children and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            for c in self._unjoined_exited():
                del self.children[c.proc.pid]
        self.kill_all()

    def kill_all(self) -> None:
        for c in list(self.children.values()):
            if c.proc.poll() is None:
                if self.stopping:   # (at a failed start the others are simply stopped)
                    log.warning("worker pid %d did not stop in time; killing it", c.proc.pid)
                c.proc.kill()
            c.proc.wait()
        self.children.clear()
        self.control.shut()     # without worker_left: the manager is going away
        self.conns.clear()
        for t in self._tasks:
            t.cancel()


def _status_text(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
