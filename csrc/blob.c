/* Blob headers: one version of a closure, at the start of a used block.
 *
 * Owns: blob_t (magic, state, version, length, pins, creator, mark).
 * Calls: arena.c (arena_block, arena_free) only.
 * Lock: every function runs with the heap lock held (heap.c, heap_lock).
 *
 * Invariant: a used block holds a blob exactly when its magic is
 * PYSHM_BLOB_MAGIC, written last by blob_init and cleared first by
 * blob_drop, so a crash between leaves a used block without a blob, which
 * heap_repair frees. */
#include "heap_layout.h"
#include "pyshm_errors.h"

/* The blob of the used block at off, or NULL.  off comes from the segment
 * (directory, pins, callers): arena_block checks it against the arena,
 * which lies inside the segment (layout_valid at attach); the length is
 * checked against the block. */
blob_t *blob_at(pyshm_heap_t *h, uint64_t off) {
    block_t *b = arena_block(h, off);
    if (!b || !(b->size & BLOCK_USED) || BLOCK_SIZE(b) < sizeof(block_t) + sizeof(blob_t))
        return NULL;
    blob_t *blob = (blob_t *)(b + 1);
    if (blob->magic != PYSHM_BLOB_MAGIC) return NULL;
    if (blob->length > BLOCK_SIZE(b) - sizeof(block_t) - sizeof(blob_t)) return NULL;
    return blob;
}

/* Makes the block that arena_alloc just returned at off a BUILDING blob of
 * this process and returns it; off was checked by arena_alloc, which also
 * sized the block for length. */
blob_t *blob_init(pyshm_heap_t *h, uint64_t off, uint64_t length) {
    blob_t *b = (blob_t *)(h->seg.rw + off + sizeof(block_t));
    b->state = BLOB_BUILDING;
    b->version = 0;
    b->length = length;
    b->pins = 0;
    b->creator_pid = h->pid;
    b->creator_start = h->start;
    b->mark = 0;
    b->magic = PYSHM_BLOB_MAGIC; /* last: now it is a blob */
    return b;
}

/* Frees a blob's block; give_back returns its pages to the OS. */
int blob_drop(pyshm_heap_t *h, uint64_t off, int give_back) {
    blob_t *b = blob_at(h, off);
    if (!b) return PYSHM_ERR_CORRUPT;
    b->magic = 0; /* first: from here on the block holds no blob */
    return arena_free(h, off, give_back);
}

/* Counts the blobs of the arena by state, and the pinned ones. */
void blob_census(pyshm_heap_t *h, pyshm_heap_stats_t *s) {
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) return; /* broken chain: count what came before */
        blob_t *blob = blob_at(h, off);
        if (blob) {
            s->n_active += blob->state == BLOB_ACTIVE;
            s->n_obsolete += blob->state == BLOB_OBSOLETE;
            s->n_building += blob->state == BLOB_BUILDING;
            s->n_pinned += blob->pins > 0;
        }
        off += BLOCK_SIZE(b);
    }
}
