# cython: language_level=3
"""Closure encoding and the lazy read-only views over it.

A closure is encoded into one contiguous blob of 8-aligned records that refer
to each other by offset from the blob start:

    blob header (32 bytes): magic, format version, root ref, total length
    record header (16 bytes): type, flags, len; then a type-specific body

A *ref* is a 64-bit word: low 3 bits 0 -> offset of a record; 1 -> a small
int (value << 3); 2 -> a constant (None, False, True); 3 -> a float whose
exponent lies within 2**-127 .. 2**128 (see pack_float), stored inline.

Dicts and sets carry a hash index built with a stable hash (not Python's
seeded hash()), so any process can look a key up without decoding the dict.
Every offset read from a blob is checked against the blob's length.
"""
from __future__ import annotations

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport Py_INCREF, Py_DECREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport floor, isfinite
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport getpid

import ast
import collections.abc as _abc
import datetime as _dt
import decimal as _decimal
import importlib
import io
import socket
import sys
import threading
import types
import uuid as _uuid

from pyshm.errors import ClosureError, ClosureReleased, HeapCorrupt

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    bint PyUnicode_IS_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    Py_ssize_t Py_REFCNT(object)
    object PyTuple_New(Py_ssize_t)
    PyObject* PyTuple_GET_ITEM(object, Py_ssize_t)
    void PyTuple_SET_ITEM(object, Py_ssize_t, PyObject*)

# ---- format -----------------------------------------------------------------

cdef enum:
    T_INT = 1
    T_FLOAT = 2
    T_COMPLEX = 3
    T_STR = 4
    T_BYTES = 5
    T_BYTEARRAY = 6
    T_TUPLE = 7
    T_LIST = 8
    T_DICT = 9
    T_SET = 10
    T_FROZENSET = 11
    T_DATETIME = 12
    T_DATE = 13
    T_TIME = 14
    T_TIMEDELTA = 15
    T_DECIMAL = 16
    T_UUID = 17
    T_NDARRAY = 18
    T_OBJECT = 19
    T_STR_SURROGATE = 20

cdef enum:
    F_SHARED = 1     # referenced more than once: the copier memoizes it
    F_CYCLE = 2      # a reference back into it was met while encoding it
    F_BUSY = 4       # being encoded (cleared when done)
    F_NOINDEX = 8    # dict/set without a hash index: lookups scan

cdef enum:
    TAG_INT = 1
    TAG_CONST = 2
    TAG_FLOAT = 3

cdef enum:
    TZ_NONE = 0
    TZ_FIXED = 1
    TZ_ZONEINFO = 2

ctypedef struct rec_t:
    uint32_t type
    uint32_t flags
    uint64_t len

cdef uint32_t BLOB_MAGIC = 0x43485350  # "PSHC"
cdef uint32_t FORMAT_VERSION = 2
cdef Py_ssize_t HEADER = 32
cdef Py_ssize_t BIG_MIN = 65536       # buffers this large are copied straight into the heap
cdef int MAX_DEPTH = 4000
cdef int64_t SMALL_INT = 1LL << 60

# ---- stable hash --------------------------------------------------------------

cdef uint64_t K1 = 0x9E3779B97F4A7C15ULL
cdef uint64_t SEED_STR = 0x5354520000000001ULL
cdef uint64_t SEED_BYTES = 0x4259540000000002ULL
cdef uint64_t SEED_INT = 0x494e540000000003ULL
cdef uint64_t SEED_FLOAT = 0x464c540000000004ULL
cdef uint64_t SEED_TUPLE = 0x5455500000000005ULL
cdef uint64_t SEED_FSET = 0x4653450000000006ULL
cdef uint64_t SEED_MISC = 0x4d49530000000007ULL


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef extern from "stable_hash.h":
    uint64_t hash_bytes "pyshm_hash_bytes"(const char* p, size_t n, uint64_t seed) noexcept nogil


cdef uint64_t hash_int(object v) except? 0:
    cdef int overflow = 0
    cdef long long x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if not overflow:
        return mix64(<uint64_t>x ^ SEED_INT)
    nbytes = (v.bit_length() + 8) // 8
    b = v.to_bytes(nbytes, "little", signed=True)
    return hash_bytes(b, len(b), SEED_INT)


cdef uint64_t hash_float(double f) except? 0:
    cdef uint64_t bits
    if isfinite(f) and f == floor(f):
        if -9.2e18 < f < 9.2e18:
            return mix64(<uint64_t>(<long long>f) ^ SEED_INT)
        return hash_int(int(f))
    memcpy(&bits, &f, 8)
    return mix64(bits ^ SEED_FLOAT)


cdef uint64_t stable_hash(object obj, bint* ok) except? 0:
    """A hash that is the same in every process and agrees with ==
    across int, bool, float, complex and Decimal.  Sets ok=0 for a type
    it cannot hash stably."""
    cdef Py_ssize_t n
    cdef const char* p
    cdef uint64_t h
    t = type(obj)
    if t is str:
        p = _utf8(obj, &n)
        if p == NULL:
            b = (<str>obj).encode("utf-8", "surrogatepass")
            return hash_bytes(b, len(b), SEED_STR)
        return hash_bytes(p, n, SEED_STR)
    if t is int or t is bool:
        return hash_int(obj)
    if obj is None:
        return SEED_MISC
    if t is float:
        return hash_float(obj)
    if t is bytes:
        return hash_bytes(<bytes>obj, len(<bytes>obj), SEED_BYTES)
    if t is tuple:
        h = SEED_TUPLE
        for item in <tuple>obj:
            h = mix64(h ^ stable_hash(item, ok)) * K1
            if not ok[0]:
                return 0
        return mix64(h)
    if t is frozenset:
        h = 0
        for item in <frozenset>obj:
            h += stable_hash(item, ok)
            if not ok[0]:
                return 0
        return mix64(h ^ SEED_FSET)
    if t is complex:
        if (<complex>obj).imag == 0:
            return hash_float((<complex>obj).real)
        return mix64(hash_float((<complex>obj).real) * K1 ^ hash_float((<complex>obj).imag))
    if t is _decimal.Decimal:
        if not obj.is_finite():
            return SEED_MISC ^ 1
        if obj == obj.to_integral_value():
            return hash_int(int(obj))
        f = float(obj)
        if f == obj:
            return hash_float(f)
        s = str(obj.normalize()).encode()
        return hash_bytes(s, len(s), SEED_MISC)
    if t is _uuid.UUID:
        b = obj.bytes
        return hash_bytes(b, 16, SEED_MISC ^ 2)
    if t is _dt.datetime:
        if obj.utcoffset() is not None:
            obj = (obj - obj.utcoffset()).replace(tzinfo=None)
            h = SEED_MISC ^ 3
        else:
            h = SEED_MISC ^ 4
        s = obj.isoformat().encode()
        return hash_bytes(s, len(s), h)
    if t is _dt.date or t is _dt.timedelta:
        s = repr(obj).encode()
        return hash_bytes(s, len(s), SEED_MISC ^ 5)
    if t is _dt.time:
        if obj.tzinfo is not None:
            return SEED_MISC ^ 6
        s = obj.isoformat().encode()
        return hash_bytes(s, len(s), SEED_MISC ^ 7)
    ok[0] = 0
    return 0


cdef inline const char* _utf8(str s, Py_ssize_t* n) except? NULL:
    """The UTF-8 bytes of s, or NULL (no error set) if it has lone surrogates."""
    if PyUnicode_IS_ASCII(s):
        n[0] = PyUnicode_GET_LENGTH(s)
        return <const char*>PyUnicode_DATA(s)
    try:
        return PyUnicode_AsUTF8AndSize(s, n)
    except UnicodeEncodeError:  # lone surrogates have no UTF-8 form
        return NULL


