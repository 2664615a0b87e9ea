"""msgpack-RPC calls/s over one connection, sequential and pipelined (64 in
flight), side by side in one run: pyshm (2 workers) against a single-process
asyncio msgpack-RPC server written here as the baseline.  The same client
drives both, in alternation over several rounds; medians and ratios.

    python benchmarks/rpc.py [--seconds 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import msgpack
from servers import free_port, stop, wait_port

APP = '''
import pyshm

@pyshm.rpc_method
def add(a, b):
    return a + b
'''

BASELINE = '''
import asyncio, sys
import msgpack

def add(a, b):
    return a + b

METHODS = {"add": add}

class Proto(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.u = msgpack.Unpacker(raw=False)
    def data_received(self, data):
        self.u.feed(data)
        out = []
        for kind, msgid, method, params in self.u:
            try:
                out.append(msgpack.packb([1, msgid, None, METHODS[method](*params)]))
            except Exception as e:
                out.append(msgpack.packb([1, msgid, str(e), None]))
        self.t.write(b"".join(out))

async def main(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Proto, "127.0.0.1", port)
    await server.serve_forever()

try:
    import uvloop
except ImportError:
    uvloop = None
(uvloop.run if uvloop else asyncio.run)(main(int(sys.argv[1])))
'''


def calls_per_second(port: int, in_flight: int, seconds: float) -> float:
    """One connection; keeps `in_flight` calls outstanding; checks answers."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        unpacker = msgpack.Unpacker(raw=False)
        msgid = sent = done = 0
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            if now < deadline:
                batch = []
                while sent - done < in_flight:
                    batch.append(msgpack.packb([0, msgid, "add", [msgid, 1]]))
                    msgid = (msgid + 1) % 2**31
                    sent += 1
                if batch:
                    s.sendall(b"".join(batch))
            elif done == sent:
                break
            unpacker.feed(s.recv(1 << 16))
            for kind, mid, err, result in unpacker:
                if err is not None or result != mid + 1:
                    raise AssertionError(f"bad answer {mid} {err} {result}")
                done += 1
        return done / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pyshm-bench-rpc-")
    with open(os.path.join(tmp, "rpc_bench_app.py"), "w") as f:
        f.write(APP)
    with open(os.path.join(tmp, "baseline.py"), "w") as f:
        f.write(BASELINE)
    env = {**os.environ, "PYTHONPATH": tmp}
    p_ours, p_base = free_port(), free_port()
    venv_bin = os.path.dirname(sys.executable)
    cfg = os.path.join(tmp, "pyshm.toml")
    with open(cfg, "w") as f:
        f.write(f'[instance]\nname = "bench-rpc-{os.getpid()}"\n[suites.rpc]\napp = "rpc_bench_app"\nworkers = 2\n'
                f'[[listen]]\nfrontend = "msgpack-rpc"\naddress = "127.0.0.1:{p_ours}"\nsuite = "rpc"\n')
    procs = {"pyshm (2 workers)": (subprocess.Popen([os.path.join(venv_bin, "pyshm"), "serve", "-c", cfg], cwd=tmp,
                                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                                   p_ours),
             "asyncio baseline (1 process)": (subprocess.Popen([sys.executable, "baseline.py", str(p_base)], cwd=tmp,
                                                               env=env), p_base)}
    runs: dict[tuple[str, int], list[float]] = {}
    try:
        for proc, port in procs.values():
            wait_port(port, proc)
            calls_per_second(port, 1, 0.5)
        for _ in range(args.rounds):
            for in_flight in (1, 64):
                for name, (proc, port) in procs.items():
                    runs.setdefault((name, in_flight), []).append(calls_per_second(port, in_flight, args.seconds))
    finally:
        stop([proc for proc, _ in procs.values()])
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"# msgpack-RPC benchmark: one connection, {args.rounds} rounds of {args.seconds:g} s, medians "
          f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    print("| server | sequential calls/s | pipelined (64 in flight) calls/s |\n|---|---|---|")
    for name in procs:
        print(f"| {name} | {med[(name, 1)]:,.0f} | {med[(name, 64)]:,.0f} |")
    ours, base = "pyshm (2 workers)", "asyncio baseline (1 process)"
    print(f"| pyshm / baseline | {med[(ours, 1)] / med[(base, 1)]:.2f}x | {med[(ours, 64)] / med[(base, 64)]:.2f}x |")


if __name__ == "__main__":
    main()
