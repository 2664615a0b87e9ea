"""The `pyshm` command.

    pyshm serve APP --http|--tcp HOST:PORT | -c pyshm.toml   run an instance (manager + suites of workers)
    pyshm status NAME [--json]       a running instance: workers, restarts, sessions, slots, heap, cluster (read-only)
    pyshm drain NAME                 stop an instance as SIGTERM does (a cluster node hands its sessions on first)
    pyshm heap stats NAME [--json]   a closure heap: usage, versions, attached processes
    pyshm clean [--force]            remove segments whose creator is gone and that nobody uses
    pyshm demo                       the example catalog instance on 127.0.0.1:7000 (`make run`)
    pyshm demo-heap                  put a large closure, map it from several processes, show memory

Exit status: 0; 1 for an error in what was asked (a configuration, a name);
2 when an instance could not start (an address in use, an application that
cannot be loaded)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from pyshm.sizes import format_size


def _heap_stats(args: argparse.Namespace) -> int:
    from pyshm.heap import SharedHeap

    heap = SharedHeap.attach(args.name, observe=True)
    stats = heap.stats()
    if args.json:
        out = dataclasses.asdict(stats)
        out["closures"] = [{"name": n, "version": v, "bytes": b} for n, v, b in heap.versions()]
        print(json.dumps(out, indent=2))
        return 0
    print(f"heap {args.name}: {format_size(stats.used_bytes)} used of "
          f"{format_size(stats.arena_bytes)} (segment {format_size(stats.size)}), "
          f"largest free {format_size(stats.largest_free)}")
    print(f"  closures {stats.names}/{stats.name_capacity}, versions: {stats.active_versions} "
          f"current, {stats.obsolete_versions} obsolete, {stats.building_versions} being built, "
          f"{stats.pinned_versions} pinned")
    print(f"  processes attached {stats.readers}/{stats.reader_capacity}, "
          f"lock repairs {stats.repairs}")
    for name, version, nbytes in heap.versions():
        print(f"  {name:<40} v{version:<8} {format_size(nbytes)}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    from pyshm import segments

    removed = segments.clean(force=args.force)
    for seg in removed:
        print(f"removed {seg.name} ({format_size(seg.size)}, creator pid {seg.creator_pid} gone)")
    kept = segments.list_segments()
    for seg in kept:
        why = "creator alive" if seg.creator_alive else f"{seg.readers} process(es) attached"
        if not seg.readable:
            why = "not readable by this pyshm (use --force)"
        print(f"kept {seg.name} ({why})")
    if not removed and not kept:
        print("no pyshm segments")
    return 0


CLIENT = ("python3 -c \"import socket,struct,sys; s=socket.create_connection(('127.0.0.1',{port})); "
          "q=sys.argv[1].encode(); s.sendall(struct.pack('>I',len(q))+q); "
          "n=struct.unpack('>I',s.recv(4))[0]; print(s.recv(n & 0x7fffffff).decode())\" {query}")


def _demo(args: argparse.Namespace) -> int:
    """A demo instance: the catalog app of pyshm.demo_app on 127.0.0.1."""
    import asyncio

    from pyshm import config as cfgmod
    from pyshm.manager import ConnectionManager

    cfg = cfgmod.from_dict({
        "instance": {"name": f"demo-{args.port}", "preload": "pyshm.demo_app:setup", "heap_size": "1GiB"},
        "suites": {"catalog": {"app": "pyshm.demo_app:handle", "workers": args.workers}},
        "listen": [{"frontend": "tcp", "address": f"127.0.0.1:{args.port}", "suite": "catalog"}]})
    manager = ConnectionManager(cfg)

    async def main() -> int:
        server = asyncio.create_task(manager.run())
        ready = asyncio.create_task(manager.ready.wait())
        await asyncio.wait([server, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            print(f"pyshm demo: a catalog of {200_000:,} products put once into shared memory, mapped by "
                  f"{args.workers} workers; raw TCP frames on 127.0.0.1:{args.port}\n"
                  f"  ask for a product:  {CLIENT.format(port=args.port, query='sku-0000042')}\n"
                  f"  ask who answered:   {CLIENT.format(port=args.port, query='stats')}\n"
                  f"  Ctrl-C stops it (answers what is in flight first).", flush=True)
        return await server

    return _run(main())


def _demo_heap(args: argparse.Namespace) -> int:
    from pyshm import demo

    return demo.run(items=args.items, workers=args.workers)


def _demo_worker(args: argparse.Namespace) -> int:
    from pyshm import demo

    return demo.worker(args.heap, args.closure)


def _serve_config(args: argparse.Namespace, interfaces: dict[str, str] | None = None):
    from pyshm import config as cfgmod
    from pyshm.errors import ConfigError

    if args.config:
        if args.app or args.tcp or args.http:
            raise ConfigError("give either -c FILE or an app with --tcp/--http, not both")
        # The worker-management and cluster flags given override the file's settings.
        data = _with_suite_flags(cfgmod.read(args.config), _suite_flags(args))
        return cfgmod.from_dict(_with_cluster_flags(data, args), interfaces)
    if not args.app or not (args.tcp or args.http):
        raise ConfigError("pyshm serve needs -c pyshm.toml, or an app and a listener: "
                          "pyshm serve app:handle --tcp 127.0.0.1:7000, or myapp:app --http 127.0.0.1:8000")
    if args.tcp and args.http:
        raise ConfigError("one app is either a raw-frame handler (--tcp) or a WSGI app (--http); "
                          "use -c pyshm.toml for both")
    listen = [{"frontend": "tcp", "address": a, "suite": "main"} for a in args.tcp or []]
    listen += [{"frontend": "http", "address": a, "suite": "main", "access_log": args.access_log}
               for a in args.http or []]
    data = {"instance": {}, "suites": {"main": {"app": args.app, "workers": args.workers, **_suite_flags(args)}},
            "listen": listen}
    if args.name:
        data["instance"]["name"] = args.name
    if args.preload:
        data["instance"]["preload"] = args.preload
    return cfgmod.from_dict(_with_cluster_flags(data, args), interfaces)


def _suite_flags(args: argparse.Namespace) -> dict:
    """The worker-management flags given, as suite settings."""
    flags = {"timeout": args.timeout, "max_requests": args.max_requests,
             "max_requests_jitter": args.max_requests_jitter, "max_rss": args.max_rss}
    return {k: v for k, v in flags.items() if v is not None}


def _with_suite_flags(data: dict, flags: dict) -> dict:
    for suite in data.get("suites", {}).values():
        if isinstance(suite, dict):
            suite.update(flags)
    return data


def _with_cluster_flags(data: dict, args: argparse.Namespace) -> dict:
    """--cluster and its companions, as the [cluster] table's settings."""
    flags = {"name": args.cluster, "node": args.node, "link": args.link, "interfaces": args.interface,
             "peers": args.peer, "secret_file": args.cluster_secret_file}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        table = data.setdefault("cluster", {})
        if isinstance(table, dict):
            table.update(given)
    return data


