"""Instance configuration: `pyshm serve -c pyshm.toml`, or the same from flags.

    [instance]
    name = "shop"              # segments /dev/shm/pyshm.shop*, default "pyshm-<port>"
    heap_size = "1GiB"
    slots = 1024               # requests in flight at once
    inline_size = "64KiB"      # payloads up to this size stay in their slot
    graceful_timeout = 30      # seconds SIGTERM waits for requests in flight
    queue_timeout = 10         # seconds a request waits for a free worker
    preload = "app:setup"      # called once in the manager with the heap, before workers start

    [suites.catalog]
    app = "app:handle"         # module:attribute, imported by each worker
    workers = 4
    policy = "least-loaded"    # or "round-robin"
    timeout = 30               # seconds a request may run; then it is answered and its worker replaced (0: none)
    max_requests = 0           # replace a worker after this many requests (0: never) ...
    max_requests_jitter = 0    # ... plus a random 0..jitter, so workers are not replaced at once
    max_rss = 0                # replace a worker whose resident memory passes this ("512MiB"; 0: never)

    [[listen]]
    frontend = "tcp"
    address = "127.0.0.1:7000"
    suite = "catalog"          # where requests go when no route matches
    routes = [{ prefix = "admin:", suite = "admin" }]
    max_frame = "16MiB"        # any other key is a front-end option

    [cluster]                  # optional: this instance is one node of a LAN cluster
    name = "shop"              # nodes with the same name and secret form one cluster
    node = "a"                 # unique in the cluster; default hostname-pid
    link = "10.0.0.5:7400"     # this node's link address (port 0: pick one)
    interfaces = ["10.0.0.5"]  # where zeroconf announces and browses (none: no multicast)
    peers = ["10.0.0.6:7400"]  # static links, for networks without multicast
    secret_file = "/etc/pyshm/cluster.key"   # or the PYSHM_CLUSTER_SECRET environment variable
    heartbeat = 0.2            # seconds between heartbeats; a peer silent for 3 is dead

Every error names the key it is about (ConfigError).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyshm.errors import ConfigError
from pyshm.sizes import parse_size

POLICIES = ("least-loaded", "round-robin")
SUITE_KEYS = ("app", "workers", "policy", "interface", "distributed", "timeout", "max_requests",
              "max_requests_jitter", "max_rss")
INTERFACES = ("handler", "wsgi", "rpc")


@dataclass
class SuiteConfig:
    name: str
    app: str
    workers: int = 2
    policy: str = "least-loaded"
    interface: str = ""      # handler | wsgi | rpc; "" = what its listeners' front-end implies
    distributed: bool | None = None   # a connection is a session bound to one worker (default: rpc suites)
    timeout: float = 30.0    # seconds a request may run (0: no limit), as gunicorn's --timeout
    max_requests: int = 0    # a worker is replaced after max_requests + random(0..jitter) requests (0: never)
    max_requests_jitter: int = 0
    max_rss: int = 0         # bytes of resident memory past which a worker is replaced (0: never)


@dataclass
class Route:
    prefix: bytes
    suite: str


@dataclass
class ListenConfig:
    frontend: str
    host: str
    port: int
    suite: str
    routes: list[Route] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def suite_for(self, route: bytes) -> str:
        for r in self.routes:
            if route.startswith(r.prefix):
                return r.suite
        return self.suite


CLUSTER_KEYS = ("name", "node", "link", "interfaces", "peers", "secret_file", "heartbeat")
SECRET_ENV = "PYSHM_CLUSTER_SECRET"
MIN_SECRET = 32


@dataclass
class ClusterConfig:
    name: str
    node: str
    link: tuple[str, int]
    secret: bytes = field(repr=False)     # never printed, logged or reported
    interfaces: list[str] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    heartbeat: float = 0.2


@dataclass
class Config:
    name: str
    suites: dict[str, SuiteConfig]
    listen: list[ListenConfig]
    heap_size: int = 1 << 30
    slots: int = 1024
    inline_size: int = 64 << 10
    graceful_timeout: float = 30.0
    queue_timeout: float = 10.0
    preload: str | None = None
    max_workers: int = 64
    sessions: int = 65536          # session table capacity
    session_ttl: float = 1800.0    # seconds an idle session lives
    secure_cookies: bool = False   # session cookies marked Secure (behind TLS)
    secret: str | None = None      # signs session cookies; random per start when unset
    cluster: ClusterConfig | None = None


def _need(table: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key} is missing")
    return _typed(table[key], f"{where}.{key}", kind)


def _typed(value: Any, where: str, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where} must be a {names}, not {value!r}")
    return value


def _size(value: Any, where: str) -> int:
    try:
        return parse_size(_typed(value, where, (int, str)))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_address(value: str, where: str) -> tuple[str, int]:
    host, sep, port = _typed(value, where, str).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where} must look like 127.0.0.1:7000 or [::1]:7000, not {value!r}")
    return host, int(port)


def _app(value: Any, where: str, *, module_alone: bool = False) -> str:
    mod, sep, attr = _typed(value, where, str).partition(":")
    if not mod or (sep and not attr) or (not sep and not module_alone):
        raise ConfigError(f"{where} must be module:attribute (e.g. myapp:handle), not {value!r}")
    return value


def _suite(name: str, t: Any) -> SuiteConfig:
    where = f"suites.{name}"
    _typed(t, where, dict)
    unknown = set(t) - set(SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]} is not a suite setting ({', '.join(SUITE_KEYS)})")
    if "distributed" in t:
        s_distributed = _typed(t["distributed"], f"{where}.distributed", bool)
    else:
        s_distributed = None
    s = SuiteConfig(name, _app(t.get("app"), f"{where}.app", module_alone=True))
    if "workers" in t:
        s.workers = _typed(t["workers"], f"{where}.workers", int)
        if not 1 <= s.workers <= 1024:
            raise ConfigError(f"{where}.workers must be 1 to 1024, not {s.workers}")
    s.distributed = s_distributed
    if "interface" in t:
        s.interface = _typed(t["interface"], f"{where}.interface", str)
        if s.interface not in INTERFACES:
            raise ConfigError(f"{where}.interface must be one of {', '.join(INTERFACES)}, not {s.interface!r}")
    if "policy" in t:
        s.policy = _typed(t["policy"], f"{where}.policy", str)
        if s.policy not in POLICIES:
            raise ConfigError(f"{where}.policy must be one of {', '.join(POLICIES)}, not {s.policy!r}")
    if "timeout" in t:
        s.timeout = float(_typed(t["timeout"], f"{where}.timeout", (int, float)))
        if s.timeout < 0:
            raise ConfigError(f"{where}.timeout must be 0 (no limit) or a number of seconds, not {s.timeout:g}")
    for key in ("max_requests", "max_requests_jitter"):
        if key in t:
            setattr(s, key, _typed(t[key], f"{where}.{key}", int))
            if getattr(s, key) < 0:
                raise ConfigError(f"{where}.{key} must be 0 or more")
    if "max_rss" in t and t["max_rss"] not in (0, "0"):
        s.max_rss = _size(t["max_rss"], f"{where}.max_rss")
    return s


def _listen(i: int, t: Any, suites: dict[str, SuiteConfig]) -> ListenConfig:
    where = f"listen[{i}]"
    _typed(t, where, dict)
    t = dict(t)
    frontend = _need(t, "frontend", where, str)
    host, port = parse_address(_need(t, "address", where, str), f"{where}.address")
    suite = _need(t, "suite", where, str)
    if suite not in suites:
        raise ConfigError(f"{where}.suite names {suite!r}, which is not among the suites "
                          f"({', '.join(suites) or 'none defined'})")
    routes = []
    for j, r in enumerate(_typed(t.get("routes", []), f"{where}.routes", list)):
        rw = f"{where}.routes[{j}]"
        _typed(r, rw, dict)
        prefix = _need(r, "prefix", rw, str)
        target = _need(r, "suite", rw, str)
        if target not in suites:
            raise ConfigError(f"{rw}.suite names {target!r}, which is not among the suites")
        routes.append(Route(prefix.encode(), target))
    options = {k: v for k, v in t.items() if k not in ("frontend", "address", "suite", "routes")}
    return ListenConfig(frontend, host, port, suite, routes, options)


def installed_interfaces() -> dict[str, str]:
    """The worker interface each installed front-end declares
    (FrontEnd.interface), by name, from the entry points."""
    from pyshm.frontend import Registry    # here, not at the top: only when no one passed them

    return Registry.load().interfaces()


def _infer_interfaces(suites: dict[str, SuiteConfig], listen: list[ListenConfig],
                      interfaces: Mapping[str, str] | None) -> None:
    """A suite without `interface` takes the one its listeners' front-end
    declares (`interfaces`, by front-end name: http -> wsgi, msgpack-rpc ->
    rpc, others -> handler); they must agree."""
    for name, s in suites.items():
        if s.interface:
            continue
        if interfaces is None:
            interfaces = installed_interfaces()
        implied = {interfaces.get(ls.frontend, "handler") for ls in listen
                   if ls.suite == name or any(r.suite == name for r in ls.routes)}
        if len(implied) > 1:
            raise ConfigError(f"suites.{name} is fed by front-ends that need different application "
                              f"interfaces ({', '.join(sorted(implied))}); set suites.{name}.interface")
        s.interface = implied.pop() if implied else "handler"
        if s.interface not in INTERFACES:
            raise ConfigError(f"suites.{name}: its front-end needs the application interface {s.interface!r}, "
                              f"which pyshm workers do not have ({', '.join(INTERFACES)})")
    for name, s in suites.items():
        if s.interface != "rpc":
            _app(s.app, f"suites.{name}.app")   # only an RPC suite may name a module alone
        if s.distributed is None:
            s.distributed = s.interface == "rpc"
        elif s.distributed and s.interface == "wsgi":
            raise ConfigError(f"suites.{name}.distributed: HTTP sessions are non-distributed (one request, "
                              f"one command); only msgpack-RPC and raw TCP suites can be distributed")


def _cluster(t: Any, env: Mapping[str, str]) -> ClusterConfig:
    _typed(t, "cluster", dict)
    unknown = set(t) - set(CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"cluster.{sorted(unknown)[0]} is not a cluster setting ({', '.join(CLUSTER_KEYS)})")
    name = _need(t, "name", "cluster", str)
    node = _typed(t.get("node", _default_node()), "cluster.node", str)
    for key, value in (("name", name), ("node", node)):
        # (no '.': avahi does not list zeroconf instance names containing one)
        if not value or len(value) > 40 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
            raise ConfigError(f"cluster.{key} must be 1 to 40 ASCII letters, digits, '-' or '_', not {value!r}")
    cfg = ClusterConfig(name, node, parse_address(t.get("link", "127.0.0.1:0"), "cluster.link"),
                        _secret(t.get("secret_file"), env))
    for i, ip in enumerate(_typed(t.get("interfaces", []), "cluster.interfaces", list)):
        if not isinstance(ip, str) or not _is_ipv4(ip):
            raise ConfigError(f"cluster.interfaces[{i}] must be an IPv4 address of this host, not {ip!r}")
        cfg.interfaces.append(ip)
    cfg.peers = [parse_address(p, f"cluster.peers[{i}]")
                 for i, p in enumerate(_typed(t.get("peers", []), "cluster.peers", list))]
    if "heartbeat" in t:
        cfg.heartbeat = float(_typed(t["heartbeat"], "cluster.heartbeat", (int, float)))
        if not 0.01 <= cfg.heartbeat <= 10:
            raise ConfigError(f"cluster.heartbeat must be 0.01 to 10 seconds, not {cfg.heartbeat:g}")
    return cfg


def _default_node() -> str:
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in socket.gethostname()[:30])
    return f"{host or 'node'}-{os.getpid()}"


def _secret(path: Any, env: Mapping[str, str]) -> bytes:
    """The cluster secret, from cluster.secret_file or PYSHM_CLUSTER_SECRET
    (the file wins); at least MIN_SECRET bytes."""
    fix = (f"put at least {MIN_SECRET} random bytes in cluster.secret_file (e.g. head -c 32 /dev/urandom "
           f"> /etc/pyshm/cluster.key; chmod 600) or in the {SECRET_ENV} environment variable, the same on "
           f"every node")
    if path is not None:
        try:
            with open(_typed(path, "cluster.secret_file", str), "rb") as f:
                secret, where = f.read().strip(), f"cluster.secret_file {path}"
        except OSError as e:
            raise ConfigError(f"cannot read cluster.secret_file {path}: {e.strerror}") from None
    elif env.get(SECRET_ENV):
        secret, where = env[SECRET_ENV].encode(), SECRET_ENV
    else:
        raise ConfigError(f"a cluster needs a secret: {fix}")
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"the cluster secret in {where} is {len(secret)} bytes, too short: {fix}")
    return secret


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def from_dict(data: dict[str, Any], interfaces: Mapping[str, str] | None = None,
              env: Mapping[str, str] | None = None) -> Config:
    """The checked configuration.  interfaces: the worker interface each
    front-end needs, by name (pyshm.frontend.Registry.interfaces()), for the
    suites that do not set one; by default the installed front-ends'.
    env: where PYSHM_CLUSTER_SECRET is looked up (os.environ)."""
    unknown = set(data) - {"instance", "suites", "listen", "cluster"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]} is not a section (instance, suites, listen, cluster)")
    cluster = _cluster(data["cluster"], os.environ if env is None else env) if "cluster" in data else None
    inst = _typed(data.get("instance", {}), "instance", dict)
    suites_t = _typed(data.get("suites", {}), "suites", dict)
    if not suites_t:
        raise ConfigError("suites is empty: define at least one [suites.NAME] with an app")
    suites = {name: _suite(name, t) for name, t in suites_t.items()}
    listen_t = _typed(data.get("listen", []), "listen", list)
    if not listen_t:
        raise ConfigError("listen is empty: add a [[listen]] with frontend, address and suite")
    listen = [_listen(i, t, suites) for i, t in enumerate(listen_t)]
    _infer_interfaces(suites, listen, interfaces)
    known = {"name", "heap_size", "slots", "inline_size", "graceful_timeout", "queue_timeout", "preload",
             "max_workers", "sessions", "session_ttl", "secure_cookies", "secret"}
    unknown = set(inst) - known
    if unknown:
        raise ConfigError(f"instance.{sorted(unknown)[0]} is not an instance setting ({', '.join(sorted(known))})")
    # A node's default name includes its node id: nodes on one host (or in
    # network namespaces, which share /dev/shm) must not collide.
    default_name = f"pyshm-{cluster.node}" if cluster else f"pyshm-{listen[0].port}"
    cfg = Config(name=_typed(inst.get("name", default_name), "instance.name", str),
                 suites=suites, listen=listen, cluster=cluster)
    if not cfg.name or "/" in cfg.name or len(cfg.name) > 100:
        raise ConfigError(f"instance.name must be 1 to 100 characters without '/', not {cfg.name!r}")
    if "heap_size" in inst:
        cfg.heap_size = _size(inst["heap_size"], "instance.heap_size")
    if "inline_size" in inst:
        cfg.inline_size = _size(inst["inline_size"], "instance.inline_size")
    if "secure_cookies" in inst:
        cfg.secure_cookies = _typed(inst["secure_cookies"], "instance.secure_cookies", bool)
    if "secret" in inst:
        cfg.secret = _typed(inst["secret"], "instance.secret", str)
        if len(cfg.secret) < 16:
            raise ConfigError("instance.secret must be at least 16 characters")
    for key in ("slots", "max_workers", "sessions"):
        if key in inst:
            setattr(cfg, key, _typed(inst[key], f"instance.{key}", int))
            if getattr(cfg, key) < 1:
                raise ConfigError(f"instance.{key} must be at least 1")
    for key in ("graceful_timeout", "queue_timeout", "session_ttl"):
        if key in inst:
            setattr(cfg, key, float(_typed(inst[key], f"instance.{key}", (int, float))))
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"instance.{key} must be positive")
    if "preload" in inst:
        cfg.preload = _app(inst["preload"], "instance.preload")
    total = sum(s.workers for s in suites.values())
    if total > cfg.max_workers:
        raise ConfigError(f"suites ask for {total} workers but instance.max_workers is {cfg.max_workers}")
    return cfg


def read(path: str) -> dict[str, Any]:
    """The TOML file's tables, not yet checked."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None

