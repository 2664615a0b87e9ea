/* The consistency checker behind pyshm_heap_check (tests, `pyshm check`).
 *
 * Owns: no structure; it only reads, and changes nothing in the segment.
 * Calls: arena.c (arena_block, arena_links), blob.c (blob_at),
 *   directory.c (dir_entry), readers.c (reader_slot).
 * Lock: runs with the heap lock held (heap.c, pyshm_heap_check), so the
 *   derived state it compares must match the primary data exactly.
 *
 * Every offset it follows (block sizes, list links, directory and pin
 * blobs) goes through arena_block/arena_links/blob_at, which check it
 * against the arena, inside the segment; a bad one is reported, never
 * dereferenced. */
#include "heap_layout.h"
#include "pyshm_errors.h"

#include <stdio.h>

typedef unsigned long long ull;

#define FAIL(...) do { snprintf(msg, cap, __VA_ARGS__); return PYSHM_ERR_CORRUPT; } while (0)

/* Verifies the chain: tiling, prev sizes, no two free neighbours, used
 * blocks hold blobs, used_bytes.  Counts the free blocks into *n_free. */
static int check_chain(pyshm_heap_t *h, char *msg, size_t cap, uint64_t *n_free) {
    uint64_t used = 0, prev = 0, prev_free = 0;
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) FAIL("bad block at offset %llu", (ull)off);
        uint64_t size = BLOCK_SIZE(b);
        int is_free = !(b->size & BLOCK_USED);
        if (b->prev != prev) FAIL("block %llu: prev %llu != %llu", (ull)off, (ull)b->prev, (ull)prev);
        if (is_free && prev_free) FAIL("adjacent free blocks at %llu", (ull)off);
        if (!is_free && !blob_at(h, off)) FAIL("used block %llu has no blob", (ull)off);
        used += is_free ? 0 : size;
        *n_free += is_free;
        prev = size;
        prev_free = is_free;
        off += size;
    }
    if (used != h->hdr->used_bytes)
        FAIL("used_bytes %llu != %llu counted", (ull)h->hdr->used_bytes, (ull)used);
    return PYSHM_OK;
}

/* Verifies one free list: free blocks of the right size class, back links
 * that match, and no loop (more entries than free blocks). */
static int check_list(pyshm_heap_t *h, char *msg, size_t cap, int bin, uint64_t n_free,
                      uint64_t *listed) {
    uint64_t back = 0;
    for (uint64_t off = h->hdr->bins[bin]; off;) {
        block_t *b = arena_block(h, off);
        free_links_t *l = arena_links(h, off);
        if (!b || !l || (b->size & BLOCK_USED)) FAIL("free list %d holds a used block", bin);
        if (l->prev != back) FAIL("free list %d: broken back link", bin);
        if (63 - __builtin_clzll(BLOCK_SIZE(b)) != bin) FAIL("block in wrong bin %d", bin);
        if (++*listed > n_free) FAIL("free list %d loops", bin);
        back = off;
        off = l->next;
    }
    return PYSHM_OK;
}

/* Every free block of the chain is on exactly one list. */
static int check_lists(pyshm_heap_t *h, char *msg, size_t cap, uint64_t n_free) {
    uint64_t listed = 0;
    for (int bin = 0; bin < PYSHM_NBINS; bin++) {
        int rc = check_list(h, msg, cap, bin, n_free, &listed);
        if (rc) return rc;
    }
    if (listed != n_free) FAIL("%llu free blocks, %llu listed", (ull)n_free, (ull)listed);
    return PYSHM_OK;
}

/* Directory entries point at active blobs, and n_names counts them. */
static int check_names(pyshm_heap_t *h, char *msg, size_t cap) {
    uint64_t names = 0;
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, i);
        if (e->state != DIR_USED) continue;
        blob_t *b = blob_at(h, e->blob);
        /* name_len is clamped: the entry itself is under suspicion. */
        int len = e->name_len <= PYSHM_DIR_NAME_MAX ? (int)e->name_len : PYSHM_DIR_NAME_MAX;
        if (!b || b->state != BLOB_ACTIVE) FAIL("name %.*s: current version not active", len, e->name);
        names++;
    }
    if (names != h->hdr->n_names) FAIL("n_names %llu != %llu", (ull)h->hdr->n_names, (ull)names);
    return PYSHM_OK;
}

/* The pins on the blob at off, counted in the live slots of the reader table. */
static uint64_t pins_of(pyshm_heap_t *h, uint64_t off) {
    uint64_t pins = 0;
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        for (uint64_t k = 0; r->pid && k < r->hiwater; k++) /* hiwater bounded by reader_slot */
            pins += r->pins[k].count && r->pins[k].blob == off ? r->pins[k].count : 0;
    }
    return pins;
}

/* Every blob's pins match the reader table; no obsolete blob is left
 * unpinned (it would be unreachable and never freed). */
static int check_pins(pyshm_heap_t *h, char *msg, size_t cap) {
    uint64_t next;
    for (uint64_t off = h->hdr->arena_off; off < h->hdr->arena_end; off = next) {
        block_t *blk = arena_block(h, off);
        if (!blk) FAIL("bad block at offset %llu", (ull)off); /* check_chain passed: cannot happen */
        next = off + BLOCK_SIZE(blk);
        blob_t *b = blob_at(h, off);
        if (!b) continue;
        uint64_t pins = pins_of(h, off);
        if (pins != b->pins) FAIL("blob %llu: pins %llu != %llu in reader table", (ull)off,
                                  (ull)b->pins, (ull)pins);
        if (b->state == BLOB_OBSOLETE && !pins) FAIL("blob %llu obsolete and unpinned", (ull)off);
    }
    return PYSHM_OK;
}

int heap_check(pyshm_heap_t *h, char *msg, size_t cap) {
    uint64_t n_free = 0;
    msg[0] = '\0';
    int rc = check_chain(h, msg, cap, &n_free);
    if (!rc) rc = check_lists(h, msg, cap, n_free);
    if (!rc) rc = check_names(h, msg, cap);
    if (!rc) rc = check_pins(h, msg, cap);
    return rc;
}
