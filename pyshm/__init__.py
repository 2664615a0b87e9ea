"""pyshm: a Python application server built on shared memory.

The names below are loaded on first use (PEP 562), so that `pyshm --help`
and `pyshm status` do not load the codec or the C core."""
from __future__ import annotations

import importlib
from typing import Any

from pyshm.errors import (
    ClosureError, ClosureNotFound, ClosureReleased, DirectoryFull, HeapCorrupt, HeapFull,
    LayoutMismatch, PinLimit, PyshmError, ReaderTableFull, SegmentError, SegmentExists,
    SegmentNotFound,
)

_LAZY = {
    "MappedDict": "pyshm._codec", "MappedList": "pyshm._codec", "MappedObject": "pyshm._codec",
    "MappedSet": "pyshm._codec", "Snapshot": "pyshm._codec", "shareable": "pyshm._codec",
    "HeapStats": "pyshm.heap", "SharedHeap": "pyshm.heap",
    "RpcRegistry": "pyshm.rpc", "endpoint": "pyshm.rpc", "rpc_method": "pyshm.rpc",
}

__all__ = [
    "SharedHeap", "HeapStats", "Snapshot", "shareable",
    "MappedDict", "MappedList", "MappedSet", "MappedObject",
    "PyshmError", "ClosureError", "ClosureNotFound", "ClosureReleased", "HeapFull",
    "HeapCorrupt", "SegmentError", "SegmentExists", "SegmentNotFound", "LayoutMismatch",
    "PinLimit", "ReaderTableFull", "DirectoryFull",
    "RpcRegistry", "rpc_method", "endpoint",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyshm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
