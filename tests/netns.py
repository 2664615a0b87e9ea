"""Network namespaces for cluster tests: a small LAN of member namespaces
joined by veth pairs to a bridge in a hub namespace, and avahi-daemon (with
its own dbus-daemon) inside one member.  Needs root and iproute2.

Nothing is added to the root network namespace: the bridge lives in the hub
namespace, and each veth pair is created in the hub with its peer placed
straight into the member.  Namespaces are named PREFIX-PID-SEQ-hub and
PREFIX-PID-SEQ-mI (PID: the creating process), so concurrent test runs
never touch each other's namespaces and `remove_leftovers` removes only
what a dead process left.  Every namespace is isolated, so every LAN may use
the same subnet (10.77.0.0/24 by default) without clashes.

    with lan(3) as net:
        p = net.members[0].run(["sleep", "1000"])   # ip netns exec ...
        ...                                        # remove_lan kills p
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

NETNS_DIR = "/run/netns"
MEMBER_VETH = "lan0"          # the member's interface, inside its namespace
BRIDGE = "br0"                # the bridge, inside the hub namespace
_seq = itertools.count()


def _ip(*args: str, timeout: float = 10) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")


def _ns_exec(ns: str, script: str, timeout: float = 10) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"in {ns}: {script!r} failed ({r.returncode}): {r.stderr.strip()}")


@dataclass
class Member:
    ns: str                       # namespace name
    ip: str                       # its IPv4 address on the bridge subnet, e.g. 10.77.0.11
    veth: str                     # its interface name inside the namespace

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """`ip netns exec NS argv...` (ip execs: the Popen's pid is argv's
        process), in a new session unless told otherwise."""
        popen_kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.argv(argv), **popen_kwargs)

    def check_output(self, argv: list[str], timeout: float = 10) -> str:
        """argv's stdout, run inside the namespace; CalledProcessError (with
        stderr) when it fails."""
        r = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r.stdout


@dataclass
class Lan:
    hub: str                      # the hub namespace holding the bridge
    members: list[Member] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [m.ns for m in self.members] + [self.hub]


def make_lan(n: int, prefix: str = "pyshmt", *, subnet: str = "10.77.0") -> Lan:
    """A hub namespace with a bridge and n member namespaces joined to it by
    veth pairs; member i has SUBNET.(10+i)/24 on `lan0`; lo up, IPv6 off,
    multicast on, no multicast snooping on the bridge."""
    if not 1 <= n <= 200:
        raise ValueError("1 <= n <= 200")
    base = f"{prefix}-{os.getpid()}-{next(_seq)}"
    net = Lan(hub=f"{base}-hub")
    try:
        _add_ns(net.hub)
        _ip("-n", net.hub, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
            "forward_delay", "0", "mcast_snooping", "0")
        _ip("-n", net.hub, "link", "set", BRIDGE, "up")
        for i in range(n):
            m = Member(ns=f"{base}-m{i}", ip=f"{subnet}.{10 + i}", veth=MEMBER_VETH)
            net.members.append(m)
            _add_ns(m.ns)
            hub_end = f"m{i}"
            _ip("-n", net.hub, "link", "add", hub_end, "type", "veth", "peer", "name", m.veth,
                "netns", m.ns)
            _ip("-n", net.hub, "link", "set", hub_end, "master", BRIDGE)
            _ip("-n", net.hub, "link", "set", hub_end, "up")
            _ip("-n", m.ns, "addr", "add", f"{m.ip}/24", "dev", m.veth)
            _ip("-n", m.ns, "link", "set", m.veth, "multicast", "on", "up")
        return net
    except BaseException:
        remove_lan(net)
        raise


def _add_ns(ns: str) -> None:
    _ip("netns", "add", ns)
    # IPv6 off before any interface appears (no link-local addresses, no MLD).
    _ns_exec(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1;"
                 " ip link set lo up")


def _ns_id(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(NETNS_DIR, ns))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in(namespaces: list[str]) -> list[int]:
    """The live (non-zombie) processes whose network namespace is one of these."""
    ids = {i for i in map(_ns_id, namespaces) if i is not None}
    if not ids:
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue                  # gone, or a zombie (its namespaces are released)
        if (st.st_dev, st.st_ino) in ids and _alive(int(entry)):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie is not alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _kill_all(namespaces: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_in(namespaces)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {namespaces} survive SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _remove(namespaces: list[str]) -> None:
    errors = []
    try:
        _kill_all(namespaces)
    except RuntimeError as e:
        errors.append(str(e))
    for ns in namespaces:           # members first: their veths (and peers) go with them
        if _ns_id(ns) is None:
            continue
        try:
            _ip("netns", "del", ns)
        except RuntimeError as e:
            errors.append(str(e))
    if errors:
        raise RuntimeError("; ".join(errors))


def remove_lan(net: Lan) -> None:
    """Kill (SIGKILL, by pid) every process inside the LAN's namespaces, then
    delete them.  Idempotent.  Processes this process started stay zombies
    until their Popen is waited on."""
    _remove(net.namespaces)


def remove_leftovers(prefix: str = "pyshmt") -> list[str]:
    """Remove namespaces named PREFIX-PID-... whose creating process is gone
    (a killed earlier run); returns their names.  Live runs' namespaces,
    this process's included, are left alone."""
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    stale = [ns for ns in names if (m := pat.match(ns)) and not _alive(int(m.group(1)))]
    # members (…-mI) before hubs
    stale.sort(key=lambda ns: ns.endswith("-hub"))
    if stale:
        _remove(stale)
    return stale