def stable_hash_of(obj) -> int | None:
    """The stable hash of obj, or None when its type has none (for tests)."""
    cdef bint ok = 1
    cdef uint64_t h = stable_hash(obj, &ok)
    return h if ok else None

# ---- a uint64 -> uint64 hash map (encoder and copier memos) ---------------

cdef struct U64Map:
    uint64_t* keys   # 0 marks an empty slot; keys are never 0
    uint64_t* vals
    size_t cap       # a power of two
    size_t n


cdef int map_init(U64Map* m, size_t cap) except -1:
    m.cap = cap
    m.n = 0
    m.keys = <uint64_t*>malloc(cap * 8)
    m.vals = <uint64_t*>malloc(cap * 8)
    if m.keys == NULL or m.vals == NULL:
        raise MemoryError()
    memset(m.keys, 0, cap * 8)
    return 0


cdef void map_free(U64Map* m) noexcept:
    free(m.keys)
    free(m.vals)
    m.keys = NULL
    m.vals = NULL


cdef inline uint64_t* map_get(U64Map* m, uint64_t k) noexcept:
    cdef size_t mask = m.cap - 1
    cdef size_t i = mix64(k) & mask
    while m.keys[i]:
        if m.keys[i] == k:
            return &m.vals[i]
        i = (i + 1) & mask
    return NULL


cdef int map_put(U64Map* m, uint64_t k, uint64_t v) except -1:
    cdef size_t mask, i, j
    cdef U64Map bigger
    if (m.n + 1) * 2 > m.cap:
        map_init(&bigger, m.cap * 2)
        for j in range(m.cap):
            if m.keys[j]:
                map_put(&bigger, m.keys[j], m.vals[j])
        map_free(m)
        m[0] = bigger
    mask = m.cap - 1
    i = mix64(k) & mask
    while m.keys[i] and m.keys[i] != k:
        i = (i + 1) & mask
    if not m.keys[i]:
        m.n += 1
    m.keys[i] = k
    m.vals[i] = v
    return 0

# ---- shareable classes -----------------------------------------------------

_registry = {}   # class -> "module:qualname"
_by_path = {}    # "module:qualname" -> class


def shareable(cls):
    """Class decorator: instances of cls may be put into closures.

    Works for dataclasses and plain classes whose attributes (in __dict__
    and __slots__) are shareable.  A mapped instance is a read-only proxy;
    get() rebuilds a real instance without calling __init__."""
    if not isinstance(cls, type):
        raise TypeError("@pyshm.shareable decorates a class")
    path = sys.intern(f"{cls.__module__}:{cls.__qualname__}")
    slots = []
    for klass in cls.__mro__:
        for s in klass.__dict__.get("__slots__", ()):
            if s not in ("__dict__", "__weakref__") and s not in slots:
                slots.append(s)
    cls.__pyshm_slots__ = tuple(slots)
    _registry[cls] = path
    _by_path[path] = cls
    return cls


def _class_for(str path):
    cls = _by_path.get(path)
    if cls is None:
        module = path.partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError:
            pass
        cls = _by_path.get(path)
    if cls is None:
        raise ClosureError(f"class {path} is not registered in this process: "
                           f"import its module (it must be decorated with @pyshm.shareable)")
    return cls


def _object_state(obj):
    d = getattr(obj, "__dict__", None)
    slots = type(obj).__pyshm_slots__
    if not slots:
        return d if d is not None else {}
    state = dict(d) if d else {}
    for s in slots:
        try:
            state[s] = getattr(obj, s)
        except AttributeError:
            pass
    return state

# ---- why something cannot be shared ------------------------------------------

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition,
               threading.Semaphore, threading.Event)
_FUNC_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
               types.LambdaType, types.BuiltinMethodType)
_GEN_TYPES = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


def _unshareable(obj) -> str:
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, socket.socket):
        return f"a socket ({name}) cannot be shared: it belongs to one process"
    if isinstance(obj, io.IOBase):
        return f"an open file ({name}) cannot be shared: it belongs to one process"
    if isinstance(obj, _LOCK_TYPES) or "lock" in type(obj).__name__.lower():
        return f"a lock ({name}) cannot be shared: use the heap's versions instead"
    if isinstance(obj, _GEN_TYPES):
        return f"a generator or coroutine ({name}) cannot be shared"
    if isinstance(obj, types.ModuleType):
        return f"a module ({obj.__name__}) cannot be shared"
    if isinstance(obj, type):
        return f"a class ({obj.__module__}.{obj.__qualname__}) cannot be shared; share its instances"
    if isinstance(obj, _FUNC_TYPES) or callable(obj):
        return f"a function or callable ({name}) cannot be shared: code belongs to one process"
    return (f"{name} instances are not shareable: decorate the class with @pyshm.shareable"
            f" (or convert it to a supported type)")


class _PathError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.msg = msg
        self.parts = []

    def closure_error(self):
        return ClosureError("root" + "".join(reversed(self.parts)) + ": " + self.msg)

# ---- encoder ------------------------------------------------------------------

cdef object _np = None      # numpy, once a numpy array has been seen
cdef object _ndarray = None


cdef object _numpy():
    global _np, _ndarray
    if _np is None:
        import numpy
        _np = numpy
        _ndarray = numpy.ndarray
    return _np


cdef inline bint _is_ndarray(object t):
    if _ndarray is not None:
        return t is _ndarray
    if "numpy" in sys.modules and t.__name__ == "ndarray" and t.__module__ == "numpy":
        _numpy()
        return True
    return False


cdef inline uint64_t pack_float(double f) noexcept:
    """A TAG_FLOAT ref for f, or 0 when f must take a record.  Doubles whose
    top four exponent bits are 0111 or 1000 (|f| in 2**-127 .. 2**128, which
    holds nearly every float a program stores) carry one bit of information
    in those four: keep bit 62, drop bits 61..59, and 61 bits remain."""
    cdef uint64_t b
    memcpy(&b, &f, 8)
    cdef uint64_t top = (b >> 59) & 0xF
    if top != 0x7 and top != 0x8:
        return 0
    cdef uint64_t p = (b & ((<uint64_t>1 << 59) - 1)) | (((b >> 62) & 1) << 59) | ((b >> 63) << 60)
    return (p << 3) | TAG_FLOAT


cdef inline double unpack_float(uint64_t ref) noexcept:
    cdef uint64_t p = ref >> 3
    cdef uint64_t top = 0x8 if (p >> 59) & 1 else 0x7
    cdef uint64_t b = ((p >> 60) << 63) | (top << 59) | (p & ((<uint64_t>1 << 59) - 1))
    cdef double f
    memcpy(&f, &b, 8)
    return f


