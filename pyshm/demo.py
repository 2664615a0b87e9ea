"""`pyshm demo`: put a large catalog once, map it from worker processes
started separately, and show what each sees and what memory it costs."""
from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from pyshm.heap import SharedHeap
from pyshm.procmem import pss, rss
from pyshm.sizes import format_size


def make_catalog(n: int) -> dict:
    return {
        "meta": {"name": "demo shop", "items": n},
        "items": {f"sku-{i:07d}": {"id": i, "name": f"product {i}", "price": round(1 + i % 997 * 0.25, 2),
                                    "tags": ["demo", "even" if i % 2 == 0 else "odd"]}
                  for i in range(n)},
    }


@dataclass
class WorkerReport:
    pid: int
    map_us: float
    lookup_ns: float
    touched: int
    rss: int = 0
    pss: int = 0


def worker(heap_name: str, closure: str) -> int:
    """Runs in each worker process: map, look up, touch everything, report,
    then stay alive until the parent closes stdin."""
    heap = SharedHeap.attach(heap_name)
    times = []
    for _ in range(1000):
        t0 = time.perf_counter()
        snap = heap.map(closure)
        times.append(time.perf_counter() - t0)
        snap.release()
    with heap.map(closure) as view:
        items = view["items"]
        n = view["meta"]["items"]
        keys = [f"sku-{(i * 7919) % n:07d}" for i in range(100_000)]
        t0 = time.perf_counter()
        for k in keys:
            items[k]
        lookup = (time.perf_counter() - t0) / len(keys)
        touched = sum(1 for rec in items.values() if rec["price"] > 0)
        report = {"pid": os.getpid(), "map_us": statistics.median(times) * 1e6,
                  "lookup_ns": lookup * 1e9, "touched": touched}
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
        sys.stdin.read()
    return 0


def run(items: int = 1_000_000, workers: int = 4) -> int:
    name = f"demo-{os.getpid()}"
    heap = SharedHeap.create(name, size="8GiB")
    procs: list[subprocess.Popen] = []
    try:
        catalog = make_catalog(items)
        t0 = time.perf_counter()
        version = heap.put("catalog", catalog)
        put_s = time.perf_counter() - t0
        nbytes = next(b for n, _, b in heap.versions() if n == "catalog")
        t0 = time.perf_counter()
        blob = pickle.dumps(catalog, protocol=pickle.HIGHEST_PROTOCOL)
        dumps_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pickle.loads(blob)
        loads_s = time.perf_counter() - t0
        del catalog
        _say(f"put catalog v{version}: {items:,} items, {format_size(nbytes)} in shared memory, "
             f"{put_s:.2f} s (pickle.dumps {dumps_s:.2f} s, pickle.loads {loads_s:.2f} s "
             f"per private copy)")
        cmd = [sys.executable, "-m", "pyshm.cli", "demo-worker", name, "catalog"]
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
        reports = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"demo worker {p.pid} exited with {p.wait()}")
            r = WorkerReport(**json.loads(line))
            r.rss, r.pss = rss(r.pid), pss(r.pid)
            reports.append(r)
        _say(f"{'worker pid':>10} {'map (median)':>13} {'lookup':>9} {'items read':>11} "
             f"{'RSS':>10} {'PSS':>10}")
        for r in reports:
            _say(f"{r.pid:>10} {r.map_us:>10.2f} µs {r.lookup_ns:>6.0f} ns {r.touched:>11,} "
                 f"{format_size(r.rss):>10} {format_size(r.pss):>10}")
        total_rss = sum(r.rss for r in reports)
        total_pss = sum(r.pss for r in reports)
        _say(f"{workers} workers each see all {format_size(nbytes)} (RSS sum {format_size(total_rss)}) "
             f"but together cost {format_size(total_pss)} (PSS sum): the closure is in memory once.")
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        heap.unlink()
        heap.close()
    return 0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
