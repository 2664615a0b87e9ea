"""End to end over real sockets: a real `pyshm serve`, raw TCP frames."""
from __future__ import annotations

import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyshm.heap import SharedHeap
from pyshm.native import request_segment
from pyshm.reqmem import RequestMemory
from server_util import FrameClient, Load, TcpConn, free_port, one_suite, quiescent, status, wait_for, worker_pids


def config(port: int, *, workers: int = 2, app: str = "apps:echo", extra: str = "", listen_extra: str = "") -> str:
    return one_suite("tcp", port, app, workers=workers, instance=extra, listen=listen_extra)


def slot_states(name: str) -> dict[str, int]:
    rm = RequestMemory.attach(request_segment(name))
    try:
        return rm.states()
    finally:
        rm.close()


def test_many_connections_answered_in_order(serve):
    port = free_port()
    srv = serve(config(port), port)

    def client(c: int) -> list[bytes]:
        cl = FrameClient(port)
        try:
            for i in range(40):   # pipelined: all sent before any is read
                cl.send(b"c%d-r%d" % (c, i))
            return [cl.recv()[1] for _ in range(40)]
        finally:
            cl.close()

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(client, range(64)))
    for c, got in enumerate(results):
        assert got == [b"c%d-r%d" % (c, i) for i in range(40)]
    cl = FrameClient(port)
    pids = {cl.call(b"pid")[1] for _ in range(20)}
    cl.close()
    assert len(pids) == 2, "both workers serve"
    assert slot_states(srv.name)["free"] == 1024
    quiescent(srv.name)      # the manager's own free list too


def test_large_payloads_and_errors(serve):
    port = free_port()
    srv = serve(config(port), port)
    used0 = status(srv.name)["heap"]["used_bytes"]
    cl = FrameClient(port)
    big = bytes(range(256)) * 4096                     # 1 MiB: over the 64 KiB inline area
    assert cl.call(big) == (False, big)
    assert cl.call(b"big:2097152") == (False, bytes(range(256)) * 8192)
    err, msg = cl.call(b"boom")
    assert err and b"ValueError: boom" in msg
    assert cl.call(b"") == (False, b"")                 # still serving after an application error
    st = quiescent(srv.name)
    assert st["heap"]["used_bytes"] == used0, "the payload and response blobs were freed"


def test_two_suites_routed_by_rule(serve):
    port, port_b = free_port(), free_port()
    body = f"""
[suites.a]
app = "apps:suite_a"
workers = 2
[suites.b]
app = "apps:suite_b"
workers = 1
policy = "round-robin"

[[listen]]
frontend = "tcp"
address = "127.0.0.1:{port}"
suite = "a"
routes = [{{ prefix = "b:", suite = "b" }}]

[[listen]]
frontend = "tcp"
address = "127.0.0.1:{port_b}"
suite = "b"
"""
    serve(body, port)
    cl, cl_b = FrameClient(port), FrameClient(port_b)
    a_pids, b_pids = set(), set()
    for i in range(30):
        err, r = cl.call(b"x%d" % i)
        assert not err and r.startswith(b"A:") and r.endswith(b":x%d" % i)
        a_pids.add(r.split(b":")[1])
        err, r = cl.call(b"b:%d" % i)           # the rule sends it to suite b
        assert not err and r.startswith(b"B:") and r.endswith(b":b:%d" % i)
        b_pids.add(r.split(b":")[1])
        err, r = cl_b.call(b"y")                # the second listener's suite
        assert r.startswith(b"B:")
        b_pids.add(r.split(b":")[1])
    assert len(a_pids) == 2 and len(b_pids) == 1 and not a_pids & b_pids


def test_oversized_frame_gets_an_error_and_a_close(serve):
    port = free_port()
    serve(config(port, listen_extra='max_frame = "1KiB"'), port)
    cl = FrameClient(port)
    assert cl.call(b"ok") == (False, b"ok")
    cl.sock.sendall(struct.pack(">I", 10 << 20) + b"x" * 1000)   # announces 10 MiB, sends a little
    err, msg = cl.recv()
    assert err and b"exceeds the limit of 1024" in msg
    assert cl.sock.recv(1) == b"", "connection closed after the error frame"
    assert FrameClient(port).call(b"next") == (False, b"next")   # the server goes on


