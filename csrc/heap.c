/* Shared closure heap operations.  Every public function takes the robust
 * lock; if its previous owner died, heap_repair() rebuilds all derived state
 * before the operation goes on. */
#include "heap_layout.h"
#include "proc.h"
#include "pyshm_errors.h"
#include "robust_lock.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void heap_fault(pyshm_heap_t *h, int p) {
    if (h->fault == p) kill(getpid(), SIGKILL);
}

void pyshm_heap_set_fault(pyshm_heap_t *h, int point) { h->fault = point; }
void pyshm_heap_fault_now(pyshm_heap_t *h, int point) { heap_fault(h, point); }

blob_t *heap_blob(pyshm_heap_t *h, uint64_t off) {
    block_t *b = arena_block(h, off);
    if (!b || !(b->size & BLOCK_USED) || BLOCK_SIZE(b) < sizeof(block_t) + sizeof(blob_t))
        return NULL;
    blob_t *blob = (blob_t *)(b + 1);
    if (blob->magic != PYSHM_BLOB_MAGIC) return NULL;
    if (blob->length > BLOCK_SIZE(b) - sizeof(block_t) - sizeof(blob_t)) return NULL;
    return blob;
}

/* Frees a blob's block; give_back returns its pages to the OS. */
int heap_blob_drop(pyshm_heap_t *h, uint64_t off, int give_back) {
    blob_t *b = heap_blob(h, off);
    if (!b) return PYSHM_ERR_CORRUPT;
    b->magic = 0;
    return arena_free(h, off, give_back);
}

/* ---- repair ------------------------------------------------------------ */

static int blob_seen(pyshm_heap_t *h, uint64_t off) {
    blob_t *b = heap_blob(h, off);
    return b && b->mark == h->hdr->repair_epoch;
}

/* Pass 1: marks every blob that starts a used block; referenced blobs are
 * re-marked ACTIVE by the directory pass, so ACTIVE ones go OBSOLETE here. */
static int repair_mark_blobs(pyshm_heap_t *h) {
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) return PYSHM_ERR_CORRUPT;
        blob_t *blob = heap_blob(h, off);
        if (blob) {
            blob->mark = h->hdr->repair_epoch;
            blob->pins = 0;
            if (blob->state == BLOB_ACTIVE) blob->state = BLOB_OBSOLETE;
        }
        off += BLOCK_SIZE(b);
    }
    return PYSHM_OK;
}

static void repair_directory(pyshm_heap_t *h) {
    h->hdr->n_names = 0;
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, i);
        if (e->state != DIR_USED) continue;
        if (!blob_seen(h, e->blob) || e->name_len > PYSHM_DIR_NAME_MAX) {
            e->state = DIR_TOMB;
            continue;
        }
        heap_blob(h, e->blob)->state = BLOB_ACTIVE;
        h->hdr->n_names++;
    }
}

static void repair_readers(pyshm_heap_t *h) {
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        if (!r->pid) continue;
        int alive = pyshm_proc_alive(r->pid, r->start);
        for (uint64_t k = 0; k < r->hiwater; k++) {
            pin_t *p = &r->pins[k];
            if (!p->count) continue;
            if (alive && blob_seen(h, p->blob)) heap_blob(h, p->blob)->pins += p->count;
            else p->count = 0;
        }
        if (!alive) { r->hiwater = 0; r->pid = 0; }
    }
}

/* Pass 4: unmarks (frees) what nobody can reach: obsolete and unpinned,
 * building by a dead process, or a used block that never got its header. */
static uint64_t repair_free_unreachable(pyshm_heap_t *h) {
    uint64_t freed = 0;
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        uint64_t size = BLOCK_SIZE(b);
        if (b->size & BLOCK_USED) {
            blob_t *blob = heap_blob(h, off);
            int drop = !blob
                || (blob->state == BLOB_OBSOLETE && !blob->pins)
                || (blob->state == BLOB_BUILDING
                    && !pyshm_proc_alive(blob->creator_pid, blob->creator_start))
                || (blob->state != BLOB_ACTIVE && blob->state != BLOB_OBSOLETE
                    && blob->state != BLOB_BUILDING);
            if (drop) {
                if (blob) blob->magic = 0;
                b->size = size; /* free: one store; rebuild merges */
                arena_release_pages(h, off, size);
                freed++;
            }
        }
        off += size;
    }
    return freed;
}

