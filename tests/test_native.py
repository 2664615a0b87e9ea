"""pyshm.native: the C error codes and the instance's segment names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyshm import native
from pyshm._native import lib
from pyshm.errors import PyshmError, SegmentError

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "pyshm_errors.h"


def test_every_error_code_of_the_header_is_declared_and_mapped_once():
    names = re.findall(r"^#define (PYSHM_ERR_\w+) ", HEADER.read_text(), flags=re.M)
    codes = {name: getattr(lib, name) for name in names}
    assert all(code < 0 for code in codes.values()) and len(set(codes.values())) == len(codes)
    unmapped = [name for name, code in codes.items() if code not in native.ERRORS and name != "PYSHM_ERR_SYS"]
    assert not unmapped, f"add these codes to pyshm.native.ERRORS: {unmapped}"
    assert lib.PYSHM_ERR_SYS not in native.ERRORS      # it carries errno: error() builds it


def test_error_names_the_call_and_keeps_errno():
    exc = native.error(lib.PYSHM_ERR_DIRFULL, "put 'x'")
    assert isinstance(exc, PyshmError) and str(exc).startswith("put 'x': directory full")
    assert type(native.error(-10_000, "x")) is PyshmError      # a code this Python does not know yet
    with pytest.raises(SegmentError, match="unlink 'a/b'") as info:
        native.check(lib.PYSHM_ERR_SYS, "unlink 'a/b'")
    assert isinstance(info.value, OSError)
    assert native.check(3, "x") == 3


def test_segment_names():
    assert native.heap_segment("shop") == "shop"
    assert native.request_segment("shop") == "shop.rr"
    assert native.session_segment("shop") == "shop.sessions"
    assert native.segment_path("shop.rr") == "/dev/shm/pyshm.shop.rr"


def test_unlink_missing(heap_name):
    with pytest.raises(FileNotFoundError, match="no segment named"):
        native.unlink(heap_name + "-missing")
    native.unlink(heap_name + "-missing", quiet=True)
