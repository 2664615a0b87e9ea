"""The network-namespace helpers of tests/netns.py: a LAN of namespaces
joined by a bridge, multicast (python-zeroconf) across it, avahi inside a
namespace, and cleanup that leaves nothing behind."""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

from netns import Avahi, Lan, lan, make_lan, parse_browse, pids_in, remove_lan, remove_leftovers


PREFIX = "pyshmt"


@pytest.fixture(autouse=True, scope="module")
def _leftovers():
    remove_leftovers(PREFIX)       # what a killed earlier run left
    yield


def ns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(" ".join(line.split()[:2]) for line in out.splitlines())


def readline(p: subprocess.Popen, timeout: float) -> str:
    """One line of p's (binary) stdout, or TimeoutError."""
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no line from {p.args} in {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError(f"{p.args} exited ({p.wait()}) before a line (got {buf!r})")
        buf += chunk
    return buf.decode()


@pytest.fixture
def net():
    """A 3-member LAN; the processes a test starts in it (net.procs) are
    killed by remove_lan and then waited on."""
    before = root_links()
    with lan(3, PREFIX) as n:
        n.procs = []
        try:
            yield n
        finally:
            remove_lan(n)
            for p in n.procs:
                p.wait(10)
                if p.stdout:
                    p.stdout.close()
    assert not set(n.namespaces) & ns_list()
    assert root_links() == before


def start(member, argv: list[str], procs: list) -> subprocess.Popen:
    p = member.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    procs.append(p)
    return p


LISTENER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7000))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode())
    c.close()
"""

CONNECT = """
import socket, sys
for ip in sys.argv[1:]:
    with socket.create_connection((ip, 7000), timeout=3) as c:
        print(ip, c.recv(100).decode())
"""


@pytest.mark.timeout(120)
def test_lan_members_reach_each_other_and_removal_leaves_nothing():
    before_links, before_ns = root_links(), ns_list()
    t0 = time.monotonic()
    n = make_lan(3, PREFIX)
    procs = []
    try:
        assert time.monotonic() - t0 < 10
        assert len(n.members) == 3 and len({m.ip for m in n.members}) == 3
        assert set(n.namespaces) <= ns_list()
        assert root_links() == before_links, "make_lan added links to the root namespace"
        for m in n.members:
            addrs = m.check_output(["ip", "-br", "-4", "addr", "show", "dev", m.veth])
            assert f"{m.ip}/24" in addrs
            assert m.check_output(["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).strip() == "1"
            assert "UP" in m.check_output(["ip", "-br", "link", "show", "dev", "lo"])
        for m in n.members:
            p = start(m, [sys.executable, "-c", LISTENER, m.ip, m.ns], procs)
            assert readline(p, 10) == "ready\n"
        for m in n.members:
            others = [o for o in n.members if o is not m]
            out = m.check_output([sys.executable, "-c", CONNECT, *[o.ip for o in others]])
            assert out.splitlines() == [f"{o.ip} {o.ns}" for o in others]
    finally:
        remove_lan(n)
        for p in procs:
            p.wait(10)
            p.stdout.close()
    assert all(p.returncode == -9 for p in procs)
    assert not set(n.namespaces) & ns_list()
    mine = f"{PREFIX}-{os.getpid()}-"       # (other runs may be making namespaces concurrently)
    assert {ns for ns in ns_list() - before_ns if ns.startswith(mine)} == set()
    assert root_links() == before_links
    remove_lan(n)                   # idempotent


PUBLISH = """
import socket, sys
from zeroconf import IPVersion, ServiceInfo, Zeroconf
ip, name = sys.argv[1], sys.argv[2]
txt = dict(kv.split("=", 1) for kv in sys.argv[3:])
zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
info = ServiceInfo("_pyshm._tcp.local.", f"{name}._pyshm._tcp.local.", port=7400,
                   addresses=[socket.inet_aton(ip)], properties=txt, server=f"{name}.local.")
zc.register_service(info, cooperating_responders=True)
print("registered", flush=True)
sys.stdin.read()
"""

BROWSE = """
import json, sys, threading
from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf
ip, want, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
names, found = [], threading.Event()
def changed(zeroconf, service_type, name, state_change):
    if state_change is ServiceStateChange.Added:
        names.append(name)
        if name == want:
            found.set()
browser = ServiceBrowser(zc, "_pyshm._tcp.local.", handlers=[changed])
info = zc.get_service_info("_pyshm._tcp.local.", want, 3000) if found.wait(timeout) else None
print(json.dumps({"names": names, "addresses": info.parsed_addresses() if info else [],
                  "port": info.port if info else None,
                  "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
                         if info else {}}))
