"""The session table in shared memory: entries, limits, churn, torn reads
across processes, and SIGKILL of a writer at every fault point and at random."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyshm.errors import SessionTableFull
from pyshm.sessions import SessionKind, SessionTable, state_closure

WORKER = Path(__file__).resolve().parent / "session_worker.py"


@pytest.fixture
def table(heap_name):
    t = SessionTable.create(heap_name, capacity=1024)
    yield t
    t.unlink()
    t.close()


def test_open_get_update_end(table, heap_name):
    s = table.open(SessionKind.DISTRIBUTED, suite=1, worker=2, worker_gen=5, ttl=60, closure="session/abc")
    other = SessionTable.attach(heap_name)          # what another process sees
    got = other.get(s.id)
    assert (got.kind, got.suite, got.worker, got.worker_gen, got.closure) == (SessionKind.DISTRIBUTED, 1, 2, 5,
                                                                           "session/abc")
    assert got.expires == pytest.approx(s.created + 60)
    table.bind(s.id, worker=4, gen=6)
    assert other.get(s.id).worker == 4 and other.bound_to(4) == [s.id]
    assert table.touch(s.id, ttl=1, now=1000.0) and table.expired(now=1000.5) == [] and \
        table.expired(now=1002.0) == [s.id]
    assert table.end(s.id) and other.get(s.id) is None and not table.end(s.id)
    assert len(s.id) == 16 and len({table.open(SessionKind.REQUEST).id for _ in range(100)}) == 100
    other.close()


def fields(s):
    """An entry's fields, by name."""
    return dict(vars(s))


def test_each_field_writer_changes_only_its_fields(table, heap_name):
    s = table.open(SessionKind.REQUEST, suite=3, worker=2, worker_gen=5, ttl=60, now=1000.0)
    other = SessionTable.attach(heap_name)          # another process's handle
    before = fields(other.get(s.id))

    def changed(**want):
        nonlocal before
        after = fields(other.get(s.id))
        assert {k: v for k, v in after.items() if before[k] != v} == want
        before = after

    assert table.bind(s.id, worker=7, gen=9)
    changed(worker=7, worker_gen=9)
    assert table.cluster(s.id, owner_node=4, secondary_node=6, repl_seq=11)
    changed(owner_node=4, secondary_node=6, repl_seq=11)
    name = state_closure(s.id)
    assert name == f"session/{s.id.hex()}"
    assert table.saved(s.id, name, 1, touch=False)                  # a checkpoint: times as they were
    changed(closure=name, closure_version=1)
    assert table.saved(s.id, name, 2, ttl=30)
    after = other.get(s.id)
    changed(closure_version=2, last_access=after.last_access, expires=after.last_access + 30)
    assert table.touch(s.id, ttl=5, now=2000.0)
    changed(last_access=2000.0, expires=2005.0)
    assert table.bind(s.id, worker=-1, gen=0)
    changed(worker=-1, worker_gen=0)
    assert other.get(s.id).kind == SessionKind.REQUEST and other.get(s.id).suite == 3
    table.check()
    assert table.end(s.id)
    gone = (table.bind(s.id, 1, 1), table.cluster(s.id, 1, 1, 1), table.saved(s.id, name, 3),
            table.saved(s.id, name, 3, touch=False), table.touch(s.id))
    assert gone == (False,) * 5
    with pytest.raises(ValueError, match="longer than 47"):
        table.saved(table.open(SessionKind.REQUEST).id, "x" * 48, 1)
    assert not hasattr(table, "put")                 # no whole-entry writer: the last one would win
    other.close()