@cython.final
cdef class Encoded:
    """One encoded closure: a local buffer plus large buffers that are copied
    straight into the heap by write_into()."""
    cdef char* buf
    cdef Py_ssize_t size, cap
    cdef U64Map memo
    cdef list keep        # temporaries whose id() is in the memo
    cdef list big         # [(record offset, buffer-owning object, nbytes)]
    cdef Py_ssize_t local_end
    cdef readonly Py_ssize_t nbytes

    @property
    def memoized(self) -> int:
        """How many objects were remembered as possibly shared."""
        return self.memo.n
    cdef int depth
    cdef bint memo_next   # set by ref(), consumed by the next start()

    def __cinit__(self):
        self.cap = 4096
        self.buf = <char*>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        map_init(&self.memo, 64)
        self.keep = []
        self.big = []

    def __dealloc__(self):
        free(self.buf)
        map_free(&self.memo)

    cdef Py_ssize_t reserve(self, Py_ssize_t n, Py_ssize_t align=8) except -1:
        cdef Py_ssize_t off = (self.size + align - 1) & ~(align - 1)
        cdef Py_ssize_t end = off + n
        cdef Py_ssize_t cap = self.cap
        cdef char* nb
        if end > cap:
            while cap < end:
                cap *= 2
            nb = <char*>realloc(self.buf, cap)
            if nb == NULL:
                raise MemoryError()
            self.buf = nb
            self.cap = cap
        memset(self.buf + self.size, 0, end - self.size)
        self.size = end
        return off

    cdef inline rec_t* rec(self, Py_ssize_t off) noexcept:
        return <rec_t*>(self.buf + off)

    cdef inline uint64_t* words(self, Py_ssize_t off) noexcept:
        return <uint64_t*>(self.buf + off + 16)

    cdef Py_ssize_t start(self, object obj, uint32_t kind, uint64_t length, Py_ssize_t body,
                          Py_ssize_t align=8) except -1:
        """Reserves a record; memoizes obj if ref() found it may be met again."""
        cdef Py_ssize_t off = self.reserve(16 + body, align)
        cdef rec_t* r = self.rec(off)
        r.type = kind
        r.len = length
        if self.memo_next:
            self.memo_next = False
            map_put(&self.memo, <uint64_t><uintptr_t><PyObject*>obj, off)
        return off

    cdef uint64_t ref(self, object obj) except? 7:
        cdef int overflow = 0
        cdef long long v
        cdef uint64_t* hit
        cdef rec_t* r
        t = type(obj)
        if obj is None:
            return TAG_CONST
        if t is bool:
            return ((2 if obj else 1) << 3) | TAG_CONST
        if t is int:
            v = PyLong_AsLongLongAndOverflow(obj, &overflow)
            if not overflow and -SMALL_INT <= v < SMALL_INT:
                return (<uint64_t>v << 3) | TAG_INT
        elif t is float:
            return self.enc_float(obj)
        # An object referenced only by its parent container and by the
        # caller's loop variable (refcount 2, measured here: the enc_* calls
        # below add temporaries) cannot be met again: it skips the memo.  The
        # root is always memoized (a cycle back to it may hold only one ref).
        cdef bint many = Py_REFCNT(obj) > 2 or self.depth == 0
        hit = map_get(&self.memo, <uint64_t><uintptr_t><PyObject*>obj) if many else NULL
        if hit != NULL:
            r = self.rec(hit[0])
            r.flags |= F_SHARED
            if r.flags & F_BUSY:
                r.flags |= F_CYCLE
            return hit[0]
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _PathError(f"nesting deeper than {MAX_DEPTH} levels")
        self.memo_next = many
        off = self.enc_new(obj, t)
        self.depth -= 1
        return off

    cdef uint64_t enc_new(self, object obj, object t) except? 7:
        if t is str:
            return self.enc_str(obj)
        if t is dict:
            return self.enc_dict(obj, T_DICT, False)
        if t is list:
            return self.enc_seq(obj, T_LIST)
        if t is tuple:
            return self.enc_seq(obj, T_TUPLE)
        if t is bytes or t is bytearray:
            return self.enc_bytes(obj, T_BYTES if t is bytes else T_BYTEARRAY)
        if t is int:
            return self.enc_bigint(obj)
        if t is set or t is frozenset:
            return self.enc_set(obj, T_SET if t is set else T_FROZENSET)
        if t is complex:
            return self.enc_complex(obj)
        if t is _dt.datetime or t is _dt.date or t is _dt.time or t is _dt.timedelta:
            return self.enc_time(obj, t)
        if t is _decimal.Decimal:
            return self.enc_text(obj, str(obj).encode(), T_DECIMAL)
        if t is _uuid.UUID:
            return self.enc_uuid(obj)
        if _is_ndarray(t):
            return self.enc_ndarray(obj)
        if t in _registry:
            return self.enc_object(obj, t)
        raise _PathError(_unshareable(obj))

    cdef uint64_t enc_float(self, double f) except? 7:
        cdef uint64_t packed = pack_float(f)
        if packed:
            return packed
        cdef Py_ssize_t off = self.start(None, T_FLOAT, 0, 8)
        memcpy(self.words(off), &f, 8)
        return off

    cdef uint64_t enc_complex(self, complex c) except? 7:
        cdef Py_ssize_t off = self.start(c, T_COMPLEX, 0, 16)
        cdef double parts[2]
        parts[0] = c.real
        parts[1] = c.imag
        memcpy(self.words(off), parts, 16)
        return off

    cdef uint64_t enc_text(self, object obj, bytes data, uint32_t kind) except? 7:
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t off = self.start(obj, kind, n, n)
        memcpy(self.words(off), <const char*>data, n)
        return off

    cdef uint64_t enc_str(self, str s) except? 7:
        cdef Py_ssize_t n
        cdef const char* p = _utf8(s, &n)
        if p == NULL:
            return self.enc_text(s, s.encode("utf-8", "surrogatepass"), T_STR_SURROGATE)
        cdef Py_ssize_t off = self.start(s, T_STR, n, n)
        memcpy(self.words(off), p, n)
        return off

    cdef uint64_t enc_bigint(self, object v) except? 7:
        nbytes = (v.bit_length() + 8) // 8
        return self.enc_text(v, v.to_bytes(nbytes, "little", signed=True), T_INT)

    cdef uint64_t enc_uuid(self, object u) except? 7:
        cdef bytes b = u.bytes
        cdef Py_ssize_t off = self.start(u, T_UUID, 16, 16)
        memcpy(self.words(off), <const char*>b, 16)
        return off

    cdef Py_ssize_t enc_data(self, Py_ssize_t off, object src, Py_ssize_t n, Py_ssize_t align) except -1:
        """Places n bytes of src's buffer: inline when small, else as a big
        chunk after the local part.  The record's first body word gets the
        data offset."""
        cdef Py_buffer view
        cdef Py_ssize_t data
        if n >= BIG_MIN:
            self.big.append((off, src, n))
            return 0
        data = self.reserve(n, align) if n else self.size
        self.words(off)[0] = data
        if n:
            PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
            try:
                memcpy(self.buf + data, view.buf, n)
            finally:
                PyBuffer_Release(&view)
        return 0

    cdef uint64_t enc_bytes(self, object b, uint32_t kind) except? 7:
        cdef Py_ssize_t n = len(b)
        cdef Py_ssize_t off = self.start(b, kind, n, 8)
        self.enc_data(off, b, n, 8)
        return off

    cdef uint64_t enc_ndarray(self, object arr) except? 7:
        np = _numpy()
        if arr.dtype.hasobject:
            raise _PathError("a numpy array of Python objects cannot be shared (use a numeric dtype)")
        a = np.ascontiguousarray(arr)
        self.keep.append(a)
        descr = repr(np.lib.format.dtype_to_descr(a.dtype)).encode()
        cdef Py_ssize_t ndim = a.ndim
        cdef Py_ssize_t dlen = len(descr)
        cdef Py_ssize_t off = self.start(arr, T_NDARRAY, a.nbytes, 16 + 8 * ndim + ((dlen + 7) & ~7))
        cdef uint64_t* w = self.words(off)
        w[1] = (<uint64_t>ndim) | (<uint64_t>dlen << 32)
        for i in range(ndim):
            w[2 + i] = a.shape[i]
        memcpy(<char*>(w + 2 + ndim), <const char*>descr, dlen)
        self.enc_data(off, a.reshape(-1).view(np.uint8) if a.nbytes else b"", a.nbytes, 64)
        return off

    cdef uint64_t enc_time(self, object v, object t) except? 7:
        cdef list fields
        if t is _dt.timedelta:
            fields = [v.days, v.seconds, v.microseconds]
            return self.enc_words(v, T_TIMEDELTA, fields)
        if t is _dt.date:
            return self.enc_words(v, T_DATE, [v.year, v.month, v.day])
        if t is _dt.datetime:
            fields = [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold]
            kind = T_DATETIME
        else:
            fields = [v.hour, v.minute, v.second, v.microsecond, v.fold]
            kind = T_TIME
        tz = v.tzinfo
        if tz is None:
            fields += [TZ_NONE, 0]
        elif type(tz) is _dt.timezone:
            off = tz.utcoffset(None)
            fields += [TZ_FIXED, (off.days * 86400 + off.seconds) * 1000000 + off.microseconds]
        elif type(tz).__name__ == "ZoneInfo" and getattr(tz, "key", None):
            fields += [TZ_ZONEINFO, tz.key]
        else:
            raise _PathError(f"the time zone {tz!r} cannot be shared (use datetime.timezone or zoneinfo.ZoneInfo)")
        return self.enc_words(v, kind, fields)

    cdef uint64_t enc_words(self, object v, uint32_t kind, list fields) except? 7:
        cdef Py_ssize_t n = len(fields)
        cdef Py_ssize_t off = self.start(v, kind, n, 8 * n)
        cdef uint64_t r
        for i in range(n):
            f = fields[i]
            r = self.ref(f) if type(f) is str else <uint64_t>(<int64_t>f)
            self.words(off)[i] = r
        return off

    cdef uint64_t enc_seq(self, object seq, uint32_t kind) except? 7:
        cdef Py_ssize_t n = len(seq)
        cdef Py_ssize_t off = self.start(seq, kind, n, 8 * n)
        cdef uint64_t r
        cdef Py_ssize_t i = 0
        self.rec(off).flags |= F_BUSY
        try:
            for item in seq:
                r = self.ref(item)
                self.words(off)[i] = r
                i += 1
        except _PathError as e:
            e.parts.append(f"[{i}]")
            raise
        self.rec(off).flags &= ~F_BUSY
        return off

    cdef uint64_t enc_dict(self, dict d, uint32_t kind, bint attrs) except? 7:
        cdef Py_ssize_t n = len(d)
        cdef Py_ssize_t cap = _index_cap(n)
        cdef Py_ssize_t off = self.start(d, kind, n, 8 + 24 * n + 4 * cap)
        cdef bint ok = 1
        cdef uint64_t h, kr, vr
        cdef uint64_t* e
        cdef Py_ssize_t i = 0
        self.words(off)[0] = cap
        self.rec(off).flags |= F_BUSY
        cdef bint in_key = True
        try:
            for k, v in d.items():
                h = stable_hash(k, &ok) if ok else 0
                in_key = True
                kr = self.ref(k)
                in_key = False
                vr = self.ref(v)
                e = self.words(off) + 1 + 3 * i
                e[0] = h
                e[1] = kr
                e[2] = vr
                i += 1
        except _PathError as err:
            err.parts.append(f"<key {k!r}>" if in_key else f".{k}" if attrs else f"[{k!r}]")
            raise
        if i != n:
            raise RuntimeError("dictionary changed size during put")
        self.finish_index(off, n, cap, 3, ok)
        return off

    cdef uint64_t enc_set(self, object s, uint32_t kind) except? 7:
        cdef Py_ssize_t n = len(s)
        cdef Py_ssize_t cap = _index_cap(n)
        cdef Py_ssize_t off = self.start(s, kind, n, 8 + 16 * n + 4 * cap)
        cdef bint ok = 1
        cdef uint64_t h, r
        cdef uint64_t* e
        cdef Py_ssize_t i = 0
        self.words(off)[0] = cap
        self.rec(off).flags |= F_BUSY
        try:
            for item in s:
                h = stable_hash(item, &ok) if ok else 0
                r = self.ref(item)
                e = self.words(off) + 1 + 2 * i
                e[0] = h
                e[1] = r
                i += 1
        except _PathError as err:
            err.parts.append(f"{{{item!r}}}")
            raise
        self.finish_index(off, n, cap, 2, ok)
        return off

    cdef int finish_index(self, Py_ssize_t off, Py_ssize_t n, Py_ssize_t cap, int width, bint ok) except -1:
        """Fills the open-addressing index (entry number + 1 per slot)."""
        cdef rec_t* r = self.rec(off)
        cdef uint64_t* entries = self.words(off) + 1
        cdef uint32_t* index = <uint32_t*>(entries + width * n)
        cdef size_t mask = cap - 1
        cdef size_t slot
        r.flags &= ~F_BUSY
        if not ok or cap == 0:
            r.flags |= F_NOINDEX
            return 0
        cdef Py_ssize_t i
        for i in range(n):
            slot = entries[width * i] & mask
            while index[slot]:
                slot = (slot + 1) & mask
            index[slot] = <uint32_t>(i + 1)
        return 0

    cdef uint64_t enc_object(self, object obj, object t) except? 7:
        state = _object_state(obj)
        if type(state) is not dict:
            raise _PathError(f"{t.__qualname__}.__dict__ is not a dict")
        self.keep.append(state)
        cdef Py_ssize_t off = self.start(obj, T_OBJECT, 0, 16)
        self.rec(off).flags |= F_BUSY
        cdef uint64_t cls_ref = self.ref(_registry[t])
        cdef uint64_t st_ref
        hit = map_get(&self.memo, <uint64_t><uintptr_t><PyObject*>state)
        if hit != NULL:
            st_ref = hit[0]
        else:
            st_ref = self.enc_dict(state, T_DICT, True)
        self.words(off)[0] = cls_ref
        self.words(off)[1] = st_ref
        self.rec(off).flags &= ~F_BUSY
        return off

    cdef int finish(self, uint64_t root) except -1:
        """Lays the big chunks out after the local part and writes the header."""
        cdef Py_ssize_t total
        self.reserve(0, 64)
        self.local_end = self.size
        total = self.local_end
        for rec_off, src, n in self.big:
            total = (total + 63) & ~63
            self.words(rec_off)[0] = total
            total += n
        cdef uint32_t* h32 = <uint32_t*>self.buf
        h32[0] = BLOB_MAGIC
        h32[1] = FORMAT_VERSION
        (<uint64_t*>self.buf)[1] = root
        (<uint64_t*>self.buf)[2] = total
        self.nbytes = total
        return 0

    def write_into(self, uintptr_t address, uint64_t capacity, bint half=False):
        """Copies the encoding to address (capacity bytes available).
        half=True stops midway (fault-injection tests)."""
        cdef char* dst = <char*>address
        cdef Py_buffer view
        cdef Py_ssize_t at = self.local_end
        cdef Py_ssize_t data, n
        if <uint64_t>self.nbytes > capacity:
            raise HeapCorrupt("blob smaller than its encoding")
        with nogil:
            memcpy(dst, self.buf, self.local_end)
        if half:
            return
        for rec_off, src, n in self.big:
            data = self.words(rec_off)[0]
            memset(dst + at, 0, data - at)
            PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
            try:
                with nogil:
                    memcpy(dst + data, view.buf, n)
            finally:
                PyBuffer_Release(&view)
            at = data + n