def _serve(args: argparse.Namespace) -> int:
    from pyshm.frontend import Registry
    from pyshm.manager import ConnectionManager

    registry = Registry.load()      # once: the configuration and the manager see the same front-ends
    config = _serve_config(args, registry.interfaces())
    return _run(ConnectionManager(config, registry).run())


def _run(coro) -> int:
    """asyncio.run, on uvloop when it is installed."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        uvloop = None   # (not run inside the except: exceptions would chain to this one)
    return asyncio.run(coro) if uvloop is None else uvloop.run(coro)


def _status(args: argparse.Namespace) -> int:
    from pyshm import control

    try:
        st = control.status(args.instance)
    except ConnectionError as e:
        print(f"pyshm: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"instance {st['instance']} (manager pid {st['pid']}): {st['requests_served']:,} requests served, "
          f"{st['connections']} connections, {st['requests_in_flight']} in flight, {st['requests_waiting']} waiting")
    print("workers:")
    for w in st["workers"]:
        print(f"  pid {w['pid']:<8} suite {w['suite']:<12} {w['state']:<9} served {w['served']:<10,} "
              f"in flight {w['in_flight']}")
    print("restarts: " + ", ".join(f"{k} {v}" for k, v in st["restarts"].items()))
    ses = st["sessions"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(ses["by_kind"].items())) or "none"
    print(f"sessions: {ses['active']:,} of {ses['capacity']:,} ({kinds})")
    slots = st["slots"]
    print(f"request slots: {slots['free']} free ({slots['manager_free']} on the manager's free list), "
          f"{slots['queued']} queued, {slots['running']} running, {slots['done']} done")
    heap = st["heap"]
    print(f"heap: {format_size(heap['used_bytes'])} used of {format_size(heap['arena_bytes'])}, "
          f"{heap['closures']} closures")
    if st.get("cluster"):
        _print_cluster(st["cluster"])
    return 0


def _print_cluster(c: dict) -> None:
    print(f"cluster {c['name']}: node {c['node']}, link {c['link']}, {c['sessions_owned']:,} sessions owned here, "
          f"forwarded in {c['forwarded_in']:,}, out {c['forwarded_out']:,}")
    for p in c["peers"]:
        heard = f"{p['last_heartbeat']:.2f} s ago" if p["last_heartbeat"] is not None else "never"
        rtt = f"{p['rtt_ms']:.2f} ms" if p["rtt_ms"] is not None else "-"
        print(f"  {p['node']:<20} {p['state']:<8} link {p['link'] or '-':<22} heard {heard:<12} rtt {rtt:<10} "
              f"forwarded in {p['forwarded_in']:,}, out {p['forwarded_out']:,}")


def _drain(args: argparse.Namespace) -> int:
    from pyshm import control

    try:
        control.drain(args.instance)
    except ConnectionError as e:
        print(f"pyshm: {e}", file=sys.stderr)
        return 1
    print(f"instance {args.instance} drains: it answers what it holds, hands its sessions to its peers "
          f"(in a cluster) and exits")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshm", description="pyshm: a shared-memory Python server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="serve the example catalog application on 127.0.0.1")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("demo-heap", help="put a large closure, map it from several processes, show memory")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(fn=_demo_heap)

    p = sub.add_parser("demo-worker", help=argparse.SUPPRESS)
    p.add_argument("heap")
    p.add_argument("closure")
    p.set_defaults(fn=_demo_worker)

    p = sub.add_parser("serve", help="run an instance: connection manager, suites of workers")
    p.add_argument("app", nargs="?", help="module:attribute: a raw-frame handler (--tcp) or a WSGI app (--http)")
    p.add_argument("-c", "--config", help="a pyshm.toml")
    p.add_argument("--tcp", action="append", metavar="HOST:PORT", help="a raw-frame listener (repeatable)")
    p.add_argument("--http", action="append", metavar="HOST:PORT", help="an HTTP/1.1 listener for a WSGI app")
    p.add_argument("--access-log", action="store_true", help="log HTTP requests in the common log format")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", help="instance name (segments /dev/shm/pyshm.NAME*)")
    p.add_argument("--preload", metavar="module:function", help="called once with the heap before workers start")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="a request running longer is answered (HTTP 504) and its worker replaced "
                        "(default 30; 0: no limit)")
    p.add_argument("--max-requests", type=int, metavar="N", help="replace a worker after N requests (0: never)")
    p.add_argument("--max-requests-jitter", type=int, metavar="N",
                   help="add a random 0..N to --max-requests per worker")
    p.add_argument("--max-rss", metavar="SIZE", help='replace a worker whose resident memory passes SIZE ("512MiB")')
    c = p.add_argument_group("cluster (the [cluster] table)")
    c.add_argument("--cluster", metavar="NAME", help="join the LAN cluster NAME (nodes with one name and secret)")
    c.add_argument("--node", metavar="ID", help="this node's id, unique in the cluster (default: hostname-pid)")
    c.add_argument("--link", metavar="HOST:PORT", help="where this node accepts links from its peers (port 0: any)")
    c.add_argument("--interface", action="append", metavar="IPV4",
                   help="announce and browse with zeroconf on this interface address (repeatable)")
    c.add_argument("--peer", action="append", metavar="HOST:PORT", help="a static peer's link address (repeatable)")
    c.add_argument("--cluster-secret-file", metavar="PATH",
                   help="the cluster secret (>= 32 bytes; else PYSHM_CLUSTER_SECRET)")
    p.set_defaults(fn=_serve)

    p = sub.add_parser("status", help="workers, sessions and memory of a running instance (read-only)")
    p.add_argument("instance", help="the instance name (instance.name, or pyshm-<port>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_status)

    p = sub.add_parser("drain", help="stop an instance (a cluster node hands its sessions to its peers first)")
    p.add_argument("instance", help="the instance name")
    p.set_defaults(fn=_drain)

    heap = sub.add_parser("heap", help="inspect a shared closure heap")
    heap_sub = heap.add_subparsers(dest="heap_command", required=True)
    p = heap_sub.add_parser("stats", help="usage, versions and attached processes of heap NAME")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_heap_stats)

    p = sub.add_parser("clean", help="remove segments whose creator is gone and nobody uses")
    p.add_argument("--force", action="store_true", help="also remove unreadable segments")
    p.set_defaults(fn=_clean)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # An access log that is switched on (--access-log, access_log = true) is written without -v too.
    logging.getLogger("pyshm.access").setLevel(logging.INFO)
    try:
        return args.fn(args)
    except Exception as exc:
        from pyshm.errors import PyshmError

        if isinstance(exc, PyshmError):
            print(f"pyshm: {exc}", file=sys.stderr)
            return exc.exit_status
        raise


if __name__ == "__main__":
    sys.exit(main())
