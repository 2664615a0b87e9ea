"""Worker management and hostile clients, end to end against a real
`pyshm serve`: startup errors, request timeouts, recycling, restarts, one
client's flood or unread answers against the others."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack

from pyshm import control
from server_util import FrameClient, free_port, one_suite, status, wait_for

HERE = Path(__file__).resolve().parent


def worker_pids(name: str) -> set[int]:
    return {w["pid"] for w in status(name)["workers"] if w["state"] == "serving"}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def idle_and_free(name: str) -> dict:
    """Waits until nothing is in flight; returns the status."""
    def check():
        st = status(name)
        ok = st["requests_in_flight"] == 0 and st["slots"]["free"] == st["slots"]["manager_free"] == 1024
        return st if ok else None
    return wait_for(check, "every slot is free again")


def run_cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "pyshm.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)


def http_get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def _rpc_answers(sock: socket.socket, n: int) -> dict[int, list]:
    unpacker, got = msgpack.Unpacker(raw=False), {}
    while len(got) < n:
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(got)} of {n} answers"
        unpacker.feed(chunk)
        for msg in unpacker:
            got[msg[1]] = msg
    return got


# -- startup ------------------------------------------------------------------------------

def test_an_address_in_use_is_one_line_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli(tmp_path, "serve", "apps:echo", "--tcp", f"127.0.0.1:{port}", "--name", f"inuse-{port}")
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"pyshm: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"pyshm.inuse-{port}")]


def test_an_app_that_cannot_be_imported_is_one_line(tmp_path):
    port = free_port()
    r = run_cli(tmp_path, "serve", "apps:no_such_function", "--tcp", f"127.0.0.1:{port}", "--workers", "3")
    assert r.returncode == 2
    assert r.stderr == ("pyshm: suite main: cannot load the application 'apps:no_such_function': AttributeError: "
                        "module 'apps' has no attribute 'no_such_function'\n")
    r = run_cli(tmp_path, "serve", "no_such_module:app", "--tcp", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["pyshm: suite main: cannot load the application 'no_such_module:app': "
                                     "ModuleNotFoundError: No module named 'no_such_module'"]
    r = run_cli(tmp_path, "-v", "serve", "no_such_module:app", "--tcp", f"127.0.0.1:{port}")
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr   # -v: the traceback too
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"pyshm.pyshm-{port}")]


def test_an_asgi_app_given_as_wsgi_is_refused_at_start(tmp_path):
    (tmp_path / "asgi_app.py").write_text(
        "async def app(scope, receive, send):\n    pass\n\n"
        "class App:\n    async def __call__(self, scope, receive, send):\n        pass\n\nobj = App()\n")
    for spec in ("asgi_app:app", "asgi_app:obj"):
        r = run_cli(tmp_path, "serve", spec, "--http", f"127.0.0.1:{free_port()}")
        assert r.returncode == 2
        assert len(r.stderr.splitlines()) == 1 and f"{spec} is an ASGI application" in r.stderr, r.stderr


# -- request timeout ---------------------------------------------------------------------

def test_a_request_running_past_the_timeout_is_answered_and_its_worker_replaced(serve):
    port = free_port()
    srv = serve(one_suite("tcp", port, "worker_apps:handle", workers=1).replace("workers = 1", "workers = 1\ntimeout = 1"),
                port)
    cl = FrameClient(port, timeout=30)
    before = int(cl.call(b"pid")[1])
    t0 = time.monotonic()
    err, msg = cl.call(b"forever:loop")
    assert (err, msg) == (True, b"timed out after 1 s")
    assert time.monotonic() - t0 < 10
    after = int(wait_for(lambda: FrameClient(port).call(b"pid")[1], "a worker answers"))
    assert after != before and not os.path.exists(f"/proc/{before}/cmdline") or _zombie(before)
    assert cl.call(b"next") == (False, b"next")          # the same connection goes on
    log = wait_for(lambda: "ran b'forever:loop' for more than 1 s" in srv.output() and srv.output(), "the log line")
    assert f"worker pid {before} of suite main" in log
    st = idle_and_free(srv.name)
    assert st["restarts"]["main"] == 1


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_http_timeout_is_a_504_for_a_loop_and_an_endless_stream(serve):
    port = free_port()
    srv = serve(one_suite("http", port, "worker_apps:wsgi", workers=1).replace("workers = 1", "workers = 1\ntimeout = 1"),
                port)
    for path in ("/forever", "/events"):
        code, body = http_get(port, path)
        assert code == 504 and b"timed out after 1 s" in body, (path, code, body)
    wait_for(lambda: "ran GET /events for more than 1 s" in srv.output(), "the log names the request")
    assert http_get(port, "/pid")[0] == 200
    idle_and_free(srv.name)


def test_rpc_timeout_is_an_error_naming_it(serve):
    port = free_port()
    srv = serve(one_suite("msgpack-rpc", port, "worker_apps", workers=1).replace("workers = 1", "workers = 1\ntimeout = 1"),
                port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(msgpack.packb([0, 1, "forever", []]) + msgpack.packb([0, 2, "add", [1, 2]]))
        got = _rpc_answers(s, 2)
    assert got[1][:2] == [1, 1] and "timed out after 1 s" in got[1][2]
    assert got[2] == [1, 2, None, 3]     # the session moved to the replacement worker
    wait_for(lambda: "ran method forever for more than 1 s" in srv.output() or "ran forever" in srv.output(),
             "the log names the method")
    idle_and_free(srv.name)


# -- recycling -----------------------------------------------------------------------------

def _load(port: int, clients: int, per_client: int) -> list[str]:
    """Sequential clients; returns the problems (an error, a wrong answer)."""
    problems: list[str] = []

    def run(c: int) -> None:
        try:
            cl = FrameClient(port, timeout=30)
            for i in range(per_client):
                tag = b"sleep:0.002:c%d-%d" % (c, i)
                got = cl.call(tag)
                if got != (False, tag):
                    problems.append(f"{tag!r} -> {got!r}")
            cl.close()
        except Exception as e:     # noqa: BLE001 - every failure is a problem to report
            problems.append(f"client {c}: {e!r}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return problems


def test_workers_recycled_every_100_requests_fail_nothing(serve):
    """A recycled worker stops taking requests at once when another one of
    its suite serves (else when its replacement joined), so under load the
    pids keep changing and no request fails."""
    port = free_port()
    body = one_suite("tcp", port, "worker_apps:handle", workers=2).replace(
        "workers = 2", "workers = 2\nmax_requests = 100\nmax_requests_jitter = 20")
    srv = serve(body, port, verbose=True)
    first = worker_pids(srv.name)
    problems = _load(port, clients=6, per_client=300)      # 1,800 requests
    assert problems == []
    st = idle_and_free(srv.name)
    assert st["requests_served"] == 1800
    replaced = srv.output().count("replacing worker pid")
    assert replaced >= 5, srv.output()
    assert not worker_pids(srv.name) & first
    assert st["restarts"]["main"] == 0          # replaced, not restarted after a death
    assert "died" not in srv.output()


def test_a_worker_past_max_rss_is_replaced_gracefully(serve):
    port = free_port()
    body = one_suite("tcp", port, "worker_apps:handle", workers=1).replace(
        "workers = 1", 'workers = 1\nmax_rss = "150MiB"')
    srv = serve(body, port, verbose=True)     # (the replacement is logged at INFO)
    cl = FrameClient(port, timeout=30)
    fat = int(cl.call(b"grow:200")[1])
    wait_for(lambda: fat not in worker_pids(srv.name) and worker_pids(srv.name), "the fat worker is replaced")
    assert cl.call(b"after") == (False, b"after")
    assert int(cl.call(b"pid")[1]) != fat
    wait_for(lambda: "passed max_rss" in srv.output(), "the max_rss replacement is logged")
    st = idle_and_free(srv.name)
    assert st["restarts"]["main"] == 0


# -- restarts ----------------------------------------------------------------------------------

def test_one_early_kill_is_restarted_at_once_not_treated_as_a_crash_loop(serve):
    port = free_port()
    srv = serve(one_suite("tcp", port, "worker_apps:handle", workers=1), port)
    victim = int(FrameClient(port).call(b"pid")[1])      # joined well under 2 s ago
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: worker_pids(srv.name) - {victim}, "a replacement joined")
    os.kill(new.pop(), signal.SIGKILL)                   # and once more, at once
    wait_for(lambda: worker_pids(srv.name) - {victim}, "a second replacement joined")
    assert "keep dying" not in srv.output()


def test_a_worker_that_keeps_exiting_backs_off(serve, tmp_path):
    """An application that exits on its own right after starting is a crash
    loop: restarts slow down (and the log says so)."""
    (tmp_path / "quitter.py").write_text(
        "import os\n\ndef handle(request):\n    if bytes(request.payload) == b'quit':\n        os._exit(1)\n"
        "    return b'ok'\n")
    port = free_port()
    srv = serve(one_suite("tcp", port, "quitter:handle", workers=1), port)
    for _ in range(3):
        wait_for(lambda: FrameClient(port).call(b"x") == (False, b"ok"), "a worker serves")
        cl = FrameClient(port)
        cl.send(b"quit")
        assert cl.recv()[0]         # an error: the worker died running it
    wait_for(lambda: "workers of suite main keep dying; next start in" in srv.output(), "the back-off")


# -- one client against the others ------------------------------------------------------------

def test_a_pipelined_flood_does_not_starve_another_client(serve):
    port = free_port()
    srv = serve(one_suite("http", port, "worker_apps:wsgi", workers=2), port)
    before = rss(srv.proc.pid)
    n = 10_000
    flood = socket.create_connection(("127.0.0.1", port), timeout=60)
    flood.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" * n)
    # Another client, while the flood is being served.
    code, body = http_get(port, "/pid", timeout=10)
    assert code == 200
    served_then = status(srv.name)["requests_served"]
    assert served_then < n + 1, "the other client was answered before the flood was through"
    during = rss(srv.proc.pid)
    got = b""
    while got.count(b"HTTP/1.1 200 OK") < n:
        chunk = flood.recv(1 << 20)
        assert chunk, f"closed after {got.count(b'HTTP/1.1 ')} answers"
        got += chunk
    assert got.count(b"HTTP/1.1 ") == n and b" 503 " not in got
    flood.close()
    idle_and_free(srv.name)
    after = rss(srv.proc.pid)
    assert during - before < 50 << 20 and after - before < 50 << 20, (before, during, after)


def test_pipelined_rpc_calls_all_answered(serve):
    port = free_port()
    srv = serve(one_suite("msgpack-rpc", port, "worker_apps", workers=2), port)
    n = 5000
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"".join(msgpack.packb([0, i, "add", [i, 1]]) for i in range(n)))
        got = _rpc_answers(s, n)
    assert all(got[i] == [1, i, None, i + 1] for i in range(n)), [m for m in got.values() if m[2]][:3]
    idle_and_free(srv.name)


def test_a_client_that_never_reads_its_answers_holds_bounded_memory(serve):
    port = free_port()
    srv = serve(one_suite("http", port, "worker_apps:wsgi", workers=2), port)
    pid = srv.proc.pid
    before = rss(pid)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b"GET /big?256 HTTP/1.1\r\nHost: x\r\n\r\n"     # 256 KiB answers
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < 20_000:
        try:
            sent += s.send(request * 100) // len(request)
        except BlockingIOError:
            time.sleep(0.05)
    # Answers stop being produced: the count settles well below what was sent.
    last, deadline = -1, time.monotonic() + 30
    while (served := status(srv.name)["requests_served"]) != last and time.monotonic() < deadline:
        last = served
        time.sleep(0.5)
    during = rss(pid)
    assert served < 300, f"{served} answers of 256 KiB produced for a client that reads none"
    assert during - before < 100 << 20, f"manager grew {(during - before) >> 20} MiB"
    s.close()
    st = idle_and_free(srv.name)
    after = rss(pid)
    assert after - before < 100 << 20, f"manager still {(after - before) >> 20} MiB larger after the close"
    assert http_get(port, "/pid")[0] == 200
    assert st["connections"] <= 1


def test_a_response_too_large_for_the_heap_is_a_logged_500(serve):
    port = free_port()
    srv = serve(one_suite("http", port, "worker_apps:wsgi", workers=1, instance='heap_size = "32MiB"'), port)
    code, body = http_get(port, "/huge?40")
    assert code == 500
    wait_for(lambda: "response of 41943" in srv.output() and "does not fit in shared memory" in srv.output(),
             "the worker logs why (without -v)")
    assert http_get(port, "/pid")[0] == 200
    st = idle_and_free(srv.name)
    assert st["heap"]["used_bytes"] == 0


def test_recycling_moves_rpc_sessions_between_calls_not_during_them(serve):
    """Workers recycled every 30 calls: each connection's Counter endpoint
    moves with its session (restored from its checkpoint) and counts on
    without a lost or doubled step, sequential and pipelined alike."""
    port = free_port()
    body = one_suite("msgpack-rpc", port, "rpc_apps", workers=2).replace("workers = 2", "workers = 2\nmax_requests = 30")
    srv = serve(body, port, verbose=True)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as seq, \
            socket.create_connection(("127.0.0.1", port), timeout=30) as pipe:
        # Each step takes a little while, so calls are still queued at a worker when it is retired.
        pipe.sendall(b"".join(msgpack.packb([0, i, "Slow.incr", [0.002]]) for i in range(150)))
        for i in range(150):
            seq.sendall(msgpack.packb([0, i, "Counter.incr", [1]]))
            assert _rpc_answers(seq, 1) == {i: [1, i, None, i + 1]}
        got = _rpc_answers(pipe, 150)
    assert sorted(m[3] for m in got.values()) == list(range(1, 151)), [m for m in got.values() if m[2]][:3]
    assert srv.output().count("replacing worker pid") >= 2      # both sessions' first workers
    idle_and_free(srv.name)


def test_a_sighup_with_broken_code_keeps_the_old_workers_and_does_not_retry_forever(serve, tmp_path):
    (tmp_path / "changing.py").write_text("def handle(request):\n    return b'v1'\n")
    port = free_port()
    srv = serve(one_suite("tcp", port, "changing:handle", workers=2), port)
    before = worker_pids(srv.name)
    (tmp_path / "changing.py").write_text("def handle(request):\n    return b'v2'\nraise RuntimeError('broken')\n")
    srv.signal(signal.SIGHUP)
    wait_for(lambda: srv.output().count("did not join; keeping pid") == 2, "both replacements gave up")
    deadline = time.monotonic() + 2          # no replacement is retried behind the scenes
    while time.monotonic() < deadline:
        assert srv.output().count("could not start: cannot load the application") <= 2, srv.output()
        time.sleep(0.2)
    assert worker_pids(srv.name) == before and len(status(srv.name)["workers"]) == 2
    assert FrameClient(port).call(b"x") == (False, b"v1")


def test_shutdown_past_the_grace_answers_everything_and_reuses_no_running_slot(serve):
    port = free_port()
    srv = serve(one_suite("tcp", port, "worker_apps:handle", workers=1,
                          instance="graceful_timeout = 1\nslots = 2"), port)
    clients = [FrameClient(port, timeout=30) for _ in range(5)]
    for i, cl in enumerate(clients):
        cl.send(b"sleep:3:%d" % i)
    wait_for(lambda: status(srv.name)["requests_waiting"] == 3, "two in slots, three waiting")
    srv.signal(signal.SIGTERM)
    for cl in clients:
        assert cl.recv() == (True, b"server shutting down")
    assert srv.proc.wait(timeout=20) == 0
    out = srv.output()
    assert "rebound" not in out and "another process" not in out, out


def test_a_control_connection_refused_mid_batch_harms_nothing(serve):
    """Two hellos in one write, the first refused (the pid is not the
    sender's): the connection closes after the first; the manager goes on."""
    import json

    port = free_port()
    srv = serve(one_suite("tcp", port, "worker_apps:handle", workers=1), port)
    hello = json.dumps({"hello": {"pid": 1, "start": 0, "suite": "main"}}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(control.address(srv.name))
        s.sendall(hello * 2)
        assert s.recv(100) == b""                        # closed, nothing granted
    st = idle_and_free(srv.name)
    assert len(st["workers"]) == 1 and FrameClient(port).call(b"x") == (False, b"x")
    assert "Traceback" not in srv.output() and "Exception in callback" not in srv.output()