def test_invalid_config_names_the_key(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.toml").write_text('[suites.main]\napp = "apps:echo"\nworkers = "four"\n'
                                       '[[listen]]\nfrontend = "tcp"\naddress = "127.0.0.1:1"\nsuite = "main"\n')
    r = subprocess.run([sys.executable, "-m", "pyshm.cli", "serve", "-c", "bad.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "suites.main.workers must be a int" in r.stderr
    (tmp_path / "bad.toml").write_text('[suites.main]\napp = "apps:echo"\n[[listen]]\nfrontend = "tcp"\n'
                                       'address = "127.0.0.1:1"\nsuite = "nope"\n')
    r = subprocess.run([sys.executable, "-m", "pyshm.cli", "serve", "-c", "bad.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "listen[0].suite names 'nope'" in r.stderr


def test_worker_sigkill_under_load(serve):
    import os

    port = free_port()
    srv = serve(config(port, workers=2, extra='preload = "apps:setup"'), port)
    load = Load(lambda c: TcpConn(port, op=b"msleep:0.01:%s"), [1] * 8)
    try:
        load.wait_answers(50, "before the kill")
        victim = worker_pids(srv.name)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(p := worker_pids(srv.name)) == 2 and victim not in p, "a replacement worker joined")
        load.wait_answers(100, "after the replacement joined")
    finally:
        s = load.finish()
    s.assert_complete(max_wait=1.0)
    assert all(load.kind(r.error) == "died" for r in s.errors), s
    assert len(s.errors) <= 1, f"a worker runs one request at a time; {s}"
    served_by = {int(r.body.split(b":")[0]) for r in s.ok}
    assert set(worker_pids(srv.name)) <= served_by, f"the replacement worker serves; {s}"
    quiescent(srv.name)
    stats = SharedHeap.attach(srv.name, observe=True).stats()
    assert stats.pinned_versions == 0, "the victim's pins were released"
    assert stats.readers == 3 and stats.building_versions == 0   # manager + 2 live workers


def test_sigterm_answers_requests_in_flight(serve):
    port = free_port()
    srv = serve(config(port, workers=2), port)
    clients = [FrameClient(port) for _ in range(6)]
    for i, cl in enumerate(clients):
        cl.send(b"sleep:0.5:%d" % i)
        cl.send(b"sleep:0.2:%d-b" % i)
    # All 12 requests reached the manager.
    wait_for(lambda: slot_states(srv.name)["free"] <= 1024 - 12, "12 requests in slots", timeout=10)
    srv.signal(signal.SIGTERM)
    for i, cl in enumerate(clients):
        first, second = cl.recv(), cl.recv()
        assert not first[0] and first[1].endswith(b":%d" % i)
        assert not second[0] and second[1].endswith(b":%d-b" % i)
        assert cl.sock.recv(1) == b""          # then the server closes
    assert srv.proc.wait(timeout=30) == 0


def test_sighup_replaces_workers_without_a_failed_request(serve):
    port = free_port()
    srv = serve(config(port, workers=2), port)
    before = set(worker_pids(srv.name))
    load = Load(lambda c: TcpConn(port), [1] * 6)
    try:
        load.wait_answers(30, "before SIGHUP")
        srv.signal(signal.SIGHUP)
        wait_for(lambda: len(p := set(worker_pids(srv.name))) == 2 and not p & before, "all workers replaced",
                 timeout=30)
        load.wait_answers(30, "after the replacement")
    finally:
        s = load.finish()
    s.assert_complete(max_wait=5.0)
    assert not s.errors, s
    served_by = {int(r.body.split(b":")[0]) for r in s.ok}
    assert before <= served_by and set(worker_pids(srv.name)) <= served_by, s
    quiescent(srv.name)


LINES_FE = '''
from pyshm.frontend import FrontEnd, ProtocolError, Request


class LineFrontEnd(FrontEnd):
    """One request per line; the answer is one line, "ERR " before errors."""
    name = "lines"
    defaults = {"max_line": 1024}

    def __init__(self, **options):
        super().__init__(**options)
        self.buf = b""

    def receive(self, data):
        self.buf += data
        events = []
        while b"\\n" in self.buf:
            line, self.buf = self.buf.split(b"\\n", 1)
            events.append(Request(line, route=line))
        if len(self.buf) > self.options["max_line"]:
            events.append(ProtocolError("line too long", b"ERR line too long\\n"))
        return events

    def response(self, request, body, *, error):
        return (b"ERR " if error else b"") + body + b"\\n"
'''


def test_a_third_party_front_end_plugs_in_through_its_entry_point(serve, tmp_path):
    """A front-end from another distribution (here a dist-info in the
    server's working directory) is found by name, like the built-ins."""
    (tmp_path / "lines_fe.py").write_text(LINES_FE)
    dist = tmp_path / "lines_fe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lines-fe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pyshm.frontends]\nlines = lines_fe:LineFrontEnd\n")
    port = free_port()
    serve(config(port).replace('frontend = "tcp"', 'frontend = "lines"'), port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"one\ntwo\nboom\n")
        got = b""
        while got.count(b"\n") < 3:
            chunk = s.recv(4096)
            assert chunk, f"closed after {got!r}"
            got += chunk
    assert got.startswith(b"one\ntwo\nERR application error: ValueError: boom")


def test_demo_serves_the_shared_catalog(tmp_path):
    """What `make run` starts: the catalog is put once by the manager and
    every worker answers from the same mapped closure."""
    import json
    import os
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyshm.cli", "demo", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"raw TCP frames on 127.0.0.1:{port}" in banner
        cl = FrameClient(port)
        got = json.loads(cl.call(b"sku-0000042")[1])
        assert (got["name"], got["price"]) == ("product 42", 11.5)
        pids = {json.loads(cl.call(b"stats")[1])["worker_pid"] for _ in range(20)}
        assert len(pids) == 2
        err, msg = cl.call(b"sku-nope")
        assert err and b"no product" in msg
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"pyshm.demo-{port}")]