cdef inline Py_ssize_t _index_cap(Py_ssize_t n):
    cdef Py_ssize_t cap = 8
    if n == 0:
        return 0
    while cap < 2 * n:
        cap *= 2
    return cap


def encode(obj) -> Encoded:
    """Checks that obj is a closure and encodes it; raises ClosureError
    naming the path to the first reference that cannot be shared."""
    cdef Encoded e = Encoded()
    e.reserve(HEADER)
    try:
        root = e.ref(obj)
    except _PathError as err:
        raise err.closure_error() from None
    except RecursionError:
        raise ClosureError(f"root: nesting deeper than Python can walk") from None
    e.finish(root)
    return e

# ---- snapshots --------------------------------------------------------------

ctypedef int (*unpin_fn_t)(void*, int64_t, uint64_t) noexcept nogil


@cython.final
cdef class Snapshot:
    """A pinned version of a closure.  `value` is its root as a lazy view;
    the version stays in memory until release() (or the end of a with
    block) and until every buffer exported from it is released."""
    cdef readonly str name
    cdef readonly uint64_t version
    cdef readonly uint64_t nbytes
    cdef const char* base
    cdef uint64_t length
    cdef bint valid
    cdef Py_ssize_t exports
    cdef object owner
    cdef unpin_fn_t unpin_fn
    cdef void* heap
    cdef int64_t slot
    cdef uint64_t blob
    cdef long pid
    cdef uint64_t root

    def __cinit__(self, owner, str name, uint64_t version, uintptr_t base, uint64_t length,
                  uintptr_t unpin_fn, uintptr_t heap, int64_t slot, uint64_t blob):
        self.owner = owner
        self.name = name
        self.version = version
        self.base = <const char*>base
        self.length = length
        self.unpin_fn = <unpin_fn_t>unpin_fn
        self.heap = <void*>heap
        self.slot = slot
        self.blob = blob
        self.pid = getpid()
        self.valid = True
        self.nbytes = length
        cdef const uint32_t* h32 = <const uint32_t*>self.base
        cdef const uint64_t* h64 = <const uint64_t*>self.base
        if length < <uint64_t>HEADER or h32[0] != BLOB_MAGIC or h64[2] > length:
            self._unpin()
            raise HeapCorrupt(f"closure {name!r} version {version}: bad blob header")
        if h32[1] != FORMAT_VERSION:
            self._unpin()
            raise HeapCorrupt(f"closure {name!r} was encoded by format {h32[1]}, this pyshm reads {FORMAT_VERSION}")
        self.root = h64[1]

    cdef void _unpin(self) noexcept:
        cdef unpin_fn_t fn = self.unpin_fn
        self.unpin_fn = NULL
        self.valid = False
        if fn != NULL and getpid() == self.pid:
            with nogil:
                fn(self.heap, self.slot, self.blob)

    def release(self):
        """Ends this snapshot: its views raise ClosureReleased from now on."""
        self.valid = False
        if self.exports == 0:
            self._unpin()

    @property
    def released(self) -> bool:
        return not self.valid

    @property
    def value(self):
        _alive(self)
        return decode_view(self, self.root)

    def get(self):
        """A private deep copy of the snapshot's root."""
        _alive(self)
        return _Copier(self).run(self.root)

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        self.release()
        return False

    def __dealloc__(self):
        self._unpin()

    def __repr__(self):
        state = "released" if not self.valid else "live"
        return f"<pyshm.Snapshot {self.name!r} v{self.version} {self.length} bytes {state}>"


