"""A real `pyshm serve` in a subprocess; clients of its front-ends; a load
generator that accounts for every request; status polling."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ERROR_FLAG = 0x8000_0000


def one_suite(frontend: str, port: int, app: str, *, workers: int = 2, instance: str = "",
              listen: str = "") -> str:
    """The body of a pyshm.toml with one suite ("main") behind one listener;
    `instance` lines go into [instance], `listen` lines into the listener."""
    return f"""{instance}
[suites.main]
app = "{app}"
workers = {workers}

[[listen]]
frontend = "{frontend}"
address = "127.0.0.1:{port}"
suite = "main"
{listen}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pyshm serve -c pyshm.toml` run in `workdir` (or `pyshm ARGS...`
    when args are given); stopped by pid."""

    def __init__(self, workdir: Path, name: str, toml: str = "", *, verbose: bool = False,
                 args: list[str] | None = None, log: str = "server.log", wrap: list[str] = ()) -> None:
        self.workdir = workdir
        self.name = name
        if args is None:
            (workdir / "pyshm.toml").write_text(toml)
            args = (["-v"] if verbose else []) + ["serve", "-c", "pyshm.toml"]
        self.path = workdir / log
        self.log = open(self.path, "wb")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
        # wrap: a command that execs the rest (ip netns exec NS): the pid is still pyshm's.
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "pyshm.cli", *args], cwd=workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server not listening on {port}:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class FrameClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> tuple[bool, bytes]:
        (n,) = struct.unpack(">I", self._read(4))
        return bool(n & ERROR_FLAG), self._read(n & ~ERROR_FLAG)

    def call(self, payload: bytes) -> tuple[bool, bytes]:
        self.send(payload)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


# -- observing a running instance ------------------------------------------------------


def status(name: str) -> dict:
    """What `pyshm status NAME --json` prints, asked in-process (same
    control-socket request, without starting an interpreter per poll)."""
    from pyshm import control

    return control.status(name)


def status_cli(name: str) -> dict:
    """`python -m pyshm.cli status NAME --json`, parsed."""
    import json

    out = subprocess.run([sys.executable, "-m", "pyshm.cli", "status", name, "--json"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out)


def wait_for(predicate, what: str, timeout: float = 15.0, interval: float = 0.02):
    """Polls predicate() until it returns something true; returns it.  Fails
    with `what` (a string, or a callable giving one) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what() if callable(what) else what}")
        time.sleep(interval)


def worker_pids(name: str, suite: str = "main") -> list[int]:
    return [w["pid"] for w in status(name)["workers"] if w["suite"] == suite]


def quiescent(name: str, slots: int = 1024) -> dict:
    """The instance's status once nothing is in flight; asserts every slot
    is free both in the request memory and on the manager's own list."""
    st = status(name)
    assert st["requests_in_flight"] == 0 and st["requests_waiting"] == 0, st
    assert st["slots"]["free"] == slots and st["slots"]["manager_free"] == slots, st["slots"]
    assert st["slots"]["queued"] == st["slots"]["running"] == st["slots"]["done"] == 0, st["slots"]
    return st


# -- protocol clients for load -------------------------------------------------------------
#
# One object per connection: send(tag) sends a request carrying `tag`;
# recv() reads one answer and returns (tag or None, error or None, body):
# ordered protocols return None (the answer belongs to the oldest request
# awaiting one), the others the tag their answer names.  matches(tag, body)
# says whether a successful answer is the one for `tag`; kind(error) sorts
# errors ("died", "unavailable", "shutting-down", "other").


def _recv_some(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk


class TcpConn:
    """Raw frames to tests/apps.py:echo; `op % tag` is the payload (the
    app answers b"<pid>:<tag>")."""
    ordered = True

    def __init__(self, port: int, *, op: bytes = b"sleep:0.01:%s", timeout: float = 30.0) -> None:
        self.op = op
        self.cl = FrameClient(port, timeout=timeout)

    def send(self, tag: bytes) -> None:
        self.cl.send(self.op % tag)

    def recv(self) -> tuple[bytes | None, str | None, bytes]:
        err, body = self.cl.recv()
        return None, body.decode(errors="replace") if err else None, body

    @staticmethod
    def matches(tag: bytes, body: bytes) -> bool:
        return tag in body.split(b":")      # b"<pid>:<tag>" (msleep: b"<pid>:<tag>:<n>")

    @staticmethod
    def kind(error: str) -> str:
        if "died while the request was running" in error:
            return "died"
        if "could start it within" in error:
            return "unavailable"
        if "shutting down" in error:
            return "shutting-down"
        return "other"

    def unread(self) -> bool:
        return bool(self.cl._buf) or _readable(self.cl.sock)

    def close(self) -> None:
        self.cl.close()


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


class HttpConn:
    """HTTP/1.1 keep-alive (pipelined when several are sent) to
    tests/wsgi_apps.py:tagged; GET `path % tag` answers b"<pid>:<tag>"."""
    ordered = True

    def __init__(self, port: int, *, path: bytes = b"/t/%s?0.01", timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, tag: bytes) -> None:
        self.sock.sendall(b"GET " + self.path % tag + b" HTTP/1.1\r\nHost: t\r\n\r\n")

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """One answer: (status, headers by lower-case name, body); needs a
        Content-Length (what the tagged app and error answers send)."""
        while b"\r\n\r\n" not in self.buf:
            self.buf += _recv_some(self.sock)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        code = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers[b"content-length"])
        while len(self.buf) < n:
            self.buf += _recv_some(self.sock)
        body, self.buf = self.buf[:n], self.buf[n:]
        return code, headers, body

    def recv(self) -> tuple[bytes | None, str | None, bytes]:
        code, _, body = self.response()
        return None, None if code == 200 else f"{code} {body.decode(errors='replace').strip()}", body

    @staticmethod
    def matches(tag: bytes, body: bytes) -> bool:
        return tag in body.split(b":")      # b"<pid>:<tag>" (msleep: b"<pid>:<tag>:<n>")

    @staticmethod
    def kind(error: str) -> str:
        # 500: the application raised or its worker died (the tagged app never raises).
        return {"500": "died", "503": "unavailable"}.get(error[:3], "other")

    def unread(self) -> bool:
        return bool(self.buf) or _readable(self.sock)

    def close(self) -> None:
        self.sock.close()


class RpcConn:
    """msgpack-RPC to tests/rpc_apps.py: sleep(secs, tag) answers tag;
    answers are matched by msgid (they may come out of order)."""
    ordered = False

    def __init__(self, port: int, *, secs: float = 0.01, timeout: float = 30.0) -> None:
        import msgpack

        self.secs = secs
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgids = iter(range(1, 1 << 32))
        self.tags: dict[int, bytes] = {}
        self._packb = msgpack.packb

    def call(self, method: str, *params):
        """One call and its answer (nothing else may be in flight)."""
        msgid = next(self.msgids)
        self.sock.sendall(self._packb([0, msgid, method, list(params)]))
        _, got, error, result = self._message()
        assert got == msgid, (got, msgid)
        if error is not None:
            raise RuntimeError(error)
        return result

    def send(self, tag: bytes) -> None:
        msgid = next(self.msgids)
        self.tags[msgid] = tag
        self.sock.sendall(self._packb([0, msgid, "sleep", [self.secs, tag.decode()]]))

    def _message(self) -> list:
        while True:
            for msg in self.unpacker:
                return msg
            self.unpacker.feed(_recv_some(self.sock))

    def recv(self) -> tuple[bytes | None, str | None, bytes]:
        kind, msgid, error, result = self._message()
        assert kind == 1, f"not a response: {[kind, msgid, error, result]}"
        tag = self.tags.pop(msgid, b"<unknown msgid %r>" % (msgid,))
        if error is not None:
            return tag, str(error), b""
        return tag, None, result.encode() if isinstance(result, str) else repr(result).encode()

    @staticmethod
    def matches(tag: bytes, body: bytes) -> bool:
        return body == tag

    @staticmethod
    def kind(error: str) -> str:
        if "died while the request was running" in error:
            return "died"
        if error.startswith("unavailable"):
            return "unavailable"
        return "other"

    def unread(self) -> bool:
        for _ in self.unpacker:      # a whole message already buffered
            return True
        return _readable(self.sock)

    def close(self) -> None:
        self.sock.close()


# -- load with strict accounting ---------------------------------------------------------------


class Record:
    """One request a load client sent, and what became of it."""
    __slots__ = ("client", "tag", "sent", "done", "error", "body")

    def __init__(self, client: int, tag: bytes, sent: float) -> None:
        self.client, self.tag, self.sent = client, tag, sent
        self.done: float | None = None
        self.error: str | None = None
        self.body = b""

    @property
    def waited(self) -> float:
        return (self.done if self.done is not None else time.monotonic()) - self.sent


class Load:
    """Client threads sending tagged requests until finish().

    Client c keeps depths[c] requests in flight on one connection (1:
    sequential; more: pipelined).  Every request is recorded with its tag
    before it is sent; every answer is matched to the request it belongs to
    (by order on ordered protocols, by the tag it names on the others) and a
    successful one must carry that tag.  Exceptions in client threads,
    answers nobody awaits and answers for the wrong tag are collected as
    problems.  Each client finishes by draining its outstanding requests."""

    def __init__(self, connect, depths: list[int]) -> None:
        self.connect = connect              # connect(c) -> TcpConn / HttpConn / RpcConn
        self.depths = depths
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.kind = None
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(len(depths))]
        for t in self.threads:
            t.start()

    def _problem(self, msg: str) -> None:
        with self.lock:
            self.problems.append(msg)

    def _run(self, c: int) -> None:
        import collections

        outstanding: collections.OrderedDict[bytes, Record] = collections.OrderedDict()
        conn = None
        try:
            conn = self.connect(c)
            self.kind = conn.kind
            i = 0
            while True:
                while not self.stop.is_set() and len(outstanding) < self.depths[c]:
                    rec = Record(c, b"c%d-%d" % (c, i), time.monotonic())
                    i += 1
                    with self.lock:
                        self.records.append(rec)
                    outstanding[rec.tag] = rec
                    conn.send(rec.tag)
                if not outstanding:
                    break
                tag, error, body = conn.recv()
                now = time.monotonic()
                if tag is None:
                    tag = next(iter(outstanding))
                rec = outstanding.pop(tag, None)
                if rec is None:
                    self._problem(f"client {c}: an answer for {tag!r}, which awaits none "
                                  f"(a duplicate?): {error or body[:80]!r}")
                    continue
                rec.done, rec.error, rec.body = now, error, body
                if error is None and not conn.matches(rec.tag, body):
                    self._problem(f"client {c}: request {rec.tag!r} answered with {body[:80]!r}")
            if conn.unread():
                self._problem(f"client {c}: bytes arrived after its last answer (a duplicate answer?)")
        except Exception as e:
            self._problem(f"client {c}: {type(e).__name__}: {e} (with {len(outstanding)} requests unanswered)")
        finally:
            if conn is not None:
                conn.close()

    def count(self) -> int:
        """Requests answered so far (successfully or not)."""
        with self.lock:
            return sum(r.done is not None for r in self.records)

    def wait_answers(self, n: int, what: str = "", timeout: float = 15.0) -> None:
        """Waits until n more requests than now have been answered."""
        target = self.count() + n
        wait_for(lambda: self.count() >= target or self.problems,
                 lambda: f"{target} answers {what} (have {self.count()}; problems {self.problems})", timeout)

    def finish(self, timeout: float = 60.0) -> Summary:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [c for c, t in enumerate(self.threads) if t.is_alive()]
        return Summary(self, hung)


class Summary:
    """The accounting of a finished Load."""

    def __init__(self, load: Load, hung: list[int]) -> None:
        with load.lock:
            self.records = list(load.records)
            self.problems = list(load.problems)
        self.hung = hung
        self.sent = len(self.records)
        self.unanswered = [r for r in self.records if r.done is None]
        self.ok = [r for r in self.records if r.done is not None and r.error is None]
        self.errors = [r for r in self.records if r.error is not None]
        kind = load.kind or (lambda e: "other")
        self.by_kind: dict[str, int] = {}
        for r in self.errors:
            k = kind(r.error)
            self.by_kind[k] = self.by_kind.get(k, 0) + 1
        self.per_client = {c: (sum(r.client == c for r in self.records),
                               sum(r.client == c and r.done is not None for r in self.records))
                           for c in range(len(load.depths))}
        self.max_wait = max((r.waited for r in self.records), default=0.0)

    def __str__(self) -> str:
        return (f"sent {self.sent}, answered {len(self.ok) + len(self.errors)} (ok {len(self.ok)}, "
                f"errors {len(self.errors)} {self.by_kind}), "
                f"unanswered {len(self.unanswered)}, hung clients {self.hung}, max wait {self.max_wait:.2f} s, "
                f"problems {self.problems[:5]}"
                + (f", first errors {[r.error for r in self.errors[:3]]}" if self.errors else ""))

    def assert_complete(self, max_wait: float = 15.0) -> None:
        """Every client finished without a problem; every request sent got
        exactly one answer or error, within max_wait."""
        assert not self.hung, f"client threads still running: {self.hung}; {self}"
        assert not self.problems, f"{self}"
        for c, (sent, answered) in self.per_client.items():
            assert sent == answered, f"client {c}: sent {sent}, answered {answered}; {self}"
        assert not self.unanswered and len(self.ok) + len(self.errors) == self.sent, str(self)
        assert self.max_wait <= max_wait, str(self)
