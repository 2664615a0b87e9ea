"""The worker process: takes requests from its ring, runs the application,
writes the response in place.

    python -m pyshm.worker --instance NAME --suite SUITE --app module:attr

Workers attach the instance's segments by name and share no Python objects
with the manager, so the supervisor starts them this way and so can anyone
else (they then join the suite's pool until they exit).

This module is the process loop only; what applications see (heap(),
FrameRequest) and how they are loaded (import_app) is pyshm.application.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Any, Callable

from pyshm import application, control, procmem, rpc, wsgi
from pyshm.application import FrameRequest, import_app
from pyshm.errors import HeapCorrupt, PyshmError, SessionTableFull, StaleWorker
from pyshm.heap import SharedHeap
from pyshm.http_sessions import SessionStore
from pyshm.native import heap_segment, request_segment
from pyshm.reqmem import RESP_ERROR, RESP_UNAVAILABLE, RequestMemory, SlotInfo
from pyshm.sessions import SessionTable

log = logging.getLogger(__name__)

class _Quiet(Exception):
    """An error answer that is not worth a traceback in the log."""


class Worker:
    TAKE_TIMEOUT_MS = 200   # how often an idle worker looks at its control socket

    def __init__(self, instance: str, suite: str, app: Callable[..., Any], interface: str = "handler") -> None:
        self.instance = instance
        self.suite = suite
        self.app = app
        self.call = {"wsgi": self._call_wsgi, "rpc": self._call_rpc}.get(interface, self._call_handler)
        start = procmem.start_time(os.getpid())
        self.ctl, reply, self.wake_fd = control.connect(instance, {"pid": os.getpid(), "start": start,
                                                                   "suite": suite})
        self.index, self.gen = int(reply["index"]), int(reply["gen"])
        self.ctl.setblocking(False)
        self.rm = RequestMemory.attach(request_segment(instance))
        self.heap = SharedHeap.attach(heap_segment(instance))
        application.set_heap(self.heap)
        application.set_node(str(reply.get("node", instance)))
        self.sessions = None
        self.rpc: rpc.CallRunner | None = None
        if interface == "wsgi":
            self.sessions = SessionStore(SessionTable.attach(instance), self.heap, bytes.fromhex(reply["secret"]),
                                         ttl=float(reply["session_ttl"]), secure=bool(reply["secure_cookies"]),
                                         suite=int(reply.get("suite_index", 0)),
                                         node=int(reply.get("node_number", 0)))
        elif interface == "rpc":
            self.rpc = rpc.CallRunner(app, SessionTable.attach(instance), self.heap)
        self.stopping = False
        self._lines = control.LineReader()

    def run(self) -> None:
        log.info("worker %d (pid %d) serves suite %s", self.index, os.getpid(), self.suite)
        try:
            while True:
                info = self.rm.take(self.index, self.gen, 0 if self.stopping else self.TAKE_TIMEOUT_MS)
                if info is not None:
                    self.serve(info)
                    continue
                if self.stopping or not self.poll_control():
                    return
                if self.rpc is not None:
                    self.rpc.forget_ended()
        except StaleWorker:
            log.warning("worker %d: the manager gave this index to another process; exiting", self.index)
        except HeapCorrupt as e:    # garbage in its ring or slot: it leaves, the manager resolves its slots
            log.error("worker %d: %s; exiting", self.index, e)

    def poll_control(self) -> bool:
        """Reads manager messages; False when the manager is gone."""
        try:
            data = self.ctl.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            log.warning("worker %d: the manager closed the control connection; exiting", self.index)
            return False
        for msg in self._lines.feed(data):
            if msg.get("stop"):
                self.stopping = True
        return True

    def serve(self, info: SlotInfo) -> None:
        if info.req_blob:
            payload = self.heap.buffer_at(info.req_data, info.req_len)
        else:
            payload = self.rm.buf[info.req_data:info.req_data + info.req_len].toreadonly()
        flags = 0
        try:
            body = self.call(payload, info)
        except _Quiet as exc:          # the client's mistake, not the application's
            body, flags = str(exc).encode(), RESP_ERROR
        except SessionTableFull as exc:
            body, flags = str(exc).encode(), RESP_ERROR | RESP_UNAVAILABLE
        except Exception as exc:
            log.error("worker %d: application error\n%s", self.index, traceback.format_exc())
            body = f"application error: {type(exc).__name__}: {exc}".encode()
            flags = RESP_ERROR
        finally:
            payload.release()
        self.respond(info.slot, body, flags)

    def _call_handler(self, payload: memoryview, info: SlotInfo) -> bytes:
        body = self.app(FrameRequest(payload, info.session if any(info.session) else None, info.peer,
                                     application.node()))
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"the application returned {type(body).__name__}, not bytes")
        return body

    def _call_wsgi(self, payload: memoryview, info: SlotInfo) -> list[bytes]:
        return wsgi.call(self.app, payload, info.peer, self.sessions, info.session if any(info.session) else None)

    def _call_rpc(self, payload: memoryview, info: SlotInfo) -> bytes:
        try:
            return self.rpc.call(payload, info.session if any(info.session) else None) or b""
        except (rpc.UnknownMethod, rpc.SessionLost) as e:
            raise _Quiet(str(e)) from None

    def respond(self, slot: int, body: bytes | bytearray | memoryview | list[bytes], flags: int) -> None:
        """Writes the answer into the slot (or a heap buffer when larger);
        a list of parts is written part by part, never joined first."""
        parts = body if isinstance(body, list) else [body]
        parts = [p.cast("B") if isinstance(p, memoryview) and (p.format != "B" or p.ndim != 1) else p
                 for p in parts]
        n = sum(len(p) for p in parts)
        blob = data = 0
        if n <= self.rm.inline_size:
            area = self.rm.response_area(slot)
        else:
            try:
                blob, data, area = self.heap.alloc_buffer(n)
            except PyshmError as exc:
                msg = f"response of {n} bytes does not fit in shared memory: {exc}"
                log.error("worker %d: %s (instance.heap_size bounds a response); answering with an error",
                          self.index, msg)
                parts, flags = [msg.encode()[:self.rm.inline_size]], RESP_ERROR
                n = len(parts[0])
                area = self.rm.response_area(slot)
        pos = 0
        for p in parts:
            area[pos:pos + len(p)] = p
            pos += len(p)
        self.rm.complete(self.index, self.gen, slot, n, blob=blob, data=data, flags=flags, wake_fd=self.wake_fd)


def _cannot_start(args: argparse.Namespace, exc: Exception) -> int:
    """The application cannot be imported: one line that says why (the
    traceback with -v), to the supervisor when it started us."""
    why = f"cannot load the application {args.app!r}: {type(exc).__name__}: {exc}"
    if args.verbose:
        log.error("%s\n%s", why, traceback.format_exc())
    if not (args.supervised and control.report_failure(args.instance, {"suite": args.suite, "error": why})):
        print(f"pyshm worker: {why}", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyshm.worker")
    p.add_argument("--instance", required=True)
    p.add_argument("--suite", required=True)
    p.add_argument("--app", required=True)
    p.add_argument("--interface", choices=("handler", "wsgi", "rpc"), default="handler",
                   help="handler: handle(request) -> bytes; wsgi: a WSGI application; rpc: an RpcRegistry")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--supervised", action="store_true",
                   help=argparse.SUPPRESS)   # started by the supervisor: start errors go to it, not stderr
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(levelname)s worker[{os.getpid()}] %(name)s: %(message)s")
    try:
        app = import_app(args.app, args.interface)
    except Exception as exc:
        return _cannot_start(args, exc)
    try:
        worker = Worker(args.instance, args.suite, app, args.interface)
    except ConnectionError as exc:
        print(f"pyshm worker: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: Any) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