cdef int _raise_released(Snapshot s) except -1:
    raise ClosureReleased(f"a view of {s.name!r} version {s.version} was used after its snapshot "
                          f"was released: map the closure again")


cdef inline int _alive(Snapshot s) except -1:
    if not s.valid:
        _raise_released(s)
    return 0


cdef int _corrupt(Snapshot s, uint64_t off) except -1:
    raise HeapCorrupt(f"closure {s.name!r} version {s.version}: bad offset {off} "
                      f"(blob is {s.length} bytes)")


cdef inline const rec_t* _rec(Snapshot s, uint64_t off, uint64_t need) except NULL:
    """The record at off, checked to lie inside the blob with `need` bytes."""
    if (off & 7) or off < <uint64_t>HEADER or off > s.length or need > s.length - off:
        _corrupt(s, off)
    return <const rec_t*>(s.base + off)


cdef inline const uint64_t* _body(const rec_t* r) noexcept:
    return <const uint64_t*>(<const char*>r + 16)


cdef const rec_t* _rec_array(Snapshot s, uint64_t off, uint64_t width, uint64_t extra) except NULL:
    """A record whose body is `extra` bytes then len entries of `width` words
    (plus, for indexed ones, the index: checked by the caller)."""
    cdef const rec_t* r = _rec(s, off, 16)
    if r.len > (s.length - off) // 8 or not width:
        _corrupt(s, off)
    _rec(s, off, 16 + extra + 8 * width * r.len)
    return r


cdef const char* _data(Snapshot s, const rec_t* r, uint64_t n) except NULL:
    """The data of a bytes/ndarray record: its first body word is the offset."""
    cdef uint64_t data = _body(r)[0]
    if data > s.length or n > s.length - data:
        _corrupt(s, data)
    return s.base + data


@cython.final
cdef class SharedBuffer:
    """Exports a read-only buffer over blob memory; the snapshot stays
    pinned while any buffer taken from it is alive."""
    cdef Snapshot s
    cdef const char* p
    cdef Py_ssize_t n

    def __getbuffer__(self, Py_buffer* buf, int flags):
        _alive(self.s)
        if flags & PyBUF_WRITABLE:
            raise BufferError("mapped closures are read-only")
        PyBuffer_FillInfo(buf, self, <void*>self.p, self.n, 1, flags)
        self.s.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.s.exports -= 1
        if not self.s.valid and self.s.exports == 0:
            self.s._unpin()


cdef object _buffer(Snapshot s, const char* p, Py_ssize_t n):
    cdef SharedBuffer b = SharedBuffer.__new__(SharedBuffer)
    b.s = s
    b.p = p
    b.n = n
    return memoryview(b)

# ---- decoding shared by views and copies ---------------------------------------

cdef object _str_of(Snapshot s, uint64_t off, const rec_t* r):
    _rec(s, off, 16 + r.len)
    if r.type == T_STR:
        return PyUnicode_DecodeUTF8(<const char*>_body(r), r.len, NULL)
    return PyBytes_FromStringAndSize(<const char*>_body(r), r.len).decode("utf-8", "surrogatepass")


cdef object _tz(Snapshot s, int64_t kind, uint64_t val):
    if kind == TZ_NONE:
        return None
    if kind == TZ_FIXED:
        return _dt.timezone(_dt.timedelta(microseconds=<int64_t>val))
    import zoneinfo
    return zoneinfo.ZoneInfo(decode_view(s, val))


cdef object _scalar(Snapshot s, uint64_t off, const rec_t* r):
    """Decodes an immutable atom; returns NotImplemented for containers."""
    cdef uint32_t t = r.type
    cdef const uint64_t* w = _body(r)
    cdef const int64_t* iw
    cdef double f
    cdef double c[2]
    if t == T_STR or t == T_STR_SURROGATE:
        return _str_of(s, off, r)
    if t == T_FLOAT:
        _rec(s, off, 24)
        memcpy(&f, w, 8)
        return f
    if t == T_INT:
        _rec(s, off, 16 + r.len)
        return int.from_bytes(PyBytes_FromStringAndSize(<const char*>w, r.len), "little", signed=True)
    if t == T_COMPLEX:
        _rec(s, off, 32)
        memcpy(c, w, 16)
        return complex(c[0], c[1])
    if t == T_DECIMAL:
        _rec(s, off, 16 + r.len)
        return _decimal.Decimal(PyBytes_FromStringAndSize(<const char*>w, r.len).decode())
    if t == T_UUID:
        _rec(s, off, 32)
        return _uuid.UUID(bytes=PyBytes_FromStringAndSize(<const char*>w, 16))
    if t == T_DATETIME or t == T_DATE or t == T_TIME or t == T_TIMEDELTA:
        _rec(s, off, 16 + 8 * r.len)
        iw = <const int64_t*>w
        if t == T_TIMEDELTA and r.len == 3:
            return _dt.timedelta(iw[0], iw[1], iw[2])
        if t == T_DATE and r.len == 3:
            return _dt.date(iw[0], iw[1], iw[2])
        if t == T_DATETIME and r.len == 10:
            return _dt.datetime(iw[0], iw[1], iw[2], iw[3], iw[4], iw[5], iw[6],
                                tzinfo=_tz(s, iw[8], w[9]), fold=iw[7])
        if t == T_TIME and r.len == 7:
            return _dt.time(iw[0], iw[1], iw[2], iw[3], tzinfo=_tz(s, iw[5], w[6]), fold=iw[4])
        _corrupt(s, off)
    return NotImplemented


