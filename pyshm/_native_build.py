"""cffi (API mode) builder for pyshm._native, compiled from csrc/."""
from __future__ import annotations

import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

def header_cdef(name: str) -> str:
    """A header of csrc/ as cffi reads it: without comments and preprocessor
    lines.  The headers that cffi can parse are the one source of their
    declarations."""
    text = (CSRC / name).read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def header_constants(name: str) -> str:
    """Every `#define NAME value` of a header of csrc/ (include guards have
    no value) as cffi declares a constant whose value the compiler supplies:
    `#define NAME ...`.  The header stays the one source of the values."""
    text = re.sub(r"/\*.*?\*/", "", (CSRC / name).read_text(), flags=re.S)
    names = re.findall(r"^\s*#\s*define\s+([A-Za-z_]\w*)[ \t]+\S", text, flags=re.M)
    return "".join(f"#define {n} ...\n" for n in names)


# segment.h and proc.h hold inline code cffi cannot parse: what Python uses of them.
EXTRA = """
typedef struct {
    uint64_t size; uint32_t kind; uint32_t layout_version;
    int64_t creator_pid; uint64_t creator_start; int creator_alive;
} pyshm_seg_info_t;
#define PYSHM_KIND_HEAP 1
#define PYSHM_LAYOUT_VERSION ...
int pyshm_segment_unlink(const char *name);
int pyshm_segment_probe(const char *name, pyshm_seg_info_t *info);
int pyshm_proc_start_time(int64_t pid, uint64_t *out);
int pyshm_proc_alive(int64_t pid, uint64_t start);
"""

CDEF = (header_constants("pyshm_errors.h") + header_cdef("heap.h") + header_cdef("reqmem.h")
        + header_cdef("sessions.h") + EXTRA)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyshm._native",
    '#include "pyshm_errors.h"\n#include "heap.h"\n#include "reqmem.h"\n#include "sessions.h"\n'
    '#include "segment.h"\n#include "proc.h"\n',
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["rt", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