/* Rebuilds all derived state from the block chain, the directory and the
 * reader table.  Called with the lock held. */
static int heap_repair(pyshm_heap_t *h, uint64_t *freed) {
    h->hdr->repair_epoch++;
    int rc = repair_mark_blobs(h);
    if (rc) return rc;
    repair_directory(h);
    repair_readers(h);
    uint64_t n = repair_free_unreachable(h);
    if (freed) *freed = n;
    return arena_rebuild(h);
}

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
        heap_fault(h, PYSHM_FAULT_ALLOC_USED);
        blob_t *b = (blob_t *)(h->seg.rw + off + sizeof(block_t));
        b->state = BLOB_BUILDING;
        b->version = 0;
        b->length = length;
        b->pins = 0;
        b->creator_pid = h->pid;
        b->creator_start = h->start;
        b->mark = 0;
        b->magic = PYSHM_BLOB_MAGIC; /* last: now it is a blob */
        fill_info(out, off, b);
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
    blob_t *b = heap_blob(h, blob);
    rc = (b && b->state == BLOB_BUILDING) ? heap_blob_drop(h, blob, 0) : PYSHM_ERR_STATE;
    heap_unlock(h);
    return rc;
}

int pyshm_heap_adopt(pyshm_heap_t *h, uint64_t blob, int64_t pid, uint64_t start) {
    int rc = heap_lock(h);
    if (rc) return rc;
    blob_t *b = heap_blob(h, blob);
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
    blob_t *old = heap_blob(h, off);
    if (!old) return PYSHM_OK;
    old->state = BLOB_OBSOLETE;
    heap_fault(h, PYSHM_FAULT_PUBLISH_OLD);
    return old->pins ? PYSHM_OK : heap_blob_drop(h, off, give_back);
}

static int publish_locked(pyshm_heap_t *h, const char *name, size_t len, uint64_t off,
                          uint64_t *version) {
    blob_t *b = heap_blob(h, off);
    if (!b || b->state != BLOB_BUILDING) return PYSHM_ERR_STATE;
    dir_entry_t *e = dir_slot_for_insert(h, name, len);
    if (!e) return PYSHM_ERR_DIRFULL;
    b->version = ++h->hdr->next_version;
    b->state = BLOB_ACTIVE;
    *version = b->version;
    if (e->state == DIR_USED) {
        uint64_t old = e->blob;
        e->blob = off; /* the publish point */
        heap_fault(h, PYSHM_FAULT_PUBLISH_DIR);
        return retire(h, old, 0);
    }
    e->hash = dir_hash(name, len);
    e->name_len = (uint32_t)len;
    memcpy(e->name, name, len);
    e->blob = off;
    heap_fault(h, PYSHM_FAULT_DIR_INSERT);
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
    blob_t *b = e ? heap_blob(h, e->blob) : NULL;
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
    blob_t *b = e ? heap_blob(h, e->blob) : NULL;
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
    blob_t *b = e->state == DIR_USED ? heap_blob(h, e->blob) : NULL;
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

/* ---- stats, reclaim, check ------------------------------------------------ */

static void count_blobs(pyshm_heap_t *h, pyshm_heap_stats_t *s) {
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) return;
        blob_t *blob = heap_blob(h, off);
        if (blob) {
            s->n_active += blob->state == BLOB_ACTIVE;
            s->n_obsolete += blob->state == BLOB_OBSOLETE;
            s->n_building += blob->state == BLOB_BUILDING;
            s->n_pinned += blob->pins > 0;
        }
        off += BLOCK_SIZE(b);
    }
}

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
    for (uint64_t i = 0; i < hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        s->n_readers += r->pid && pyshm_proc_alive(r->pid, r->start);
    }
    count_blobs(h, s);
    heap_unlock(h);
    return PYSHM_OK;
}

int pyshm_heap_reclaim(pyshm_heap_t *h, pyshm_reclaim_t *out) {
    int rc = heap_lock(h);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        out->readers += r->pid && !pyshm_proc_alive(r->pid, r->start);
    }
    rc = heap_repair(h, &out->blobs);
    heap_unlock(h);
    return rc;
}

