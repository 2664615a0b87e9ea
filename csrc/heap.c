/* Shared closure heap operations: the public API of heap.h.
 *
 * Owns: the heap header (heap_hdr_t: layout, lock, next_version,
 *   n_repairs), the per-process handle, and the put / publish / pin
 *   protocol that moves a blob between the structures below.
 * Calls: segment.c, robust_lock.c, proc.c, arena.c, blob.c, directory.c,
 *   readers.c, heap_repair.c, heap_check.c (fault.c for fault_point);
 *   nothing calls up into this file.
 * Lock: every public function takes the robust lock (heap_lock); if its
 *   previous owner died, heap_repair() rebuilds all derived state before
 *   the operation goes on. */
#include "heap_layout.h"
#include "proc.h"
#include "pyshm_errors.h"
#include "robust_lock.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The heap lock: hdr->lock, robust and process-shared, guards every field
 * of the segment (heap_layout.h).  Taken by every public function and
 * released before it returns, except across the caller's encoding, which
 * writes only a BUILDING blob of its own. */
static int heap_lock(pyshm_heap_t *h) {
    int rc = pyshm_lock_acquire(&h->hdr->lock);
    if (rc < 0) return rc;
    if (rc == 1) {
        /* The previous owner died mid-update: repair, then mark consistent. */
        int r = heap_repair(h, NULL);
        h->hdr->n_repairs++;
        pyshm_lock_consistent(&h->hdr->lock);
        if (r) { pyshm_lock_release(&h->hdr->lock); return r; }
    }
    return PYSHM_OK;
}

static void heap_unlock(pyshm_heap_t *h) { pyshm_lock_release(&h->hdr->lock); }

/* ---- create / attach ---------------------------------------------------- */