cdef dict _dtypes = {}


cdef object _ndarray_of(Snapshot s, uint64_t off, const rec_t* r, bint copy):
    np = _numpy()
    cdef const uint64_t* w = _body(r)
    _rec(s, off, 32)
    cdef uint64_t ndim = w[1] & 0xffffffff
    cdef uint64_t dlen = w[1] >> 32
    _rec(s, off, 32 + 8 * ndim + dlen)
    shape = tuple([w[2 + i] for i in range(ndim)])
    descr = PyBytes_FromStringAndSize(<const char*>(w + 2 + ndim), dlen)
    dtype = _dtypes.get(descr)
    if dtype is None:
        dtype = np.lib.format.descr_to_dtype(ast.literal_eval(descr.decode()))
        _dtypes[descr] = dtype
    cdef const char* p = _data(s, r, r.len)
    if copy:
        return np.frombuffer(PyBytes_FromStringAndSize(p, r.len), dtype=dtype).reshape(shape).copy()
    if r.len == 0:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(_buffer(s, p, r.len), dtype=dtype).reshape(shape)


cdef object decode_key(Snapshot s, uint64_t ref):
    """Keys and set members come back as real objects: they must hash.
    Atoms (str, numbers, ...) decode directly; only tuples and frozensets
    need a copier."""
    if ref & 7:
        return decode_view(s, ref)
    v = _scalar(s, ref, _rec(s, ref, 16))
    return _Copier(s).run(ref) if v is NotImplemented else v


cdef object decode_view(Snapshot s, uint64_t ref):
    cdef uint64_t tag = ref & 7
    cdef const rec_t* r
    if tag == TAG_INT:
        return <int64_t>ref >> 3
    if tag == TAG_FLOAT:
        return unpack_float(ref)
    if tag == TAG_CONST:
        if ref == TAG_CONST:
            return None
        return ref == ((2 << 3) | TAG_CONST)
    if tag:
        _corrupt(s, ref)
    r = _rec(s, ref, 16)
    t = r.type
    if t == T_STR:
        _rec(s, ref, 16 + r.len)
        return PyUnicode_DecodeUTF8(<const char*>_body(r), r.len, NULL)
    if t == T_DICT:
        return _mapped_dict(s, ref, r)
    if t == T_LIST or t == T_TUPLE:
        _rec_array(s, ref, 1, 0)
        return _mapped_list(s, ref, r)
    if t == T_SET or t == T_FROZENSET:
        return _mapped_set(s, ref, r)
    if t == T_BYTES or t == T_BYTEARRAY:
        _rec(s, ref, 24)
        return _buffer(s, _data(s, r, r.len), r.len)
    if t == T_OBJECT:
        return _mapped_object(s, ref, r)
    if t == T_NDARRAY:
        return _ndarray_of(s, ref, r, False)
    v = _scalar(s, ref, r)
    if v is NotImplemented:
        _corrupt(s, ref)
    return v


cdef inline bint _same_record(Snapshot a, uint64_t a_off, Snapshot b, uint64_t b_off):
    """Two views of one record are equal, as `x == x` is for a cyclic list."""
    return a.base == b.base and a_off == b_off


cdef bint _equal(a, b) except -1:
    if a is b:
        return True
    if _ndarray is not None and (type(a) is _ndarray or type(b) is _ndarray):
        return bool(_np.array_equal(a, b)) and getattr(a, "shape", None) == getattr(b, "shape", None)
    return bool(a == b)

# ---- views --------------------------------------------------------------------

_READ_ONLY = "mapped closures are read-only: put a new version instead"


@cython.final
@cython.freelist(64)
cdef class MappedDict:
    """A read-only Mapping over a dict in shared memory.  Lookups probe the
    stored hash index; nothing is decoded but the key compared and the
    value returned."""
    cdef Snapshot s
    cdef uint64_t off
    cdef uint64_t n, cap
    cdef const uint64_t* entries
    cdef const uint32_t* index

    cdef const uint64_t* find(self, key) except? NULL:
        _alive(self.s)
        return _probe(self.s, self.off, self.entries, self.index, self.n, self.cap, 3, key)

    def __getitem__(self, key):
        cdef const uint64_t* e = self.find(key)
        if e == NULL:
            raise KeyError(key)
        return decode_view(self.s, e[2])

    def get(self, key, default=None):
        cdef const uint64_t* e = self.find(key)
        return default if e == NULL else decode_view(self.s, e[2])

    def __contains__(self, key):
        try:
            return self.find(key) != NULL
        except TypeError:
            return False

    def __len__(self):
        _alive(self.s)
        return self.n

    def __iter__(self):
        cdef uint64_t i
        for i in range(self.n):
            _alive(self.s)
            yield decode_key(self.s, self.entries[3 * i + 1])

    def keys(self):
        return _abc.KeysView(self)

    def values(self):
        return _MappedValues(self)

    def items(self):
        return _MappedItems(self)

    def _values(self):
        cdef uint64_t i
        for i in range(self.n):
            _alive(self.s)
            yield decode_view(self.s, self.entries[3 * i + 2])

    def _items(self):
        cdef uint64_t i
        for i in range(self.n):
            _alive(self.s)
            yield decode_key(self.s, self.entries[3 * i + 1]), decode_view(self.s, self.entries[3 * i + 2])

    def __eq__(self, other):
        cdef uint64_t i
        if isinstance(other, MappedDict) and _same_record(self.s, self.off, (<MappedDict>other).s, (<MappedDict>other).off):
            return True
        if not isinstance(other, _abc.Mapping):
            return NotImplemented
        _alive(self.s)
        if len(other) != self.n:
            return False
        for i in range(self.n):
            k = decode_key(self.s, self.entries[3 * i + 1])
            try:
                ov = other[k]
            except KeyError:
                return False
            if not _equal(decode_view(self.s, self.entries[3 * i + 2]), ov):
                return False
        return True

    __hash__ = None

    def __setitem__(self, key, value):
        raise TypeError(_READ_ONLY)

    def __delitem__(self, key):
        raise TypeError(_READ_ONLY)

    def copy(self):
        """A private dict copy of this mapping (deep)."""
        _alive(self.s)
        return _Copier(self.s).run(self.off)

    def __repr__(self):
        if not self.s.valid:
            return "<MappedDict (released)>"
        return f"MappedDict({dict(self.items())!r})"


class _MappedValues(_abc.ValuesView):
    """values() of a MappedDict: walks the entries, no lookup per key."""
    __slots__ = ()

    def __iter__(self):
        return self._mapping._values()


class _MappedItems(_abc.ItemsView):
    """items() of a MappedDict: walks the entries, no lookup per key."""
    __slots__ = ()

    def __iter__(self):
        return self._mapping._items()


cdef const uint64_t* _probe(Snapshot s, uint64_t off, const uint64_t* entries, const uint32_t* index,
                            uint64_t n, uint64_t cap, int width, key) except? NULL:
    """The entry (hash, key ref[, value ref]) whose key equals `key`, found
    through the stored index, or by a scan when there is no index or the
    key has no stable hash; NULL when absent."""
    cdef bint ok = 1
    cdef uint64_t h = 0, i, idx, probes
    cdef const uint64_t* e
    if cap:
        h = stable_hash(key, &ok)
    if cap and ok:
        i = h & (cap - 1)
        for probes in range(cap):
            idx = index[i]
            if idx == 0:
                return NULL
            if idx > n:
                _corrupt(s, off)
            e = entries + width * (idx - 1)
            if e[0] == h and _key_equals(s, e[1], key):
                return e
            i = (i + 1) & (cap - 1)
        return NULL
    for i in range(n):
        e = entries + width * i
        if _key_equals(s, e[1], key):
            return e
    return NULL


