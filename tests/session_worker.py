"""Subprocess for the session table tests.

    session_worker.py churn INSTANCE SEED [FAULT]   writes at random; prints "ready"
    session_worker.py read INSTANCE SECONDS         reads at random; prints torn reads found
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
        elif op < 0.75:
            sid = rnd.choice(live)
            s = t.get(sid)
            if s is not None:
                k = rnd.randrange(1 << 20)
                s.suite = s.worker = s.worker_gen = k   # always equal: a reader checks it
                t.put(s)
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
            elif not (s.suite == s.worker == s.worker_gen):
                torn += 1
    print(f"{reads} {torn}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "churn":
        churn(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        read(sys.argv[2], float(sys.argv[3]))
