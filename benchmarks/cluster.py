"""The cluster, measured in one run (issue 11):

1. Session requests served where the session lives vs forwarded over the
   node link: two nodes on this machine (1 worker each; every request runs
   on node a's worker), `wrk -t2 -c16` with a's session cookie against a,
   then against b, in alternation.  Goal: a forwarded request under 2x a
   local one in latency.
2. From a node's start to a peer listing it alive (zeroconf on 127.0.0.1,
   no static peers), median of N, against python-zeroconf's own default
   (registration with probing) timed in the same run, in alternation.
   Goal: under 1 s.
3. From SIGKILL of a node to every peer listing it dead, median of N.
   Goal: under 1 s (Tomcat's default is 3 s).

    python benchmarks/cluster.py [--duration 4] [--rounds 3] [--starts 10]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import socket
import time

from servers import free_port, stop, wait_port, wrk

APP = '''
def app(environ, start_response):
    s = environ["pyshm.session"]
    s["n"] = s.get("n", 0) + 1
    body = b"%d %s" % (s["n"], environ["pyshm.node"].encode())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''
SECRET = os.urandom(24).hex()
CLUSTER = f"bench{os.getpid()}"


class Node:
    def __init__(self, tmp: str, node: str, *, peers: list[int] = (), zeroconf: bool = False,
                 workers: int = 1) -> None:
        self.node, self.http, self.link = node, free_port(), free_port()
        self.name = f"bench-{os.getpid()}-{node}"
        args = [sys.executable, "-m", "pyshm.cli", "serve", "bench_cluster_app:app", "--http",
                f"127.0.0.1:{self.http}", "--workers", str(workers), "--name", self.name, "--cluster", CLUSTER,
                "--node", node, "--link", f"127.0.0.1:{self.link}"]
        args += [a for p in peers for a in ("--peer", f"127.0.0.1:{p}")]
        if zeroconf:
            args += ["--interface", "127.0.0.1"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=tmp, env={**os.environ, "PYSHM_CLUSTER_SECRET": SECRET},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def peers(self) -> dict[str, str]:
        from pyshm import control

        try:
            return {p["node"]: p["state"] for p in control.status(self.name)["cluster"]["peers"]}
        except (OSError, KeyError, TypeError):
            return {}


def unlink_segments(instance: str) -> None:
    from pyshm.native import heap_segment, request_segment, session_segment, unlink

    for segment in (heap_segment(instance), request_segment(instance), session_segment(instance)):
        unlink(segment, quiet=True)


def get(port: int, cookie: str = "") -> tuple[bytes, bytes]:
    """GET / (this directory's http.py shadows the standard library's): head and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def wait(predicate, timeout: float = 20.0, interval: float = 0.005) -> float:
    """Polls until predicate() is true; the monotonic time it became so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError("timed out")


def forwarding(tmp: str, duration: int, rounds: int) -> None:
    a = Node(tmp, "a")
    b = Node(tmp, "b", peers=[a.link])
    try:
        wait_port(a.http, a.proc)
        wait_port(b.http, b.proc)
        wait(lambda: b.peers().get("a") == "alive")
        head, _ = get(a.http)
        cookie = head.split(b"Set-Cookie: ")[1].split(b";")[0].decode()
        for port in (a.http, b.http):
            assert get(port, cookie)[1].endswith(b" a"), "the session is not served by a"
        runs: dict[str, list[dict]] = {"local": [], "forwarded": []}
        for _ in range(rounds):
            for label, port in (("local", a.http), ("forwarded", b.http)):
                runs[label].append(wrk(f"http://127.0.0.1:{port}/", duration, connections=16,
                                       headers=[f"Cookie: {cookie}"]))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50", "p99")} for k, v in runs.items()}
        bad = sum(r["non2xx"] for v in runs.values() for r in v)
        print(f"session requests, 1 worker on node a, wrk -t2 -c16, {rounds} x {duration} s, medians"
              f"{'' if not bad else f' ({bad} non-2xx answers!)'}:")
        for k in ("local", "forwarded"):
            print(f"  {k:<10} {med[k]['rps']:>9,.0f} req/s   p50 {med[k]['p50']:6.2f} ms   p99 {med[k]['p99']:6.2f} ms")
        lo, fw = med["local"], med["forwarded"]
        print(f"  forwarded/local: latency p50 {fw['p50'] / lo['p50']:.2f}x, p99 {fw['p99'] / lo['p99']:.2f}x, "
              f"throughput {fw['rps'] / lo['rps']:.2f}x   (goal: latency under 2x)")
    finally:
        stop([a.proc, b.proc])


async def _zeroconf_default(ip: str) -> float:
    """python-zeroconf's default: register (with probing) on ip; seconds
    until a browser on the same interface resolves it."""
    from zeroconf import IPVersion, ServiceInfo, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    kind = "_pyshmbench._tcp.local."
    name = f"n{os.getpid()}{time.monotonic_ns()}.{kind}"
    seen = asyncio.Event()
    browser_zc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    zc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)

    def handler(zeroconf, service_type, name: str, state_change) -> None:
        if name == wanted and state_change is ServiceStateChange.Added:
            seen.set()

    wanted = name
    browser = AsyncServiceBrowser(browser_zc.zeroconf, kind, handlers=[handler])
    try:
        info = ServiceInfo(kind, name, addresses=[bytes(map(int, ip.split(".")))], port=7400, properties={"x": "1"})
        t0 = time.monotonic()
        await (await zc.async_register_service(info))
        await asyncio.wait_for(seen.wait(), 10)
        return time.monotonic() - t0
    finally:
        await browser.async_cancel()
        await zc.async_close()
        await browser_zc.async_close()


def discovery_and_death(tmp: str, starts: int) -> None:
    a = Node(tmp, "a", zeroconf=True)
    b = Node(tmp, "b", zeroconf=True)
    found, whole, default, dead = [], [], [], []
    try:
        wait_port(a.http, a.proc)
        wait_port(b.http, b.proc)
        wait(lambda: a.peers().get("b") == "alive")
        for i in range(starts):
            default.append(asyncio.run(_zeroconf_default("127.0.0.1")))
            c = Node(tmp, f"c{i}", zeroconf=True)
            try:
                wait_port(c.http, c.proc)       # started: listeners bound, workers up, cluster announced
                up = time.monotonic()
                seen = wait(lambda: a.peers().get(c.node) == "alive" and b.peers().get(c.node) == "alive")
                found.append(seen - up)
                os.kill(c.proc.pid, signal.SIGKILL)
                killed = time.monotonic()
                c.proc.wait()
                gone = wait(lambda: a.peers().get(c.node) == "dead" and b.peers().get(c.node) == "dead")
                dead.append(gone - killed)
                whole.append(seen - c.started)
            finally:
                stop([c.proc])
                unlink_segments(c.name)     # (no one removes a SIGKILLed instance's segments)
    finally:
        stop([a.proc, b.proc])
    f, d, k = statistics.median(found), statistics.median(default), statistics.median(dead)
    print(f"a new node, once it serves, listed alive by both peers (zeroconf on 127.0.0.1), median of "
          f"{starts}: {f * 1000:.0f} ms (max {max(found) * 1000:.0f});  python-zeroconf's default registration seen by a browser: "
          f"{d * 1000:.0f} ms;  ratio {f / d:.2f}x   (goal: under 1 s)")
    print(f"  counted from the new node's process start (interpreter, workers, then the cluster): "
          f"{statistics.median(whole) * 1000:.0f} ms")
    print(f"SIGKILL of a node to both peers listing it dead, median of {starts}: {k * 1000:.0f} ms "
          f"(max {max(dead) * 1000:.0f})   (goal: under 1 s; Tomcat's default 3 s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: `make bench` installs it (apt-get install wrk)")
    tmp = tempfile.mkdtemp(prefix="pyshm-bench-cluster-")
    with open(os.path.join(tmp, "bench_cluster_app.py"), "w") as f:
        f.write(APP)
    forwarding(tmp, args.duration, args.rounds)
    discovery_and_death(tmp, args.starts)


if __name__ == "__main__":
    main()
