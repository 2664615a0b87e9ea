"""The supervisor: starts the configured workers, learns at once when one
dies (its control connection closes), has the manager answer what the dead
worker held, and starts a replacement.

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
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyshm import control, procmem
from pyshm.dispatch import WorkerRef
from pyshm.errors import SegmentExists, WorkerStartError

if TYPE_CHECKING:
    from pyshm.manager import ConnectionManager

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


class _ControlConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines = control.LineReader()
        self.worker: WorkerRef | None = None


class Supervisor:
    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager
        self.children: dict[int, Child] = {}      # by pid
        self.conns: dict[int, _ControlConn] = {}  # by worker index
        self.free_indices: list[int] = []
        self.listener: socket.socket | None = None
        self.stopping = False
        self._quick_deaths: dict[str, int] = {}
        self.restarts: dict[str, int] = {}          # by suite: workers started to replace dead ones
        self._joined = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.start_errors: dict[int, str] = {}      # by pid: why a worker could not start

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.manager.config
        self.free_indices = list(range(cfg.max_workers - 1, -1, -1))
        loop = asyncio.get_running_loop()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.listener.bind(control.address(cfg.name))
        except OSError as e:
            raise SegmentExists(f"instance {cfg.name!r} already runs here (control socket: {e.strerror}); "
                                f"choose another instance.name") from None
        self.listener.listen(128)
        loop.add_reader(self.listener, self._accept)
        for suite in cfg.suites.values():
            for _ in range(suite.workers):
                self.spawn(suite.name)
        await self._wait_joined(sum(s.workers for s in cfg.suites.values()))
        self._task(self._watch_children())

    async def _wait_joined(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        exited: dict[int, float] = {}
        while len(self.manager.workers) < n:
            for c in self._unjoined_exited():
                why = self.start_errors.get(c.proc.pid)
                if why is not None:
                    raise WorkerStartError(f"suite {c.suite}: {why}")
                # Its reason may still be on the way: give it a moment.
                if time.monotonic() - exited.setdefault(c.proc.pid, time.monotonic()) > 0.5:
                    raise WorkerStartError(f"a worker of suite {c.suite!r} exited with status "
                                           f"{c.proc.returncode} before joining; its error is above")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"only {len(self.manager.workers)} of {n} workers joined within "
                                       f"{START_TIMEOUT:g} s")
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    def spawn(self, suite: str, *, replacement: bool = False) -> Child:
        cfg = self.manager.config
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

    # -- control connections ----------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _ControlConn(sock)
        asyncio.get_running_loop().add_reader(sock, self._readable, conn)

    def _readable(self, conn: _ControlConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(conn)
            return
        try:
            for msg in conn.lines.feed(data):
                if "hello" in msg and conn.worker is None:
                    self._hello(conn, msg["hello"])
                elif "failed" in msg and conn.worker is None:
                    self._failed(conn, msg["failed"])
                    return
                elif msg.get("status") and conn.worker is None:
                    self._status(conn)
                    return
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad control message from a worker: %s", e)
            self._closed(conn)

    def _status(self, conn: _ControlConn) -> None:
        """`pyshm status`: a read-only report, then the connection closes."""
        _, uid = self._peer(conn)
        if uid == os.getuid():
            conn.sock.setblocking(True)
            try:
                conn.sock.sendall(control.encode(self.manager.status()))
            except OSError:
                pass
        self._closed(conn)

    def _peer(self, conn: _ControlConn) -> tuple[int, int]:
        """(pid, uid) of the process at the other end, as the kernel says."""
        pid, uid, _ = struct.unpack("3i", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
        return pid, uid

    def _failed(self, conn: _ControlConn, failed: dict) -> None:
        """A worker we started says why it cannot start (then exits)."""
        pid, uid = self._peer(conn)
        child = self.children.get(pid)
        if uid == os.getuid() and child is not None and pid not in self.start_errors:
            why = str(failed.get("error", "unknown error"))[:2000]
            self.start_errors[pid] = why
            if self.manager.ready.is_set():
                log.error("a worker of suite %s could not start: %s", child.suite, why)
        self._closed(conn)

    def _hello(self, conn: _ControlConn, hello: dict) -> None:
        m = self.manager
        suite = str(hello["suite"])
        pid, start = int(hello["pid"]), int(hello["start"])
        # The socket is abstract (no file permissions): the kernel says who
        # connected, and only this user's processes, as who they claim, join.
        peer_pid, peer_uid = self._peer(conn)
        if peer_uid != os.getuid() or peer_pid != pid:
            log.warning("refused a worker: uid %d pid %d (claimed pid %d)", peer_uid, peer_pid, pid)
            self._closed(conn)
            return
        if suite not in m.dispatchers or not self.free_indices or self.stopping:
            why = (f"no suite {suite!r}" if suite not in m.dispatchers
                   else "shutting down" if self.stopping else "no free worker index (instance.max_workers)")
            conn.sock.send(control.encode({"error": why}))
            self._closed(conn)
            return
        index = self.free_indices.pop()
        gen = m.rm.bind_worker(index, pid, start)
        w = WorkerRef(index, gen, pid, start, suite)
        conn.worker = w
        self.conns[index] = conn
        cfg = m.config
        reply = {"index": index, "gen": gen, "secret": m.secret.hex(), "session_ttl": cfg.session_ttl,
                 "secure_cookies": cfg.secure_cookies}
        socket.send_fds(conn.sock, [control.encode(reply)], [m.wake_fd])
        child = self.children.get(pid)
        if child is not None:
            child.worker = w
            child.joined = time.monotonic()
            child.replacement = False
        m.worker_joined(w)
        self._retire_recycled(suite)
        self._joined.set()
        log.info("worker pid %d joined suite %s as index %d", pid, suite, index)

    def _closed(self, conn: _ControlConn) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(conn.sock)
        conn.sock.close()
        w = conn.worker
        if w is None:
            return
        conn.worker = None
        self.conns.pop(w.index, None)
        self.manager.worker_left(w)
        self.free_indices.append(w.index)
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
        if conn is not None and conn.worker is w:
            try:
                conn.sock.send(control.encode({"stop": True}))
            except OSError:
                pass

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
        serving = [x for x in self.manager.workers.values() if x.suite == suite and not x.draining]
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
                while old.index in self.conns and self.conns[old.index].worker is old:
                    await asyncio.sleep(0.02)
        finally:
            child.replacing = False

    async def stop_all(self) -> None:
        self.stopping = True
        for w in list(self.manager.workers.values()):
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
        loop = asyncio.get_running_loop()
        for conn in list(self.conns.values()):
            # Closed without worker_left: the manager is going away.
            loop.remove_reader(conn.sock)
            conn.sock.close()
        self.conns.clear()
        if self.listener is not None:
            loop.remove_reader(self.listener)
            self.listener.close()
            self.listener = None
        for t in self._tasks:
            t.cancel()


def _status_text(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
