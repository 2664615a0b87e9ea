"""Subcommands the tests run as separately started processes."""
from __future__ import annotations

import json
import os
import random
import sys
import time

from pyshm import SharedHeap


def payload(seed: int, size: int = 200) -> dict:
    return {"seed": seed, "rows": [{"i": i, "s": f"v{seed}-{i}"} for i in range(size)]}


def ready(**info: object) -> None:
    sys.stdout.write(json.dumps({"pid": os.getpid(), **info}) + "\n")
    sys.stdout.flush()


def cmd_map(heap_name: str, closure: str) -> None:
    """Maps the closure, reports what it sees, then waits for stdin to close."""
    heap = SharedHeap.attach(heap_name)
    snap = heap.map(closure)
    view = snap.value
    ready(version=snap.version, n=len(view["rows"]), last=view["rows"][-1]["s"],
          equal=view == heap.get(closure))
    sys.stdin.read()
    snap.release()


def cmd_touch(heap_name: str, closure: str) -> None:
    """Maps a closure holding a numpy array and reads every page of it."""
    heap = SharedHeap.attach(heap_name)
    with heap.map(closure) as view:
        arr = view["data"]
        total = int(arr[:: 512].sum())   # one read per 4 KiB page of uint64
        ready(total=total, nbytes=arr.nbytes)
        sys.stdin.read()
        del arr


def cmd_hold(heap_name: str, closure: str) -> None:
    """Pins the closure's current version and waits to be killed."""
    heap = SharedHeap.attach(heap_name)
    snap = heap.map(closure)
    ready(version=snap.version)
    sys.stdin.read()
    time.sleep(3600)


def cmd_fault(heap_name: str, point: str, closure: str, seed: str) -> None:
    """Runs the operation that passes through `point` with the fault armed."""
    heap = SharedHeap.attach(heap_name)
    if point in ("pin", "unpin"):
        snap = heap.map(closure)
        heap._set_fault(point)
        if point == "pin":
            heap.map(closure)
        snap.release()
    else:
        heap._set_fault(point)
        heap.put(closure, payload(int(seed)))
    ready(survived=True)


def cmd_churn(heap_name: str, seed: str) -> None:
    """Random puts, maps, releases and deletes until killed."""
    rnd = random.Random(int(seed))
    heap = SharedHeap.attach(heap_name)
    held = []
    ready()
    while True:
        name = f"c{rnd.randrange(4)}"
        op = rnd.random()
        try:
            if op < 0.3:
                heap.put(name, payload(rnd.randrange(1000), rnd.choice([5, 50, 500])))
            elif op < 0.5:  # frees of big versions hold the lock longest
                heap.put(name, {"blob": bytes(2 << 20)})
            elif op < 0.8 and len(held) < 20:
                held.append(heap.map(name))
            elif op < 0.95 and held:
                held.pop(rnd.randrange(len(held))).release()
            else:
                heap.delete(name)
        except KeyError:
            pass


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
