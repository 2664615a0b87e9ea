"""Sessions, side by side in one run.

1. HTTP requests/s of one small app with and without sessions on pyshm (2
   workers; goal: sessions cost under 15%), and the same app on gunicorn (sync,
   2 workers) with Flask's cookie sessions and with server-side sessions in
   Redis (a real redis-server started here).  wrk -t2 -c64; each request
   carries one of 64 session cookies (a wrk Lua script); servers up at once,
   measured in alternation, medians.
2. The cost of one session lookup + update, in process: pyshm's session
   table + heap closure against a Redis GET + SET round trip.

    python benchmarks/sessions.py [--duration 5] [--rounds 3]
"""
from __future__ import annotations

import sys

# This directory holds benchmarks/http.py, which would shadow the standard
# library's http package (urllib needs it): look here last.
sys.path.append(sys.path.pop(0))

import argparse  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from servers import Redis, free_port, stop, wait_port  # noqa: E402

APPS = '''
import os, pickle, uuid
from flask import Flask, session, request, make_response
import redis as _redis

def plain(environ, start_response):
    body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [body]

def counted(environ, start_response):
    s = environ["pyshm.session"]
    s["visits"] = s.get("visits", 0) + 1
    body = b"%d" % s["visits"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

flask_cookie = Flask("cookie")
flask_cookie.secret_key = b"bench-secret-bench-secret"

@flask_cookie.route("/")
def cookie_visit():
    session["visits"] = session.get("visits", 0) + 1
    return str(session["visits"])

flask_redis = Flask("redis")
_r = _redis.Redis(host="127.0.0.1", port=int(os.environ.get("BENCH_REDIS_PORT", "6379")))

@flask_redis.route("/")
def redis_visit():
    sid = request.cookies.get("sid")
    raw = _r.get("s:" + sid) if sid else None
    state = pickle.loads(raw) if raw else {}
    state["visits"] = state.get("visits", 0) + 1
    new = sid is None or raw is None
    sid = sid if not new else uuid.uuid4().hex
    _r.set("s:" + sid, pickle.dumps(state), ex=1800)
    resp = make_response(str(state["visits"]))
    if new:
        resp.set_cookie("sid", sid, httponly=True, samesite="Lax")
    return resp
'''

LUA = '''
cookies = {}
for line in io.lines(os.getenv("BENCH_COOKIES")) do cookies[#cookies + 1] = line end
request = function()
    if #cookies > 0 then
        wrk.headers["Cookie"] = cookies[math.random(#cookies)]
    end
    return wrk.format("GET", "/")
end
'''


def cookies_for(port: int, n: int) -> list[str]:
    """n fresh sessions: the Cookie header each one's first answer set."""
    out = []
    for _ in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
            header = r.headers.get("Set-Cookie")
            if header:
                out.append(header.split(";", 1)[0])
    return out


