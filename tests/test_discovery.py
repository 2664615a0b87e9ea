"""pyshm.cluster.discovery: zeroconf discovery of a cluster's nodes, on 127.0.0.1 only.

Each test uses its own cluster name (pid and a counter), so runs on the same
machine (and other mDNS traffic on the loopback) do not see each other's nodes.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from pyshm.cluster.discovery import (
    PROTOCOL,
    SERVICE,
    Announcement,
    Discovery,
    format_ports,
    instance_name,
    parse_announcement,
    parse_ports,
)

LOOPBACK = ["127.0.0.1"]
WAIT = 5.0
LOGGER = "pyshm.cluster.discovery"
_serial = itertools.count()


def unique_cluster(tag: str) -> str:
    return f"t{os.getpid()}-{next(_serial)}-{tag}"


@dataclass
class Recorder:
    """What one Discovery reported, and on which threads."""
    found: dict[str, Announcement] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def on_found(self, announcement: Announcement) -> None:
        self.threads.add(threading.get_ident())
        self.found[announcement.node] = announcement

    def on_removed(self, node: str) -> None:
        self.threads.add(threading.get_ident())
        self.removed.append(node)


def make(cluster: str, node: str, recorder: Recorder, *, link_port: int = 7400,
         ports: dict[str, int] | None = None, epoch: int | None = None,
         role: str = "node") -> Discovery:
    return Discovery(cluster=cluster, node=node, epoch=time.time_ns() if epoch is None else epoch,
                     link_port=link_port, ports={"http": 8001} if ports is None else ports,
                     interfaces=LOOPBACK, on_found=recorder.on_found,
                     on_removed=recorder.on_removed, role=role)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def stop_all(discoveries: list[Discovery]) -> None:
    await asyncio.gather(*(d.stop() for d in discoveries), return_exceptions=True)


def ignored(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    """True once the discovery logger said it ignored a record naming all `words`."""
    return any(r.name == LOGGER and r.getMessage().startswith("ignoring")
               and all(w in r.getMessage() for w in words) for r in caplog.records)


# --- without the network ---------------------------------------------------

def test_ports_round_trip_and_garbage() -> None:
    ports = {"http": 8001, "tcp": 7000, "msgpack-rpc": 9000}
    assert format_ports(ports) == "http=8001,msgpack-rpc=9000,tcp=7000"
    assert parse_ports(format_ports(ports)) == ports
    assert parse_ports("") == {}
    for garbage in ("http", "http=", "http=x", "http=0", "http=65536", "http=+80", "=80",
                    "http=80,", "http=80,http=81", "a b=80", "http= 80"):
        assert parse_ports(garbage) is None, garbage


def test_instance_names_fit_and_stay_distinct() -> None:
    names = {instance_name("a-b", "c"), instance_name("a", "b-c"), instance_name("shop", "a")}
    assert len(names) == 3
    long = instance_name("c" * 70, "é" * 40 + ".\x01")
    label = long[: -len(SERVICE) - 1]
    assert len(label.encode()) <= 63 and "\x01" not in label
    assert instance_name("shop", "a").startswith("shop-a-")


def _info(properties: dict, addresses: list[str] | None = None) -> ServiceInfo:
    return ServiceInfo(SERVICE, f"x.{SERVICE}", port=1, properties=properties, server="x.local.",
                       parsed_addresses=LOOPBACK if addresses is None else addresses)


def test_parse_announcement_refuses_bad_fields() -> None:
    good = {"cluster": "c", "node": "n", "link": "7400", "ports": "http=8001", "role": "node",
            "v": "1", "epoch": "123"}
    assert parse_announcement(_info(good)) == Announcement(
        cluster="c", node="n", addresses=("127.0.0.1",), link_port=7400, ports={"http": 8001},
        role="node", version=1, epoch=123)
    assert parse_announcement(_info(good, addresses=[])) is None
    changes = [("link", "x"), ("link", "0"), ("link", "99999"), ("v", "-1"), ("epoch", "1e9"),
               ("ports", "http"), ("role", ""), ("role", "a b"), ("node", ""), ("cluster", ""),
               ("node", b"\xff\xfe")]
    for key, value in changes:
        assert parse_announcement(_info({**good, key: value})) is None, (key, value)
    for key in good:
        if key != "ports":
            missing = {k: v for k, v in good.items() if k != key}
            assert parse_announcement(_info(missing)) is None, key
    assert parse_announcement(_info({**good, "node": None})) is None


def test_bad_configuration_is_refused() -> None:
    rec = Recorder()
    for interfaces in ([], ["::1"], ["lo"], ["0.0.0.0"], ["127.0.0.1", "nonsense"]):
        with pytest.raises(ValueError):
            Discovery(cluster="c", node="n", epoch=1, link_port=7400, ports={},
                      interfaces=interfaces, on_found=rec.on_found)
    for kwargs in ({"link_port": 0}, {"link_port": 70000}, {"ports": {"http": 0}},
                   {"ports": {"a,b": 80}}, {"role": ""}, {"node": ""}, {"cluster": "x" * 300}):
        settings = {"cluster": "c", "node": "n", "epoch": 1, "link_port": 7400, "ports": {},
                    **kwargs}
        with pytest.raises(ValueError):
            Discovery(**settings, interfaces=LOOPBACK, on_found=rec.on_found)


@pytest.mark.timeout(60)
def test_stop_without_start_and_twice() -> None:
    async def scenario() -> None:
        d = make(unique_cluster("stop"), "a", Recorder())
        await d.stop()
        await d.stop()
        with pytest.raises(RuntimeError):
            await d.start()
    asyncio.run(scenario())


# --- on 127.0.0.1 ----------------------------------------------------------

@pytest.mark.timeout(60)
def test_three_nodes_see_each_other() -> None:
    cluster = unique_cluster("three")
    specs = {"a": (7401, {"http": 8001}), "b": (7402, {"http": 8002, "tcp": 7002}),
             "c": (7403, {})}
    recorders = {node: Recorder() for node in specs}
    epochs = {node: time.time_ns() + i for i, node in enumerate(specs)}

    async def scenario() -> None:
        discoveries = [make(cluster, node, recorders[node], link_port=link, ports=ports,
                            epoch=epochs[node]) for node, (link, ports) in specs.items()]
        try:
            for d in discoveries:
                await d.start()
            complete = lambda: all(set(r.found) == set(specs) - {n} for n, r in recorders.items())
            assert await wait_until(complete), {n: sorted(r.found) for n, r in recorders.items()}
        finally:
            await stop_all(discoveries)

    asyncio.run(scenario())
    for me, recorder in recorders.items():
        assert recorder.threads == {threading.get_ident()}
        for node, seen in recorder.found.items():
            link, ports = specs[node]
            assert seen == Announcement(cluster=cluster, node=node, addresses=("127.0.0.1",),
                                        link_port=link, ports=ports, role="node",
                                        version=PROTOCOL, epoch=epochs[node]), (me, seen)


@pytest.mark.timeout(60)
def test_another_cluster_is_never_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ours, theirs = unique_cluster("ours"), unique_cluster("theirs")
    a1, a2, b1 = Recorder(), Recorder(), Recorder()

    async def scenario() -> None:
        discoveries = [make(ours, "a1", a1), make(ours, "a2", a2), make(theirs, "b1", b1)]
        try:
            for d in discoveries:
                await d.start()
            assert await wait_until(lambda: "a2" in a1.found and "a1" in a2.found)
            # Both sides did receive the other cluster's record, and dropped it.
            assert await wait_until(lambda: ignored(caplog, "'b1'", repr(theirs))
                                    and ignored(caplog, "'a1'", repr(ours))
                                    and ignored(caplog, "'a2'", repr(ours)))
            await asyncio.sleep(0.3)
        finally:
            await stop_all(discoveries)

    asyncio.run(scenario())
    assert set(a1.found) == {"a2"} and set(a2.found) == {"a1"}
    assert b1.found == {} and b1.removed == []
    assert "b1" not in a1.removed + a2.removed


@pytest.mark.timeout(60)
def test_garbage_records_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cluster = unique_cluster("garbage")
    good = {"cluster": cluster, "link": "7400", "ports": "http=8001", "role": "node",
            "v": "1", "epoch": "1"}
    bad = {"badlink": {**good, "node": "badlink", "link": "x"},
           "nonode": dict(good),
           "badports": {**good, "node": "badports", "ports": "http=x"},
           "badutf8": {**good, "node": b"\xff\xfe", "epoch": "2"},
           "noepoch": {k: v for k, v in {**good, "node": "noepoch"}.items() if k != "epoch"}}
    tag = unique_cluster("raw")
    infos = [ServiceInfo(SERVICE, f"{tag}-{name}.{SERVICE}", port=7400, properties=props,
                         server=f"{tag}-{name}.local.", parsed_addresses=LOOPBACK)
             for name, props in bad.items()]
    watcher, other = Recorder(), Recorder()

    async def scenario() -> None:
        raw = AsyncZeroconf(interfaces=LOOPBACK)
        discoveries = [make(cluster, "watcher", watcher), make(cluster, "good", other)]
        try:
            await discoveries[0].start()
            for info in infos:
                await raw.async_register_service(info, cooperating_responders=True)
            await discoveries[1].start()
            assert await wait_until(lambda: "good" in watcher.found and "watcher" in other.found)
            assert await wait_until(lambda: all(ignored(caplog, f"{tag}-{name}") for name in bad))
        finally:
            await stop_all(discoveries)
            await raw.async_close()

    asyncio.run(scenario())
    assert set(watcher.found) == {"good"} and set(other.found) == {"watcher"}
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(
        ("pyshm", "asyncio"))]
    assert errors == []


@pytest.mark.timeout(60)
def test_stop_says_goodbye_and_a_restart_is_found_again() -> None:
    cluster = unique_cluster("bye")
    recorders = {node: Recorder() for node in "abc"}

    async def scenario() -> None:
        discoveries = {node: make(cluster, node, recorders[node], epoch=1) for node in "abc"}
        restarted: Discovery | None = None
        try:
            for d in discoveries.values():
                await d.start()
            assert await wait_until(lambda: all(len(r.found) == 2 for r in recorders.values()))
            await discoveries["c"].stop()
            await discoveries["c"].stop()
            assert await wait_until(lambda: "c" in recorders["a"].removed
                                    and "c" in recorders["b"].removed)
            restarted = make(cluster, "c", Recorder(), epoch=2)
            await restarted.start()
            assert await wait_until(lambda: recorders["a"].found["c"].epoch == 2
                                    and recorders["b"].found["c"].epoch == 2)
        finally:
            await stop_all([*discoveries.values(), *([restarted] if restarted else [])])

    asyncio.run(scenario())
    assert recorders["c"].removed == []
    assert recorders["a"].removed.count("c") == 1 and recorders["b"].removed.count("c") == 1