def test_a_started_by_hand_worker_joins_and_a_killed_manager_takes_its_workers_along(serve, tmp_path):
    """Workers attach by name: one started separately joins the suite (and
    is not restarted when it leaves).  SIGKILL of the manager: its workers
    exit by themselves and the same instance starts again at once."""
    import os
    import subprocess
    import sys

    port = free_port()
    srv = serve(config(port, workers=1), port)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    extra = subprocess.Popen([sys.executable, "-m", "pyshm.worker", "--instance", srv.name, "--suite", "main",
                              "--app", "apps:echo"], env=env)
    try:
        deadline = time.monotonic() + 20
        while str(extra.pid).encode() not in {FrameClient(port).call(b"pid")[1] for _ in range(10)}:
            assert time.monotonic() < deadline, "the hand-started worker never served"
        cl = FrameClient(port)
        pids = {int(cl.call(b"pid")[1]) for _ in range(30)}
        assert extra.pid in pids and len(pids) == 2
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        assert extra.wait(timeout=5) == 0         # noticed the manager is gone, exited
        for pid in pids - {extra.pid}:
            deadline = time.monotonic() + 5
            while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]:
                assert time.monotonic() < deadline, f"worker {pid} outlived its manager"
                time.sleep(0.05)
    finally:
        if extra.poll() is None:
            os.kill(extra.pid, signal.SIGKILL)
            extra.wait()
    port2 = free_port()
    again = serve(config(port2, workers=1), port2, name=srv.name)   # its segments were orphans
    assert FrameClient(port2).call(b"x") == (False, b"x")
    again.stop()


def test_bad_listener_option_and_broken_app_fail_at_start(tmp_path):
    import subprocess
    import sys

    def run(body: str) -> subprocess.CompletedProcess:
        (tmp_path / "c.toml").write_text(body)
        return subprocess.run([sys.executable, "-m", "pyshm.cli", "serve", "-c", "c.toml"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60,
                              env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)})

    r = run(config(free_port(), listen_extra="max_frames = 5"))
    assert r.returncode == 1 and "listen[0]: front-end 'tcp' has no option 'max_frames'" in r.stderr
    r = run(config(free_port(), app="apps:no_such_function"))
    assert r.returncode == 2                  # could not start (1 is for a configuration error)
    assert r.stderr == ("pyshm: suite main: cannot load the application 'apps:no_such_function': "
                        "AttributeError: module 'apps' has no attribute 'no_such_function'\n")


def test_a_distributed_tcp_suite_binds_each_connection_to_one_worker(serve):
    port = free_port()
    serve(config(port, workers=2).replace("workers = 2", "workers = 2\ndistributed = true"), port)
    clients = [FrameClient(port) for _ in range(6)]
    seen = set()
    for cl in clients:
        pids = {cl.call(b"pid")[1] for _ in range(10)}
        assert len(pids) == 1                      # all its requests on its bound worker
        seen |= pids
        sid = cl.call(b"sid")[1]
        assert len(sid) == 32 and cl.call(b"sid")[1] == sid
    assert len(seen) == 2                          # connections spread over the workers
    assert FrameClient(port).call(b"sid")[1] != clients[0].call(b"sid")[1]