def wrk(port: int, duration: int, lua: str, cookie_file: str) -> float:
    env = {**os.environ, "BENCH_COOKIES": cookie_file}
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{duration}s", "-s", lua, f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True, env=env).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"errors in the run:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def http_section(args, tmp: str, redis: Redis) -> None:
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": tmp, "BENCH_REDIS_PORT": str(redis.port)}
    ports = {name: free_port() for name in ("plain", "sessions", "cookie", "redis")}
    cmds = {
        "pyshm, no sessions": ([os.path.join(venv_bin, "pyshm"), "serve", "bench_session_apps:plain", "--http",
                                f"127.0.0.1:{ports['plain']}", "--workers", "2", "--name", f"bs-plain-{os.getpid()}"],
                               ports["plain"]),
        "pyshm, sessions": ([os.path.join(venv_bin, "pyshm"), "serve", "bench_session_apps:counted", "--http",
                             f"127.0.0.1:{ports['sessions']}", "--workers", "2", "--name", f"bs-sess-{os.getpid()}"],
                            ports["sessions"]),
        "gunicorn + Flask cookie sessions": ([sys.executable, "-m", "gunicorn", "bench_session_apps:flask_cookie",
                                              "-b", f"127.0.0.1:{ports['cookie']}", "-w", "2", "--log-level",
                                              "warning"], ports["cookie"]),
        "gunicorn + Flask, sessions in Redis": ([sys.executable, "-m", "gunicorn", "bench_session_apps:flask_redis",
                                                 "-b", f"127.0.0.1:{ports['redis']}", "-w", "2", "--log-level",
                                                 "warning"], ports["redis"]),
    }
    lua = os.path.join(tmp, "cookies.lua")
    with open(lua, "w") as f:
        f.write(LUA)
    procs, files, runs = {}, {}, {}
    try:
        for name, (cmd, port) in cmds.items():
            procs[name] = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
        for name, (cmd, port) in cmds.items():
            wait_port(port, procs[name])
            files[name] = os.path.join(tmp, f"cookies-{port}.txt")
            with open(files[name], "w") as f:
                f.write("\n".join(cookies_for(port, 64)) + "\n")
            wrk(port, 1, lua, files[name])   # warm-up
        for _ in range(args.rounds):
            for name, (cmd, port) in cmds.items():
                runs.setdefault(name, []).append(wrk(port, args.duration, lua, files[name]))
    finally:
        stop(list(procs.values()))
    med = {name: statistics.median(r) for name, r in runs.items()}
    base = med["pyshm, sessions"]
    print(f"\n### 1. HTTP requests/s, wrk -t2 -c64, {args.rounds} rounds of {args.duration} s in alternation, medians\n")
    print("| server | requests/s | pyshm with sessions / this |\n|---|---|---|")
    for name, rps in med.items():
        print(f"| {name} | {rps:,.0f} | {base / rps:.2f}x |")
    overhead = 1 - med["pyshm, sessions"] / med["pyshm, no sessions"]
    print(f"\nsession overhead on pyshm: {overhead * 100:.1f}% of requests/s (goal: under 15%)")


def cost_section(redis: Redis) -> None:
    from pyshm.heap import SharedHeap
    from pyshm.sessions import SessionKind, SessionTable, state_closure

    name = f"bench-sess-{os.getpid()}"
    heap = SharedHeap.create(name, size="256MiB")
    table = SessionTable.create(name, 1024)
    try:
        entry = table.open(SessionKind.REQUEST, ttl=1800)
        closure = state_closure(entry.id)
        heap.put(closure, {"visits": 0, "user": "ada", "cart": [1, 2, 3]})

        def pyshm_step() -> None:       # what an HTTP request with a changed session does
            table.brief(entry.id)
            state = heap.get(closure)
            state["visits"] += 1
            table.saved(entry.id, closure, heap.put(closure, state), 1800)

        r = redis.client
        r.set("s:bench", pickle.dumps({"visits": 0, "user": "ada", "cart": [1, 2, 3]}))

        def redis_step() -> None:
            state = pickle.loads(r.get("s:bench"))
            state["visits"] += 1
            r.set("s:bench", pickle.dumps(state), ex=1800)

        times: dict[str, list[float]] = {"pyshm": [], "redis": []}
        for _ in range(7):
            for label, fn, n in (("pyshm", pyshm_step, 2000), ("redis", redis_step, 500)):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[label].append((time.perf_counter() - t0) / n)
        ours, theirs = statistics.median(times["pyshm"]), statistics.median(times["redis"])
        print("\n### 2. one session lookup + update (median, in process)\n")
        print("| how | per request | vs pyshm |\n|---|---|---|")
        print(f"| pyshm: table lookup, closure get, put, table update | {ours * 1e6:.1f} µs | 1x |")
        print(f"| Redis GET + SET on 127.0.0.1 (pickled dict) | {theirs * 1e6:.1f} µs | {theirs / ours:.1f}x |")
    finally:
        table.unlink()
        table.close()
        heap.unlink()
        heap.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: `make bench` installs it")
    print(f"# sessions benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    tmp = tempfile.mkdtemp(prefix="pyshm-bench-sessions-")
    with open(os.path.join(tmp, "bench_session_apps.py"), "w") as f:
        f.write(APPS)
    redis = Redis()
    try:
        http_section(args, tmp, redis)
        cost_section(redis)
    finally:
        redis.stop()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
