"""Finding and removing pyshm segments left behind by dead processes.
(What segments are called, and creating and unlinking one: pyshm.native.)"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pyshm import native
from pyshm._native import ffi, lib
from pyshm.native import PREFIX, SHM_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    size: int
    kind: int
    layout_version: int
    creator_pid: int
    creator_alive: bool
    readers: int | None     # live attached processes (heaps), None if unknown
    readable: bool          # header valid and of this layout version

    @property
    def orphaned(self) -> bool:
        """Its creator is gone and no live process is attached."""
        return self.readable and not self.creator_alive and not self.readers


def list_segments() -> list[SegmentInfo]:
    found = []
    for entry in sorted(os.listdir(SHM_DIR)):
        if entry.startswith(PREFIX):
            found.append(probe(entry[len(PREFIX):]))
    return found


def probe(name: str) -> SegmentInfo:
    from pyshm.heap import SharedHeap

    info = ffi.new("pyshm_seg_info_t *")
    rc = lib.pyshm_segment_probe(name.encode(), info)
    if rc not in (lib.PYSHM_OK, lib.PYSHM_ERR_LAYOUT):
        return SegmentInfo(name, 0, 0, 0, 0, False, None, False)
    readers = None
    if rc == lib.PYSHM_OK and info.kind == lib.PYSHM_KIND_HEAP:
        try:
            readers = SharedHeap.attach(name, observe=True).stats().readers
        except Exception as exc:  # a broken segment is reported, not fatal
            log.warning("segment %s: %s", name, exc)
    return SegmentInfo(name, info.size, info.kind, info.layout_version, info.creator_pid,
                       bool(info.creator_alive), readers, rc == lib.PYSHM_OK)


def clean(force: bool = False) -> list[SegmentInfo]:
    """Unlinks orphaned segments (and, with force, unreadable ones too);
    returns what was removed."""
    removed = []
    for seg in list_segments():
        if seg.orphaned or (force and not seg.readable):
            native.unlink(seg.name, quiet=True)
            log.info("removed segment %s (creator pid %d gone)", seg.name, seg.creator_pid)
            removed.append(seg)
    return removed