static uint64_t pow2_at_least(uint64_t n) {
    uint64_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

static pyshm_heap_t *handle_new(void) {
    pyshm_heap_t *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->slot = -1;
    h->pid = getpid();
    pyshm_proc_start_time(h->pid, &h->start);
    return h;
}

static int layout(heap_hdr_t *hdr, uint64_t size, uint64_t names, uint64_t readers) {
    uint64_t off = (sizeof(heap_hdr_t) + 4095) & ~4095ull;
    hdr->readers_off = off;
    hdr->n_readers = readers;
    off += (readers * sizeof(reader_t) + 4095) & ~4095ull;
    hdr->dir_off = off;
    hdr->dir_cap = pow2_at_least(names + names / 2);
    off += (hdr->dir_cap * sizeof(dir_entry_t) + 4095) & ~4095ull;
    hdr->arena_off = off;
    hdr->arena_end = size;
    return off + 4 * PYSHM_MIN_BLOCK <= size ? PYSHM_OK : PYSHM_ERR_TOOSMALL;
}

int pyshm_heap_create(const char *name, uint64_t size, uint64_t names, uint64_t readers,
                      pyshm_heap_t **out) {
    pyshm_heap_t *h = handle_new();
    if (!h) return PYSHM_ERR_SYS;
    if (!names) names = 16384;
    if (!readers) readers = 256;
    int rc = pyshm_segment_create(&h->seg, name, size, PYSHM_KIND_HEAP);
    if (rc) { free(h); return rc; }
    h->hdr = (heap_hdr_t *)h->seg.rw;
    rc = layout(h->hdr, size, names, readers);
    if (!rc) rc = pyshm_lock_init(&h->hdr->lock);
    if (rc) {
        pyshm_segment_detach(&h->seg);
        pyshm_segment_unlink(name);
        free(h);
        return rc;
    }
    arena_init(h);
    readers_claim(h);
    __atomic_store_n(&h->hdr->seg.ready, 1, __ATOMIC_RELEASE);
    *out = h;
    return PYSHM_OK;
}

/* The regions recorded in the header lie inside the segment, in order. */
static int layout_valid(const pyshm_heap_t *h) {
    const heap_hdr_t *hdr = h->hdr;
    const pyshm_segment_t *seg = &h->seg;
    return seg->size >= sizeof(heap_hdr_t)
        && hdr->readers_off >= sizeof(heap_hdr_t)
        && hdr->n_readers <= (seg->size - hdr->readers_off) / sizeof(reader_t)
        && hdr->dir_off >= hdr->readers_off + hdr->n_readers * sizeof(reader_t)
        && hdr->dir_cap && !(hdr->dir_cap & (hdr->dir_cap - 1))
        && hdr->dir_cap <= (seg->size - hdr->dir_off) / sizeof(dir_entry_t)
        && hdr->arena_off >= hdr->dir_off + hdr->dir_cap * sizeof(dir_entry_t)
        && hdr->arena_off <= hdr->arena_end && hdr->arena_end <= seg->size
        && hdr->arena_off % PYSHM_ALIGN == 0;
}

int pyshm_heap_attach(const char *name, int flags, pyshm_heap_t **out) {
    pyshm_heap_t *h = handle_new();
    if (!h) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_attach(&h->seg, name, PYSHM_KIND_HEAP);
    if (rc) { free(h); return rc; }
    h->hdr = (heap_hdr_t *)h->seg.rw;
    if (!layout_valid(h)) { pyshm_segment_detach(&h->seg); free(h); return PYSHM_ERR_CORRUPT; }
    if (!(flags & PYSHM_ATTACH_OBSERVE)) rc = pyshm_heap_rebind(h);
    if (rc) { pyshm_segment_detach(&h->seg); free(h); return rc; }
    *out = h;
    return PYSHM_OK;
}

int pyshm_heap_rebind(pyshm_heap_t *h) {
    h->pid = getpid();
    pyshm_proc_start_time(h->pid, &h->start);
    int rc = heap_lock(h);
    if (rc) return rc;
    rc = readers_claim(h);
    heap_unlock(h);
    return rc;
}

void pyshm_heap_detach(pyshm_heap_t *h) {
    if (!h) return;
    if (h->slot >= 0 && h->pid == getpid() && heap_lock(h) == PYSHM_OK) {
        readers_release_slot(h, reader_slot(h, h->slot));
        heap_unlock(h);
    }
    pyshm_segment_detach(&h->seg);
    free(h);
}

uintptr_t pyshm_heap_ro_base(pyshm_heap_t *h) { return (uintptr_t)h->seg.ro; }
uintptr_t pyshm_heap_rw_base(pyshm_heap_t *h) { return (uintptr_t)h->seg.rw; }
int64_t pyshm_heap_slot(pyshm_heap_t *h) { return h->slot; }

/* ---- put ---------------------------------------------------------------- */

static void fill_info(pyshm_pin_info_t *out, uint64_t off, blob_t *b) {
    out->blob = off;
    out->data = BLOB_DATA(off);
    out->length = b->length;
    out->version = b->version;
}

int pyshm_heap_alloc(pyshm_heap_t *h, uint64_t length, pyshm_pin_info_t *out) {
    int rc = heap_lock(h);
    if (rc) return rc;
    uint64_t off;
    rc = arena_alloc(h, sizeof(blob_t) + length, &off);
    if (rc == PYSHM_ERR_FULL) {
        /* Dead processes may hold pins or half-built blobs: reclaim, retry. */
        heap_repair(h, NULL);
        rc = arena_alloc(h, sizeof(blob_t) + length, &off);
    }
    if (!rc) {
        fault_point(h, PYSHM_FAULT_ALLOC_USED);
        fill_info(out, off, blob_init(h, off, length));
    }
    heap_unlock(h);
    return rc;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Faults in the pages of [off, off+len) with one system call, before a large
 * encoding is copied there (one trap per 4 KiB page costs far more).  Best
 * effort: kernels before 5.14 refuse it and the copy faults as usual. */
void pyshm_heap_prefault(pyshm_heap_t *h, uint64_t off, uint64_t len) {
    if (!pyshm_in_bounds(&h->seg, off, len)) return;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t from = off & ~(page - 1);
    madvise(h->seg.rw + from, off + len - from, MADV_POPULATE_WRITE);
}

int pyshm_heap_abandon(pyshm_heap_t *h, uint64_t blob) {
    int rc = heap_lock(h);
    if (rc) return rc;
    blob_t *b = blob_at(h, blob);
    rc = (b && b->state == BLOB_BUILDING) ? blob_drop(h, blob, 0) : PYSHM_ERR_STATE;
    heap_unlock(h);
    return rc;
}

int pyshm_heap_adopt(pyshm_heap_t *h, uint64_t blob, int64_t pid, uint64_t start) {
    int rc = heap_lock(h);
    if (rc) return rc;
    blob_t *b = blob_at(h, blob);
    /* Only the blob that process is building: if it died and a repair freed
     * the block, it may since hold another process's blob. */
    if (b && b->state == BLOB_BUILDING && b->creator_pid == pid && b->creator_start == start) {
        b->creator_pid = h->pid;
        b->creator_start = h->start;
    } else {
        rc = PYSHM_ERR_STATE;
    }
    heap_unlock(h);
    return rc;
}

/* The old version leaves: obsolete, and freed unless someone pins it.
 * give_back: its pages go back to the OS (delete) or stay warm for the
 * next version (replace). */
static int retire(pyshm_heap_t *h, uint64_t off, int give_back) {
    blob_t *old = blob_at(h, off);
    if (!old) return PYSHM_OK;
    old->state = BLOB_OBSOLETE;
    fault_point(h, PYSHM_FAULT_PUBLISH_OLD);
    return old->pins ? PYSHM_OK : blob_drop(h, off, give_back);
}

static int publish_locked(pyshm_heap_t *h, const char *name, size_t len, uint64_t off,
                          uint64_t *version) {
    blob_t *b = blob_at(h, off);
    if (!b || b->state != BLOB_BUILDING) return PYSHM_ERR_STATE;
    dir_entry_t *e = dir_slot_for_insert(h, name, len);
    if (!e) return PYSHM_ERR_DIRFULL;
    b->version = ++h->hdr->next_version;
    b->state = BLOB_ACTIVE;
    *version = b->version;
    if (e->state == DIR_USED) {
        uint64_t old = e->blob;
        e->blob = off; /* the publish point */
        fault_point(h, PYSHM_FAULT_PUBLISH_DIR);
        return retire(h, old, 0);
    }
    e->hash = dir_hash(name, len);
    e->name_len = (uint32_t)len;
    memcpy(e->name, name, len);
    e->blob = off;
    fault_point(h, PYSHM_FAULT_DIR_INSERT);
    e->state = DIR_USED; /* the publish point for a new name */
    h->hdr->n_names++;
    return PYSHM_OK;
}

int pyshm_heap_publish(pyshm_heap_t *h, const char *name, size_t len, uint64_t blob,
                       uint64_t *version) {
    if (len == 0 || len > PYSHM_DIR_NAME_MAX) return PYSHM_ERR_NAME;
    int rc = heap_lock(h);
    if (rc) return rc;
    rc = publish_locked(h, name, len, blob, version);
    heap_unlock(h);
    return rc;
}

/* ---- map / delete -------------------------------------------------------- */

int pyshm_heap_pin(pyshm_heap_t *h, const char *name, size_t len, pyshm_pin_info_t *out) {
    if (h->slot < 0) return PYSHM_ERR_NOSLOT;
    int rc = heap_lock(h);
    if (rc) return rc;
    dir_entry_t *e = dir_find(h, name, len);
    blob_t *b = e ? blob_at(h, e->blob) : NULL;
    if (!e) rc = PYSHM_ERR_NOTFOUND;
    else if (!b) rc = PYSHM_ERR_CORRUPT;
    else rc = readers_pin(h, e->blob);
    if (!rc) fill_info(out, e->blob, b);
    heap_unlock(h);
    return rc;
}

int pyshm_heap_unpin(pyshm_heap_t *h, int64_t slot, uint64_t blob) {
    int rc = heap_lock(h);
    if (rc) return rc;
    rc = readers_unpin(h, slot, blob);
    heap_unlock(h);
    return rc;
}

int pyshm_heap_delete(pyshm_heap_t *h, const char *name, size_t len) {
    int rc = heap_lock(h);
    if (rc) return rc;
    dir_entry_t *e = dir_find(h, name, len);
    if (!e) rc = PYSHM_ERR_NOTFOUND;
    else {
        uint64_t old = e->blob;
        dir_remove(h, e);
        rc = retire(h, old, 1);
    }
    heap_unlock(h);
    return rc;
}

/* The current version of `name`, without pinning it. */
int pyshm_heap_lookup(pyshm_heap_t *h, const char *name, size_t len, uint64_t *version) {
    int rc = heap_lock(h);
    if (rc) return rc;
    dir_entry_t *e = dir_find(h, name, len);
    blob_t *b = e ? blob_at(h, e->blob) : NULL;
    rc = !e ? PYSHM_ERR_NOTFOUND : !b ? PYSHM_ERR_CORRUPT : PYSHM_OK;
    if (!rc) *version = b->version;
    heap_unlock(h);
    return rc;
}

uint64_t pyshm_heap_name_capacity(pyshm_heap_t *h) { return h->hdr->dir_cap; }

/* Returns 1 and fills the outputs when directory entry `index` is in use. */
int pyshm_heap_name_at(pyshm_heap_t *h, uint64_t index, char *name, size_t cap,
                       uint64_t *version, uint64_t *length) {
    if (index >= h->hdr->dir_cap) return 0;
    int rc = heap_lock(h);
    if (rc) return rc;
    dir_entry_t *e = dir_entry(h, index);
    blob_t *b = e->state == DIR_USED ? blob_at(h, e->blob) : NULL;
    int found = b && e->name_len < cap;
    if (found) {
        memcpy(name, e->name, e->name_len);
        name[e->name_len] = '\0';
        *version = b->version;
        *length = b->length;
    }
    heap_unlock(h);
    return found;
}

/* ---- stats, reclaim, trim, check ------------------------------------------ */

int pyshm_heap_stats(pyshm_heap_t *h, pyshm_heap_stats_t *s) {
    int rc = heap_lock(h);
    if (rc) return rc;
    memset(s, 0, sizeof *s);
    heap_hdr_t *hdr = h->hdr;
    s->size = h->seg.size;
    s->arena_bytes = hdr->arena_end - hdr->arena_off;
    s->used_bytes = hdr->used_bytes;
    s->largest_free = arena_largest_free(h);
    s->n_names = hdr->n_names;
    s->reader_capacity = hdr->n_readers;
    s->name_capacity = hdr->dir_cap;
    s->n_repairs = hdr->n_repairs;
    s->n_readers = readers_count(h, 1);
    blob_census(h, s);
    heap_unlock(h);
    return PYSHM_OK;
}

int pyshm_heap_reclaim(pyshm_heap_t *h, pyshm_reclaim_t *out) {
    int rc = heap_lock(h);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    out->readers = readers_count(h, 0);
    rc = heap_repair(h, &out->blobs);
    heap_unlock(h);
    return rc;
}

int pyshm_heap_trim(pyshm_heap_t *h) {
    int rc = heap_lock(h);
    if (rc) return rc;
    arena_trim(h);
    heap_unlock(h);
    return PYSHM_OK;
}

int pyshm_heap_check(pyshm_heap_t *h, char *msg, size_t cap) {
    int rc = heap_lock(h);
    if (rc) return rc;
    rc = heap_check(h, msg, cap);
    heap_unlock(h);
    return rc;
}
