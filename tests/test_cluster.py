"""A LAN cluster on 127.0.0.1 (issue 11): static peers, the authenticated
link, forwarding by session owner, and a node's death.  Every node is a real
`pyshm serve`; every client a real HTTP client."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cluster_util import Node, secret_file
from server_util import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nodes(tmp_path):
    """nodes(["a", "b"], ...) starts nodes that list each other as static
    peers; every node started is stopped by pid at the end."""
    started: list[Node] = []
    key = secret_file(tmp_path / "cluster.key")

    def start(names: list[str], *, cluster: str = "shop", key_file=None, peers: dict[str, int] | None = None,
              link: int = 0, **kw) -> dict[str, Node]:
        links = {n: link or free_port() for n in names}
        out = {}
        for n in names:
            others = [p for m, p in links.items() if m != n] + list((peers or {}).values())
            out[n] = Node(tmp_path, n, cluster=cluster, secret_file=key_file or key, link=links[n], peers=others,
                          **kw)
            started.append(out[n])
        for node in out.values():
            node.wait_listening()
        return out

    start.key = key
    start.tmp = tmp_path
    yield start
    for node in started:
        node.stop()


def test_three_nodes_with_static_peers_list_each_other_alive(nodes):
    ns = nodes(["a", "b", "c"])
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    def measured() -> dict | None:
        st = ns["a"].status()["cluster"]
        return st if all(p["rtt_ms"] for p in st["peers"]) else None

    st = wait_for(measured, "round trips measured")
    assert st["name"] == "shop" and st["node"] == "a" and st["link"].endswith(f":{ns['a'].link}")
    assert all(0 < p["rtt_ms"] < 1000 and p["last_heartbeat"] < 5 for p in st["peers"])
    # One link per pair, and it stays: nobody dials on once linked (both
    # ends may dial at the start: at most two links opened per pair).
    opened = {n: {p["node"]: p["links_opened"] for p in node.status()["cluster"]["peers"]} for n, node in ns.items()}
    assert all(1 <= count <= 2 for peers in opened.values() for count in peers.values()), opened
    time.sleep(2)
    assert opened == {n: {p["node"]: p["links_opened"] for p in node.status()["cluster"]["peers"]}
                      for n, node in ns.items()}
    secret = nodes.key.read_bytes().decode()
    for node in ns.values():             # the secret is in no status and no log line
        assert secret not in json.dumps(node.status()) and secret not in node.log()


def test_wrong_secret_and_other_cluster_are_refused(nodes):
    a = nodes(["a"])["a"]
    wrong = secret_file(nodes.tmp / "wrong.key", b"W" * 40)
    x = nodes(["x"], key_file=wrong, peers={"a": a.link})["x"]
    y = nodes(["y"], cluster="other", peers={"a": a.link})["y"]
    wait_for(lambda: "does not hold this cluster's secret" in a.log() + x.log(), "a refusal for the wrong secret")
    wait_for(lambda: "belongs to cluster" in a.log() + y.log(), "a refusal for the other cluster")
    time.sleep(1.0)     # (several dial attempts later)
    assert a.peers() == {} and x.peers() == {} and y.peers() == {}


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_garbage_and_half_open_handshakes_are_dropped(nodes):
    ns = nodes(["a", "b"])
    ns["a"].wait_peers({"b": "alive"})
    garbage = socket.create_connection(("127.0.0.1", ns["a"].link))
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    silent = socket.create_connection(("127.0.0.1", ns["a"].link))      # says nothing after a's hello
    half = socket.create_connection(("127.0.0.1", ns["a"].link))        # sends half a frame
    half.sendall(b"\x00\x00\x01")
    assert _closed_within(garbage, 5) and _closed_within(silent, 5) and _closed_within(half, 5)
    for s in (garbage, silent, half):
        s.close()
    assert ns["a"].peers() == {"b": "alive"} and ns["b"].peers() == {"a": "alive"}
    assert httpx.get(ns["a"].url + "/").status_code == 200


def test_a_session_made_on_a_is_served_by_a_wherever_it_lands(nodes):
    ns = nodes(["a", "b", "c"])
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    with httpx.Client() as client:
        assert client.get(ns["a"].url + "/").text == "1 a"
        assert client.get(ns["b"].url + "/").text == "2 a"       # forwarded to the owner, state continues
        assert client.get(ns["c"].url + "/").text == "3 a"
        assert client.get(ns["b"].url + "/").text == "4 a"
        body = client.post(ns["c"].url + "/", content=b"x" * 300_000).text     # a large request forwarded
        assert body == "5 a"
    sa, sb, sc = (ns[n].status()["cluster"] for n in "abc")
    assert sa["forwarded_in"] == 4 and sb["forwarded_out"] == 2 and sc["forwarded_out"] == 2
    assert {p["node"]: p["forwarded_in"] for p in sa["peers"]} == {"b": 2, "c": 2}
    # Fresh sessions start where the client lands; a cookie signed with another secret starts afresh.
    with httpx.Client() as client:
        assert client.get(ns["b"].url + "/").text == "1 b"
        assert client.get(ns["c"].url + "/").text == "2 b"
    from pyshm.session_cookie import CookieSigner

    forged = CookieSigner(b"not the cluster's secret" * 2).sign(bytes(16), owner=0x1234)
    r = httpx.get(ns["c"].url + "/", cookies={"pyshm_session": forged})
    assert r.text == "1 c"


def test_owner_killed_mid_request_is_an_error_not_a_hang(nodes):
    ns = nodes(["a", "b"])
    ns["b"].wait_peers({"a": "alive"})
    with httpx.Client(timeout=30) as client:
        assert client.get(ns["a"].url + "/").text == "1 a"
        result: dict = {}

        def slow() -> None:
            t0 = time.monotonic()
            result["r"] = client.get(ns["b"].url + "/sleep?20")       # forwarded to a, which sleeps
            result["took"] = time.monotonic() - t0

        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: ns["a"].status()["cluster"]["forwarded_in"] == 1, "the request forwarded to a")
        killed = time.monotonic()
        ns["a"].kill()
        t.join(15)
        assert not t.is_alive(), "the client hangs"
        assert result["r"].status_code == 502 and b"node a died" in result["r"].content
        assert time.monotonic() - killed < 10
        ns["b"].wait_peers({"a": "dead"}, timeout=5)
        # The session is lost with its owner: the client starts a fresh one at b, and b says so.
        assert client.get(ns["b"].url + "/").text == "1 b"
    assert "is lost (that node is gone)" in ns["b"].log()


def test_drain_hands_sessions_to_peers(nodes):
    ns = nodes(["a", "b", "c"])
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    clients = [httpx.Client() for _ in range(12)]
    try:
        for c in clients:
            assert c.get(ns["a"].url + "/").text == "1 a"
            assert c.get(ns["a"].url + "/").text == "2 a"
        out = subprocess.run([sys.executable, "-m", "pyshm.cli", "drain", ns["a"].name], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "drains" in out.stdout
        assert ns["a"].server.proc.wait(30) == 0    # it handed its sessions over, then exited
        owners = set()
        for i, c in enumerate(clients):
            body = c.get(ns["bc"[i % 2]].url + "/").text
            visits, owner = body.split()
            assert visits == "3" and owner in ("b", "c"), body
            owners.add(owner)
            assert c.get(ns["bc"[(i + 1) % 2]].url + "/").text == f"4 {owner}"    # its new owner, from anywhere
            assert f"{owner_number(owner):08x}" in c.cookies["pyshm_session"]        # the cookie names it now
        assert owners == {"b", "c"}             # (rendezvous hashing spread them)
    finally:
        for c in clients:
            c.close()
    assert "handed 12 of 12 sessions" in ns["a"].log()


def owner_number(node: str) -> int:
    from pyshm.cluster.node import node_number

    return node_number(node)


class SessionLoad:
    """Clients with sessions, each sending requests to the nodes in the
    rotation in turn and checking that its visit count goes up by exactly
    one every time: a failed request or a lost session update is an error."""

    def __init__(self, urls: dict[str, str], clients: int) -> None:
        self.rotation = dict(urls)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.served = 0
        self.owners: dict[int, str] = {}
        self.busy: dict[str, int] = {}      # requests on their way to each node
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> SessionLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client hangs"

    def out_of_rotation(self, node: str) -> None:
        """As a load balancer takes a node out: no new request goes to it,
        and the ones on their way are answered before it is stopped."""
        with self.lock:
            del self.rotation[node]
        wait_for(lambda: not self.busy.get(node), f"requests to {node} answered")

    def into_rotation(self, node: str, url: str) -> None:
        with self.lock:
            self.rotation[node] = url

    def _client(self, i: int) -> None:
        visits, turn = 0, i
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                with self.lock:
                    names = sorted(self.rotation)
                    name = names[turn % len(names)]
                    url = self.rotation[name]
                    self.busy[name] = self.busy.get(name, 0) + 1
                turn += 1
                try:
                    r = client.get(url + "/")
                except httpx.HTTPError as e:
                    self.errors.append(f"client {i}: {type(e).__name__}: {e}")
                    return
                finally:
                    with self.lock:
                        self.busy[name] -= 1
                got, owner = r.text.split() if r.status_code == 200 else ("-", "-")
                if r.status_code != 200 or int(got) != visits + 1:
                    self.errors.append(f"client {i}: after {visits} visits got {r.status_code} {r.text!r}")
                    return
                visits += 1
                self.owners[i] = owner
                with self.lock:
                    self.served += 1

    def wait_served(self, more: int) -> None:
        target = self.served + more
        wait_for(lambda: self.served >= target or self.errors, "requests served")
        assert not self.errors, self.errors


def test_drain_and_rolling_restart_under_load_lose_nothing(nodes):
    ns = nodes(["a", "b", "c"])
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    links = {name: node.link for name, node in ns.items()}
    with SessionLoad({n: node.url for n, node in ns.items()}, clients=9) as load:
        load.wait_served(100)
        for name in ["a", "b", "c", "a"]:        # every node once, then a again
            load.out_of_rotation(name)
            assert ns[name].stop() == 0
            load.wait_served(50)                 # the others serve every session meanwhile
            assert name not in load.owners.values()
            ns[name] = nodes([name], peers={m: links[m] for m in links if m != name}, link=links[name],
                             http=ns[name].http)[name]
            for other in ns:
                ns[other].wait_peers({m: "alive" for m in ns if m != other})
            load.into_rotation(name, ns[name].url)
            load.wait_served(50)
    assert not load.errors, load.errors


def test_cluster_configuration_errors_name_the_fix(tmp_path):
    from pyshm import config
    from pyshm.errors import ConfigError

    base = {"suites": {"main": {"app": "wsgi_apps:node_counter"}},
            "listen": [{"frontend": "http", "address": "127.0.0.1:8000", "suite": "main"}]}
    interfaces = {"http": "wsgi"}

    def load(cluster: dict, env: dict | None = None):
        return config.from_dict({**base, "cluster": cluster}, interfaces, env=env or {})

    with pytest.raises(ConfigError, match="a cluster needs a secret: put at least 32 random bytes"):
        load({"name": "shop"})
    with pytest.raises(ConfigError, match="PYSHM_CLUSTER_SECRET is 5 bytes, too short"):
        load({"name": "shop"}, {"PYSHM_CLUSTER_SECRET": "short"})
    short = secret_file(tmp_path / "short.key", b"x" * 31)
    with pytest.raises(ConfigError, match=f"cluster.secret_file {short} is 31 bytes"):
        load({"name": "shop", "secret_file": str(short)})
    with pytest.raises(ConfigError, match="cannot read cluster.secret_file"):
        load({"name": "shop", "secret_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="cluster.node must be 1 to 40 ASCII letters"):
        load({"name": "shop", "node": "a.b"}, {"PYSHM_CLUSTER_SECRET": "s" * 32})
    with pytest.raises(ConfigError, match=r"cluster.interfaces\[0\] must be an IPv4 address"):
        load({"name": "shop", "interfaces": ["::1"]}, {"PYSHM_CLUSTER_SECRET": "s" * 32})
    with pytest.raises(ConfigError, match="cluster.colour is not a cluster setting"):
        load({"name": "shop", "colour": "red"}, {"PYSHM_CLUSTER_SECRET": "s" * 32})
    cfg = load({"name": "shop", "secret_file": str(nodes_key := secret_file(tmp_path / "k", b"k" * 40))})
    assert cfg.cluster.secret == b"k" * 40 and cfg.cluster.node and cfg.name == f"pyshm-{cfg.cluster.node}"
    assert b"k" * 40 not in repr(cfg).encode() and nodes_key.exists()


def test_an_rpc_session_resumed_with_its_token_anywhere(nodes):
    from server_util import RpcConn

    ns = nodes(["a", "b", "c"], frontend="msgpack-rpc", app="rpc_apps", workers=2)
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    first = RpcConn(ns["a"].http)
    assert [first.call("Counter.incr") for _ in range(2)] == [1, 2]
    token = first.call("pyshm.session_token")
    assert isinstance(token, str) and token == first.call("pyshm.session_token")
    first.close()                                   # the session outlives its connection (it has a token)
    at_b = RpcConn(ns["b"].http)
    assert at_b.call("pyshm.resume", token) is True
    assert at_b.call("Counter.incr") == 3           # forwarded to a, where the session lives
    assert at_b.call("Counter.incr", 10) == 13
    with pytest.raises(RuntimeError, match="before any call that used"):
        at_b.call("pyshm.resume", token)
    at_b.close()
    assert ns["a"].status()["cluster"]["forwarded_in"] >= 3
    bad = RpcConn(ns["c"].http)                     # a token this cluster did not sign
    with pytest.raises(RuntimeError, match="not a session token"):
        bad.call("pyshm.resume", token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    bad.close()
    # a drains: the session (its endpoint's checkpoint) goes to b or c; the token still finds it.
    ns["a"].stop()
    at_c = RpcConn(ns["c"].http)
    assert at_c.call("pyshm.resume", token) is True
    assert at_c.call("Counter.incr") == 14
    at_c.close()
    # Without a token, a connection's session ends with it, as on a single node.
    plain = RpcConn(ns["b"].http)
    assert plain.call("Counter.incr") == 1
    plain.close()


def test_an_rpc_session_of_a_dead_node_is_an_error_not_a_fresh_one(nodes):
    from server_util import RpcConn

    ns = nodes(["a", "b"], frontend="msgpack-rpc", app="rpc_apps")
    ns["b"].wait_peers({"a": "alive"})
    first = RpcConn(ns["a"].http)
    assert first.call("Counter.incr") == 1
    token = first.call("pyshm.session_token")
    at_b = RpcConn(ns["b"].http)
    assert at_b.call("pyshm.resume", token) is True and at_b.call("Counter.incr") == 2
    ns["a"].kill()
    ns["b"].wait_peers({"a": "dead"}, timeout=5)
    with pytest.raises(RuntimeError, match="session-ended: the session ended: its node is gone"):
        at_b.call("Counter.incr")
    again = RpcConn(ns["b"].http)
    with pytest.raises(RuntimeError, match="the session ended"):
        again.call("pyshm.resume", token)
    for c in (first, at_b, again):
        c.close()


def test_a_flood_of_garbage_connections_on_the_link_port_is_bounded(nodes):
    from pyshm.procmem import resident_bytes

    ns = nodes(["a", "b"])
    ns["a"].wait_peers({"b": "alive"})
    pid = ns["a"].server.proc.pid
    before = resident_bytes(pid)
    socks = []
    for i in range(400):         # each announces a 4 KiB handshake frame and sends most of it, then waits
        s = socket.create_connection(("127.0.0.1", ns["a"].link))
        s.sendall(b"\x00\x00\x10\x00" + b"\x81" * 4000)
        socks.append(s)
    during = resident_bytes(pid)
    assert during - before < 32 << 20, f"RSS grew {(during - before) >> 20} MiB"
    time.sleep(0.5)
    open_now = sum(not _closed_within(s, 0.01) for s in socks)
    assert open_now <= 64, f"{open_now} unauthenticated connections held at once"   # the rest refused at once
    assert all(_closed_within(s, 10) for s in socks)       # and those dropped by the handshake timeout
    for s in socks:
        s.close()
    assert ns["a"].peers() == {"b": "alive"} and httpx.get(ns["a"].url + "/").text == "1 a"
    assert resident_bytes(pid) - before < 32 << 20


def test_two_nodes_draining_at_once_lose_no_session(nodes):
    ns = nodes(["a", "b", "c"])
    for name, node in ns.items():
        node.wait_peers({m: "alive" for m in ns if m != name})
    cookies = []
    for i in range(40):
        for n in "ab":
            r = httpx.get(ns[n].url + "/")
            assert r.text == f"1 {n}"
            cookies.append(r.cookies["pyshm_session"])
    ns["b"].server.signal(signal.SIGTERM)
    ns["a"].server.signal(signal.SIGTERM)
    assert ns["a"].server.proc.wait(30) == 0 and ns["b"].server.proc.wait(30) == 0
    lost = [c for c in cookies if httpx.get(ns["c"].url + "/", cookies={"pyshm_session": c}).text != "2 c"]
    assert not lost, f"{len(lost)} of {len(cookies)} sessions lost"


def test_an_idle_session_finds_its_new_owner_after_its_old_owner_restarts(nodes):
    ns = nodes(["a", "b"])
    ns["a"].wait_peers({"b": "alive"})
    links = {n: ns[n].link for n in ns}
    with httpx.Client() as client:
        assert client.get(ns["a"].url + "/").text == "1 a"
        assert client.get(ns["a"].url + "/").text == "2 a"
        assert ns["a"].stop() == 0                   # hands the session to b; the client stays idle
        a2 = nodes(["a"], peers={"b": links["b"]}, link=links["a"], http=ns["a"].http)["a"]
        a2.wait_peers({"b": "alive"})
        assert client.get(a2.url + "/").text == "3 b"   # its cookie names a: the restarted a forwards it to b


def test_an_answer_too_large_for_the_link_is_an_error_at_once(nodes):
    ns = nodes(["a", "b"], app="wsgi_apps:big_or_count")
    ns["b"].wait_peers({"a": "alive"})
    with httpx.Client(timeout=60) as client:
        assert client.get(ns["a"].url + "/").text == "1 a"
        t0 = time.monotonic()
        r = client.get(ns["b"].url + "/huge")          # forwarded to a, whose answer cannot cross the link
        assert r.status_code == 413 and b"cannot cross the link" in r.content
        assert time.monotonic() - t0 < 20
        assert client.get(ns["b"].url + "/").text == "2 a"      # the link is fine
    assert ns["b"].peers() == {"a": "alive"}


def test_refusals_cannot_flood_or_forge_log_lines(nodes):
    from pyshm.cluster import wire

    a = nodes(["a"])["a"]
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", a.link)) as s:
            s.sendall(wire._clear({"refused": "x\nCRITICAL pyshm.manager: forged"}))
            _closed_within(s, 5)
    wait_for(lambda: "refused" in a.log(), "a refusal logged")
    lines = [line for line in a.log().splitlines() if "refused" in line]
    assert 1 <= len(lines) <= 2, lines
    assert not any(line.startswith("CRITICAL") for line in a.log().splitlines())