cdef const uint64_t* _indexed_entries(Snapshot s, uint64_t off, const rec_t* r, int width,
                                     uint64_t* cap) except NULL:
    """The entries of a dict (width 3) or set (width 2) record, checked with
    the index after them to lie inside the blob.  Sets *cap to the index
    capacity, 0 when lookups must scan.  The index is entries + width * len."""
    cdef uint64_t c
    _rec(s, off, 24)
    c = _body(r)[0]
    _rec_array(s, off, width, 8)
    if c & (c - 1) or c > s.length:
        _corrupt(s, off)
    _rec(s, off, 24 + 8 * width * r.len + 4 * c)
    cap[0] = 0 if r.flags & F_NOINDEX else c
    return _body(r) + 1


cdef MappedDict _mapped_dict(Snapshot s, uint64_t off, const rec_t* r):
    cdef MappedDict d = MappedDict.__new__(MappedDict)
    d.entries = _indexed_entries(s, off, r, 3, &d.cap)
    d.index = <const uint32_t*>(d.entries + 3 * r.len)
    d.s = s
    d.off = off
    d.n = r.len
    return d


cdef bint _key_equals(Snapshot s, uint64_t ref, key) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    cdef const rec_t* r
    t = type(key)
    if t is str and (ref & 7) == 0:
        r = _rec(s, ref, 16)
        if r.type != T_STR:
            return r.type == T_STR_SURROGATE and _str_of(s, ref, r) == key
        p = _utf8(key, &n)
        if p == NULL or <uint64_t>n != r.len:
            return False
        _rec(s, ref, 16 + r.len)
        return memcmp(p, _body(r), n) == 0
    if t is int and (ref & 7) == TAG_INT:
        return (<int64_t>ref >> 3) == key
    return _equal(decode_key(s, ref), key)


@cython.final
@cython.freelist(64)
cdef class MappedList:
    """A read-only Sequence over a list or tuple in shared memory."""
    cdef Snapshot s
    cdef uint64_t off, n
    cdef bint is_tuple
    cdef const uint64_t* refs

    cdef object item(self, Py_ssize_t i):
        _alive(self.s)
        return decode_view(self.s, self.refs[i])

    def __getitem__(self, index):
        cdef Py_ssize_t i
        if isinstance(index, slice):
            items = [self.item(j) for j in range(*index.indices(self.n))]
            return tuple(items) if self.is_tuple else items
        i = index
        if i < 0:
            i += self.n
        if i < 0 or <uint64_t>i >= self.n:
            raise IndexError(("tuple" if self.is_tuple else "list") + " index out of range")
        return self.item(i)

    def __len__(self):
        _alive(self.s)
        return self.n

    def __iter__(self):
        cdef uint64_t i
        for i in range(self.n):
            yield self.item(i)

    def __reversed__(self):
        cdef Py_ssize_t i
        for i in range(<Py_ssize_t>self.n - 1, -1, -1):
            yield self.item(i)

    def __contains__(self, value):
        cdef uint64_t i
        for i in range(self.n):
            if _equal(self.item(i), value):
                return True
        return False

    def index(self, value):
        cdef uint64_t i
        for i in range(self.n):
            if _equal(self.item(i), value):
                return i
        raise ValueError(f"{value!r} is not in the sequence")

    def count(self, value):
        cdef uint64_t i
        return sum(1 for i in range(self.n) if _equal(self.item(i), value))

    def __eq__(self, other):
        cdef uint64_t i
        if isinstance(other, MappedList):
            if _same_record(self.s, self.off, (<MappedList>other).s, (<MappedList>other).off):
                return True
            if (<MappedList>other).is_tuple != self.is_tuple:
                return False
        elif not isinstance(other, tuple if self.is_tuple else list):
            return NotImplemented
        _alive(self.s)
        if len(other) != self.n:
            return False
        for i in range(self.n):
            if not _equal(self.item(i), other[i]):
                return False
        return True

    def __hash__(self):
        if not self.is_tuple:
            raise TypeError("unhashable type: mapped list")
        return hash(self.copy())

    def __setitem__(self, index, value):
        raise TypeError(_READ_ONLY)

    def __delitem__(self, index):
        raise TypeError(_READ_ONLY)

    def copy(self):
        """A private list (or tuple) copy of this sequence (deep)."""
        _alive(self.s)
        return _Copier(self.s).run(self.off)

    def __repr__(self):
        if not self.s.valid:
            return "<MappedList (released)>"
        return f"Mapped{'Tuple' if self.is_tuple else 'List'}({list(self)!r})"


cdef MappedList _mapped_list(Snapshot s, uint64_t off, const rec_t* r):
    cdef MappedList v = MappedList.__new__(MappedList)
    v.s = s
    v.off = off
    v.n = r.len
    v.is_tuple = r.type == T_TUPLE
    v.refs = _body(r)
    return v


@cython.final
cdef class MappedSet:
    """A read-only Set over a set or frozenset; `in` probes the index."""
    cdef Snapshot s
    cdef uint64_t off, n, cap
    cdef bint frozen
    cdef const uint64_t* entries
    cdef const uint32_t* index

    def __contains__(self, item):
        _alive(self.s)
        try:
            return _probe(self.s, self.off, self.entries, self.index, self.n, self.cap, 2, item) != NULL
        except TypeError:
            return False

    def __len__(self):
        _alive(self.s)
        return self.n

    def __iter__(self):
        cdef uint64_t i
        for i in range(self.n):
            _alive(self.s)
            yield decode_key(self.s, self.entries[2 * i + 1])

    def __eq__(self, other):
        if not isinstance(other, (set, frozenset, MappedSet)):
            return NotImplemented
        _alive(self.s)
        return len(other) == self.n and all(item in other for item in self)

    def __hash__(self):
        if not self.frozen:
            raise TypeError("unhashable type: mapped set")
        return hash(self.copy())

    def copy(self):
        _alive(self.s)
        return _Copier(self.s).run(self.off)

    def __repr__(self):
        if not self.s.valid:
            return "<MappedSet (released)>"
        return f"MappedSet({set(self)!r})"


cdef MappedSet _mapped_set(Snapshot s, uint64_t off, const rec_t* r):
    cdef MappedSet v = MappedSet.__new__(MappedSet)
    v.entries = _indexed_entries(s, off, r, 2, &v.cap)
    v.index = <const uint32_t*>(v.entries + 2 * r.len)
    v.s = s
    v.off = off
    v.n = r.len
    v.frozen = r.type == T_FROZENSET
    return v


@cython.final
cdef class MappedObject:
    """A read-only proxy of a @shareable instance: attributes come from the
    stored state; methods and properties of the class run against the proxy."""
    cdef Snapshot s
    cdef uint64_t off
    cdef MappedDict state
    cdef readonly str class_path

    def __getattr__(self, name):
        try:
            return self.state[name]
        except KeyError:
            pass
        cls = _by_path.get(self.class_path)
        attr = getattr(cls, name, None) if cls is not None else None
        if isinstance(attr, property) and attr.fget is not None:
            return attr.fget(self)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        raise AttributeError(f"mapped {self.class_path} has no attribute {name!r}")

    def __setattr__(self, name, value):
        raise TypeError(_READ_ONLY)

    def __delattr__(self, name):
        raise TypeError(_READ_ONLY)

    def __eq__(self, other):
        if isinstance(other, MappedObject):
            return self.class_path == (<MappedObject>other).class_path and self.state == (<MappedObject>other).state
        if _registry.get(type(other)) == self.class_path:
            return self.state == _object_state(other)
        return NotImplemented

    __hash__ = None

    def __dir__(self):
        return list(self.state)

    def copy(self):
        """Rebuilds a real (private) instance."""
        _alive(self.s)
        return _Copier(self.s).run(self.off)

    def __repr__(self):
        if not self.s.valid:
            return f"<mapped {self.class_path} (released)>"
        return f"<mapped {self.class_path} {dict(self.state.items())!r}>"


