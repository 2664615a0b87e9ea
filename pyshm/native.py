"""The conventions of pyshm's C core, in one place: what its negative return
codes mean as Python exceptions, what the shared-memory segments of an
instance are called, and creating, attaching and unlinking them.

Every C function returns 0 (PYSHM_OK) or a negative PYSHM_ERR_* code of
csrc/pyshm_errors.h; pyshm/_native_build.py declares each of those codes to
cffi, so they are read here as lib.PYSHM_ERR_*, never as numbers.  ERRORS maps
each code once to an exception class of pyshm.errors and a message; callers
that know better (a name that is missing, a heap that is full) raise their own
message first and hand the rest to error() or check().

Segments live in /dev/shm as pyshm.<name>.  An instance owns three: its
closure heap (named as the instance), its request memory (<instance>.rr) and
its session table (<instance>.sessions).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from pyshm._native import ffi, lib
from pyshm.errors import (
    ClosureNotFound, DirectoryFull, HeapCorrupt, HeapFull, LayoutMismatch, PinLimit, PyshmError,
    ReaderTableFull, SegmentError, SegmentExists, SegmentNotFound,
)

# -- segment names ------------------------------------------------------------------------

SHM_DIR = "/dev/shm"
PREFIX = "pyshm."            # what the C core puts before a segment's name in SHM_DIR


def segment_path(name: str) -> str:
    """The file a segment of that name is, e.g. /dev/shm/pyshm.shop."""
    return f"{SHM_DIR}/{PREFIX}{name}"


def heap_segment(instance: str) -> str:
    """The segment of an instance's closure heap: the instance's own name."""
    return instance


def request_segment(instance: str) -> str:
    """The segment of an instance's request memory (pyshm.reqmem)."""
    return f"{instance}.rr"


def session_segment(instance: str) -> str:
    """The segment of an instance's session table (pyshm.sessions)."""
    return f"{instance}.sessions"


# -- error codes ----------------------------------------------------------------------------

#: Each negative code of csrc/pyshm_errors.h (but PYSHM_ERR_SYS, which
#: carries errno) and the exception that stands for it.
ERRORS: dict[int, tuple[type[Exception], str]] = {
    lib.PYSHM_ERR_MAGIC: (SegmentError, "not a pyshm segment"),
    lib.PYSHM_ERR_LAYOUT: (LayoutMismatch, "segment written by another pyshm layout version; "
                                           "stop its users and remove it with `pyshm clean --force`"),
    lib.PYSHM_ERR_KIND: (SegmentError, "segment is not a closure heap"),
    lib.PYSHM_ERR_FULL: (HeapFull, "heap full"),
    lib.PYSHM_ERR_NOTFOUND: (ClosureNotFound, "no such closure"),
    lib.PYSHM_ERR_CORRUPT: (HeapCorrupt, "heap consistency check failed"),
    lib.PYSHM_ERR_NOSLOT: (ReaderTableFull, "reader table full: too many processes attached"),
    lib.PYSHM_ERR_PINS: (PinLimit, "this process holds too many snapshots of distinct versions; release some"),
    lib.PYSHM_ERR_DIRFULL: (DirectoryFull, "directory full: create the heap with a larger names="),
    lib.PYSHM_ERR_NAME: (ValueError, "name must be 1 to 104 bytes (heap names 1 to 200, without '/')"),
    lib.PYSHM_ERR_EXISTS: (SegmentExists, "segment exists"),
    lib.PYSHM_ERR_TOOSMALL: (ValueError, "segment too small for its tables"),
    lib.PYSHM_ERR_NOTREADY: (SegmentError, "segment still being initialised by its creator"),
    lib.PYSHM_ERR_LOCK: (HeapCorrupt, "heap lock not recoverable"),
    lib.PYSHM_ERR_STATE: (PyshmError, "operation on a version in the wrong state"),
}


def error(rc: int, what: str) -> Exception:
    """The exception for the failed C call `what` that returned rc (read
    right after the call: PYSHM_ERR_SYS takes errno)."""
    if rc == lib.PYSHM_ERR_SYS:
        err = ffi.errno
        return SegmentError(err, f"{what}: {os.strerror(err)}")
    cls, msg = ERRORS.get(rc, (PyshmError, f"error {rc}"))
    return cls(f"{what}: {msg}")


def check(rc: int, what: str) -> int:
    """rc, unless it is an error code (negative): then its exception."""
    if rc < 0:
        raise error(rc, what)
    return rc


# -- create, attach, unlink --------------------------------------------------------------------

def open_segment(fn: Callable[..., int], ctype: str, name: str, *args: Any, what: str, create: bool = False,
                 errors: Mapping[int, Exception] | None = None) -> Any:
    """Calls the C create or attach function fn of a kind of segment (`what`,
    e.g. "heap") as fn(name, *args, &handle) and returns the handle.  A code
    in `errors` raises that exception; any other fails as error() says."""
    out = ffi.new(ctype)
    rc = fn(name.encode(), *args, out)
    if rc:
        if errors and rc in errors:
            raise errors[rc]
        raise error(rc, f"{'create' if create else 'attach'} {what} {name!r}")
    return out[0]


def open_instance_segment(fn: Callable[..., int], ctype: str, name: str, *args: Any, what: str,
                          create: bool = False, too_small: str = "") -> Any:
    """open_segment() for a segment of a running instance (its request
    memory, its session table): the errors say what to do about the instance.
    too_small: why the arguments were refused (PYSHM_ERR_TOOSMALL)."""
    return open_segment(fn, ctype, name, *args, what=what, create=create, errors={
        lib.PYSHM_ERR_EXISTS: SegmentExists(f"{what} {name!r} exists: another instance of that name runs, "
                                            f"or a dead one left it (`pyshm clean`)"),
        lib.PYSHM_ERR_TOOSMALL: ValueError(f"{what} {name!r}: {too_small}"),
        lib.PYSHM_ERR_NOTFOUND: SegmentNotFound(f"no {what} {name!r}: is the instance running?"),
        lib.PYSHM_ERR_CORRUPT: HeapCorrupt(f"{what} {name!r}: header fails its layout checks"),
    })


def unlink(name: str, *, quiet: bool = False) -> None:
    """Removes the segment's name (processes attached keep using it).
    Raises SegmentNotFound if there is none, unless quiet: then nothing
    that fails is raised."""
    rc = lib.pyshm_segment_unlink(name.encode())
    if not rc or quiet:
        return
    if rc == lib.PYSHM_ERR_NOTFOUND:
        raise SegmentNotFound(f"no segment named {name!r}")
    raise error(rc, f"unlink {name!r}")