@contextmanager
def lan(n: int, prefix: str = "pyshmt", *, subnet: str = "10.77.0") -> Iterator[Lan]:
    net = make_lan(n, prefix, subnet=subnet)
    try:
        yield net
    finally:
        remove_lan(net)


# ---------------------------------------------------------------- avahi

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
host-name={host}
use-ipv4=yes
use-ipv6=no
allow-interfaces={iface}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no
publish-aaaa-on-ipv4=no

[reflector]
enable-reflector=no

[rlimits]
"""

_MOUNT_RUN = 'mount --bind "$0" /run && exec "$@"'   # sh -c SCRIPT RUNDIR ARGV...


class Avahi:
    """avahi-daemon with its own dbus-daemon inside one member namespace.

    Each daemon is started by its own `ip netns exec NS unshare -m sh -c
    'mount --bind RUN /run && exec DAEMON'`: both see the same private /run
    (RUN: a directory of ours), never the host's.  dbus listens on
    RUN/dbus/system_bus_socket; later commands reach it through
    DBUS_SYSTEM_BUS_ADDRESS (self.bus)."""

    def __init__(self, member: Member, workdir: str | os.PathLike) -> None:
        self.member = member
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_run = None
        run = self.workdir / "run"
        if len(str(run / "dbus" / "system_bus_socket")) > 100:    # sun_path holds 108 bytes
            run = self._own_run = Path(tempfile.mkdtemp(prefix="pyshmt-avahi-"))
        self.run_dir = run
        self.socket = run / "dbus" / "system_bus_socket"
        self.bus = f"unix:path={self.socket}"
        self.dbus: subprocess.Popen | None = None
        self.avahi: subprocess.Popen | None = None
        self._logs: list = []

    def _env(self) -> list[str]:
        return ["env", f"DBUS_SYSTEM_BUS_ADDRESS={self.bus}"]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        self._logs.append(log)
        return self.member.run(["unshare", "-m", "--propagation", "private", "sh", "-c", _MOUNT_RUN,
                                str(self.run_dir), *self._env(), *argv],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10) -> None:
        """Start dbus-daemon, then avahi-daemon; return when avahi's server
        state is RUNNING (its host name established), asked over dbus."""
        if self.avahi is not None:
            raise RuntimeError("already started")
        deadline = time.monotonic() + timeout
        for d in ("dbus", "avahi-daemon"):
            (self.run_dir / d).mkdir(parents=True, exist_ok=True)
        for stale in (self.socket, self.run_dir / "avahi-daemon" / "pid",
                      self.run_dir / "avahi-daemon" / "socket"):   # from a killed earlier run
            stale.unlink(missing_ok=True)
        dbus_conf = self.workdir / "dbus.conf"
        dbus_conf.write_text(DBUS_CONF.format(socket="/run/dbus/system_bus_socket"))
        avahi_conf = self.workdir / "avahi-daemon.conf"
        avahi_conf.write_text(AVAHI_CONF.format(host=re.sub(r"[^A-Za-z0-9-]", "-", self.member.ns)[:63],
                                                iface=self.member.veth))
        try:
            self.dbus = self._spawn("dbus", ["dbus-daemon", f"--config-file={dbus_conf}", "--nofork",
                                             "--nopidfile", "--nosyslog"])
            while not self.socket.exists():
                self._check(self.dbus, "dbus", deadline)
                time.sleep(0.02)
            self.avahi = self._spawn("avahi", ["avahi-daemon", "--no-drop-root", "--no-chroot",
                                               "--no-rlimits", "-f", str(avahi_conf)])
            while self._state() != 2:            # AVAHI_SERVER_RUNNING
                self._check(self.avahi, "avahi", deadline)
                self._check(self.dbus, "dbus", deadline)
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _check(self, p: subprocess.Popen, name: str, deadline: float) -> None:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not up in time:\n{self.log(name)}")

    def _state(self) -> int | None:
        try:
            out = self.member.check_output(
                [*self._env(), "dbus-send", "--system", "--print-reply", "--reply-timeout=1000",
                 "--dest=org.freedesktop.Avahi", "/", "org.freedesktop.Avahi.Server.GetState"],
                timeout=5)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"int32 (-?\d+)", out)
        return int(m.group(1)) if m else None

    def browse(self, service: str = "_pyshm._tcp", timeout: float = 10, *,
               min_count: int = 0) -> list[dict]:
        """`avahi-browse -rpt SERVICE` in the namespace: its resolved ('=')
        lines as dicts {interface, protocol, name, type, domain, host,
        address, port, txt} (name unescaped; host as avahi prints it, with
        its \\DDD escapes).  One run takes about 1 s (-t waits for avahi's
        "all for now").  With min_count, browse again until at least
        that many services are listed or timeout passes (then return the
        last list)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(deadline - time.monotonic(), 2.0)
            try:
                out = self.member.check_output([*self._env(), "avahi-browse", "-rpt", service],
                                               timeout=left)
            except subprocess.TimeoutExpired as e:     # avahi-browse is killed: keep what it printed
                out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            found = parse_browse(out)
            if len(found) >= min_count or time.monotonic() + 0.2 > deadline:
                return found
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM avahi then dbus (SIGKILL after 5 s), by pid; wait for
        both, so neither is left defunct.  Idempotent."""
        for p in (self.avahi, self.dbus):
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._own_run is not None:
            shutil.rmtree(self._own_run, ignore_errors=True)
            self._own_run = None


def _unescape(s: str) -> str:
    """avahi's label escapes: \\DDD (decimal byte) and \\C."""
    out = bytearray()
    i = 0
    b = s.encode()
    while i < len(b):
        if b[i] == 0x5C and i + 4 <= len(b) and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4]))
            i += 4
        elif b[i] == 0x5C and i + 1 < len(b):
            out.append(b[i + 1])
            i += 2
        else:
            out.append(b[i])
            i += 1
    return out.decode(errors="replace")


def parse_txt(field_: str) -> dict[str, str]:
    """avahi's TXT rendering `"k=v" "flag"` (with \\" and \\\\ escapes) as a dict."""
    items = re.findall(r'"((?:[^"\\]|\\.)*)"', field_)
    txt = {}
    for item in items:
        item = re.sub(r"\\(.)", r"\1", item)
        k, _, v = item.partition("=")
        txt[k] = v
    return txt


def parse_browse(out: str) -> list[dict]:
    """The resolved ('=') lines of `avahi-browse -p -r` output."""
    found = []
    for line in out.splitlines():
        if not line.startswith("="):
            continue
        parts = line.split(";", 9)
        if len(parts) < 10:
            continue
        _, iface, proto, name, type_, domain, host, address, port, txt = parts
        found.append({"interface": iface, "protocol": proto, "name": _unescape(name),
                      "type": type_, "domain": domain, "host": host, "address": address,
                      "port": int(port), "txt": parse_txt(txt)})
    return found
