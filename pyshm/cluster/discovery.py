"""Zeroconf discovery: announce this node and find the other nodes of its cluster.

One job: register this node as a `_pyshm._tcp.local.` service (python-zeroconf,
on an explicit list of IPv4 interface addresses, never all of them) and browse
for the same type, reporting every node of the same cluster name that
announces itself (`on_found`) or says goodbye (`on_removed`).

mDNS only finds peers.  python-zeroconf keeps a SIGKILLed publisher's records
for many minutes (its PTR TTLs are raised to 1125 s), so `on_found` means "a
node said it exists", never "it is alive": liveness comes from the link's
heartbeats.  `on_found` is called again when a node's records change (a
restarted node announces a new boot epoch under the same instance name).

The TXT record carries no secret: cluster, node, link, ports, role, v, epoch.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import (BadTypeInNameException, DNSQuestionType, IPVersion, ServiceInfo,
                      ServiceStateChange, Zeroconf)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE = "_pyshm._tcp.local."
PROTOCOL = 1                      # version in TXT "v"
RESOLVE_TIMEOUT_MS = 1000         # how long one resolution of a found service may take
_INSTANCE_MAX = 63                # bytes of an instance label (RFC 6763 4.1.1)
_TXT_ITEM_MAX = 255               # bytes of one TXT "key=value" string
_UINT = re.compile(r"[0-9]{1,20}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Announcement:
    """What one node of the cluster announced about itself."""
    cluster: str
    node: str
    addresses: tuple[str, ...]    # IPv4 addresses the service record gives
    link_port: int
    ports: dict[str, int]         # front-end name -> port, e.g. {"http": 8001}
    role: str                     # "node" (later: "bus", "router", "backup")
    version: int
    epoch: int                    # boot epoch (ns since the epoch at the node's start)


# --- names and TXT records -------------------------------------------------

def instance_name(cluster: str, node: str) -> str:
    """The service instance name of (cluster, node): readable, unique, at most 63 bytes.

    A short hash of the pair keeps "a-b"/"c" and "a"/"b-c" apart; control
    characters are replaced and the readable part is cut on a character
    boundary so that the whole label fits.
    """
    digest = hashlib.sha256(f"{cluster}\0{node}".encode()).hexdigest()[:8]
    readable = _CONTROL.sub("_", f"{cluster}-{node}")
    room = _INSTANCE_MAX - len(digest) - 1
    readable = readable.encode()[:room].decode(errors="ignore")
    return f"{readable}-{digest}.{SERVICE}"


def server_name(cluster: str, node: str) -> str:
    """The host name the node's A records are published under (one per node)."""
    digest = hashlib.sha256(f"{cluster}\0{node}".encode()).hexdigest()[:16]
    return f"pyshm-{digest}.local."


def format_ports(ports: dict[str, int]) -> str:
    """{"http": 8001, "tcp": 7000} -> "http=8001,tcp=7000"."""
    return ",".join(f"{name}={port}" for name, port in sorted(ports.items()))


def parse_ports(text: str) -> dict[str, int] | None:
    """"http=8001,tcp=7000" -> {"http": 8001, "tcp": 7000}; None when malformed."""
    ports: dict[str, int] = {}
    for item in text.split(",") if text else ():
        name, sep, value = item.partition("=")
        port = _parse_port(value)
        if not sep or not _TOKEN.fullmatch(name) or port is None or name in ports:
            return None
        ports[name] = port
    return ports


def _parse_uint(text: str | None) -> int | None:
    return int(text) if text is not None and _UINT.fullmatch(text) else None


def _parse_port(text: str | None) -> int | None:
    port = _parse_uint(text)
    return port if port is not None and 0 < port < 65536 else None


def txt_properties(*, cluster: str, node: str, epoch: int, link_port: int,
                   ports: dict[str, int], role: str) -> dict[str, str]:
    """The TXT record of a node (every value a string; no secret, ever)."""
    return {"cluster": cluster, "node": node, "link": str(link_port),
            "ports": format_ports(ports), "role": role, "v": str(PROTOCOL),
            "epoch": str(epoch)}