@pytest.mark.parametrize("first, second", [("bind", "cluster"), ("cluster", "saved"), ("saved", "bind")])
def test_writers_in_two_processes_keep_each_others_fields(table, heap_name, first, second):
    """Two processes write different fields of one entry as fast as they
    can: neither ever finds its fields undone by the other (a writer that
    read the entry and wrote all of it back would), and each one's last
    value is there at the end."""
    sid = table.open(SessionKind.DISTRIBUTED).id
    procs = [subprocess.Popen([sys.executable, str(WORKER), "hammer", heap_name, sid.hex(), writer, "20000"],
                              stdout=subprocess.PIPE, text=True) for writer in (first, second)]
    lost = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and lost == ["0", "0"]
    s = table.get(sid)
    last = {"bind": (s.worker, s.worker_gen), "cluster": (s.owner_node, s.secondary_node, s.repl_seq),
            "saved": (s.closure, s.closure_version)}
    want = {"bind": (20000, 20000), "cluster": (20000, 20000, 20000), "saved": ("c20000", 20000)}
    assert last[first] == want[first] and last[second] == want[second]
    table.check()


@pytest.mark.parametrize("writer", ["bind", "saved", "cluster"])
def test_writer_killed_inside_each_field_writer_leaves_the_table_consistent(table, heap_name, writer):
    sid = table.open(SessionKind.DISTRIBUTED, worker=1, worker_gen=1).id
    p = subprocess.run([sys.executable, str(WORKER), "hammer", heap_name, sid.hex(), writer, "1", "update"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    table.check()                      # repairs on taking the lock the dead writer held
    assert table.stats().repairs == 1
    assert table.bind(sid, 2, 3) and table.cluster(sid, 1, 2, 3) and table.saved(sid, state_closure(sid), 4)
    s = table.get(sid)
    assert (s.worker, s.worker_gen, s.owner_node, s.repl_seq, s.closure_version) == (2, 3, 1, 3, 4)


def test_full_table_is_a_clear_error(heap_name):
    t = SessionTable.create(heap_name, capacity=8)
    try:
        ids = [t.open(SessionKind.REQUEST).id for _ in range(8)]
        with pytest.raises(SessionTableFull, match="is full"):
            t.open(SessionKind.REQUEST)
        t.end(ids[0])
        t.open(SessionKind.REQUEST)                  # room again
        t.check()
    finally:
        t.unlink()
        t.close()


def test_churn_of_10000_sessions_leaves_nothing_behind(table):
    before = table.stats()
    live = []
    rnd = random.Random(3)
    for i in range(10_000):
        live.append(table.open(SessionKind(rnd.choice([1, 2])), suite=i).id)
        if len(live) > 500:
            assert table.end(live.pop(rnd.randrange(len(live))))
    for sid in live:
        table.end(sid)
    table.check()
    after = table.stats()
    assert after.active == before.active == 0
    assert after.tombstones <= after.capacity // 2 + 1     # rehashed away as they piled up


def test_readers_never_see_a_torn_entry(table, heap_name):
    writer = subprocess.Popen([sys.executable, str(WORKER), "churn", heap_name, "1"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        r = subprocess.run([sys.executable, str(WORKER), "read", heap_name, "2"], capture_output=True, text=True,
                           timeout=60, check=True)
        reads, torn = map(int, r.stdout.split())
        assert reads > 1000 and torn == 0
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    table.check()


@pytest.mark.parametrize("point", ["create", "update", "end"])
def test_writer_killed_inside_an_update_leaves_the_table_consistent(table, heap_name, point):
    p = subprocess.run([sys.executable, str(WORKER), "churn", heap_name, "2", point], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    table.check()                      # repairs on taking the lock the dead writer held
    assert table.stats().repairs == 1
    s = table.open(SessionKind.REQUEST)
    assert table.get(s.id) is not None


def test_writers_killed_at_random_leave_the_table_consistent(table, heap_name):
    for seed in range(25):
        p = subprocess.Popen([sys.executable, str(WORKER), "churn", heap_name, str(seed)], stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(random.Random(seed).uniform(0.01, 0.15))
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close()
        table.check()
    for sid in table.ids():
        table.end(sid)
    assert table.stats().active == 0
    table.check()
