"""Chaos: on each front-end, sequential and pipelined clients keep sending
tagged requests while workers are SIGKILLed again and again.  Every request
sent must get exactly one answer or one error, matched by its tag, within a
bound; the only errors allowed say that the worker died while running the
request (a worker runs one request at a time: at most one per kill); and
afterwards nothing is left in flight, every slot is free, the heap is back
where it was."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from server_util import (
    HttpConn, Load, RpcConn, TcpConn, free_port, one_suite, quiescent, status, wait_for, worker_pids,
)

KILLS = 12               # at least 10; one every 0.3-1 s
BOUND = 15.0             # seconds within which every request is answered
QUEUE_TIMEOUT = 8        # above the longest the suite can be without a worker: no "unavailable"
DEPTHS = [1, 1, 1, 8, 8]  # three sequential clients, two with 8 requests pipelined
SLEEP = 0.02             # seconds each request runs

FRONTENDS = {
    "tcp": ("apps:echo", lambda port: TcpConn(port, op=b"sleep:%g:%%s" % SLEEP, timeout=BOUND + 5)),
    "http": ("wsgi_apps:tagged", lambda port: HttpConn(port, path=b"/t/%%s?%g" % SLEEP, timeout=BOUND + 5)),
    # A distributed suite: each connection is a session bound to a worker;
    # when that worker dies the session moves to another.
    "msgpack-rpc": ("rpc_apps", lambda port: RpcConn(port, secs=SLEEP, timeout=BOUND + 5)),
}


@pytest.mark.fuzz          # make fuzz runs it with a new kill schedule each time
@pytest.mark.parametrize("frontend", list(FRONTENDS))
def test_chaos(serve, frontend):
    app, connect = FRONTENDS[frontend]
    port = free_port()
    srv = serve(one_suite(frontend, port, app, workers=2, instance=f"queue_timeout = {QUEUE_TIMEOUT}"), port)
    st0 = status(srv.name)
    # A fixed kill schedule in `make test`; PYSHM_CHAOS_SEED=random (make fuzz) draws a new one.
    seed_env = os.environ.get("PYSHM_CHAOS_SEED", "20261125")
    seed = random.randrange(1 << 30) if seed_env == "random" else int(seed_env)
    rng = random.Random(seed)
    kills: list[int] = []
    t0 = time.monotonic()
    load = Load(lambda c: connect(port), DEPTHS)
    try:
        load.wait_answers(20, "before the first kill")
        while len(kills) < KILLS and not load.problems:
            assert time.monotonic() - t0 < 60, f"only {len(kills)} kills in 60 s: workers do not come back"
            time.sleep(rng.uniform(0.3, 1.0))        # the kill schedule, not a synchronization
            live = [pid for pid in worker_pids(srv.name) if pid not in kills]
            if not live:
                continue                            # both dead: wait for a replacement to join
            victim = rng.choice(live)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append(victim)
        chaos = time.monotonic() - t0
        wait_for(lambda: len(p := worker_pids(srv.name)) == 2 and not set(p) & set(kills),
                 "two live workers again", timeout=BOUND)
        load.wait_answers(20, "after the last kill", timeout=BOUND)
    finally:
        s = load.finish(timeout=BOUND + 30)
    st = status(srv.name)
    summary = (f"{frontend}: {len(kills)} kills in {chaos:.1f} s (seed {seed}); {s}; "
               f"requests_served {st['requests_served']}, restarts {st['restarts']}")
    print("\n" + summary)
    assert len(kills) >= 10, summary
    s.assert_complete(max_wait=BOUND)
    assert set(s.by_kind) <= {"died"}, f"errors other than a worker dying: {summary}"
    assert s.by_kind.get("died", 0) <= len(kills), f"more errors than kills: {summary}"
    assert len(s.ok) >= 100, summary
    assert st["requests_served"] == len(s.ok), f"served by the workers != successful answers: {summary}"
    assert st["restarts"] == {"main": len(kills)}, summary
    quiescent(srv.name)
    # The connections are closed; (msgpack-RPC) their sessions end; the heap is back where it was.
    wait_for(lambda: (h := status(srv.name))["sessions"]["active"] == 0
             and h["heap"]["used_bytes"] == st0["heap"]["used_bytes"],
             lambda: f"sessions ended and heap back to {st0['heap']}: {status(srv.name)}", timeout=10)


class FakeConn:
    """An in-memory connection whose third answer is lost, duplicated or
    for another request."""
    ordered = False
    matches = staticmethod(TcpConn.matches)
    kind = staticmethod(TcpConn.kind)

    def __init__(self, fault: str) -> None:
        self.fault, self.n, self.answers = fault, 0, []

    def send(self, tag: bytes) -> None:
        self.n += 1
        body = b"1:" + tag
        if self.n == 3 and self.fault == "lost":
            return
        if self.n == 3 and self.fault == "mismatched":
            body = b"1:another"
        self.answers.append((tag, None, body))
        if self.n == 3 and self.fault == "duplicated":
            self.answers.append((tag, None, body))

    def recv(self):
        if not self.answers:
            raise TimeoutError("timed out")
        return self.answers.pop(0)

    def unread(self) -> bool:
        return bool(self.answers)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fault,problem", [("lost", "TimeoutError"), ("duplicated", "awaits none"),
                                           ("mismatched", "answered with b'1:another'")])
def test_the_load_accounting_catches_lost_duplicated_and_mismatched_answers(fault, problem):
    load = Load(lambda c: FakeConn(fault) if c == 0 else FakeConn("none"), [1, 1])
    load.wait_answers(10)
    s = load.finish()
    assert any(problem in p for p in s.problems) and all(p.startswith("client 0:") for p in s.problems), s
    with pytest.raises(AssertionError):
        s.assert_complete()
    assert (len(s.unanswered) == 1) == (fault == "lost"), s
