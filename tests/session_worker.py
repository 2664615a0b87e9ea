"""Subprocess for the session table tests.

    session_worker.py churn INSTANCE SEED [FAULT]   writes at random; prints "ready"
    session_worker.py read INSTANCE SECONDS         reads at random; prints torn reads found
    session_worker.py hammer INSTANCE SID WRITER N [FAULT]
                                                    one field writer (bind, saved, cluster), values 1..N
"""
from __future__ import annotations

import random
import sys
import time

from pyshm.sessions import SessionKind, SessionTable


def churn(instance: str, seed: int, fault: str | None) -> None:
    t = SessionTable.attach(instance)
    rnd = random.Random(seed)
    live = []
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        if fault and n == 50:
            t._set_fault(fault)          # SIGKILLs itself inside the next write of that kind
        op = rnd.random()
        if op < 0.45 or not live:
            try:
                k = rnd.randrange(1 << 20)
                s = t.open(SessionKind.REQUEST, suite=k, worker=k, worker_gen=k)
                live.append(s.id)
            except Exception:
                pass
        elif op < 0.75:              # each field writer keeps its fields equal: a reader checks it
            sid = rnd.choice(live)
            k = rnd.randrange(1, 1 << 20)
            writer = rnd.randrange(4)
            if writer == 0:
                t.bind(sid, k, k)
            elif writer == 1:
                t.saved(sid, f"c{k}", k, rnd.choice([0, 60]), touch=rnd.random() < 0.5)
            elif writer == 2:
                t.cluster(sid, k, k, k)
            else:
                t.touch(sid, 60)
        else:
            t.end(live.pop(rnd.randrange(len(live))))


def read(instance: str, seconds: float) -> None:
    t = SessionTable.attach(instance)
    ids = []
    torn = reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(ids) < 64:
            ids = t.ids(256)
        for sid in list(ids):
            s = t.get(sid)
            reads += 1
            if s is None:
                ids.remove(sid)
            elif not (s.worker == s.worker_gen and s.owner_node == s.secondary_node == s.repl_seq
                      and s.closure == (f"c{s.closure_version}" if s.closure_version else "")
                      and s.expires in (0.0, s.last_access + 60)):
                torn += 1
    print(f"{reads} {torn}", flush=True)


def hammer(instance: str, sid: bytes, writer: str, n: int, fault: str | None) -> None:
    t = SessionTable.attach(instance)
    if fault:
        t._set_fault(fault)              # SIGKILLs itself inside the first write
    write = {"bind": lambda k: t.bind(sid, k, k), "saved": lambda k: t.saved(sid, f"c{k}", k, touch=False),
             "cluster": lambda k: t.cluster(sid, k, k, k)}[writer]
    mine = {"bind": lambda s: (s.worker, s.worker_gen), "saved": lambda s: (s.closure, s.closure_version),
            "cluster": lambda s: (s.owner_node, s.secondary_node, s.repl_seq)}[writer]
    lost = 0
    for k in range(1, n + 1):
        assert write(k)
        # Only this process writes these fields: another writer that undid
        # them (wrote back what it had read before) shows as an older value.
        lost += mine(t.get(sid)) != mine_of(writer, k)
    print(lost, flush=True)


def mine_of(writer: str, k: int) -> tuple:
    """What `hammer` writes as value k."""
    return {"bind": (k, k), "saved": (f"c{k}", k), "cluster": (k, k, k)}[writer]


if __name__ == "__main__":
    if sys.argv[1] == "churn":
        churn(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif sys.argv[1] == "hammer":
        hammer(sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
               sys.argv[6] if len(sys.argv) > 6 else None)
    else:
        read(sys.argv[2], float(sys.argv[3]))
