"""Shared closure heap against its anchors, side by side in one run.

    python benchmarks/heap.py [--quick]

Anchors: a local dict, pickle.dumps/loads (what per-process copies cost),
multiprocessing.Manager().dict(), multiprocessing.shared_memory + pickle,
py-lmdb, and Redis GET on 127.0.0.1 (a real redis-server started and stopped
here).  Every number is a median of repeated runs; ratios are printed
because this machine is noisy.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory

import numpy as np

import pyshm
from pyshm.procmem import smaps_rollup
from servers import Redis

HEAP = f"bench-{os.getpid()}"


# ---- helpers ------------------------------------------------------------------

def per_call(fn, reps: int, inner: int = 1) -> float:
    """Median seconds per call over `reps` batches of `inner` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def side_by_side(fns: dict, reps: int, inner: int = 1) -> dict:
    """Median seconds per call of each function, measured in alternation
    (one batch of each per round) so that a noisy stretch of the machine
    hits all of them alike."""
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt(s: float | None) -> str:
    if s is None:
        return "n/a"
    for unit, scale in (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3)):
        if s < scale * 1000:
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def ratio(anchor: float | None, ours: float) -> str:
    return "n/a" if anchor is None else f"{anchor / ours:.3g}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def records(n: int) -> dict:
    return {f"key-{i:08d}": {"id": i, "name": f"item {i}", "price": i * 0.25, "stock": i % 100}
            for i in range(n)}


def closure_of(nbytes: int, items: dict) -> dict:
    """A closure of about nbytes: records plus a numeric array filling the rest."""
    filler = max(0, nbytes - 200 * len(items)) // 8
    return {"items": items, "vectors": np.arange(filler, dtype=np.float64)}


# ---- 1. map ----------------------------------------------------------------------

