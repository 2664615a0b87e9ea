"""What the README promises and no other test checked, end to end against a
real `pyshm serve`: SIGHUP loading changed code, graceful_timeout running
out, queue_timeout and slot exhaustion, a full heap on both paths, a
hand-started worker's death, the command-line forms of `pyshm serve`,
`pyshm clean` with a segment still in use, and `pyshm status` counts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyshm.heap import SharedHeap
from server_util import (
    FrameClient, Load, TcpConn, free_port, one_suite, quiescent, status, status_cli, wait_for, worker_pids,
)

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE)}


def tcp(port: int, *, workers: int = 2, app: str = "apps:echo", instance: str = "") -> str:
    return one_suite("tcp", port, app, workers=workers, instance=instance)


def segment_files(name: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f == f"pyshm.{name}" or f.startswith(f"pyshm.{name}.")]


# -- SIGHUP ---------------------------------------------------------------------------------

HUP_APP = '''
import os
import time

VERSION = {version!r}


def handle(request):
    data = bytes(request.payload)
    if data == b"version":
        return VERSION
    _, secs, tag = data.split(b":", 2)           # sleep:S:TAG
    time.sleep(float(secs))
    return b"%d:%s:%s" % (os.getpid(), tag, VERSION)
'''


def test_sighup_serves_the_changed_code(serve, tmp_path):
    """The application module lives in the server's working directory; its
    source changes, SIGHUP: the new workers run the new code, and a load
    running all along sees no failed request."""
    (tmp_path / "hup_app.py").write_text(HUP_APP.format(version=b"one"))
    port = free_port()
    srv = serve(tcp(port, app="hup_app:handle"), port)
    before = set(worker_pids(srv.name))
    load = Load(lambda c: TcpConn(port), [1, 1, 1, 4])
    try:
        load.wait_answers(40, "before the change")
        # Another size than the first version: a stale .pyc can never be taken for it.
        (tmp_path / "hup_app.py").write_text(HUP_APP.format(version=b"two, changed"))
        srv.signal(signal.SIGHUP)
        wait_for(lambda: len(p := set(worker_pids(srv.name))) == 2 and not p & before, "all workers replaced",
                 timeout=30)
        replaced = time.monotonic()
        load.wait_answers(40, "after the replacement")
    finally:
        s = load.finish()
    s.assert_complete(max_wait=5.0)
    assert not s.errors, f"a request failed during SIGHUP; {s}"
    versions = [r.body.rsplit(b":", 1)[1] for r in s.ok]
    assert versions[0] == b"one" and b"two, changed" in versions, s
    late = [r.body for r in s.ok if r.sent > replaced]
    assert late and all(b.endswith(b":two, changed") for b in late), late[:5]
    cl = FrameClient(port)
    assert {cl.call(b"version")[1] for _ in range(10)} == {b"two, changed"}
    cl.close()
    quiescent(srv.name)


# -- graceful_timeout ------------------------------------------------------------------------


def test_graceful_timeout_expires(serve):
    """SIGTERM with a request that runs longer than graceful_timeout: it is
    answered 'server shutting down' when the timeout runs out, and the
    server exits a few seconds later, its segments removed."""
    port = free_port()
    srv = serve(tcp(port, workers=1, instance="graceful_timeout = 1"), port)
    cl = FrameClient(port, timeout=15)
    cl.send(b"sleep:5:late")
    wait_for(lambda: status(srv.name)["slots"]["running"] == 1, "the request runs")
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    err, body = cl.recv()
    answered = time.monotonic() - t0
    assert err and b"server shutting down" in body, body
    assert 0.9 <= answered < 3.0, f"answered {answered:.2f} s after SIGTERM (graceful_timeout = 1)"
    assert cl.sock.recv(1) == b"", "the connection closes after the answer"
    cl.close()
    assert srv.proc.wait(timeout=15) == 0
    exited = time.monotonic() - t0
    assert exited < 8.0, f"the server took {exited:.1f} s to exit"
    assert not segment_files(srv.name)


# -- slots and queue_timeout ----------------------------------------------------------------------


def test_more_requests_than_slots_are_all_served(serve):
    """slots = 4 and 40 requests pipelined on 4 connections: the ones
    without a slot wait in the manager, none is lost, each connection gets
    its answers in order, and all slots are free afterwards."""
    port = free_port()
    srv = serve(tcp(port, workers=2, instance="slots = 4"), port)
    clients = [FrameClient(port, timeout=15) for _ in range(4)]
    for c, cl in enumerate(clients):
        cl.sock.sendall(b"".join(struct_frame(b"sleep:0.05:c%d-%d" % (c, i)) for i in range(10)))
    peak = wait_for(lambda: (st := status(srv.name))["requests_waiting"] > 0 and st,
                    "requests waiting for a slot", timeout=10)
    assert peak["slots"]["free"] == 0 and peak["slots"]["manager_free"] == 0, peak["slots"]
    for c, cl in enumerate(clients):
        got = [cl.recv() for _ in range(10)]
        assert [e for e, _ in got] == [False] * 10, got
        assert [b.split(b":")[1] for _, b in got] == [b"c%d-%d" % (c, i) for i in range(10)]
        cl.close()
    st = quiescent(srv.name, slots=4)
    assert st["requests_served"] == 40


def struct_frame(payload: bytes) -> bytes:
    import struct

    return struct.pack(">I", len(payload)) + payload


def test_queue_timeout_answers_requests_that_cannot_start(serve):
    """One worker busy for 3 s, slots = 2, queue_timeout = 1: of three more
    requests one waits in the worker's ring (it has a slot) and two in the
    manager (no slot left); all three are answered 'could not start it
    within 1 s' after about a second, the busy one is answered normally,
    and the server serves on."""
    port = free_port()
    srv = serve(tcp(port, workers=1, instance="slots = 2\nqueue_timeout = 1"), port)
    busy = FrameClient(port, timeout=15)
    busy.send(b"sleep:3:busy")
    wait_for(lambda: status(srv.name)["slots"]["running"] == 1, "the busy request runs")
    waiting = [FrameClient(port, timeout=15) for _ in range(3)]
    t0 = time.monotonic()
    for i, cl in enumerate(waiting):
        cl.send(b"sleep:0:w%d" % i)
    st = wait_for(lambda: (st := status(srv.name))["requests_waiting"] == 2 and st, "two requests without a slot")
    assert st["slots"]["queued"] == 1 and st["slots"]["running"] == 1, st["slots"]
    for i, cl in enumerate(waiting):
        err, body = cl.recv()
        took = time.monotonic() - t0
        assert err and b"could start it within 1 s" in body, (i, body)
        assert 0.9 <= took < 2.9, f"request {i} answered after {took:.2f} s"
        cl.close()
    err, body = busy.recv()
    assert not err and body.endswith(b":busy")
    busy.close()
    assert FrameClient(port).call(b"after") == (False, b"after")
    quiescent(srv.name, slots=2)


# -- a full heap -----------------------------------------------------------------------------------


def test_heap_full_on_the_request_and_the_response_path(serve):
    """heap_size = 8MiB (3 MiB of arena): a request payload larger than the
    heap gets a clear error, so does a response larger than it; the server
    goes on and the heap is back where it was."""
    port = free_port()
    srv = serve(tcp(port, instance='heap_size = "8MiB"\ninline_size = "4KiB"'), port)
    st0 = status(srv.name)
    used0, arena = st0["heap"]["used_bytes"], st0["heap"]["arena_bytes"]
    too_big = (arena + (1 << 20)) // 256 * 256
    cl = FrameClient(port, timeout=15)
    fits = bytes(range(256)) * 400                 # 100 KiB: a heap blob, not inline
    assert cl.call(fits) == (False, fits)
    err, msg = cl.call(b"r" * too_big)
    assert err and b"request too large for the server's memory" in msg and b"no free block" in msg, msg[:200]
    err, msg = cl.call(b"big:%d" % too_big)
    assert err and b"response of %d bytes does not fit in shared memory" % too_big in msg, msg[:200]
    assert cl.call(fits) == (False, fits)          # the same connection goes on
    assert cl.call(b"big:102400") == (False, bytes(range(256)) * 400)
    cl.close()
    st = quiescent(srv.name)
    assert st["heap"]["used_bytes"] == used0, (st["heap"], used0)
    stats = SharedHeap.attach(srv.name, observe=True).stats()
    assert stats.building_versions == 0 and stats.pinned_versions == 0


# -- a hand-started worker ---------------------------------------------------------------------------


def test_a_hand_started_worker_that_dies_is_answered_for_and_not_restarted(serve):
    port = free_port()
    srv = serve(tcp(port, workers=2), port)
    own = set(worker_pids(srv.name))
    extra = subprocess.Popen([sys.executable, "-m", "pyshm.worker", "--instance", srv.name, "--suite", "main",
                              "--app", "apps:echo"], env=ENV)
    clients = []
    try:
        wait_for(lambda: set(worker_pids(srv.name)) == own | {extra.pid}, "the hand-started worker joined")
        clients = [FrameClient(port, timeout=15) for _ in range(3)]
        for i, cl in enumerate(clients):            # least-loaded: one on each of the three workers
            cl.send(b"sleep:2:r%d" % i)
        wait_for(lambda: (st := status(srv.name))["slots"]["running"] == 3
                 and all(w["in_flight"] == 1 for w in st["workers"]), "each worker runs one request")
        os.kill(extra.pid, signal.SIGKILL)
        assert extra.wait(timeout=10) == -signal.SIGKILL
        answers = [cl.recv() for cl in clients]
    finally:
        if extra.poll() is None:
            os.kill(extra.pid, signal.SIGKILL)
            extra.wait()
        for cl in clients:
            cl.close()
    errors = [body for err, body in answers if err]
    assert errors == [b"worker %d died while the request was running" % extra.pid], answers
    assert {int(body.split(b":")[0]) for err, body in answers if not err} == own
    # The other two answered 2 s after the kill: a restart would have happened by now.
    st = status(srv.name)
    assert {w["pid"] for w in st["workers"]} == own and st["restarts"] == {"main": 0}, st
    cl = FrameClient(port)
    assert {int(cl.call(b"pid")[1]) for _ in range(20)} == own      # the others serve on
    cl.close()
    quiescent(srv.name)


# -- pyshm serve without a configuration file ---------------------------------------------------------


@pytest.fixture
def cli_serve(serve):
    """`pyshm ARGS...` (no configuration file), stopped by pid."""
    return lambda *args, port: serve("", port, args=list(args))


def test_serve_tcp_from_the_command_line(cli_serve):
    port = free_port()
    srv = cli_serve("serve", "apps:echo", "--tcp", f"127.0.0.1:{port}", port=port)
    name = f"pyshm-{port}"                       # the default instance name
    cl = FrameClient(port)
    assert cl.call(b"hello") == (False, b"hello")
    assert len({cl.call(b"pid")[1] for _ in range(20)}) == 2      # --workers defaults to 2
    cl.close()
    assert len(worker_pids(name)) == 2 and segment_files(name)
    assert srv.stop() == 0
    assert not segment_files(name)


def test_serve_http_from_the_command_line_without_an_access_log(cli_serve):
    port = free_port()
    name = f"test-{os.getpid()}-cli-{port}"
    srv = cli_serve("-v", "serve", "wsgi_apps:hello", "--http", f"127.0.0.1:{port}", "--workers", "1",
                    "--name", name, port=port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/").text == "hello"
        assert client.post("/echo", content=b"posted").text == "posted"
    assert len(worker_pids(name)) == 1
    # The access line would be logged before the answer is written: none.
    assert "GET / HTTP/1.1" not in srv.output() and "pyshm.access" not in srv.output(), srv.output()
    assert "http front-end on 127.0.0.1" in srv.output()           # -v does log
    assert srv.stop() == 0
    assert not segment_files(name)


def test_serve_http_access_log_flag(cli_serve):
    """`--access-log` alone (no -v) puts a common-log-format line per
    request in the output."""
    port = free_port()
    name = f"test-{os.getpid()}-cli-{port}"
    srv = cli_serve("serve", "wsgi_apps:hello", "--http", f"127.0.0.1:{port}", "--workers", "1", "--access-log",
                    "--name", name, port=port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/environ?q=1").status_code == 200
    # Logged before the answer was written: it is in the output already.
    assert '"GET /environ?q=1 HTTP/1.1" 200' in srv.output(), srv.output()
    assert srv.stop() == 0


# -- pyshm clean ------------------------------------------------------------------------------------------

CREATE = """
import sys
from pyshm import SharedHeap
h = SharedHeap.create(sys.argv[1], size="16MiB")
h.put("x", {"n": 1})
print("ready", flush=True)
sys.stdin.read()
"""


def test_clean_keeps_a_segment_a_live_process_uses_and_removes_it_once_orphaned(heap_name, procs):
    """Its creator SIGKILLed, a heap another live process still maps is
    kept by `pyshm clean`; once that process is SIGKILLed too, the heap is
    an orphan and clean removes it."""
    creator = subprocess.Popen([sys.executable, "-c", CREATE, heap_name], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert creator.stdout.readline() == "ready\n"
        holder = procs.start("hold", heap_name, "x")
        assert '"version"' in holder.stdout.readline()
        os.kill(creator.pid, signal.SIGKILL)
        assert creator.wait(timeout=10) == -signal.SIGKILL
    finally:
        if creator.poll() is None:
            os.kill(creator.pid, signal.SIGKILL)
            creator.wait()
        creator.stdin.close()
        creator.stdout.close()

    def clean() -> str:
        return subprocess.run([sys.executable, "-m", "pyshm.cli", "clean"], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    out = clean()
    assert f"kept {heap_name} (1 process(es) attached)" in out, out
    assert os.path.exists(f"/dev/shm/pyshm.{heap_name}")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    out = clean()
    assert f"removed {heap_name} " in out, out
    assert not os.path.exists(f"/dev/shm/pyshm.{heap_name}")


# -- pyshm status ----------------------------------------------------------------------------------------------


def test_status_counts_after_activity(serve):
    """After sequential, pipelined and large requests: requests_served is
    the number sent, the workers' served add up to it, nothing is in
    flight, every slot is free on both lists, the heap is back where it
    was (as `pyshm status NAME --json` prints it)."""
    port = free_port()
    srv = serve(tcp(port, instance='inline_size = "4KiB"'), port)
    st0 = status_cli(srv.name)
    assert st0["requests_served"] == 0
    sent = 0
    cl = FrameClient(port, timeout=15)
    for i in range(30):
        assert cl.call(b"s%d" % i) == (False, b"s%d" % i)
        sent += 1
    large = bytes(range(256)) * 800                 # 200 KiB each way: heap blobs
    for _ in range(5):
        assert cl.call(large) == (False, large)
        assert cl.call(b"big:204800") == (False, large)
        sent += 2
    cl.close()
    pipelined = [FrameClient(port, timeout=15) for _ in range(4)]
    for c, p in enumerate(pipelined):
        p.sock.sendall(b"".join(struct_frame(b"p%d-%d" % (c, i)) for i in range(25)))
    for c, p in enumerate(pipelined):
        assert [p.recv()[1] for _ in range(25)] == [b"p%d-%d" % (c, i) for i in range(25)]
        p.close()
        sent += 25
    st = status_cli(srv.name)
    assert st["requests_served"] == sent, (st["requests_served"], sent)
    assert sum(w["served"] for w in st["workers"]) == sent, st["workers"]
    assert all(w["in_flight"] == 0 and w["state"] == "serving" for w in st["workers"]), st["workers"]
    assert st["requests_in_flight"] == 0 and st["requests_waiting"] == 0
    assert st["slots"]["free"] == 1024 and st["slots"]["manager_free"] == 1024, st["slots"]
    assert st["heap"]["used_bytes"] == st0["heap"]["used_bytes"], (st["heap"], st0["heap"])
    assert st["restarts"] == {"main": 0}
