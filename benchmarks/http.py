"""HTTP requests/s, side by side in one run: pyshm (2 workers) against
uvicorn (httptools + uvloop, 1 worker, a raw ASGI app) and gunicorn (sync,
2 workers), all driven by `wrk -t2 -c64` on this machine.

    python benchmarks/http.py [--duration 5] [--rounds 3]

The servers run at once and are measured in alternation, so a noisy stretch
of the machine hits each alike.  Prints median requests/s and latency
p50/p99 (from wrk) over the rounds, and the ratios."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from servers import free_port, stop, wait_port, wrk

APPS = '''
BODY_10K = b"x" * 10240

def wsgi(environ, start_response):
    body = BODY_10K if environ["PATH_INFO"] == "/10k" else b"Hello, world!"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

async def asgi(scope, receive, send):
    body = BODY_10K if scope["path"] == "/10k" else b"Hello, world!"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


def servers(tmp: str) -> dict[str, tuple[list[str], int]]:
    venv_bin = os.path.dirname(sys.executable)
    p1, p2, p3 = free_port(), free_port(), free_port()
    return {
        "pyshm (2 workers)": ([os.path.join(venv_bin, "pyshm"), "serve", "bench_apps:wsgi", "--http",
                               f"127.0.0.1:{p1}", "--workers", "2", "--name", f"bench-http-{os.getpid()}"], p1),
        "uvicorn (httptools, uvloop, 1 worker)": ([sys.executable, "-m", "uvicorn", "bench_apps:asgi", "--port",
                                                   str(p2), "--http", "httptools", "--loop", "uvloop",
                                                   "--log-level", "warning", "--no-access-log"], p2),
        "gunicorn (sync, 2 workers)": ([sys.executable, "-m", "gunicorn", "bench_apps:wsgi", "-b",
                                        f"127.0.0.1:{p3}", "-w", "2", "-k", "sync", "--log-level", "warning"], p3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: `make bench` installs it (apt-get install wrk)")
    tmp = tempfile.mkdtemp(prefix="pyshm-bench-http-")
    with open(os.path.join(tmp, "bench_apps.py"), "w") as f:
        f.write(APPS)
    env = {**os.environ, "PYTHONPATH": tmp}
    runs: dict[str, dict[str, list[dict]]] = {}
    print(f"# HTTP benchmark: wrk -t2 -c64, {args.rounds} rounds of {args.duration} s per server and path, "
          f"servers in alternation; medians. {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    procs = {}
    try:
        specs = servers(tmp)
        for name, (cmd, port) in specs.items():   # all up at once; an idle server costs nothing
            procs[name] = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
        for name, (cmd, port) in specs.items():
            wait_port(port, procs[name])
            wrk(f"http://127.0.0.1:{port}/", 2)   # warm-up
        for _ in range(args.rounds):
            for path in ("/", "/10k"):
                for name, (cmd, port) in specs.items():
                    runs.setdefault(name, {}).setdefault(path, []).append(
                        wrk(f"http://127.0.0.1:{port}{path}", args.duration))
    finally:
        stop(list(procs.values()))
        shutil.rmtree(tmp)
    results = {name: {path: {k: (statistics.median(r[k] for r in rs) if k != "sockerr" else rs[-1][k])
                             for k in rs[0]} for path, rs in paths.items()} for name, paths in runs.items()}
    ours = results["pyshm (2 workers)"]
    for path, label in (("/", "hello world"), ("/10k", "10 KB response")):
        print(f"\n### {label}\n\n| server | requests/s | p50 | p99 | pyshm / this |\n|---|---|---|---|---|")
        for name, r in results.items():
            x = r[path]
            note = f" ({x['non2xx']} non-2xx)" if x["non2xx"] else ""
            note += f" (socket errors: {x['sockerr']})" if x["sockerr"] else ""
            print(f"| {name} | {x['rps']:,.0f}{note} | {x['p50']:.2f} ms | {x['p99']:.2f} ms | "
                  f"{ours[path]['rps'] / x['rps']:.2f}x |")


if __name__ == "__main__":
    main()
