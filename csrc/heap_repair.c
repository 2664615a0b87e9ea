/* Repair: rebuilds all derived state of a heap whose lock owner died, or
 * whose memory a failed alloc wants back from dead processes.
 *
 * Owns: no structure of its own; the repair epoch (hdr->repair_epoch) and
 *   the four passes that recompute blob states and pins, n_names, the
 *   reader table's dead slots, and (through arena_rebuild) the free lists.
 * Calls: proc.c (pyshm_proc_alive), arena.c, blob.c, directory.c, readers.c.
 * Lock: runs with the heap lock held (heap.c calls it from heap_lock, from
 *   pyshm_heap_alloc and from pyshm_heap_reclaim).
 *
 * Only primary data is trusted: the block chain, the directory's
 * (state, blob) and the reader table's (pid, start, pins).  Every offset
 * read from them goes through arena_block/blob_at, which check it against
 * the arena (inside the segment). */
#include "heap_layout.h"
#include "proc.h"
#include "pyshm_errors.h"

/* 1 when off is a blob that the current repair's pass 1 marked. */
static int blob_seen(pyshm_heap_t *h, uint64_t off) {
    blob_t *b = blob_at(h, off);
    return b && b->mark == h->hdr->repair_epoch;
}

/* Pass 1: marks every blob that starts a used block; referenced blobs are
 * re-marked ACTIVE by the directory pass, so ACTIVE ones go OBSOLETE here.
 * Fails when the chain itself is broken, before anything is changed on the
 * strength of it. */
static int repair_mark_blobs(pyshm_heap_t *h) {
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) return PYSHM_ERR_CORRUPT;
        blob_t *blob = blob_at(h, off);
        if (blob) {
            blob->mark = h->hdr->repair_epoch;
            blob->pins = 0;
            if (blob->state == BLOB_ACTIVE) blob->state = BLOB_OBSOLETE;
        }
        off += BLOCK_SIZE(b);
    }
    return PYSHM_OK;
}

/* Pass 2: every used name whose blob pass 1 saw makes that blob ACTIVE;
 * the others become tombstones.  Recounts n_names. */
static void repair_directory(pyshm_heap_t *h) {
    h->hdr->n_names = 0;
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, i);
        if (e->state != DIR_USED) continue;
        if (!blob_seen(h, e->blob) || e->name_len > PYSHM_DIR_NAME_MAX) {
            e->state = DIR_TOMB;
            continue;
        }
        blob_at(h, e->blob)->state = BLOB_ACTIVE;
        h->hdr->n_names++;
    }
}

/* Pass 3: recounts each blob's pins from the live slots; a dead process's
 * slot is emptied and freed. */
static void repair_readers(pyshm_heap_t *h) {
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        if (!r->pid) continue;
        int alive = pyshm_proc_alive(r->pid, r->start);
        for (uint64_t k = 0; k < r->hiwater; k++) { /* hiwater bounded by reader_slot */
            pin_t *p = &r->pins[k];
            if (!p->count) continue;
            if (alive && blob_seen(h, p->blob)) blob_at(h, p->blob)->pins += p->count;
            else p->count = 0;
        }
        if (!alive) { r->hiwater = 0; r->pid = 0; }
    }
}

/* 1 when nobody can reach the used block's blob (NULL: no header yet):
 * obsolete and unpinned, building by a dead process, or in no known state. */
static int unreachable(const blob_t *blob) {
    return !blob
        || (blob->state == BLOB_OBSOLETE && !blob->pins)
        || (blob->state == BLOB_BUILDING
            && !pyshm_proc_alive(blob->creator_pid, blob->creator_start))
        || (blob->state != BLOB_ACTIVE && blob->state != BLOB_OBSOLETE
            && blob->state != BLOB_BUILDING);
}

/* Pass 4: unmarks (frees) every unreachable used block, one store each;
 * arena_rebuild then merges the free runs and relinks the lists. */
static uint64_t repair_free_unreachable(pyshm_heap_t *h) {
    uint64_t freed = 0;
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) break; /* pass 1 walked this chain; arena_rebuild reports it */
        uint64_t size = BLOCK_SIZE(b);
        blob_t *blob = (b->size & BLOCK_USED) ? blob_at(h, off) : NULL;
        if ((b->size & BLOCK_USED) && unreachable(blob)) {
            if (blob) blob->magic = 0;
            b->size = size; /* free: one store; rebuild merges */
            arena_release_pages(h, off, size);
            freed++;
        }
        off += size;
    }
    return freed;
}

/* Rebuilds all derived state from the block chain, the directory and the
 * reader table. */
int heap_repair(pyshm_heap_t *h, uint64_t *freed) {
    h->hdr->repair_epoch++;
    int rc = repair_mark_blobs(h);
    if (rc) return rc;
    repair_directory(h);
    repair_readers(h);
    uint64_t n = repair_free_unreachable(h);
    if (freed) *freed = n;
    return arena_rebuild(h);
}