def _decode_txt(info: ServiceInfo) -> dict[str, str] | None:
    """The TXT keys and values as strings; None if any is not UTF-8 or has no value."""
    try:
        decoded = {key.decode(): value.decode() for key, value in info.properties.items()
                   if value is not None}
    except UnicodeDecodeError:
        return None
    return decoded


def parse_announcement(info: ServiceInfo) -> Announcement | None:
    """The Announcement a resolved service gives, or None (logged) if any field is bad."""
    txt = _decode_txt(info)
    if txt is None:
        log.debug("ignoring %s: its TXT record is not UTF-8", info.name)
        return None
    cluster, node, role = txt.get("cluster", ""), txt.get("node", ""), txt.get("role", "")
    link, ports = _parse_port(txt.get("link")), parse_ports(txt.get("ports", ""))
    version, epoch = _parse_uint(txt.get("v")), _parse_uint(txt.get("epoch"))
    addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
    if not (cluster and node and _TOKEN.fullmatch(role) and link is not None
            and ports is not None and version is not None and epoch is not None and addresses):
        log.debug("ignoring %s: a bad or missing field in %r (addresses %s)", info.name, txt,
                  addresses)
        return None
    return Announcement(cluster=cluster, node=node, addresses=addresses, link_port=link,
                        ports=ports, role=role, version=version, epoch=epoch)


def _check_interfaces(interfaces: list[str]) -> list[str]:
    """The interface list as given, if it is a non-empty list of IPv4 addresses."""
    if not interfaces:
        raise ValueError("discovery needs at least one interface address (none given)")
    for address in interfaces:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"discovery interface {address!r} is not an IPv4 address") from None
        if address == "0.0.0.0":
            raise ValueError("discovery interface 0.0.0.0 would mean every interface: "
                             "name the addresses")
    return list(interfaces)


def _check_txt(properties: dict[str, str]) -> None:
    """Refuse names that would not fit, or not survive, the TXT record."""
    for key, value in properties.items():
        if len(f"{key}={value}".encode()) > _TXT_ITEM_MAX:
            raise ValueError(f"discovery TXT entry {key!r} is longer than {_TXT_ITEM_MAX} bytes")
    for key in ("cluster", "node"):
        if not properties[key]:
            raise ValueError(f"discovery needs a non-empty {key} name")
    if not _TOKEN.fullmatch(properties["role"]):
        raise ValueError(f"discovery role {properties['role']!r} is not a short token")


# --- the service -----------------------------------------------------------