def bench_map(heap, redis, lmdb_env, sizes: list[tuple[str, int]], items_1m: dict) -> None:
    rows = []
    for label, nbytes in sizes:
        n_items = min(len(items_1m), max(4, nbytes // 400))
        obj = closure_of(nbytes, {k: items_1m[k] for k in list(items_1m)[:n_items]})
        heap.put(label, obj)
        blob = pickle.dumps(obj, protocol=5)
        del obj
        reps = 200 if nbytes < 10 << 20 else 5

        def pyshm_map():
            heap.map(label).release()

        ours = per_call(pyshm_map, 50, 200)
        loads = per_call(lambda: pickle.loads(blob), reps)
        shm = shared_memory.SharedMemory(create=True, size=len(blob))
        shm.buf[:len(blob)] = blob

        def shm_loads():
            s = shared_memory.SharedMemory(name=shm.name)
            pickle.loads(s.buf)
            s.close()

        shm_t = per_call(shm_loads, reps)
        shm.close()
        shm.unlink()
        with lmdb_env.begin(write=True) as txn:
            txn.put(label.encode(), blob)

        def lmdb_loads():
            with lmdb_env.begin(buffers=True) as txn:
                pickle.loads(txn.get(label.encode()))

        lmdb_t = per_call(lmdb_loads, reps)
        redis_t = None
        if redis.client and len(blob) < 512 << 20:
            redis.client.set(label, blob)
            redis_t = per_call(lambda: pickle.loads(redis.client.get(label)), reps)
            redis.client.delete(label)
        rows.append([label, fmt(ours), fmt(loads), fmt(shm_t), fmt(lmdb_t), fmt(redis_t),
                     ratio(loads, ours), ratio(lmdb_t, ours)])
        del blob
        gc.collect()
        heap.delete(label)
    table("1. map a snapshot (median, warm): pyshm map+release vs getting a usable object elsewhere",
          ["closure", "pyshm map", "pickle.loads", "shared_memory+pickle", "lmdb get+pickle",
           "Redis GET+pickle", "pickle.loads / pyshm", "lmdb / pyshm"], rows)


# ---- 2. lookup ---------------------------------------------------------------------

def bench_lookup(heap, redis, lmdb_env, items_1m: dict, quick: bool) -> None:
    heap.put("items", items_1m)
    rnd = random.Random(1)
    keys = [f"key-{rnd.randrange(len(items_1m)):08d}" for _ in range(10_000)]
    snap = heap.map("items")
    view = snap.value

    def run(get, ks):
        def f():
            for k in ks:
                get(k)
        return f

    t = side_by_side({"ours": run(view.__getitem__, keys), "field": run(lambda k: view[k]["price"], keys),
                      "local": run(items_1m.__getitem__, keys)}, 21)
    ours, ours_field, local = (t[k] / len(keys) for k in ("ours", "field", "local"))
    few = keys[:1000]
    with lmdb_env.begin(write=True) as txn:
        for k, v in items_1m.items():
            txn.put(k.encode(), pickle.dumps(v))

    def lmdb_get(k):
        with lmdb_env.begin(buffers=True) as txn:
            return pickle.loads(txn.get(k.encode()))

    lmdb_t = per_call(run(lmdb_get, keys), 11) / len(keys)
    redis_t = None
    if redis.client:
        pipe = redis.client.pipeline(transaction=False)
        for k, v in items_1m.items():
            pipe.set(k, pickle.dumps(v))
        pipe.execute()
        redis_t = per_call(run(lambda k: pickle.loads(redis.client.get(k)), few), 5) / len(few)
        redis.client.flushall()
    with multiprocessing.Manager() as manager:
        md = manager.dict()
        md.update(items_1m if not quick else dict(list(items_1m.items())[:10000]))
        mkeys = few if not quick else [k for k in few if k in md]
        manager_t = per_call(run(md.__getitem__, mkeys), 5) / max(1, len(mkeys))
    snap.release()
    rows = [
        ["pyshm view[key]", fmt(ours), "1x"],
        ["pyshm view[key]['price']", fmt(ours_field), f"{ours_field / ours:.3g}x"],
        ["local dict", fmt(local), f"{local / ours:.3g}x"],
        ["lmdb get + pickle.loads", fmt(lmdb_t), f"{lmdb_t / ours:.3g}x"],
        ["Redis GET + pickle.loads (loopback)", fmt(redis_t), "n/a" if redis_t is None else f"{redis_t / ours:.3g}x"],
        ["multiprocessing.Manager().dict()[key]", fmt(manager_t), f"{manager_t / ours:.3g}x"],
    ]
    table(f"2. one lookup by str key in a mapped {len(items_1m):,}-key dict of small records (median)",
          ["how", "per lookup", "time / pyshm"], rows)


# ---- 3. put / get ---------------------------------------------------------------------

def bench_put_get(heap, items_1m: dict) -> None:
    blob = pickle.dumps(items_1m, protocol=5)
    t = side_by_side({"put": lambda: heap.put("items", items_1m),
                      "dumps": lambda: pickle.dumps(items_1m, protocol=5),
                      "get": lambda: heap.get("items"), "loads": lambda: pickle.loads(blob)}, 5)
    put, dumps, get, loads = t["put"], t["dumps"], t["get"], t["loads"]
    flat = np.random.default_rng(1).integers(0, 255, size=256 << 20, dtype=np.uint8)
    raw = flat.tobytes()
    dst = np.empty_like(flat)
    t = side_by_side({"np": lambda: heap.put("flat", flat), "cold": lambda: np.array(flat, copy=True),
                      "bytes": lambda: heap.put("flat", raw), "warm": lambda: np.copyto(dst, flat)}, 7)
    put_np, memcpy_cold, put_bytes, memcpy_warm = t["np"], t["cold"], t["bytes"], t["warm"]
    heap.delete("flat")
    gb = len(raw) / 1e9
    rows = [
        [f"put {len(items_1m):,}-entry dict", fmt(put), "pickle.dumps", fmt(dumps), f"{dumps / put:.3g}x"],
        [f"get (full copy-out)", fmt(get), "pickle.loads", fmt(loads), f"{loads / get:.3g}x"],
        ["put 256 MiB numpy array", f"{fmt(put_np)} ({gb / put_np:.2f} GB/s)", "memcpy into fresh pages",
         f"{fmt(memcpy_cold)} ({gb / memcpy_cold:.2f} GB/s)", f"{memcpy_cold / put_np:.3g}x"],
        ["put 256 MiB bytes", f"{fmt(put_bytes)} ({gb / put_bytes:.2f} GB/s)", "memcpy, warm pages",
         f"{fmt(memcpy_warm)} ({gb / memcpy_warm:.2f} GB/s)", f"{memcpy_warm / put_bytes:.3g}x"],
    ]
    table("3. put and get (median)", ["pyshm", "time", "anchor", "time", "anchor / pyshm"], rows)


# ---- 4. session-sized dict ---------------------------------------------------------------

def session_dict() -> dict:
    return {"user_id": 123456, "name": "Ada Lovelace", "email": "ada@example.org", "roles": ["admin", "dev"],
            "cart": [{"sku": f"sku-{i}", "qty": i % 3 + 1, "price": 9.99 + i} for i in range(45)],
            "prefs": {"theme": "dark", "lang": "en", "tz": "Europe/London"},
            "csrf": "x" * 64, "created": 1_700_000_000.0, "last_seen": 1_700_000_100.0,
            "flags": {f"f{i}": i % 2 == 0 for i in range(20)}, "history": list(range(100))}


def bench_session(heap, redis, lmdb_env) -> None:
    s = session_dict()
    blob = pickle.dumps(s, protocol=5)
    fields = ["user_id", "name", "email", "roles", "prefs", "csrf", "created", "last_seen", "flags", "cart"]

    def map_read():
        with heap.map("session") as v:
            for f in fields:
                v[f]

    def loads_read():
        d = pickle.loads(blob)
        for f in fields:
            d[f]

    heap.put("session", s)
    t = side_by_side({"put": lambda: heap.put("session", s), "read": map_read,
                      "dumps": lambda: pickle.dumps(s, protocol=5), "loads": loads_read}, 50, 200)
    put, read, dumps, loads = t["put"], t["read"], t["dumps"], t["loads"]

    def lmdb_put():
        with lmdb_env.begin(write=True) as txn:
            txn.put(b"session", pickle.dumps(s, protocol=5))

    lmdb_t = per_call(lmdb_put, 20, 50)
    redis_put = redis_read = None
    if redis.client:
        redis_put = per_call(lambda: redis.client.set("session", pickle.dumps(s, protocol=5)), 10, 100)
        redis_read = per_call(lambda: [pickle.loads(redis.client.get("session"))[f] for f in fields], 10, 100)
    rows = [
        ["put a new version", fmt(put), f"pickle.dumps {fmt(dumps)}; lmdb put {fmt(lmdb_t)}; "
                                        f"Redis SET {fmt(redis_put)}", ratio(redis_put, put)],
        ["map + read 10 fields", fmt(read), f"pickle.loads + 10 fields {fmt(loads)}; "
                                            f"Redis GET + loads {fmt(redis_read)}", ratio(redis_read, read)],
    ]
    table(f"4. a {len(blob) / 1024:.1f} KB (pickled) session-like dict (median)",
          ["operation", "pyshm", "anchors", "Redis / pyshm"], rows)


# ---- 5. memory ------------------------------------------------------------------------------

def child_main(mode: str, arg: str) -> None:
    """A process that holds the closure (mapped or unpickled) and reports."""
    if mode == "map":
        heap = pyshm.SharedHeap.attach(arg)
        snap = heap.map("big")
        view = snap.value
        view["vectors"][::512].sum()  # touch every page of the array
        n = sum(1 for _ in view["items"])
    else:
        with open(arg, "rb") as f:
            obj = pickle.load(f)
        n = len(obj["items"])
    sys.stdout.write(json.dumps({"n": n}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()


def bench_memory(heap, items_1m: dict, nbytes: int) -> None:
    obj = closure_of(nbytes, items_1m)
    heap.put("big", obj)
    with tempfile.NamedTemporaryFile(suffix=".pickle", delete=False) as f:
        pickle.dump(obj, f, protocol=5)
        path = f.name
    del obj
    gc.collect()
    results = {}
    try:
        for mode, arg in (("map", HEAP), ("pickle", path)):
            ps = [subprocess.Popen([sys.executable, __file__, "--child", mode, arg], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for _ in range(4)]
            try:
                for p in ps:
                    json.loads(p.stdout.readline())
                rollups = [smaps_rollup(p.pid) for p in ps]
                results[mode] = (sum(r["Pss"] for r in rollups), sum(r["Rss"] for r in rollups))
            finally:
                for p in ps:
                    p.stdin.close()
                    p.wait()
    finally:
        os.unlink(path)
    heap.delete("big")
    gb = 1 << 30
    rows = [["4 processes mapping it (pyshm)", f"{results['map'][0] / gb:.2f} GiB", f"{results['map'][1] / gb:.2f} GiB"],
            ["4 processes each with an unpickled copy", f"{results['pickle'][0] / gb:.2f} GiB",
             f"{results['pickle'][1] / gb:.2f} GiB"],
            ["copies / pyshm", f"{results['pickle'][0] / results['map'][0]:.3g}x", ""]]
    table(f"5. memory of a {nbytes / gb:.1f} GiB closure held by 4 processes (sum over the 4)",
          ["", "sum of Pss", "sum of Rss"], rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. 2,4")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(*args.child)
    import lmdb

    quick = args.quick
    n_items = 20_000 if quick else 1_000_000
    big = (64 << 20) if quick else (1 << 30)
    sizes = [("1 KB", 1 << 10), ("1 MB", 1 << 20), ("100 MB", 100 << 20), ("1 GB", 1 << 30)]
    if quick:
        sizes = sizes[:3]
    print(f"# pyshm heap benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"numpy {np.__version__})")
    heap = pyshm.SharedHeap.create(HEAP, size="12GiB")
    redis = Redis()
    tmp = tempfile.mkdtemp(prefix="pyshm-bench-lmdb-")
    lmdb_env = lmdb.open(tmp, map_size=8 << 30, sync=False, metasync=False, writemap=True)
    try:
        items_1m = records(n_items)
        wanted = set(args.sections.split(","))
        for section, run in (("1", lambda: bench_map(heap, redis, lmdb_env, sizes, items_1m)),
                             ("2", lambda: bench_lookup(heap, redis, lmdb_env, items_1m, quick)),
                             ("3", lambda: bench_put_get(heap, items_1m)),
                             ("4", lambda: bench_session(heap, redis, lmdb_env)),
                             ("5", lambda: bench_memory(heap, items_1m, big))):
            if section in wanted:
                run()
    finally:
        lmdb_env.close()
        shutil.rmtree(tmp)
        redis.stop()
        heap.unlink()
        heap.close()


if __name__ == "__main__":
    main()