cdef MappedObject _mapped_object(Snapshot s, uint64_t off, const rec_t* r):
    cdef MappedObject v = MappedObject.__new__(MappedObject)
    _rec(s, off, 32)
    cdef const uint64_t* w = _body(r)
    st = decode_view(s, w[1])
    path = decode_view(s, w[0])
    if type(st) is not MappedDict or type(path) is not str:
        _corrupt(s, off)
    v.s = s
    v.off = off
    v.state = st
    v.class_path = path
    return v


_abc.Mapping.register(MappedDict)
_abc.Sequence.register(MappedList)
_abc.Set.register(MappedSet)

# ---- deep copy out ---------------------------------------------------------------


cdef class _Pending:
    """Stands for a frozenset still being rebuilt (a cycle runs through it)."""
    cdef uint64_t ref


cdef object _IN_PROGRESS = object()


@cython.final
cdef class _Copier:
    """Rebuilds real objects from a blob, keeping shared references and
    cycles: records flagged SHARED are memoized by offset."""
    cdef Snapshot s
    cdef U64Map memo
    cdef list objs
    cdef list fixups

    def __cinit__(self, Snapshot s):
        self.s = s
        map_init(&self.memo, 64)
        self.objs = []
        self.fixups = []

    def __dealloc__(self):
        map_free(&self.memo)

    cdef int remember(self, uint64_t ref, object obj) except -1:
        cdef uint64_t* hit = map_get(&self.memo, ref)
        if hit != NULL:
            self.objs[hit[0]] = obj
        else:
            map_put(&self.memo, ref, len(self.objs))
            self.objs.append(obj)
        return 0

    def run(self, uint64_t ref):
        obj = self.copy(ref)
        for container, key, target, is_attr in self.fixups:
            value = self.objs[map_get(&self.memo, target)[0]]
            if is_attr:
                object.__setattr__(container, key, value)
            else:
                container[key] = value
        return obj

    cdef int settle(self, object container, object key, object value, bint is_attr) except -1:
        if type(value) is _Pending:
            self.fixups.append((container, key, (<_Pending>value).ref, is_attr))
        return 0

    cdef object copy(self, uint64_t ref):
        cdef const rec_t* r
        cdef uint64_t* hit
        if ref & 7:
            return decode_view(self.s, ref)
        r = _rec(self.s, ref, 16)
        if r.flags & F_SHARED:
            hit = map_get(&self.memo, ref)
            if hit != NULL:
                obj = self.objs[hit[0]]
                if obj is _IN_PROGRESS:
                    p = _Pending()
                    (<_Pending>p).ref = ref
                    return p
                return obj
        obj = self.build(ref, r)
        if r.flags & F_SHARED:
            self.remember(ref, obj)
        return obj

    cdef object build(self, uint64_t ref, const rec_t* r):
        cdef uint32_t t = r.type
        cdef bint shared = r.flags & F_SHARED
        cdef const uint64_t* w
        cdef uint64_t i, n
        if t == T_LIST:
            _rec_array(self.s, ref, 1, 0)
            n = r.len
            w = _body(r)
            lst = [None] * n
            if shared:
                self.remember(ref, lst)
            for i in range(n):
                v = self.copy(w[i])
                self.settle(lst, i, v, False)
                lst[i] = v
            return lst
        if t == T_TUPLE:
            _rec_array(self.s, ref, 1, 0)
            return self.build_tuple(ref, r)
        if t == T_DICT:
            d = {}   # not _PyDict_NewPresized: it makes a generic-keys dict, slower for str keys
            if shared:
                self.remember(ref, d)
            self.fill_dict(ref, r, d, None)
            return d
        if t == T_SET or t == T_FROZENSET:
            return self.build_set(ref, r)
        if t == T_OBJECT:
            return self.build_object(ref, r)
        if t == T_BYTES or t == T_BYTEARRAY:
            _rec(self.s, ref, 24)
            b = PyBytes_FromStringAndSize(_data(self.s, r, r.len), r.len)
            return b if t == T_BYTES else bytearray(b)
        if t == T_NDARRAY:
            return _ndarray_of(self.s, ref, r, True)
        v = _scalar(self.s, ref, r)
        if v is NotImplemented:
            _corrupt(self.s, ref)
        return v

    cdef object build_tuple(self, uint64_t ref, const rec_t* r):
        cdef uint64_t i, n = r.len
        cdef const uint64_t* w = _body(r)
        cdef PyObject* old
        if not (r.flags & F_CYCLE):
            items = [self.copy(w[i]) for i in range(n)]
            for v in items:
                if type(v) is _Pending:
                    raise ClosureError("cannot rebuild a cycle through a frozenset inside a tuple")
            return tuple(items)
        # A reference back into this tuple is inside it: create it first,
        # memoize it, then fill it in place (nothing has hashed it yet).
        tup = PyTuple_New(n)
        for i in range(n):
            Py_INCREF(None)
            PyTuple_SET_ITEM(tup, i, <PyObject*>None)
        self.remember(ref, tup)
        for i in range(n):
            v = self.copy(w[i])
            if type(v) is _Pending:
                raise ClosureError("cannot rebuild a cycle through a frozenset inside a tuple")
            old = PyTuple_GET_ITEM(tup, i)
            Py_INCREF(v)
            PyTuple_SET_ITEM(tup, i, <PyObject*>v)
            Py_DECREF(<object>old)
        return tup

    cdef object build_set(self, uint64_t ref, const rec_t* r):
        cdef uint64_t cap, i
        cdef const uint64_t* e = _indexed_entries(self.s, ref, r, 2, &cap)
        if r.type == T_SET:
            s = set()
            if r.flags & F_SHARED:
                self.remember(ref, s)
            for i in range(r.len):
                s.add(self.key(e[2 * i + 1]))
            return s
        if r.flags & F_SHARED:
            self.remember(ref, _IN_PROGRESS)
        return frozenset([self.key(e[2 * i + 1]) for i in range(r.len)])

    cdef object key(self, uint64_t ref):
        k = self.copy(ref)
        if type(k) is _Pending:
            raise ClosureError("cannot rebuild a cycle through a frozenset used as a key")
        return k

    cdef int fill_dict(self, uint64_t ref, const rec_t* r, object target, object inst) except -1:
        """Copies the dict record's entries into target, or onto inst's attributes."""
        cdef uint64_t cap, i
        cdef const uint64_t* e = _indexed_entries(self.s, ref, r, 3, &cap)
        for i in range(r.len):
            k = self.key(e[3 * i + 1])
            v = self.copy(e[3 * i + 2])
            if inst is not None:
                self.settle(inst, k, v, True)
                object.__setattr__(inst, k, v)
            else:
                self.settle(target, k, v, False)
                target[k] = v
        return 0

    cdef object build_object(self, uint64_t ref, const rec_t* r):
        _rec(self.s, ref, 32)
        cdef const uint64_t* w = _body(r)
        cls = _class_for(decode_view(self.s, w[0]))
        inst = cls.__new__(cls)
        if r.flags & F_SHARED:
            self.remember(ref, inst)
        if w[1] & 7:
            _corrupt(self.s, ref)
        cdef const rec_t* state = _rec(self.s, w[1], 16)
        if state.type != T_DICT:
            _corrupt(self.s, ref)
        self.fill_dict(w[1], state, None, inst)
        return inst
