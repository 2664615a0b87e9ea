"""The `pyshm` command: demo, heap stats, clean."""
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


def _demo(args: argparse.Namespace) -> int:
    from pyshm import demo

    return demo.run(items=args.items, workers=args.workers)


def _demo_worker(args: argparse.Namespace) -> int:
    from pyshm import demo

    return demo.worker(args.heap, args.closure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshm", description="pyshm: a shared-memory Python server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="put a large closure, map it from several processes")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("demo-worker", help=argparse.SUPPRESS)
    p.add_argument("heap")
    p.add_argument("closure")
    p.set_defaults(fn=_demo_worker)

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
    try:
        return args.fn(args)
    except Exception as exc:
        from pyshm.errors import PyshmError

        if isinstance(exc, PyshmError):
            print(f"pyshm: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
