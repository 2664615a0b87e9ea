"""cffi (API mode) builder for pyshm._native, compiled from csrc/."""
from __future__ import annotations

import pathlib

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

CDEF = """
typedef struct pyshm_heap pyshm_heap_t;
typedef struct { uint64_t blob; uint64_t data; uint64_t length; uint64_t version; } pyshm_pin_info_t;
typedef struct {
    uint64_t size, arena_bytes, used_bytes, largest_free, n_names;
    uint64_t n_active, n_obsolete, n_building, n_pinned, n_readers;
    uint64_t reader_capacity, name_capacity, n_repairs;
} pyshm_heap_stats_t;
typedef struct { uint64_t readers; uint64_t blobs; } pyshm_reclaim_t;
typedef struct {
    uint64_t size; uint32_t kind; uint32_t layout_version;
    int64_t creator_pid; uint64_t creator_start; int creator_alive;
} pyshm_seg_info_t;

#define PYSHM_ATTACH_OBSERVE 1
#define PYSHM_KIND_HEAP 1
#define PYSHM_LAYOUT_VERSION ...

int pyshm_heap_create(const char *name, uint64_t size, uint64_t names, uint64_t readers, pyshm_heap_t **out);
int pyshm_heap_attach(const char *name, int flags, pyshm_heap_t **out);
void pyshm_heap_detach(pyshm_heap_t *h);
int pyshm_heap_rebind(pyshm_heap_t *h);
uintptr_t pyshm_heap_ro_base(pyshm_heap_t *h);
uintptr_t pyshm_heap_rw_base(pyshm_heap_t *h);
int64_t pyshm_heap_slot(pyshm_heap_t *h);
int pyshm_heap_alloc(pyshm_heap_t *h, uint64_t length, pyshm_pin_info_t *out);
int pyshm_heap_abandon(pyshm_heap_t *h, uint64_t blob);
int pyshm_heap_adopt(pyshm_heap_t *h, uint64_t blob, int64_t pid, uint64_t start);
void pyshm_heap_prefault(pyshm_heap_t *h, uint64_t off, uint64_t len);
int pyshm_heap_publish(pyshm_heap_t *h, const char *name, size_t name_len, uint64_t blob, uint64_t *version);
int pyshm_heap_pin(pyshm_heap_t *h, const char *name, size_t name_len, pyshm_pin_info_t *out);
int pyshm_heap_unpin(pyshm_heap_t *h, int64_t slot, uint64_t blob);
int pyshm_heap_delete(pyshm_heap_t *h, const char *name, size_t name_len);
int pyshm_heap_lookup(pyshm_heap_t *h, const char *name, size_t name_len, uint64_t *version);
int pyshm_heap_name_at(pyshm_heap_t *h, uint64_t index, char *name, size_t cap, uint64_t *version, uint64_t *length);
uint64_t pyshm_heap_name_capacity(pyshm_heap_t *h);
int pyshm_heap_stats(pyshm_heap_t *h, pyshm_heap_stats_t *out);
int pyshm_heap_reclaim(pyshm_heap_t *h, pyshm_reclaim_t *out);
int pyshm_heap_check(pyshm_heap_t *h, char *msg, size_t cap);
int pyshm_heap_trim(pyshm_heap_t *h);
void pyshm_heap_set_fault(pyshm_heap_t *h, int point);
void pyshm_heap_fault_now(pyshm_heap_t *h, int point);

typedef struct pyshm_reqmem pyshm_reqmem_t;
typedef struct {
    uint32_t slot; uint32_t flags; uint64_t seq;
    uint64_t req_len, req_blob, req_data;
    uint64_t resp_len, resp_blob, resp_data;
    uint8_t session[16]; uint32_t peer_len; char peer[64];
} pyshm_slot_info_t;
typedef struct {
    uint64_t n_slots, n_workers, inline_size;
    uint64_t free, queued, running, done;
} pyshm_reqmem_stats_t;
#define PYSHM_KIND_REQMEM 2
#define PYSHM_SLOT_FREE 0
#define PYSHM_SLOT_QUEUED 1
#define PYSHM_SLOT_RUNNING 2
#define PYSHM_SLOT_DONE 3
#define PYSHM_RESP_ERROR 1
int pyshm_rm_create(const char *name, uint32_t n_slots, uint32_t n_workers, uint32_t inline_size, pyshm_reqmem_t **out);
int pyshm_rm_attach(const char *name, pyshm_reqmem_t **out);
void pyshm_rm_detach(pyshm_reqmem_t *rm);
uintptr_t pyshm_rm_base(pyshm_reqmem_t *rm);
uint64_t pyshm_rm_size(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_n_slots(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_n_workers(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_inline_size(pyshm_reqmem_t *rm);
uint64_t pyshm_rm_req_off(pyshm_reqmem_t *rm, uint32_t slot);
uint64_t pyshm_rm_resp_off(pyshm_reqmem_t *rm, uint32_t slot);
int pyshm_rm_bind_worker(pyshm_reqmem_t *rm, uint32_t w, int64_t pid, uint64_t start, uint64_t *gen);
int pyshm_rm_unbind_worker(pyshm_reqmem_t *rm, uint32_t w);
int pyshm_rm_submit(pyshm_reqmem_t *rm, uint32_t w, uint32_t slot, uint64_t seq, uint64_t req_len,
                    uint64_t req_blob, uint64_t req_data, const uint8_t *session, const char *peer, uint32_t peer_len);
int pyshm_rm_drain(pyshm_reqmem_t *rm, uint32_t w, uint32_t *out, uint32_t cap);
void pyshm_rm_arm(pyshm_reqmem_t *rm);
int pyshm_rm_slot_info(pyshm_reqmem_t *rm, uint32_t slot, uint32_t *state, uint32_t *worker, pyshm_slot_info_t *out);
int pyshm_rm_cancel(pyshm_reqmem_t *rm, uint32_t slot);
int pyshm_rm_release(pyshm_reqmem_t *rm, uint32_t slot);
int pyshm_rm_stats(pyshm_reqmem_t *rm, pyshm_reqmem_stats_t *out);
int pyshm_rm_take(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, int timeout_ms, pyshm_slot_info_t *out);
int pyshm_rm_complete(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, uint32_t slot, uint64_t resp_len,
                      uint64_t resp_blob, uint64_t resp_data, uint32_t flags, int wake_fd);
int pyshm_rm_interrupt(pyshm_reqmem_t *rm, uint32_t w);

int pyshm_segment_unlink(const char *name);
int pyshm_segment_probe(const char *name, pyshm_seg_info_t *info);
int pyshm_proc_start_time(int64_t pid, uint64_t *out);
int pyshm_proc_alive(int64_t pid, uint64_t start);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyshm._native",
    '#include "heap.h"\n#include "reqmem.h"\n#include "segment.h"\n#include "proc.h"\n',
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["rt", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