class Discovery:
    """Announces this node on `interfaces` and reports the other nodes of `cluster`.

    Callbacks run on the asyncio loop that called start().  Another cluster's
    nodes, our own record and records with bad fields are ignored.
    """

    def __init__(self, *, cluster: str, node: str, epoch: int, link_port: int,
                 ports: dict[str, int], interfaces: list[str],
                 on_found: Callable[[Announcement], None],
                 on_removed: Callable[[str], None] | None = None,
                 role: str = "node") -> None:
        self.cluster = cluster
        self.node = node
        self.epoch = epoch
        self.interfaces = _check_interfaces(interfaces)
        self.properties = txt_properties(cluster=cluster, node=node, epoch=epoch,
                                         link_port=link_port, ports=ports, role=role)
        _check_txt(self.properties)
        if _parse_port(str(link_port)) is None or parse_ports(format_ports(ports)) is None:
            raise ValueError(f"discovery: bad link port {link_port!r} or ports {ports!r}")
        self.link_port = link_port
        self.on_found = on_found
        self.on_removed = on_removed
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._announcing: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._resolving: dict[str, asyncio.Task] = {}   # instance name -> resolution
        self._known: dict[str, str] = {}                 # instance name -> node
        self._stopped = False

    def service_info(self) -> ServiceInfo:
        """The record this node registers."""
        return ServiceInfo(SERVICE, instance_name(self.cluster, self.node), port=self.link_port,
                           properties=self.properties, server=server_name(self.cluster, self.node),
                           parsed_addresses=self.interfaces)

    async def start(self) -> None:
        """Register this node and browse; returns once the registration is done.

        The first announcement is on its way when this returns; its two
        repeats (225 ms apart) follow in the background.
        """
        if self._aiozc is not None or self._stopped:
            raise RuntimeError("Discovery.start() may be called once")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._aiozc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        try:
            # QM, not zeroconf's default QU first question: several responders on one
            # host share port 5353 (SO_REUSEPORT), so a unicast answer reaches only one
            # of their sockets, often not the asker's; a node joining would then see
            # the others only at the browser's second query, ~1.2 s later.
            self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE,
                                                handlers=[self._on_state_change],
                                                question_type=DNSQuestionType.QM)
            self._info = self.service_info()
            self._announcing = await self._aiozc.async_register_service(
                self._info, cooperating_responders=True)
        except BaseException:
            await self.stop()
            raise
        log.info("discovery: node %r of cluster %r announced on %s", self.node, self.cluster,
                 ", ".join(self.interfaces))

    async def stop(self) -> None:
        """Unregister (goodbye packets) and close zeroconf; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        aiozc, self._aiozc = self._aiozc, None
        for task in self._resolving.values():
            task.cancel()
        self._resolving.clear()
        if self._announcing is not None:
            self._announcing.cancel()
        if aiozc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        await self._say_goodbye(aiozc)
        await aiozc.async_close()

    async def _say_goodbye(self, aiozc: AsyncZeroconf) -> None:
        if self._info is None or aiozc.zeroconf.done:
            return
        try:
            await (await aiozc.async_unregister_service(self._info))
        except Exception:  # noqa: BLE001 - a failed goodbye must not stop the shutdown
            log.warning("discovery: goodbye of node %r failed", self.node, exc_info=True)

    # --- browsing: zeroconf's callbacks ------------------------------------

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        """Browser handler (keyword arguments); hops to our loop if called elsewhere."""
        if threading.get_ident() == self._loop_thread:
            self._dispatch(name, state_change)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, name, state_change)

    def _dispatch(self, name: str, state_change: ServiceStateChange) -> None:
        if self._stopped:
            return
        if state_change is ServiceStateChange.Removed:
            self._removed(name)
        else:
            self._resolve_later(name)

    def _resolve_later(self, name: str) -> None:
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.ensure_future(self._resolve(name))
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._resolved(name, done))

    def _resolved(self, name: str, task: asyncio.Task) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    def _removed(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        node = self._known.pop(name, None)
        if node is not None and self.on_removed is not None:
            log.debug("discovery: node %r said goodbye", node)
            self._call(self.on_removed, node)

    async def _resolve(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        try:
            info = AsyncServiceInfo(SERVICE, name)
            found = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS,
                                             question_type=DNSQuestionType.QM)
        except BadTypeInNameException:
            found = False
        if not found or self._stopped:
            log.debug("discovery: %s did not resolve", name)
            return
        announcement = parse_announcement(info)
        if announcement is not None and self._accept(name, announcement):
            self._known[name] = announcement.node
            self._call(self.on_found, announcement)

    def _accept(self, name: str, announcement: Announcement) -> bool:
        """True for a node of our cluster that is not this node."""
        if announcement.cluster != self.cluster:
            log.debug("ignoring %s: node %r of another cluster %r", name, announcement.node,
                      announcement.cluster)
            return False
        if announcement.node != self.node:
            return True
        if (announcement.epoch, announcement.link_port) != (self.epoch, self.link_port):
            log.warning("discovery: another process announces node id %r in cluster %r "
                        "(link port %d): node ids must be unique", self.node, self.cluster,
                        announcement.link_port)
        return False

    def _call(self, callback: Callable[..., None], argument: object) -> None:
        """Run a user callback; its exception is logged, never lost in a task."""
        try:
            callback(argument)
        except Exception:  # noqa: BLE001
            log.exception("discovery: callback %r failed", callback)
