"""Property tests: for random nested structures, get(put(x)) == x and the
mapped view behaves like x."""
from __future__ import annotations

import datetime as dt
import decimal
import struct
import uuid
from collections.abc import Mapping, Sequence, Set

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyshm._codec import encode, stable_hash_of

hashable_atoms = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**200, max_value=2**200)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
    | st.complex_numbers(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.uuids() | st.dates() | st.timedeltas()
    | st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)
                   | st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)), st.integers(-600, 600)))
    | st.times()
)
keys = st.recursive(hashable_atoms, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                    max_leaves=4)
atoms = hashable_atoms | st.binary(min_size=0, max_size=50).map(bytearray)
values = st.recursive(
    atoms,
    lambda inner: (st.lists(inner, max_size=6) | st.tuples(inner, inner)
                   | st.dictionaries(keys, inner, max_size=6) | st.sets(keys, max_size=5)
                   | st.frozensets(keys, max_size=5)),
    max_leaves=30,
)

# Examples, deadline and seed come from the profile (tests/conftest.py).
SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_behaves_like(view, x):
    """The view answers len, iteration, `in` and indexing like x."""
    assert view == x
    if isinstance(x, dict):
        assert isinstance(view, Mapping)
        assert len(view) == len(x)
        assert list(view) == list(x)
        for k, v in x.items():
            assert k in view
            assert_behaves_like(view[k], v)
        assert ("no such key", object) not in view
    elif isinstance(x, (list, tuple)):
        assert isinstance(view, Sequence)
        assert len(view) == len(x)
        for i, v in enumerate(x):
            assert_behaves_like(view[i], v)
            assert_behaves_like(view[i - len(x)], v)
        assert list(view[1:3]) == list(x[1:3])
    elif isinstance(x, (set, frozenset)):
        assert isinstance(view, Set)
        assert len(view) == len(x)
        assert set(view) == x
        for item in x:
            assert item in view
    elif isinstance(x, (bytes, bytearray)):
        assert bytes(view) == bytes(x)
    else:
        assert view == x and type(view) is type(x)


@pytest.mark.fuzz
@SETTINGS
@given(values)
def test_roundtrip_and_view(heap, x):
    heap.put("x", x)
    assert heap.get("x") == x
    with heap.map("x") as view:
        assert_behaves_like(view, x)


@pytest.mark.fuzz
@SETTINGS
@given(st.dictionaries(keys, st.integers(), max_size=40))
def test_dict_lookup_by_equal_keys_of_other_types(heap, d):
    """1 == 1.0 == True and Decimal(1) == 1: lookups agree with Python's."""
    heap.put("d", d)
    with heap.map("d") as view:
        for k in d:
            assert view[k] == d[k]
            if isinstance(k, bool) or (isinstance(k, int) and abs(k) < 2**53):
                assert view.get(float(k)) == d[k]
                assert view.get(decimal.Decimal(int(k))) == d[k]


def test_special_values(heap):
    x = {"nan": float("inf"), "neg0": -0.0, "big": -(2**1000), "s": "snow ☃ \U0001f600",
         "surrogate": "\ud800x", "u": uuid.UUID(int=7), "empty": [(), {}, set(), frozenset(), b"", ""]}
    heap.put("x", x)
    assert heap.get("x") == x
    with heap.map("x") as view:
        assert view == x
        assert view["surrogate"] == "\ud800x"


def bits(f: float) -> bytes:
    return struct.pack("<d", f)


@pytest.mark.fuzz
@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True), max_size=30))
def test_floats_come_back_bit_for_bit(heap, xs):
    """Floats are stored inline when their exponent allows, else as records:
    either way -0.0, subnormals, infinities and NaN payloads survive."""
    xs = xs + [0.0, -0.0, 2.0**-127, 2.0**-128, 2.0**127, 2.0**128, -(2.0**128), 5e-324, 1.7e308]
    heap.put("f", xs)
    assert [bits(f) for f in heap.get("f")] == [bits(f) for f in xs]
    with heap.map("f") as view:
        assert [bits(f) for f in view] == [bits(f) for f in xs]


def test_keys_of_every_length_look_up(heap):
    """The stable hash reads short keys as overlapping words and long ones
    16 bytes at a time: keys of 0..80 bytes, differing only in one byte,
    all hash apart and look up."""
    keys = [("k" * n)[:max(0, n - 1)] + chr(48 + n % 40) if n else "" for n in range(81)]
    keys += [b"\x00" * n for n in range(40)]
    d = {k: i for i, k in enumerate(keys)}
    assert len({stable_hash_of(k) for k in keys}) == len(keys)
    heap.put("d", d)
    with heap.map("d") as view:
        for k, i in d.items():
            assert view[k] == i
        assert "k" * 100 not in view


def test_only_objects_reachable_twice_are_memoized():
    """An object held only by its container can be neither shared nor in a
    cycle, so the encoder does not remember it; one held twice it does."""
    distinct = [f"s{i}" for i in range(1000)] + [[i] for i in range(100)]
    assert encode(distinct).memoized == 1  # the root only
    shared = [1.5]
    assert encode([shared, shared, {1: shared}]).memoized == 2  # root + shared
