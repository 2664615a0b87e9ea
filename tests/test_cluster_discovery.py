"""Nodes that find each other with zeroconf (issue 11): on 127.0.0.1, and
across network namespaces joined by a bridge (multicast on those veths
only), with avahi listing them."""
from __future__ import annotations

import subprocess
import time

import pytest

from cluster_util import Node, secret_file
from netns import Avahi, lan, remove_leftovers

pytestmark = pytest.mark.timeout(180)

PREFIX = "pyshmc"


@pytest.fixture(autouse=True, scope="module")
def _leftovers():
    remove_leftovers(PREFIX)       # what a killed earlier run left
    yield


def test_three_nodes_on_loopback_discover_each_other(tmp_path):
    key = secret_file(tmp_path / "cluster.key")
    cluster = f"zc{tmp_path.name[-12:]}".replace("_", "-")      # (a name no other run uses)
    nodes = []
    try:
        for n in "abc":
            nodes.append(Node(tmp_path, n, cluster=cluster, secret_file=key, interfaces=["127.0.0.1"]))
        for node in nodes:
            node.wait_listening()
        for node in nodes:
            node.wait_peers({m.node: "alive" for m in nodes if m is not node})
    finally:
        for node in nodes:
            node.stop()


def test_nodes_in_three_namespaces_discover_each_other_and_avahi_lists_them(tmp_path):
    key = secret_file(tmp_path / "cluster.key")
    with lan(3, PREFIX) as net:
        avahi = Avahi(net.members[2], str(tmp_path / "avahi"))
        avahi.start()
        nodes = []
        try:
            for n, member in zip("abc", net.members):
                nodes.append(Node(tmp_path, n, cluster="shop", secret_file=key, interfaces=[member.ip],
                                  host=member.ip, netns=member.ns, http=8000, link=7400))
            for node in nodes:
                node.wait_listening()
            for node in nodes:
                node.wait_peers({m.node: "alive" for m in nodes if m is not node}, timeout=20)
            listed = {s["txt"]["node"]: s for s in avahi.browse(min_count=3) if s["txt"].get("cluster") == "shop"}
            assert sorted(listed) == ["a", "b", "c"]
            for node, member in zip(nodes, net.members):
                s = listed[node.node]
                assert s["address"] == member.ip and s["txt"]["link"] == "7400" and "http=8000" in s["txt"]["ports"]
                assert int(s["txt"]["epoch"]) == node.status()["cluster"]["epoch"]
                assert key.read_bytes().decode() not in str(s)
            # A silent cut (c's cable pulled: no reset reaches anyone): its
            # peers miss its heartbeats and list it dead, mDNS notwithstanding.
            subprocess.run(["ip", "-n", net.hub, "link", "set", "m2", "down"], check=True)
            cut = time.monotonic()
            for node in nodes[:2]:
                node.wait_peers({m.node: "dead" if m.node == "c" else "alive" for m in nodes if m is not node},
                                timeout=10)
            assert time.monotonic() - cut < 10
            assert "3 heartbeats missed" in nodes[0].log()
            subprocess.run(["ip", "-n", net.hub, "link", "set", "m2", "up"], check=True)     # back: a new handshake
            for node in nodes:
                node.wait_peers({m.node: "alive" for m in nodes if m is not node}, timeout=20)
        finally:
            for node in nodes:
                node.stop()
            avahi.stop()