browser.cancel()
zc.close()
"""


def publish(member, name: str, procs: list, **txt: str) -> subprocess.Popen:
    p = member.run([sys.executable, "-c", PUBLISH, member.ip, name, *[f"{k}={v}" for k, v in txt.items()]],
                   stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    procs.append(p)
    assert readline(p, 20) == "registered\n"
    return p


@pytest.mark.timeout(120)
def test_zeroconf_multicast_across_the_bridge(net: Lan):
    a, b, _ = net.members
    publish(a, "node-a", net.procs, cluster="x", node="a")
    t0 = time.monotonic()
    out = b.check_output([sys.executable, "-c", BROWSE, b.ip, "node-a._pyshm._tcp.local.", "10"],
                         timeout=30)
    took = time.monotonic() - t0
    got = json.loads(out)
    assert got["names"] == ["node-a._pyshm._tcp.local."]
    assert got["addresses"] == [a.ip]
    assert got["port"] == 7400
    assert got["txt"] == {"cluster": "x", "node": "a"}
    assert took < 10


@pytest.mark.timeout(120)
def test_avahi_in_a_namespace_sees_a_zeroconf_service(net: Lan, tmp_path):
    a, _, c = net.members
    av = Avahi(c, tmp_path / "avahi")
    try:
        t0 = time.monotonic()
        av.start()
        started = time.monotonic() - t0
        assert av.browse() == []
        publish(a, "node-a", net.procs, cluster="x", node="a")
        t0 = time.monotonic()
        found = av.browse(min_count=1, timeout=15)
        took = time.monotonic() - t0
        assert found == [{"interface": c.veth, "protocol": "IPv4", "name": "node-a", "type": "_pyshm._tcp",
                          "domain": "local", "host": "node-a.local", "address": a.ip, "port": 7400,
                          "txt": {"cluster": "x", "node": "a"}}]
        assert started < 10 and took < 15
        pids = [av.avahi.pid, av.dbus.pid]
        assert set(pids) <= set(pids_in([c.ns]))
    finally:
        av.stop()
    assert av.avahi.returncode is not None and av.dbus.returncode is not None
    assert not set(pids) & set(pids_in([c.ns]))
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), "avahi or dbus left defunct"
    av.stop()                       # idempotent


@pytest.mark.timeout(120)
def test_remove_lan_kills_what_runs_inside_and_deletes_the_namespaces():
    before_links = root_links()
    n = make_lan(2, PREFIX)
    try:
        m = n.members[1]
        child = m.run(["sleep", "1000"])
        # an orphan that is not our child: sh exits, its sleep lives on
        orphan = int(m.check_output(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]))
        assert {child.pid, orphan} <= set(pids_in([m.ns]))
        assert pids_in([n.members[0].ns]) == []
    finally:
        remove_lan(n)
    assert child.wait(10) == -9
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
        with open(f"/proc/{orphan}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert pids_in(n.namespaces) == []
    assert not set(n.namespaces) & ns_list()
    assert root_links() == before_links


@pytest.mark.timeout(120)
def test_remove_leftovers_removes_only_dead_runs_namespaces():
    dead = subprocess.Popen(["true"])
    dead.wait()                     # a pid that no longer runs: "a killed earlier run"
    # A prefix of this run's own, so that concurrent runs neither see nor take
    # these namespaces (and a later run's remove_leftovers(PREFIX) would).
    prefix = f"{PREFIX}-{os.getpid()}-x"
    stale = f"{prefix}-{dead.pid}-0-m0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    p = None
    try:
        p = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "1000"], start_new_session=True)
        with lan(1, prefix) as live:
            assert remove_leftovers(prefix) == [stale]
            assert p.wait(10) == -9
            assert stale not in ns_list()
            assert set(live.namespaces) <= ns_list()
            assert remove_leftovers(prefix) == []
        assert not set(live.namespaces) & ns_list()
    finally:
        if stale in ns_list():
            remove_lan(Lan(hub=stale, members=[]))
        if p is not None:
            p.wait(10)


def test_parse_browse():
    out = ("+;lan0;IPv4;node-a;_pyshm._tcp;local\n"
           '=;lan0;IPv4;node\\032a\\.b;_pyshm._tcp;local;h.local;10.77.0.10;7400;'
           '"q=a \\"b\\" ;c" "flag" "node=a"\n')
    assert parse_browse(out) == [{"interface": "lan0", "protocol": "IPv4", "name": "node a.b",
                                  "type": "_pyshm._tcp", "domain": "local", "host": "h.local",
                                  "address": "10.77.0.10", "port": 7400,
                                  "txt": {"q": 'a "b" ;c', "flag": "", "node": "a"}}]