#define FAIL(...) do { snprintf(msg, cap, __VA_ARGS__); return PYSHM_ERR_CORRUPT; } while (0)

/* Verifies the chain: tiling, prev sizes, no two free neighbours, used bytes. */
static int check_chain(pyshm_heap_t *h, char *msg, size_t cap, uint64_t *n_free) {
    uint64_t used = 0, prev = 0, prev_free = 0;
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) FAIL("bad block at offset %llu", (unsigned long long)off);
        uint64_t size = BLOCK_SIZE(b);
        int is_free = !(b->size & BLOCK_USED);
        if (b->prev != prev) FAIL("block %llu: prev %llu != %llu", (unsigned long long)off,
                                  (unsigned long long)b->prev, (unsigned long long)prev);
        if (is_free && prev_free) FAIL("adjacent free blocks at %llu", (unsigned long long)off);
        if (!is_free && !heap_blob(h, off)) FAIL("used block %llu has no blob", (unsigned long long)off);
        used += is_free ? 0 : size;
        *n_free += is_free;
        prev = size;
        prev_free = is_free;
        off += size;
    }
    if (used != h->hdr->used_bytes)
        FAIL("used_bytes %llu != %llu counted", (unsigned long long)h->hdr->used_bytes,
             (unsigned long long)used);
    return PYSHM_OK;
}

static int check_lists(pyshm_heap_t *h, char *msg, size_t cap, uint64_t n_free) {
    uint64_t listed = 0;
    for (int bin = 0; bin < PYSHM_NBINS; bin++) {
        uint64_t back = 0;
        for (uint64_t off = h->hdr->bins[bin]; off; off = ((free_links_t *)(h->seg.rw + off + 16))->next) {
            block_t *b = arena_block(h, off);
            if (!b || (b->size & BLOCK_USED)) FAIL("free list %d holds a used block", bin);
            free_links_t *l = (free_links_t *)(h->seg.rw + off + 16);
            if (l->prev != back) FAIL("free list %d: broken back link", bin);
            if (63 - __builtin_clzll(BLOCK_SIZE(b)) != bin) FAIL("block in wrong bin %d", bin);
            if (++listed > n_free) FAIL("free list %d loops", bin);
            back = off;
        }
    }
    if (listed != n_free) FAIL("%llu free blocks, %llu listed", (unsigned long long)n_free,
                               (unsigned long long)listed);
    return PYSHM_OK;
}

/* Directory entries point at active blobs; every blob's pins match the
 * reader table; no obsolete blob is left unpinned. */
static int check_refs(pyshm_heap_t *h, char *msg, size_t cap) {
    uint64_t names = 0;
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, i);
        if (e->state != DIR_USED) continue;
        blob_t *b = heap_blob(h, e->blob);
        if (!b || b->state != BLOB_ACTIVE) FAIL("name %.*s: current version not active", (int)e->name_len, e->name);
        names++;
    }
    if (names != h->hdr->n_names) FAIL("n_names %llu != %llu", (unsigned long long)h->hdr->n_names, (unsigned long long)names);
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end; off += BLOCK_SIZE(arena_block(h, off))) {
        blob_t *b = heap_blob(h, off);
        if (!b) continue;
        uint64_t pins = 0;
        for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
            reader_t *r = reader_slot(h, (int64_t)i);
            for (uint64_t k = 0; r->pid && k < r->hiwater; k++)
                pins += r->pins[k].count && r->pins[k].blob == off ? r->pins[k].count : 0;
        }
        if (pins != b->pins) FAIL("blob %llu: pins %llu != %llu in reader table", (unsigned long long)off,
                                  (unsigned long long)b->pins, (unsigned long long)pins);
        if (b->state == BLOB_OBSOLETE && !pins) FAIL("blob %llu obsolete and unpinned", (unsigned long long)off);
    }
    return PYSHM_OK;
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
    uint64_t n_free = 0;
    msg[0] = '\0';
    rc = check_chain(h, msg, cap, &n_free);
    if (!rc) rc = check_lists(h, msg, cap, n_free);
    if (!rc) rc = check_refs(h, msg, cap);
    heap_unlock(h);
    return rc;
}
