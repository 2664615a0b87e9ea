"""Memory accounting of processes, from /proc (Linux)."""
from __future__ import annotations

import os


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/PID/smaps_rollup, in bytes (Rss, Pss, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def pss(pid: int) -> int:
    """Proportional set size: shared pages split between their mappers."""
    return smaps_rollup(pid)["Pss"]


def rss(pid: int) -> int:
    return smaps_rollup(pid)["Rss"]


def resident_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/statm (cheap: no page walk); 0 when
    the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of
    /proc/PID/stat, as csrc/proc.c reads it); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
