"""Memory accounting of processes, from /proc (Linux)."""
from __future__ import annotations


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
