"""pyshm: a Python application server built on shared memory."""
from __future__ import annotations

from pyshm._codec import MappedDict, MappedList, MappedObject, MappedSet, Snapshot, shareable
from pyshm.errors import (
    ClosureError, ClosureNotFound, ClosureReleased, DirectoryFull, HeapCorrupt, HeapFull,
    LayoutMismatch, PinLimit, PyshmError, ReaderTableFull, SegmentError, SegmentExists,
    SegmentNotFound,
)
from pyshm.heap import HeapStats, SharedHeap
from pyshm.rpc import RpcRegistry, endpoint, rpc_method

__all__ = [
    "SharedHeap", "HeapStats", "Snapshot", "shareable",
    "MappedDict", "MappedList", "MappedSet", "MappedObject",
    "PyshmError", "ClosureError", "ClosureNotFound", "ClosureReleased", "HeapFull",
    "HeapCorrupt", "SegmentError", "SegmentExists", "SegmentNotFound", "LayoutMismatch",
    "PinLimit", "ReaderTableFull", "DirectoryFull",
    "RpcRegistry", "rpc_method", "endpoint",
]
__version__ = "0.1.0"
